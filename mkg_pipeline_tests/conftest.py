"""Shared fixtures: one fixture module per real component (see fixtures/)."""

import signal
from collections.abc import Iterator

import pytest

pytest_plugins = [
    "mkg_pipeline_tests.fixtures.corpus",
    "mkg_pipeline_tests.fixtures.local_server",
    "mkg_pipeline_tests.fixtures.proxy",
    "mkg_pipeline_tests.fixtures.s3",
]


def pytest_configure(config: pytest.Config) -> None:
    """SIGINT and SIGTERM back to their defaults when this process inherited them ignored.

    A job started in the background of a non-interactive shell (``make test &``, many CI runners)
    starts with SIGINT ignored, and so do pytest-xdist's workers. Dagster's in-process runs then map
    SIGTERM to SIGINT's handler, i.e. ignore SIGTERM too, and every process started after that
    inherits it: the ``tail -F`` that Dagster's compute-log capture starts per step no longer stops
    on Dagster's SIGTERM (each step end then waits 30 s for it, and it outlives the suite), nor do
    moto or a Dagster daemon stopped by a test (10-20 s each before SIGKILL). Found as tests taking
    70 s in the suite that take 11 s alone, the make test wall time 5 to 7.5 min from run to run.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.fixture(autouse=True)
def _settings_from_this_tests_environment() -> Iterator[None]:
    """get_settings() loads once per process; each test gets the settings of its own environment."""
    from mkg_pipeline.config import get_settings

    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(autouse=True)
def _a_cold_process_per_test() -> Iterator[None]:
    """Breakers and limiters live once per server URL per process, like a run pod's. A test worker is one
    process for hundreds of tests, and ports are reused: without this a test could inherit the breaker
    opened, or the limit backed off to its floor, by an earlier test whose server on the same URL was
    killed. (The 70-s tests of the suite were the signal trap above, not this.)"""
    from mkg_pipeline.vllm.breaker import reset_breakers
    from mkg_pipeline.vllm.limiter import reset_limiters

    reset_breakers()
    reset_limiters()
    yield
    reset_breakers()
    reset_limiters()
