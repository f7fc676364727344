"""docs/: the reference covers every configuration field and public client name; links resolve."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest
from pydantic import BaseModel

from mkg_pipeline.config import PipelineConfig
from mkg_pipeline_tests.deploy.helpers import DOCS, REPO

pytestmark = pytest.mark.deploy

REFERENCE = DOCS / "reference.md"
DOC_FILES = ("architecture.md", "deployment.md", "runbook.md", "troubleshooting.md", "reference.md")


def _fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, object]]:
    """(dotted name, env variable, FieldInfo) of every leaf field, walking nested sections."""
    out = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}.{name}" if prefix else name
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out.extend(_fields(annotation, dotted))
        else:
            out.append((dotted, "MKG_" + dotted.replace(".", "__").upper(), field))
    return out


def _row(text: str, dotted: str) -> str | None:
    for line in text.splitlines():
        if line.startswith("|") and f"`{dotted}`" in line.split("|")[1]:
            return line
    return None


def test_reference_lists_every_config_field_with_default_bounds_and_env() -> None:
    text = REFERENCE.read_text()
    fields = _fields(PipelineConfig)
    assert len(fields) > 30
    problems = []
    for dotted, env, field in fields:
        row = _row(text, dotted)
        if row is None:
            problems.append(f"{dotted}: no table row")
            continue
        if f"`{env}`" not in row:
            problems.append(f"{dotted}: environment variable {env} missing")
        default = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[attr-defined]
        if repr(default) not in row:
            problems.append(f"{dotted}: default {default!r} missing")
        for meta in field.metadata:  # type: ignore[attr-defined]
            for attr in ("ge", "gt", "le", "lt", "min_length", "max_length"):
                value = getattr(meta, attr, None)
                if value is not None and str(value) not in row:
                    problems.append(f"{dotted}: bound {attr}={value} missing")
    assert not problems, "docs/reference.md:\n" + "\n".join(problems)


def test_env_variable_scheme_matches_the_loader() -> None:
    """The variables the reference documents are the ones load_config reads."""
    from mkg_pipeline.config import load_config

    config = load_config(environ={"MKG_HTTP_CLIENT__TIMEOUT_S": "123", "MKG_ENGINE": "mineru"})
    assert config.http_client.timeout_s == 123 and config.engine == "mineru"


def test_reference_covers_the_client_api_and_exceptions() -> None:
    import mkg_pipeline.vllm as vllm
    from mkg_pipeline.vllm import errors
    from mkg_pipeline.vllm.breaker import CircuitBreaker, Permit
    from mkg_pipeline.vllm.client import ChatResult, VLLMClient

    text = REFERENCE.read_text()
    missing = [name for name in vllm.__all__ if f"`{name}" not in text]
    missing += [f"VLLMClient.{n}" for n, _ in inspect.getmembers(VLLMClient) if not n.startswith("_") and n not in text]
    missing += [f"ChatResult.{f.name}" for f in dataclasses.fields(ChatResult) if f"`{f.name}`" not in text]
    missing += [
        f"CircuitBreaker.{n}" for n, _ in inspect.getmembers(CircuitBreaker) if not n.startswith("_") and n not in text
    ]
    missing += [f"Permit.{n}" for n, _ in inspect.getmembers(Permit) if not n.startswith("_") and n not in text]
    for _, cls in inspect.getmembers(errors, inspect.isclass):
        if issubclass(cls, Exception):
            row = _row(text, cls.__name__)
            if row is None or f"`{cls.error_type}`" not in row:
                missing.append(f"{cls.__name__} (error_type {cls.error_type})")
    assert not missing, f"docs/reference.md lacks: {missing}"


def test_reference_lists_our_metrics() -> None:
    from mkg_pipeline_tests.deploy.helpers import registry_metric_names

    text = REFERENCE.read_text()
    missing = [n for n in registry_metric_names() if n not in text]
    assert not missing, missing


@pytest.mark.parametrize("name", DOC_FILES)
def test_relative_links_resolve(name: str) -> None:
    text = (DOCS / name).read_text()
    assert len(text) > 1500, f"{name} looks like a stub"
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (DOCS / target).resolve().exists(), f"{name}: broken link {target}"


def test_runbook_covers_drain_restart_resume() -> None:
    text = (DOCS / "runbook.md").read_text().lower()
    for needle in (
        "circuit breaker",
        "page cache",
        "status.json",
        "max_concurrent_runs",
        "incoming_pdfs_sensor",
        "daily_baseline_quality_schedule",
        "queuedruncoordinator",
        "rollout restart",
        "docker compose",
        "re-materializ",
    ):
        assert needle in text, f"runbook.md does not mention {needle}"


def test_deployment_guide_covers_both_paths() -> None:
    text = (DOCS / "deployment.md").read_text()
    for needle in (
        "kubectl apply -k deploy/k8s/overlays/prod",
        "docker compose",
        "device plugin",
        "GPU operator",
        "DCGM",
        "mkg-pipeline-dashboard.json",
    ):
        assert needle in text, f"deployment.md does not mention {needle}"
    assert re.search(r"kubectl (-n \S+ )?create secret generic", text), "deployment.md: how to create the Secrets"
    assert (REPO / "deploy/monitoring/grafana/mkg-pipeline-dashboard.json").is_file()
