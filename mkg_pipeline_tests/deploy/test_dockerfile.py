"""deploy/docker/Dockerfile.worker: CPU-only, non-root, checked at build time (no Docker engine here:
the file is parsed, not built; see docs/deployment.md for the build)."""

from __future__ import annotations

import importlib.util
import json
import shlex

import pytest

from mkg_pipeline_tests.deploy.helpers import DEPLOY, REPO, dockerfile_instructions, dockerfile_stages

pytestmark = pytest.mark.deploy

DOCKERFILE = DEPLOY / "docker" / "Dockerfile.worker"


@pytest.fixture(scope="module")
def stages() -> list[dict]:
    return dockerfile_stages(DOCKERFILE.read_text())


def _load_checker():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("check_image_deps", DEPLOY / "docker" / "check_image_deps.py")
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
    import tomllib

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
