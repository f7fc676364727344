"""The Dagster instances (k8s ConfigMap, compose file) against Dagster's own config schemas, and the
run pod exactly as dagster-k8s's K8sRunLauncher would build it from that config."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import kubernetes_validate
import pytest
import yaml

from mkg_pipeline_tests.deploy.helpers import (
    COMPOSE,
    KUBERNETES_VERSION,
    VLLM_CLIENT_LABEL,
    containers,
    effective_run_as,
    find,
    gpu_count,
    instance_yaml,
)

pytestmark = pytest.mark.deploy


def _validated_instance(text: str) -> dict[str, Any]:
    """Dagster's own loader: top-level schema, storage, concurrency; raises on any error."""
    from dagster._core.instance.config import dagster_instance_config

    with tempfile.TemporaryDirectory() as home:
        Path(home, "dagster.yaml").write_text(text)
        config, custom_class = dagster_instance_config(home)
    assert custom_class is None
    return dict(config)


def _check_class_config(section: dict[str, Any]) -> None:
    """A `module/class/config` section against that class's config_type()."""
    import importlib

    from dagster._config import validate_config

    cls = getattr(importlib.import_module(section["module"]), section["class"])
    result = validate_config(cls.config_type(), section.get("config") or {})
    assert result.success, f"{section['module']}.{section['class']}: {[e.message for e in result.errors or []]}"


def _assert_instance(config: dict[str, Any]) -> None:
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    runs = config["concurrency"]["runs"]
    assert runs["max_concurrent_runs"] >= 1
    assert any(limit["key"] == "mkg/golden_set" for limit in runs["tag_concurrency_limits"])
    # one run per batch at a time (issue 9 row 2), and dead runs give their pool slots back (row 3)
    assert {"key": "dagster/partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in runs[
        "tag_concurrency_limits"
    ]
    assert config["run_monitoring"]["enabled"] is True
    assert config["run_monitoring"]["free_slots_after_run_end_seconds"] > 0
    assert config["concurrency"]["pools"]["default_limit"] >= 1
    # runs beyond the vllm pool render the next batches while it is full (issue 18, no idle GPU between batches)
    assert config["concurrency"]["pools"]["default_limit"] < runs["max_concurrent_runs"]
    assert "postgres" in config["storage"]
    for key in ("run_coordinator", "compute_logs", "run_launcher"):
        if key in config:
            _check_class_config(config[key])


def test_k8s_instance_is_valid_dagster_config(overlay: tuple[str, list[dict]]) -> None:
    _, objs = overlay
    text = find(objs, "ConfigMap", "dagster-instance")["data"]["dagster.yaml"]
    config = _validated_instance(text)
    _assert_instance(config)
    assert config["run_launcher"]["class"] == "K8sRunLauncher"


def test_compose_instance_is_valid_dagster_config() -> None:
    config = _validated_instance((COMPOSE / "dagster.yaml").read_text())
    _assert_instance(config)
    # DefaultRunLauncher: no run-worker health check, so a run nobody could mark failed needs a time limit
    assert config["run_monitoring"]["max_runtime_seconds"] > 0


def test_local_instance_checks_its_home_and_fails_runs_left_started() -> None:
    """Issue 21 row 9: the local dagster.yaml (make demo, the e2e tests) is Dagster-valid, opens its home only
    once it is known writable, and fails a run left STARTED (DefaultRunLauncher, SQLite in DAGSTER_HOME)."""
    from dagster._core.instance.config import dagster_instance_config

    from mkg_pipeline.orchestration.instance import CheckedInstance

    repo = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory() as home:
        Path(home, "dagster.yaml").write_text((repo / "dagster.yaml").read_text())
        config, custom_class = dagster_instance_config(home)
    assert custom_class is CheckedInstance
    assert config["run_monitoring"]["enabled"] is True
    assert 3600 <= config["run_monitoring"]["max_runtime_seconds"] <= 24 * 3600
    assert "run_launcher" not in config, "compose uses the DefaultRunLauncher (see the comment in dagster.yaml)"


def test_workspaces_point_at_the_code_location(overlay: tuple[str, list[dict]]) -> None:
    _, objs = overlay
    workspace = yaml.safe_load(find(objs, "ConfigMap", "dagster-instance")["data"]["workspace.yaml"])
    (entry,) = workspace["load_from"]
    server = entry["grpc_server"]
    service = find(objs, "Service", server["host"])
    assert server["port"] in [p["port"] for p in service["spec"]["ports"]]
    compose_ws = yaml.safe_load((COMPOSE / "workspace.yaml").read_text())
    assert compose_ws["load_from"][0]["grpc_server"]["location_name"] == server["location_name"] == "mkg_pipeline"


def test_instance_env_references_are_provided(overlay: tuple[str, list[dict]]) -> None:
    """Every {env: X} in dagster.yaml is set in the webserver, the daemon, the code location and run pods."""
    _, objs = overlay
    text = find(objs, "ConfigMap", "dagster-instance")["data"]["dagster.yaml"]
    wanted = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if set(node) == {"env"}:
                wanted.add(node["env"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(yaml.safe_load(text))
    config_maps = {o["metadata"]["name"]: o.get("data", {}) for o in objs if o["kind"] == "ConfigMap"}
    for name in ("dagster-webserver", "dagster-daemon", "mkg-code-location"):
        (container,) = find(objs, "Deployment", name)["spec"]["template"]["spec"]["containers"]
        have = {e["name"] for e in container.get("env", [])}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                have |= set(config_maps[source["configMapRef"]["name"]])
        # K8s job namespace only matters where the launcher runs (webserver, daemon)
        missing = wanted - have - ({"DAGSTER_K8S_PIPELINE_RUN_NAMESPACE"} if name == "mkg-code-location" else set())
        assert not missing, f"{name} lacks {missing}"


# --- the run pod, built by dagster-k8s itself ----------------------------------------------------


def _launcher(objs: list[dict]):  # type: ignore[no-untyped-def]
    from dagster._config import process_config
    from dagster_k8s import K8sRunLauncher
    from dagster_k8s import launcher as launcher_module

    config = instance_yaml(objs)["run_launcher"]["config"]
    with mock.patch.dict(os.environ, {"DAGSTER_K8S_PIPELINE_RUN_NAMESPACE": "mkg-pipeline"}):
        processed = process_config(K8sRunLauncher.config_type(), config)
    assert processed.success, processed.errors
    # No cluster here: skip loading a kubeconfig / in-cluster token; nothing below calls the API.
    with mock.patch.object(launcher_module, "load_kubernetes_config"):
        return K8sRunLauncher(**processed.value)


def _run_job(objs: list[dict], tags: dict[str, str] | None = None) -> dict[str, Any]:
    """The batch/v1 Job K8sRunLauncher.launch_run would create (same calls as _launch_k8s_job_with_args)."""
    from dagster._core.storage.dagster_run import DagsterRun
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import construct_dagster_k8s_job
    from kubernetes.client import ApiClient

    launcher = _launcher(objs)
    run = DagsterRun(job_name="ingest_job", run_id="0123456789abcdef", tags=tags or {})
    context = K8sContainerContext.create_for_run(run, launcher, include_run_tags=True)
    code = find(objs, "Deployment", "mkg-code-location")["spec"]["template"]["spec"]["containers"][0]
    job_config = context.get_k8s_job_config(job_image=code["image"], run_launcher=launcher)
    job = construct_dagster_k8s_job(
        job_config=job_config,
        args=["dagster", "api", "execute_run", "{}"],
        job_name="dagster-run-0123456789abcdef",
        pod_name="dagster-run-0123456789abcdef",
        component="run_worker",
        user_defined_k8s_config=context.run_k8s_config,
        labels={"dagster/job": "ingest_job", "dagster/run-id": run.run_id},
        env_vars=[{"name": "DAGSTER_RUN_JOB_NAME", "value": "ingest_job"}],
    )
    body = ApiClient().sanitize_for_serialization(job)
    body["metadata"]["namespace"] = context.namespace
    return body


def test_run_pod_is_valid_and_cpu_only(overlay: tuple[str, list[dict]]) -> None:
    name, objs = overlay
    job = _run_job(objs)
    kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)
    assert job["metadata"]["namespace"] == "mkg-pipeline"
    spec = job["spec"]["template"]["spec"]
    (container,) = list(containers(spec))
    assert gpu_count(container) == (0, 0), f"{name}: run pods must not request a GPU"
    assert "nodeSelector" not in spec or not any("gpu" in k for k in spec["nodeSelector"])
    # docs/architecture.md, "Run pods and dependencies": CPU-only run pods, requests 2 CPU / 4 Gi, limits 4 CPU / 8 Gi.
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi"},
        "limits": {"cpu": "4", "memory": "8Gi"},
    }
    assert effective_run_as(spec, container, "runAsNonRoot") is True
    assert effective_run_as(spec, container, "runAsUser") not in (None, 0)
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}
    assert spec["serviceAccountName"] == "mkg-pipeline-worker"
    assert spec["automountServiceAccountToken"] is False
    # the image is the code location's (what DAGSTER_CURRENT_IMAGE reports in the cluster)
    code = find(objs, "Deployment", "mkg-code-location")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == code["image"]
    # env: the pipeline config, the instance DB, the secrets
    sources = {s.get("configMapRef", s.get("secretRef", {})).get("name") for s in container["envFrom"]}
    assert {"dagster-env", "mkg-pipeline-env", "mkg-pipeline-secrets"} <= sources
    assert any(e["name"] == "DAGSTER_PG_PASSWORD" for e in container["env"])


def test_run_pod_is_admitted_by_the_vllm_networkpolicy(overlay: tuple[str, list[dict]]) -> None:
    _, objs = overlay
    labels = _run_job(objs)["spec"]["template"]["metadata"]["labels"]
    key, value = VLLM_CLIENT_LABEL
    assert labels.get(key) == value
    policy = find(objs, "NetworkPolicy", "vllm-ingress")
    selectors = [
        peer["podSelector"]["matchLabels"]
        for rule in policy["spec"]["ingress"]
        for peer in rule["from"]
        if "namespaceSelector" not in peer
    ]
    assert any(sel.items() <= labels.items() for sel in selectors)


def test_run_tags_cannot_ask_for_a_gpu(overlay: tuple[str, list[dict]]) -> None:
    """only_allow_user_defined_k8s_config_fields: a dagster-k8s/config tag cannot change resources."""
    import json

    _, objs = overlay
    gpu = {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}}
    with pytest.raises(Exception, match="violated the allowed list"):
        _run_job(objs, tags={"dagster-k8s/config": json.dumps(gpu)})
    selector = {"pod_spec_config": {"node_selector": {"nvidia.com/gpu.present": "true"}}}
    with pytest.raises(Exception, match="violated the allowed list"):
        _run_job(objs, tags={"dagster-k8s/config": json.dumps(selector)})
    # annotations stay allowed
    annotated = {"pod_template_spec_metadata": {"annotations": {"team": "docs"}}}
    job = _run_job(objs, tags={"dagster-k8s/config": json.dumps(annotated)})
    assert job["spec"]["template"]["metadata"]["annotations"]["team"] == "docs"
