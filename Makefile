# The two entry points a fresh machine needs (see README.md):
#   make demo   - install, start moto S3 + the local VLM server, run the pipeline end to end
#   make test   - install (pip + promtool from Debian's prometheus package) and run every test
#   (make test-fast - unit and in-process stage tests only, while editing)
# Both create .venv themselves; nothing has to be installed by hand first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# Three pytest workers (pytest-xdist), a test file each: the e2e tests spend much of their time waiting on
# servers, leases and Dagster subprocesses, so three keep CI's two cores busier than two do (measured on
# two cores: 5:01 against 5:57). Each worker starts its own local VLM server and moto; set TEST_WORKERS=0
# to run in one process.
TEST_WORKERS ?= 3
DEMO_ARGS ?=

.PHONY: install demo test test-fast lint promtool clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip check
	touch $(STAMP)

install: $(STAMP)

# promtool validates deploy/monitoring; Debian's prometheus package ships it.
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
	@promtool --version 2>&1 | head -1

demo: $(STAMP)
	$(PY) -m mkg_devstack.demo $(DEMO_ARGS)

# compileall first: the suite starts a few hundred Python processes (Dagster runs, render workers,
# servers), and where PYTHONDONTWRITEBYTECODE is set each of them would compile the package from source.
test: $(STAMP) promtool lint
	$(PY) -m compileall -q mkg_pipeline mkg_devstack mkg_pipeline_tests >/dev/null
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Unit and in-process stage tests only: no servers, no Dagster instance; under a minute.
test-fast: $(STAMP) lint
	$(PY) -m pytest mkg_pipeline_tests/unit mkg_pipeline_tests/stages $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check --quiet mkg_pipeline mkg_devstack mkg_pipeline_tests benchmarks
	$(VENV)/bin/ruff format --check --quiet mkg_pipeline mkg_devstack mkg_pipeline_tests benchmarks

clean:
	rm -rf $(VENV) .demo .pytest_cache .ruff_cache
