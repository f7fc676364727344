"""Schema validation of the rendered Kubernetes manifests (offline).

* Built-in kinds: ``kubernetes-validate`` in strict mode (unknown fields are errors) against its
  bundled OpenAPI schemas for Kubernetes 1.32.
* ServiceMonitor (monitoring.coreos.com/v1): the vendored schema in ``schemas/`` (see its README).
* Any other kind is an error: a new CRD needs a schema here before it ships.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from mkg_pipeline_tests.deploy.helpers import KUBERNETES_VERSION, SCHEMAS, find, ident

pytestmark = pytest.mark.deploy

CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
}


def _crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / CRD_SCHEMAS[(api_version, kind)]).read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _validate(obj: dict[str, Any]) -> None:
    key = (obj["apiVersion"], obj["kind"])
    if key in CRD_SCHEMAS:
        _crd_validator(*key).validate(obj)
        return
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_every_object_validates(overlay: tuple[str, list[dict]]) -> None:
    name, objs = overlay
    assert objs, f"overlay {name} rendered nothing"
    errors = []
    for obj in objs:
        try:
            _validate(obj)
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{ident(obj)}: no schema for {obj['apiVersion']} {obj['kind']} (vendor one in schemas/)")
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{ident(obj)}: {path}: {exc.message}")
    assert not errors, f"overlay {name}:\n" + "\n".join(errors)


def test_base_renders_and_validates(rendered: dict[str, list[dict]]) -> None:
    for obj in rendered["base"]:
        _validate(obj)


def test_strict_mode_really_rejects_unknown_fields(rendered: dict[str, list[dict]]) -> None:
    """Guard against a silently lenient validator: a misspelt field must fail."""
    deployment = copy.deepcopy(find(rendered["dev"], "Deployment", "vllm"))
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # typo of "resources"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)

    monitor = copy.deepcopy(find(rendered["dev"], "ServiceMonitor", "pushgateway"))
    monitor["spec"]["endpoints"][0]["honourLabels"] = True
    with pytest.raises(jsonschema.ValidationError):
        _validate(monitor)
    monitor = copy.deepcopy(find(rendered["dev"], "ServiceMonitor", "vllm"))
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        _validate(monitor)


def test_every_namespaced_object_is_in_the_namespace(overlay: tuple[str, list[dict]]) -> None:
    name, objs = overlay
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}
    wrong = [
        ident(o) for o in objs if o["kind"] not in cluster_scoped and o["metadata"].get("namespace") != "mkg-pipeline"
    ]
    assert not wrong, f"{name}: objects outside namespace mkg-pipeline: {wrong}"


def test_namespace_enforces_restricted_pod_security(overlay: tuple[str, list[dict]]) -> None:
    _, objs = overlay
    labels = find(objs, "Namespace", "mkg-pipeline")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_references_resolve(overlay: tuple[str, list[dict]]) -> None:
    """ConfigMaps, PVCs and ServiceAccounts named by pods exist in the overlay (Secrets: see policies)."""
    name, objs = overlay
    have = {(o["kind"], o["metadata"]["name"]) for o in objs}
    missing = []
    for obj in objs:
        spec = None
        if obj["kind"] in {"Deployment", "StatefulSet", "Job"}:
            spec = obj["spec"]["template"]["spec"]
        if spec is None:
            continue
        sa = spec.get("serviceAccountName")
        if sa and ("ServiceAccount", sa) not in have:
            missing.append(f"{ident(obj)} → ServiceAccount/{sa}")
        for volume in spec.get("volumes", []):
            if "configMap" in volume and ("ConfigMap", volume["configMap"]["name"]) not in have:
                missing.append(f"{ident(obj)} → ConfigMap/{volume['configMap']['name']}")
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                if ("PersistentVolumeClaim", claim) not in have:
                    missing.append(f"{ident(obj)} → PersistentVolumeClaim/{claim}")
        for container in spec.get("containers", []):
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef")
                if ref and ("ConfigMap", ref["name"]) not in have:
                    missing.append(f"{ident(obj)} → ConfigMap/{ref['name']}")
            for env in container.get("env", []):
                ref = (env.get("valueFrom") or {}).get("configMapKeyRef")
                if ref and ("ConfigMap", ref["name"]) not in have:
                    missing.append(f"{ident(obj)} → ConfigMap/{ref['name']}")
    for obj in objs:
        if obj["kind"] == "Service":
            selector = obj["spec"].get("selector", {})
            matched = [
                o
                for o in objs
                if o["kind"] in {"Deployment", "StatefulSet"}
                and selector.items() <= o["spec"]["template"]["metadata"].get("labels", {}).items()
            ]
            if not matched:
                missing.append(f"{ident(obj)} selects no workload")
    assert not missing, f"{name}:\n" + "\n".join(missing)
