"""The configuration loads in the environment a pod of the shipped namespace really gets.

Kubernetes injects service-link variables for every Service of the pod's namespace
(``<NAME>_SERVICE_HOST``, ``<NAME>_PORT_<port>_TCP_ADDR``, ...). Our ``mkg-code-location`` Service makes
them ``MKG_CODE_LOCATION_*``, which look like configuration variables and are not (issue 11).
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from pydantic import SecretStr

from mkg_pipeline_tests.deploy.helpers import REPO, find
from mkg_pipeline_tests.deploy.test_dagster_instance import _run_job

pytestmark = pytest.mark.deploy

#: MKG_* variables the manifests set that are read by other parts of the project, not config fields
NOT_FIELDS = {"MKG_PUSHGATEWAY_URL", "MKG_CONFIG_FILE"}
#: what the worker image sets (deploy/docker/Dockerfile.worker copies config/mineru.yaml there)
IMAGE_ENV = {"MKG_CONFIG_FILE": str(REPO / "config" / "mineru.yaml")}
#: the API server's own Service, in every namespace's pods
KUBERNETES_SERVICE = {"metadata": {"name": "kubernetes"}, "spec": {"ports": [{"name": "https", "port": 443}]}}


def service_link_env(services: list[dict[str, Any]]) -> dict[str, str]:
    """The variables the kubelet injects for these Services (enableServiceLinks, the default)."""
    env: dict[str, str] = {}
    for index, service in enumerate(services):
        spec = service["spec"]
        if spec.get("clusterIP") == "None":  # headless Services get no variables
            continue
        ip = spec.get("clusterIP") or f"10.96.0.{10 + index}"  # assigned by the API server
        name = service["metadata"]["name"].upper().replace("-", "_")
        ports = spec.get("ports", [])
        first = ports[0]
        env[f"{name}_SERVICE_HOST"] = ip
        env[f"{name}_SERVICE_PORT"] = str(first["port"])
        env[f"{name}_PORT"] = f"{first.get('protocol', 'TCP').lower()}://{ip}:{first['port']}"
        for port in ports:
            protocol = port.get("protocol", "TCP")
            if port.get("name"):
                env[f"{name}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(port["port"])
            prefix = f"{name}_PORT_{port['port']}_{protocol}"
            env[prefix] = f"{protocol.lower()}://{ip}:{port['port']}"
            env[f"{prefix}_PROTO"] = protocol.lower()
            env[f"{prefix}_PORT"] = str(port["port"])
            env[f"{prefix}_ADDR"] = ip
    return env


def _secret_data(objs: list[dict[str, Any]], fallback: list[dict[str, Any]], name: str) -> dict[str, str]:
    """A Secret's values; the base and prod ship none (created by hand), so the dev overlay's stand in."""
    for candidates in (objs, fallback):
        for obj in candidates:
            if obj["kind"] == "Secret" and obj["metadata"]["name"] == name:
                data = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
                return {**data, **(obj.get("stringData") or {})}
    raise AssertionError(f"Secret/{name} is in no rendered overlay")


def container_env(container: dict[str, Any], objs: list[dict[str, Any]], dev: list[dict[str, Any]]) -> dict[str, str]:
    """envFrom (ConfigMaps, Secrets), then env (literal values, key references): what the container sees."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(find(objs, "ConfigMap", source["configMapRef"]["name"]).get("data") or {})
        if "secretRef" in source:
            env.update(_secret_data(objs, dev, source["secretRef"]["name"]))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        ref = item.get("valueFrom", {})
        if "secretKeyRef" in ref:
            env[item["name"]] = _secret_data(objs, dev, ref["secretKeyRef"]["name"])[ref["secretKeyRef"]["key"]]
        elif "configMapKeyRef" in ref:
            data = find(objs, "ConfigMap", ref["configMapKeyRef"]["name"])["data"]
            env[item["name"]] = data[ref["configMapKeyRef"]["key"]]
    return env


def _pods(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The containers that load the pipeline configuration: the code location and a run pod."""
    (code_location,) = find(objs, "Deployment", "mkg-code-location")["spec"]["template"]["spec"]["containers"]
    (run_pod,) = _run_job(objs)["spec"]["template"]["spec"]["containers"]
    return {"code-location": code_location, "run-pod": run_pod}


@pytest.mark.parametrize("variant", ["base", "dev", "prod"])
@pytest.mark.parametrize("pod", ["code-location", "run-pod"])
def test_config_loads_with_the_namespace_service_links(
    rendered: dict[str, list[dict[str, Any]]], variant: str, pod: str
) -> None:
    from mkg_pipeline.config import load_config

    objs = rendered[variant]
    container = _pods(objs)[pod]
    assert container.get("enableServiceLinks", True), "the test assumes the default: service links injected"
    services = [o for o in objs if o["kind"] == "Service"] + [KUBERNETES_SERVICE]
    links = service_link_env(services)
    assert "MKG_CODE_LOCATION_SERVICE_HOST" in links and "MKG_CODE_LOCATION_PORT_4000_TCP_ADDR" in links
    manifest_env = container_env(container, objs, rendered["dev"])
    # the kubelet's order: service links, then the image, envFrom and env override them
    environ = {**links, **IMAGE_ENV, **manifest_env}

    config = load_config(environ=environ)

    intended = {k: v for k, v in manifest_env.items() if k.startswith("MKG_") and k not in NOT_FIELDS}
    assert {"MKG_VLLM__URL", "MKG_STORAGE__BUCKET", "MKG_VLLM__API_KEY"} <= set(intended), sorted(intended)
    for name, value in intended.items():
        node: Any = config
        for part in name.removeprefix("MKG_").lower().split("__"):
            node = getattr(node, part)
        loaded = node.get_secret_value() if isinstance(node, SecretStr) else node
        assert str(loaded) == value, f"{variant}/{pod}: {name}={value!r} loaded as {loaded!r}"
