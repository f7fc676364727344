"""docker compose files: schema (vendored compose-spec.json), interpolation, and policies.

Validation is against a vendored copy of the Compose Specification schema (``schemas/compose-spec.json``,
taken from the npm package dclint 3.1.0 - no PyPI/Debian package ships a current one; see
``schemas/README.md``). Files are interpolated first, the way ``docker compose`` does, with
``.env.example`` plus test values for the secrets it leaves empty on purpose.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from mkg_pipeline_tests.deploy.helpers import (
    COMPOSE,
    REPO,
    SCHEMAS,
    InterpolationError,
    compose_user_uid,
    compose_variables,
    load_compose,
    read_env_file,
)

pytestmark = pytest.mark.deploy

FILES = ("docker-compose.yml", "docker-compose.vllm.yml")
SECRETS = ("VLLM_API_KEY", "MINIO_ROOT_PASSWORD", "POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD")
#: services that may reach vLLM on its internal network
VLLM_NETWORK_MEMBERS = {"vllm", "code-location", "prometheus", "dcgm-exporter"}


def _env() -> dict[str, str]:
    env = read_env_file(COMPOSE / ".env.example")
    env.update({name: f"test-{name.lower()}" for name in SECRETS})
    return env


@pytest.fixture(scope="module")
def schema_validator() -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(scope="module")
def project() -> dict[str, Any]:
    """The main file with its `include`d file merged in, as compose builds its model."""
    main = load_compose("docker-compose.yml", _env())
    merged = {
        "services": dict(main["services"]),
        "networks": dict(main.get("networks") or {}),
        "volumes": dict(main.get("volumes") or {}),
    }
    for entry in main.get("include", []):
        path = entry["path"] if isinstance(entry, dict) else entry
        included = load_compose(path, _env())
        for key in ("services", "networks", "volumes"):
            overlap = set(merged[key]) & set(included.get(key) or {})
            assert not overlap, f"{path} redefines {key} {overlap}"
            merged[key].update(included.get(key) or {})
    return merged


@pytest.mark.parametrize("name", FILES)
def test_compose_file_matches_the_compose_spec(name: str, schema_validator: jsonschema.protocols.Validator) -> None:
    document = load_compose(name, _env())
    errors = sorted(schema_validator.iter_errors(document), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{name}: {'.'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_vendored_schema_is_strict_enough(schema_validator: jsonschema.protocols.Validator) -> None:
    bad = {
        "services": {
            "x": {
                "image": "busybox",
                "deploy": {
                    "resources": {
                        "reservations": {"devices": [{"driver": "nvidia", "count": 1, "capabilites": ["gpu"]}]}
                    }
                },
            }
        }
    }  # typo
    assert list(schema_validator.iter_errors(bad))
    assert list(schema_validator.iter_errors({"services": {"x": {"image": "busybox", "helthcheck": {}}}}))
    assert "include" in schema_validator.schema["properties"]


@pytest.mark.parametrize("name", FILES)
def test_secrets_have_no_default(name: str) -> None:
    text = (COMPOSE / name).read_text()
    variables = compose_variables(text)
    for secret in SECRETS:
        if secret in variables:
            assert variables[secret] == ":?", f"{name}: {secret} must be required (${{{secret}:?...}}), no default"
    example = read_env_file(COMPOSE / ".env.example")
    with pytest.raises(InterpolationError, match="required variable"):
        load_compose(name, example)  # .env.example as shipped: secrets empty → compose refuses


def test_env_example_lists_every_variable() -> None:
    example = read_env_file(COMPOSE / ".env.example")
    used = {}
    for name in FILES:
        used.update(compose_variables((COMPOSE / name).read_text()))
    missing = set(used) - set(example)
    assert not missing, f".env.example does not mention {sorted(missing)}"
    for secret in SECRETS:
        assert example[secret] == "", f".env.example ships a value for {secret}"


def test_include_brings_in_the_vllm_file() -> None:
    main = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    paths = [e["path"] if isinstance(e, dict) else e for e in main["include"]]
    assert paths == ["docker-compose.vllm.yml"]
    assert "vllm" not in main["services"], "the vLLM service lives in docker-compose.vllm.yml only"


def _duration_s(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", text):
        total += float(number) * units[unit]
    return total


def test_vllm_service(project: dict[str, Any]) -> None:
    vllm = project["services"]["vllm"]
    raw = (COMPOSE / "docker-compose.vllm.yml").read_text()
    image = vllm["image"]
    assert image.startswith("vllm/vllm-openai:v") and not image.endswith(":latest")
    args = " ".join(vllm["command"])
    assert "--model=Qwen/Qwen2.5-VL-7B-Instruct" in args
    assert "--gpu-memory-utilization=0.92" in args
    assert "--max-model-len=32768" in args
    # No cap on sequences: vLLM's default for the GPU, and the workers' adaptive limiters find the knee.
    assert "--max-num-seqs" not in args
    assert "--port=8000" in args
    assert "--api-key=${VLLM_API_KEY:?" in raw
    (device,) = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and "gpu" in device["capabilities"]
    assert "ports" not in vllm, "vLLM's port 8000 must not be published on the host"
    assert vllm.get("ipc") == "host" or vllm.get("shm_size")
    health = vllm["healthcheck"]
    assert "/health" in " ".join(health["test"])
    assert _duration_s(health["start_period"]) >= 10 * 60, "model loading needs a 10-20 minute start period"
    mounts = [v if isinstance(v, str) else v["target"] for v in vllm["volumes"]]
    hf_home = vllm["environment"]["HF_HOME"]
    assert any(m.split(":")[1] == hf_home if isinstance(m, str) else m == hf_home for m in mounts)


def test_vllm_is_reachable_only_on_its_internal_network(project: dict[str, Any]) -> None:
    networks = project["networks"]
    assert networks["vllm"]["internal"] is True
    members = {name for name, svc in project["services"].items() if "vllm" in (svc.get("networks") or [])}
    assert "code-location" in members and "vllm" in members
    assert members <= VLLM_NETWORK_MEMBERS, f"unexpected services on the vllm network: {members - VLLM_NETWORK_MEMBERS}"
    for name, svc in project["services"].items():
        for port in svc.get("ports", []):
            text = str(port if isinstance(port, str) else port.get("published"))
            assert not text.endswith("8000"), f"{name} publishes 8000"
            assert str(port).startswith("127.0.0.1:") or (
                isinstance(port, dict) and port.get("host_ip") == "127.0.0.1"
            ), f"{name} publishes {port} on all interfaces"
    workers = project["services"]["code-location"]["environment"]
    assert workers["MKG_VLLM__URL"] == "http://vllm:8000"


def test_no_compose_service_runs_as_root(project: dict[str, Any]) -> None:
    for name, svc in project["services"].items():
        uid = compose_user_uid(svc.get("user"))
        assert uid is not None and uid != 0, f"{name}: set a numeric non-root `user:` (got {svc.get('user')!r})"
        assert svc.get("cap_drop") == ["ALL"], f"{name}: cap_drop: [ALL]"
        assert not svc.get("privileged"), f"{name}: privileged"
        assert "no-new-privileges:true" in svc.get("security_opt", []), f"{name}: no-new-privileges"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            assert "docker.sock" not in source, f"{name} mounts the Docker socket"


def test_only_the_gpu_services_reserve_gpus(project: dict[str, Any]) -> None:
    for name, svc in project["services"].items():
        devices = (((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")
        if name in {"vllm", "dcgm-exporter"}:
            assert devices
        else:
            assert not devices, f"{name} reserves a GPU"
            assert "gpus" not in svc


def test_dagster_services(project: dict[str, Any]) -> None:
    from mkg_pipeline.config import load_config

    services = project["services"]
    for name in ("code-location", "dagster-daemon", "dagster-webserver"):
        svc = services[name]
        targets = {v.split(":")[1] for v in svc["volumes"]}
        assert {"/opt/dagster/dagster_home/dagster.yaml", "/opt/dagster/dagster_home/workspace.yaml"} <= targets
        for volume in svc["volumes"]:
            source = volume.split(":")[0]
            assert (COMPOSE / source).is_file(), f"{name}: {source} does not exist"
        env = svc["environment"]
        for variable in ("DAGSTER_PG_HOST", "DAGSTER_PG_PASSWORD", "MKG_STORAGE__BUCKET", "MKG_STORAGE__ENDPOINT_URL"):
            assert env.get(variable), f"{name} lacks {variable}"
        # the pipeline configuration loads from exactly this environment
        load_config(environ={k: str(v) for k, v in env.items() if k.startswith("MKG_")})
    build = services["code-location"]["build"]
    assert (COMPOSE / build["context"] / build["dockerfile"]).resolve() == REPO / "deploy/docker/Dockerfile.worker"
    assert services["code-location"]["environment"]["MKG_PUSHGATEWAY_URL"] == "http://pushgateway:9091"
    assert "pushgateway" in services
    for name, svc in services.items():
        for dependency in svc.get("depends_on") or {}:
            assert dependency in services, f"{name} depends on unknown service {dependency}"
        for network in svc.get("networks") or []:
            assert network in project["networks"], f"{name}: unknown network {network}"
    assert "vllm" not in (services["code-location"].get("depends_on") or {}), (
        "workers must not wait for the model to load (breaker + page cache handle an absent server)"
    )


def test_monitoring_profile_mounts_exist(project: dict[str, Any]) -> None:
    for name in ("prometheus", "grafana"):
        for volume in project["services"][name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{name}: {source} does not exist"
    provisioning = COMPOSE / "grafana" / "provisioning"
    for path in provisioning.rglob("*.yml"):
        yaml.safe_load(path.read_text())


def test_gitignore_keeps_local_state_out() -> None:
    ignored = (COMPOSE / ".gitignore").read_text().split()
    assert ".env" in ignored and "data/" in ignored
    assert Path(COMPOSE / ".env.example").is_file()
