"""deploy/docker/Dockerfile.worker: CPU-only, non-root, checked at build time (no Docker engine here:
the file is parsed, not built; see docs/deployment.md for the build)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mkg_pipeline_tests.deploy.helpers import DEPLOY, REPO, dockerfile_instructions, dockerfile_stages

pytestmark = pytest.mark.deploy

DOCKERFILE = DEPLOY / "docker" / "Dockerfile.worker"
CHECKER = DEPLOY / "docker" / "check_image_deps.py"


@pytest.fixture(scope="module")
def stages() -> list[dict]:
    return dockerfile_stages(DOCKERFILE.read_text())


def _load_checker():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("check_image_deps", CHECKER)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stages_and_base_images(stages: list[dict]) -> None:
    names = [s["name"] for s in stages]
    assert names[-1] == "worker", "the worker image must be the default (last) target"
    assert "webserver" in names
    external = [s["base"] for s in stages if s["base"] not in names]
    assert external and all(b.startswith("python:3.11-slim") for b in external), external


def test_runtime_images_run_as_non_root(stages: list[dict]) -> None:
    for stage in stages:
        if stage["name"] not in {"worker", "webserver"}:
            continue
        users = [args for keyword, args in stage["instructions"] if keyword == "USER"]
        assert users, f"stage {stage['name']} sets no USER"
        uid = users[-1].split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"stage {stage['name']}: USER {users[-1]}"


def test_build_fails_on_gpu_stack_and_broken_deps(stages: list[dict]) -> None:
    build = next(s for s in stages if s["name"] == "build")
    runs = " && ".join(args for keyword, args in build["instructions"] if keyword == "RUN")
    assert "pip install ." in runs
    assert "pip check" in runs
    assert "check_image_deps.py" in runs
    assert "torch" not in runs and "--extra-index-url" not in runs


def test_worker_entrypoint_cmd_and_healthcheck(stages: list[dict]) -> None:
    worker = stages[-1]
    instructions = dict(worker["instructions"])
    cmd = json.loads(instructions["CMD"])
    assert cmd[:3] == ["dagster", "api", "grpc"] and "mkg_pipeline.orchestration.definitions" in cmd and "4000" in cmd
    health = instructions["HEALTHCHECK"]
    assert "mkg-healthcheck" in health
    # K8sRunLauncher sets only `args`: whatever ENTRYPOINT the image has must exec them unchanged.
    entrypoint = [args for keyword, args in dockerfile_instructions(DOCKERFILE.read_text()) if keyword == "ENTRYPOINT"]
    assert entrypoint and json.loads(entrypoint[-1]) == ["/usr/bin/tini", "--"]
    runs = [args for keyword, args in worker["instructions"] if keyword == "RUN"]
    assert any("mkg-healthcheck --import-definitions" in r for r in runs), "smoke-test the image at build time"
    assert "<<" not in DOCKERFILE.read_text(), "heredocs need BuildKit's dockerfile:1.4 frontend; keep them out"


def test_console_script_exists() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["mkg-healthcheck"] == "mkg_pipeline.healthcheck:main"


def test_dockerignore_is_an_allow_list() -> None:
    lines = [
        ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied = set()
    for keyword, args in dockerfile_instructions(DOCKERFILE.read_text()):
        if keyword == "COPY" and "--from" not in args:
            sources = shlex.split(args)[:-1]
            copied |= {s.rstrip("/") for s in sources}
    for source in copied:
        assert any(source == a or source.startswith(a + "/") for a in allowed), (
            f"{source} is not in .dockerignore's allow-list"
        )
        assert (REPO / source).exists(), f"COPY {source}: no such path"


@pytest.mark.parametrize(
    ("names", "forbidden"),
    [
        (["httpx", "dagster", "PyMuPDF"], []),
        (["torch", "httpx"], ["torch"]),
        (["nvidia-cublas-cu12", "nvidia_cudnn_cu12"], ["nvidia-cublas-cu12", "nvidia-cudnn-cu12"]),
        (["Triton", "onnxruntime-gpu", "vllm"], ["onnxruntime-gpu", "triton", "vllm"]),
        (["onnxruntime"], []),
    ],
)
def test_check_image_deps_classifies(names: list[str], forbidden: list[str]) -> None:
    checker = _load_checker()
    got, reported = checker.classify(names)
    assert got == sorted(forbidden)
    if names == ["onnxruntime"]:
        assert reported == ["onnxruntime"]


def test_check_image_deps_names_who_required_a_package() -> None:
    """The error message's "required by" lookup works on a real environment (this venv)."""
    checker = _load_checker()
    assert "mkg-pipeline" in checker._required_by("httpx")
    assert checker.normalise("Nvidia_CUDNN.cu12") == "nvidia-cudnn-cu12"


# --------------------------------------------------------------------------- the dev stack stays out of the image


def _install(site: Path, name: str, files: dict[str, str]) -> None:
    """A distribution as pip lays it out in site-packages: the files, and a dist-info whose RECORD lists them."""
    for path, text in files.items():
        (site / path).parent.mkdir(parents=True, exist_ok=True)
        (site / path).write_text(text)
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    record = [*files, f"{info.name}/METADATA", f"{info.name}/RECORD"]
    (info / "RECORD").write_text("".join(f"{path},,\n" for path in record))


def _check(site: Path | None) -> subprocess.CompletedProcess[str]:
    """The checker in a fresh interpreter that sees only the standard library and ``site`` (``-S``: no
    site-packages), as the image's venv would show it; without ``site``, in this test's own environment."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    argv = [sys.executable, str(CHECKER)]
    if site is not None:
        env["PYTHONPATH"] = str(site)
        argv.insert(1, "-S")
    else:
        env["PYTHONPATH"] = str(REPO)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_check_image_deps_passes_the_product_alone(tmp_path: Path) -> None:
    _install(tmp_path, "mkg-pipeline", {"mkg_pipeline/__init__.py": "", "mkg_pipeline/config.py": ""})
    result = _check(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no dev stack" in result.stdout


def test_check_image_deps_fails_when_the_dev_package_is_importable(tmp_path: Path) -> None:
    _install(tmp_path, "mkg-pipeline", {"mkg_pipeline/__init__.py": "", "mkg_devstack/__init__.py": ""})
    result = _check(tmp_path)
    assert result.returncode == 1
    assert f"mkg_devstack is importable ({tmp_path / 'mkg_devstack' / '__init__.py'})" in result.stderr
    assert "mkg-pipeline installed 1 file(s) under mkg_devstack/" in result.stderr


def test_check_image_deps_fails_on_dev_stack_files_even_if_not_importable(tmp_path: Path) -> None:
    """A wheel that carried the dev stack is caught by its RECORD, whatever later removed the package."""
    _install(tmp_path, "mkg-pipeline", {"mkg_pipeline/__init__.py": "", "mkg_devstack/demo.py": ""})
    (tmp_path / "mkg_devstack" / "demo.py").unlink()
    (tmp_path / "mkg_devstack").rmdir()
    result = _check(tmp_path)
    assert result.returncode == 1
    assert "importable" not in result.stderr
    assert "mkg-pipeline installed 1 file(s) under mkg_devstack/" in result.stderr


def test_check_image_deps_fails_on_the_ocr_wheel(tmp_path: Path) -> None:
    _install(tmp_path, "mkg-pipeline", {"mkg_pipeline/__init__.py": ""})
    _install(tmp_path, "rapidocr-onnxruntime", {"rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx": "x"})
    result = _check(tmp_path)
    assert result.returncode == 1
    assert "error: rapidocr-onnxruntime must not be in the CPU worker image" in result.stderr


def test_check_image_deps_fails_in_the_dev_environment() -> None:
    """The environment the tests run in has the dev stack (``make install`` installs ``.[dev]``): the check names it."""
    result = _check(None)
    assert result.returncode == 1
    assert "the dev stack must not be in the image: mkg_devstack is importable" in result.stderr
    assert "error: rapidocr-onnxruntime must not be in the CPU worker image" in result.stderr


def test_image_installs_neither_the_dev_package_nor_the_local_server_extra() -> None:
    """The image's ``pip install`` lines see no mkg_devstack/ and ask for no extra that pulls the OCR wheel;
    ``make install`` does (``.[dev]`` includes ``local-server``)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0].lower() for r in requirements}

    assert not names(project["dependencies"]) & {"rapidocr-onnxruntime", "fastapi", "uvicorn"}
    assert "rapidocr-onnxruntime" in names(extras["local-server"])
    assert any("local-server" in r for r in extras["dev"])
    assert '-e ".[dev]"' in (REPO / "Makefile").read_text()

    text = DOCKERFILE.read_text()
    installs = re.findall(r"pip install ([^&\n]+)", text)
    assert installs, "no pip install in the Dockerfile"
    for args in installs:
        for extra in re.findall(r"\.\[([^\]]+)\]", args):
            pulled = set(extra.split(","))
            assert not pulled & {"dev", "local-server"}, f"the image installs the dev stack: pip install {args}"
            for name in pulled:
                assert "rapidocr-onnxruntime" not in names(extras[name]), f"extra [{name}] pulls the OCR wheel"
    copied = {
        s.rstrip("/")
        for keyword, args in dockerfile_instructions(text)
        if keyword == "COPY" and "--from" not in args
        for s in shlex.split(args)[:-1]
    }
    assert not any(s == "mkg_devstack" or s.startswith("mkg_devstack/") or s == "." for s in copied), copied
    allowed = [ln for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.startswith("!")]
    assert not any("mkg_devstack" in ln for ln in allowed), "the build context must not carry mkg_devstack/"
