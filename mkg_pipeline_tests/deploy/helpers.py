"""Helpers of the offline deploy tests: rendering, walking pod specs, PromQL names, compose interpolation."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose"
MONITORING = DEPLOY / "monitoring"
DOCS = REPO / "docs"
SCHEMAS = Path(__file__).resolve().parent / "schemas"

OVERLAYS = ("dev", "prod")
KUBERNETES_VERSION = "1.32.0"

#: the label vLLM's NetworkPolicy admits on port 8000 (run pods and the code location carry it)
VLLM_CLIENT_LABEL = ("mkg-pipeline.io/vllm-client", "true")
GPU_RESOURCE = "nvidia.com/gpu"

POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


# --- kustomize ----------------------------------------------------------------------------------


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        raise RuntimeError(
            "kubectl is not on PATH: the deploy tests render deploy/k8s with `kubectl kustomize` "
            "(kubectl >= 1.27 bundles kustomize v5). Install kubectl, or run `kustomize build` by hand."
        )
    return path


def render(path: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize <path>` → the list of objects (empty documents dropped)."""
    result = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {path} failed:\n{result.stderr[-4000:]}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def ident(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata'].get('name')}"


def find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for obj in objs:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise AssertionError(f"{kind}/{name} not in the rendered manifests")


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The pod spec of a workload (Deployment, StatefulSet, Job, ...) or None."""
    if obj["kind"] == "Pod":
        return obj["spec"]
    if obj["kind"] in POD_TEMPLATE_KINDS:
        return obj["spec"]["template"]["spec"]
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def pod_labels(obj: dict[str, Any]) -> dict[str, str]:
    if obj["kind"] == "Pod":
        return obj["metadata"].get("labels", {})
    return obj["spec"]["template"]["metadata"].get("labels", {})


def containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from spec.get("initContainers", [])
    yield from spec.get("containers", [])


def workloads(objs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(identity, object, pod spec) of every object that runs pods."""
    for obj in objs:
        spec = pod_spec(obj)
        if spec is not None:
            yield ident(obj), obj, spec


def gpu_count(container: dict[str, Any]) -> tuple[int, int]:
    """(requested, limited) nvidia.com/gpu of a container; 0 when absent."""
    resources = container.get("resources") or {}
    return (
        int((resources.get("requests") or {}).get(GPU_RESOURCE, 0)),
        int((resources.get("limits") or {}).get(GPU_RESOURCE, 0)),
    )


def effective_run_as(pod: dict[str, Any], container: dict[str, Any], key: str) -> Any:
    """A securityContext field as the kubelet applies it: the container's, else the pod's."""
    value = (container.get("securityContext") or {}).get(key)
    if value is None:
        value = (pod.get("securityContext") or {}).get(key)
    return value


def instance_yaml(objs: list[dict[str, Any]]) -> dict[str, Any]:
    """The dagster.yaml inside the rendered `dagster-instance` ConfigMap."""
    return yaml.safe_load(find(objs, "ConfigMap", "dagster-instance")["data"]["dagster.yaml"])


# --- PromQL -------------------------------------------------------------------------------------

PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
    "atan2",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels and strings removed).

    Label matchers ``{...}``, ranges/subqueries ``[...]``, grouping clauses ``by (...)`` etc. and
    string literals go first; what remains is an identifier not followed by ``(`` (a function
    call or an aggregation) and not a keyword. ``__name__="x"`` selectors are not used here.
    """
    text = _STRING.sub(" ", expr)
    previous = None
    while previous != text:  # nested braces/brackets: strip innermost first until stable
        previous = text
        text = _MATCHERS.sub(" ", text)
        text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def unknown_metric_names(names: set[str], known: set[str]) -> set[str]:
    """Names not in ``known``, after allowing histogram series suffixes of known base names."""
    unknown = set()
    for name in names:
        if name in known:
            continue
        base = next((name[: -len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None)
        if base is not None and base in known:
            continue
        unknown.add(name)
    return unknown


def read_name_list(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(line)
    return names


def registry_metric_names() -> set[str]:
    """Every series name our code can export, read from the registry (counters get _total)."""
    import mkg_pipeline.metrics.pipeline  # noqa: F401  (registers the pipeline metrics in REGISTRY)
    from mkg_pipeline.metrics.client import REGISTRY

    names = set()
    for family in REGISTRY.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        else:
            names.add(family.name)
    return names


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel, rows' nested panels included."""
    found = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((panel.get("title", "?"), target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    return found


def load_dashboard() -> dict[str, Any]:
    return json.loads((MONITORING / "grafana" / "mkg-pipeline-dashboard.json").read_text())


# --- compose ------------------------------------------------------------------------------------

_INTERP = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


class InterpolationError(ValueError):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose-style interpolation: ``$$``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
    ``${VAR:?message}``, ``${VAR?message}``, ``${VAR:+alt}``. Raises on a required variable."""
    if isinstance(value, dict):
        return {interpolate(k, env): interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        expr = match.group("braced") if match.group("braced") is not None else match.group("plain")
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?", expr, re.S)
        if not m:
            raise InterpolationError(f"bad interpolation ${{{expr}}}")
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        current = env.get(name)
        empty_counts = op is not None and op.startswith(":")
        missing = current is None or (empty_counts and current == "")
        if op in (":-", "-"):
            return interpolate(arg, env) if missing else current  # type: ignore[return-value]
        if op in (":?", "?"):
            if missing:
                raise InterpolationError(f"required variable {name} is missing: {arg}")
            return current  # type: ignore[return-value]
        if op in (":+", "+"):
            return interpolate(arg, env) if not missing else ""
        return current or ""

    return _INTERP.sub(substitute, value)


def compose_variables(text: str) -> dict[str, str | None]:
    """Variables a compose file interpolates: name → operator (``:?``, ``:-``, ... or None)."""
    found: dict[str, str | None] = {}
    for match in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?+])?", text):
        found.setdefault(match.group(1), match.group(2))
    return found


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip()
    return values


def load_compose(name: str, env: dict[str, str]) -> dict[str, Any]:
    """Parse a compose file (YAML anchors and merge keys resolved) and interpolate it."""
    return interpolate(yaml.safe_load((COMPOSE / name).read_text()), env)


def compose_user_uid(user: str | int | None) -> int | None:
    """The numeric uid of a compose ``user:`` (``"uid[:gid]"``); None if unset or a name."""
    if user is None:
        return None
    uid = str(user).split(":", 1)[0]
    return int(uid) if uid.isdigit() else None


# --- Dockerfile ---------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped.
    Heredoc bodies are not supported (the Dockerfile has none, and a test keeps it so)."""
    instructions = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    return instructions


def dockerfile_stages(text: str) -> list[dict[str, Any]]:
    """Stages in order: {"base", "name", "instructions"}; ARG values before the first FROM are substituted."""
    instructions = dockerfile_instructions(text)
    global_args: dict[str, str] = {}
    stages: list[dict[str, Any]] = []
    for keyword, args in instructions:
        if keyword == "ARG" and not stages:
            name, _, default = args.partition("=")
            global_args[name.strip()] = default.strip().strip('"')
            continue
        if keyword == "FROM":
            parts = args.split()
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args.get(m.group(1) or m.group(2), ""), parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append({"base": base, "name": name, "instructions": []})
            continue
        if stages:
            stages[-1]["instructions"].append((keyword, args))
    return stages
