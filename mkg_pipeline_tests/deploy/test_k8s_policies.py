"""Policy checks on the rendered overlays: each fails on the regression it names."""

from __future__ import annotations

from typing import Any

import pytest

from mkg_pipeline_tests.deploy.helpers import (
    VLLM_CLIENT_LABEL,
    containers,
    effective_run_as,
    find,
    gpu_count,
    ident,
    pod_labels,
    workloads,
)

pytestmark = pytest.mark.deploy

PROMETHEUS_POD_LABEL = ("app.kubernetes.io/name", "prometheus")


# --- network ------------------------------------------------------------------------------------


def _rules_on_port(policy: dict[str, Any], port: int) -> list[dict[str, Any]]:
    rules = []
    for rule in policy["spec"].get("ingress", []):
        ports = rule.get("ports")
        # no `ports` means every port, 8000 included
        if not ports or any(p.get("port") in (port, "http") for p in ports):
            rules.append(rule)
    return rules


def test_vllm_networkpolicy_admits_only_pipeline_pods_and_prometheus(overlay: tuple[str, list[dict]]) -> None:
    name, objs = overlay
    vllm = find(objs, "Deployment", "vllm")
    vllm_labels = pod_labels(vllm)
    policies = [
        p
        for p in objs
        if p["kind"] == "NetworkPolicy"
        and p["spec"]["podSelector"].get("matchLabels")
        and p["spec"]["podSelector"]["matchLabels"].items() <= vllm_labels.items()
    ]
    assert policies, f"{name}: no NetworkPolicy selects the vLLM pods"
    # An empty podSelector on the policy itself would select every pod: not this one.
    for policy in policies:
        assert "Ingress" in policy["spec"].get("policyTypes", ["Ingress"])
    label_key, label_value = VLLM_CLIENT_LABEL
    client_rules = 0
    for policy in policies:
        rules = _rules_on_port(policy, 8000)
        for rule in rules:
            peers = rule.get("from")
            assert peers, f"{ident(policy)}: a rule on 8000 without `from` admits everyone"
            for peer in peers:
                assert "ipBlock" not in peer, f"{ident(policy)}: ipBlock on 8000: {peer}"
                pod_sel = peer.get("podSelector")
                ns_sel = peer.get("namespaceSelector")
                assert pod_sel is not None, f"{ident(policy)}: namespaceSelector-only peer on 8000: {peer}"
                match = pod_sel.get("matchLabels") or {}
                assert match or pod_sel.get("matchExpressions"), f"{ident(policy)}: empty podSelector on 8000"
                if ns_sel is None:
                    # same namespace: exactly the pipeline client label
                    assert match == {label_key: label_value}, (
                        f"{ident(policy)}: in-namespace peer on 8000 must select {label_key}={label_value}, got {match}"
                    )
                    client_rules += 1
                else:
                    assert ns_sel.get("matchLabels") or ns_sel.get("matchExpressions"), (
                        f"{ident(policy)}: empty namespaceSelector (all namespaces) on 8000"
                    )
                    assert match.get(PROMETHEUS_POD_LABEL[0]) == PROMETHEUS_POD_LABEL[1], (
                        f"{ident(policy)}: cross-namespace peer on 8000 must be Prometheus, got {match}"
                    )
    assert client_rules, f"{name}: no rule admits the pipeline pods on 8000"


def test_pipeline_pods_carry_the_vllm_client_label(overlay: tuple[str, list[dict]]) -> None:
    _, objs = overlay
    key, value = VLLM_CLIENT_LABEL
    assert pod_labels(find(objs, "Deployment", "mkg-code-location")).get(key) == value
    # and nothing else in the namespace does (webserver, daemon, storage have no business with vLLM)
    others = [
        i
        for i, obj, _ in workloads(objs)
        if obj["metadata"]["name"] != "mkg-code-location" and pod_labels(obj).get(key) == value
    ]
    assert not others, f"unexpected vLLM clients: {others}"


# --- RBAC ---------------------------------------------------------------------------------------


def test_no_cluster_wide_rbac(overlay: tuple[str, list[dict]]) -> None:
    name, objs = overlay
    cluster = [ident(o) for o in objs if o["kind"] in {"ClusterRole", "ClusterRoleBinding"}]
    assert not cluster, f"{name}: cluster-scoped RBAC: {cluster}"


def test_roles_grant_nothing_on_secrets_and_no_wildcards(overlay: tuple[str, list[dict]]) -> None:
    _, objs = overlay
    roles = [o for o in objs if o["kind"] == "Role"]
    assert roles
    for role in roles:
        for rule in role.get("rules", []):
            resources = rule.get("resources", [])
            assert not any(r == "secrets" or r.startswith("secrets/") for r in resources), (
                f"{ident(role)} grants {rule.get('verbs')} on secrets"
            )
            assert "*" not in resources and "*" not in rule.get("verbs", []) and "*" not in rule.get("apiGroups", [])


def test_run_launcher_role_covers_what_k8s_run_launcher_calls(overlay: tuple[str, list[dict]]) -> None:
    _, objs = overlay
    role = find(objs, "Role", "dagster-run-launcher")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    needed = {("batch", "jobs", v) for v in ("create", "get", "list", "watch", "delete")}
    needed |= {("", "pods", v) for v in ("get", "list", "watch", "delete")}
    needed |= {("", "pods/log", "get"), ("", "events", "list")}
    assert needed <= granted, f"missing: {sorted(needed - granted)}"
    binding = find(objs, "RoleBinding", "dagster-run-launcher")
    assert [s["name"] for s in binding["subjects"]] == ["dagster"]
    # the launcher's service account runs the webserver and the daemon, never the workers
    for workload in ("dagster-daemon", "dagster-webserver"):
        assert find(objs, "Deployment", workload)["spec"]["template"]["spec"]["serviceAccountName"] == "dagster"
    code = find(objs, "Deployment", "mkg-code-location")["spec"]["template"]["spec"]
    assert code["serviceAccountName"] == "mkg-pipeline-worker"
    assert code["automountServiceAccountToken"] is False


# --- pods ---------------------------------------------------------------------------------------


def test_no_container_runs_as_root(overlay: tuple[str, list[dict]]) -> None:
    name, objs = overlay
    problems = []
    for wid, _, spec in workloads(objs):
        for container in containers(spec):
            uid = effective_run_as(spec, container, "runAsUser")
            non_root = effective_run_as(spec, container, "runAsNonRoot")
            if uid is None or uid == 0 or non_root is not True:
                problems.append(f"{wid}/{container['name']}: runAsUser={uid} runAsNonRoot={non_root}")
    assert not problems, f"{name}:\n" + "\n".join(problems)


def test_container_hardening(overlay: tuple[str, list[dict]]) -> None:
    name, objs = overlay
    problems = []
    for wid, _, spec in workloads(objs):
        pod_seccomp = ((spec.get("securityContext") or {}).get("seccompProfile") or {}).get("type")
        for container in containers(spec):
            sc = container.get("securityContext") or {}
            where = f"{wid}/{container['name']}"
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if (sc.get("capabilities") or {}).get("drop") != ["ALL"]:
                problems.append(f"{where}: capabilities.drop is not [ALL]")
            if (sc.get("seccompProfile") or {}).get("type", pod_seccomp) != "RuntimeDefault":
                problems.append(f"{where}: seccompProfile is not RuntimeDefault")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: readOnlyRootFilesystem is not true")
            if sc.get("privileged"):
                problems.append(f"{where}: privileged")
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            if sc.get("readOnlyRootFilesystem") and "/tmp" not in mounts:
                problems.append(f"{where}: read-only root without a writable /tmp")
        if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
            problems.append(f"{wid}: host namespaces")
        if any("hostPath" in v for v in spec.get("volumes", [])):
            problems.append(f"{wid}: hostPath volume")
    assert not problems, f"{name}:\n" + "\n".join(problems)


def test_every_container_has_requests_and_limits(overlay: tuple[str, list[dict]]) -> None:
    name, objs = overlay
    problems = []
    for wid, _, spec in workloads(objs):
        for container in containers(spec):
            resources = container.get("resources") or {}
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in (resources.get(kind) or {}):
                        problems.append(f"{wid}/{container['name']}: no {kind}.{resource}")
    assert not problems, f"{name}:\n" + "\n".join(problems)


def test_only_vllm_requests_a_gpu_and_exactly_one(overlay: tuple[str, list[dict]]) -> None:
    name, objs = overlay
    for wid, obj, spec in workloads(objs):
        total = [gpu_count(c) for c in containers(spec)]
        if obj["kind"] == "Deployment" and obj["metadata"]["name"] == "vllm":
            assert total == [(1, 1)], f"{name}: vLLM must request and limit exactly one GPU, got {total}"
            assert obj["spec"]["replicas"] == 1
        else:
            assert all(t == (0, 0) for t in total), f"{name}: {wid} asks for a GPU: {total}"


def test_vllm_deployment_shape(overlay: tuple[str, list[dict]]) -> None:
    _, objs = overlay
    deployment = find(objs, "Deployment", "vllm")
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    spec = deployment["spec"]["template"]["spec"]
    assert spec.get("nodeSelector"), "vLLM must be pinned to GPU nodes"
    assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", []))
    (container,) = spec["containers"]
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    budget = startup.get("initialDelaySeconds", 0) + startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= 20 * 60, f"startup probe allows only {budget} s for model loading"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])
    cache = next(v for v in spec["volumes"] if "persistentVolumeClaim" in v)
    find(objs, "PersistentVolumeClaim", cache["persistentVolumeClaim"]["claimName"])
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_HOME"]["value"].startswith(
        next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == cache["name"])
    )
    # API key from a Secret reference, never a literal, never on the command line
    assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "mkg-pipeline-secrets"
    assert not any("api-key" in a for a in container.get("args", []) + container.get("command", []))
    args = " ".join(container["args"])
    for flag in ("--gpu-memory-utilization", "--max-model-len", "--port=8000"):
        assert flag in args
    # No cap on sequences: vLLM's default for the GPU, and the workers' adaptive limiters find the knee.
    assert "--max-num-seqs" not in args
    config = find(objs, "ConfigMap", "vllm-server-config")["data"]
    assert config["SERVE_MODEL"] == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert config["SERVE_GPU_MEMORY_UTILIZATION"] == "0.92"
    assert config["SERVE_MAX_MODEL_LEN"] == "32768"
    for ref in ("SERVE_MODEL", "SERVE_GPU_MEMORY_UTILIZATION", "SERVE_MAX_MODEL_LEN"):
        assert f"$({ref})" in args and ref in config


def test_pipeline_env_points_at_the_services(overlay: tuple[str, list[dict]]) -> None:
    _, objs = overlay
    env = find(objs, "ConfigMap", "mkg-pipeline-env")["data"]
    assert env["MKG_VLLM__URL"] == "http://vllm:8000"
    service = find(objs, "Service", "vllm")
    assert [p["port"] for p in service["spec"]["ports"]] == [8000]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert env["MKG_PUSHGATEWAY_URL"] == "http://pushgateway:9091"
    find(objs, "Service", "pushgateway")
    # every MKG_* variable is a real configuration field (or a documented non-field)
    from mkg_pipeline.config import load_config

    load_config(environ={k: v for k, v in env.items() if k.startswith("MKG_")})


def test_code_location_image_is_the_run_pod_image(overlay: tuple[str, list[dict]]) -> None:
    _, objs = overlay
    (container,) = find(objs, "Deployment", "mkg-code-location")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DAGSTER_CURRENT_IMAGE"] == container["image"]
    assert ":" in container["image"], "pin an image tag"


def test_images_are_pinned(overlay: tuple[str, list[dict]]) -> None:
    name, objs = overlay
    for wid, _, spec in workloads(objs):
        for container in containers(spec):
            image = container["image"]
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert tag and tag != "latest", f"{name}: {wid}/{container['name']} image {image} is not pinned"


# --- secrets ------------------------------------------------------------------------------------


def _secret_refs(objs: list[dict]) -> set[str]:
    names = set()
    for _, _, spec in workloads(objs):
        for container in containers(spec):
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    names.add(source["secretRef"]["name"])
            for env in container.get("env", []):
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    names.add(ref["name"])
    return names


def test_base_and_prod_ship_no_secret(rendered: dict[str, list[dict]]) -> None:
    for name in ("base", "prod"):
        secrets = [ident(o) for o in rendered[name] if o["kind"] == "Secret"]
        assert not secrets, f"{name} ships Secret objects: {secrets}"


def test_dev_generates_every_referenced_secret_with_obvious_values(rendered: dict[str, list[dict]]) -> None:
    import base64

    objs = rendered["dev"]
    generated = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Secret"}
    from mkg_pipeline_tests.deploy.helpers import instance_yaml

    launcher = instance_yaml(objs)["run_launcher"]["config"]
    needed = _secret_refs(objs) | set(launcher["env_secrets"]) | {launcher["postgres_password_secret"]}
    assert needed <= set(generated), f"dev lacks Secrets {needed - set(generated)}"
    for secret in generated.values():
        for key, value in secret["data"].items():
            text = base64.b64decode(value).decode()
            if "KEY_ID" in key:
                continue
            assert "dev" in text and "insecure" in text, (
                f"{secret['metadata']['name']}.{key} must look like a dev value"
            )
    # keys the pods read exist in the generated Secret
    for _, _, spec in workloads(objs):
        for container in containers(spec):
            for env in container.get("env", []):
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    assert ref["key"] in generated[ref["name"]]["data"], f"{ref} missing in dev"
