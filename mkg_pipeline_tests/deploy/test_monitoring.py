"""deploy/monitoring: promtool (rules, unit tests, scrape config), metric names, dashboard."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from mkg_pipeline_tests.deploy.helpers import (
    DOCS,
    MONITORING,
    REPO,
    dashboard_exprs,
    load_dashboard,
    promql_metric_names,
    read_name_list,
    registry_metric_names,
    unknown_metric_names,
)

pytestmark = pytest.mark.deploy

ALERTS = MONITORING / "alerts.yml"
REQUIRED_ALERTS = {
    "VLLMServerDown",
    "VLLMHighP95Latency",
    "VLLMQueueBackingUp",
    "VLLMKVCacheNearFull",
    "VLLMHighErrorRate",
    "CircuitBreakerOpen",
    "GPUMemoryNearFull",
    "PipelinePagesFailing",
}
#: series Prometheus itself (up, ALERTS, scrape_*) or the Pushgateway (push_*) creates
BUILTIN_NAMES = {
    "up",
    "ALERTS",
    "ALERTS_FOR_STATE",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "scrape_series_added",
    "push_time_seconds",
    "push_failure_time_seconds",
}


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (`make promtool` installs Debian's prometheus package)")
    return path


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_promtool(), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def _alerts() -> list[dict]:
    return [r for r in _rules() if "alert" in r]


def _known_names() -> set[str]:
    names = read_name_list(MONITORING / "metric_names" / "vllm.txt")
    names |= read_name_list(MONITORING / "metric_names" / "dcgm.txt")
    names |= registry_metric_names()
    names |= BUILTIN_NAMES
    names |= {r["record"] for r in _rules() if "record" in r}
    return names


# --- promtool -----------------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    result = _run("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests() -> None:
    files = sorted((MONITORING / "tests").glob("*.yml"))
    assert files
    result = _run("test", "rules", *[str(f) for f in files])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


def test_promtool_check_scrape_config() -> None:
    result = _run("check", "config", str(MONITORING / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"vllm", "pushgateway", "dcgm"} <= set(jobs)
    assert jobs["pushgateway"]["honor_labels"] is True


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each dashboard query (as a recording rule in a scratch file)."""
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr}
        for i, (_, expr) in enumerate(dashboard_exprs(load_dashboard()))
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for path in (MONITORING / "tests").glob("*.yml"):
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {a["alert"] for a in _alerts()}
    assert names - fired == set(), f"alerts never fired in tests: {names - fired}"
    assert names - quiet == set(), f"alerts never shown quiet in tests: {names - quiet}"


# --- rule content -------------------------------------------------------------------------------


def test_required_alerts_with_for_severity_annotations_and_runbook() -> None:
    alerts = {a["alert"]: a for a in _alerts()}
    assert set(alerts) >= REQUIRED_ALERTS, f"missing alerts: {REQUIRED_ALERTS - set(alerts)}"
    troubleshooting = (DOCS / "troubleshooting.md").read_text()
    anchors = {_slug(h) for h in re.findall(r"^#+\s+(.+?)\s*$", troubleshooting, re.M)}
    for name, alert in alerts.items():
        assert alert.get("for"), f"{name}: no `for:`"
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}, name
        annotations = alert["annotations"]
        assert annotations.get("summary") and annotations.get("description"), name
        url = annotations["runbook_url"]
        assert url.startswith("docs/troubleshooting.md#"), f"{name}: runbook_url {url}"
        anchor = url.split("#", 1)[1]
        assert anchor == name.lower(), f"{name}: anchor should be #{name.lower()}"
        assert anchor in anchors, f"{name}: docs/troubleshooting.md has no heading for #{anchor}"


def _slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


# --- metric names -------------------------------------------------------------------------------


def test_promql_name_extraction() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, model_name) "
        '(rate(vllm:e2e_request_latency_seconds_bucket{job="vllm"}[5m])))'
        ' > 1e-9 and on (instance) up == 0 or absent(up{job="vllm"}) unless ignoring (server) '
        "increase((sum(mkg_pipeline_pages_failed_total) or vector(0))[30m:1m]) / clamp_min(x:y:z, 1)"
    )
    assert promql_metric_names(expr) == {
        "vllm:e2e_request_latency_seconds_bucket",
        "up",
        "mkg_pipeline_pages_failed_total",
        "x:y:z",
    }
    assert unknown_metric_names({"a_bucket", "a_count", "b_total", "c"}, {"a", "b_total"}) == {"c"}


def test_our_metric_names_come_from_the_registry() -> None:
    names = registry_metric_names()
    assert "mineru_vllm_client_failures_total" in names
    assert "mineru_vllm_request_duration_seconds" in names
    assert "mkg_pipeline_pages_failed_total" in names
    assert "mineru_vllm_circuit_breaker_state" in names


def test_alert_rules_use_only_known_metric_names() -> None:
    known = _known_names()
    problems = {}
    for rule in _rules():
        unknown = unknown_metric_names(promql_metric_names(rule["expr"]), known)
        if unknown:
            problems[rule.get("alert") or rule.get("record")] = sorted(unknown)
    assert not problems, f"unknown metric names (add to metric_names/*.txt only if the exporter has them): {problems}"


def test_dashboard_uses_only_known_metric_names() -> None:
    known = _known_names()
    problems = {}
    for title, expr in dashboard_exprs(load_dashboard()):
        unknown = unknown_metric_names(promql_metric_names(expr), known)
        if unknown:
            problems.setdefault(title, []).extend(sorted(unknown))
    assert not problems, problems


def test_name_lists_document_their_source() -> None:
    for name in ("vllm.txt", "dcgm.txt"):
        text = (MONITORING / "metric_names" / name).read_text()
        assert re.search(r"\d+\.\d+", text.split("\n\n")[0]), f"{name}: state the exporter version in the header"
    pinned = re.search(r"vllm/vllm-openai:(v[\d.]+)", (REPO / "deploy/compose/docker-compose.vllm.yml").read_text())
    assert pinned and pinned.group(1) in (MONITORING / "metric_names" / "vllm.txt").read_text()


# --- dashboard ----------------------------------------------------------------------------------


def test_dashboard_is_importable_and_complete() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    assert dashboard.get("id") is None, "an exported dashboard must not carry a database id"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"

    def panels(items: list[dict]) -> list[dict]:
        out = []
        for p in items:
            out.append(p)
            out.extend(panels(p.get("panels", [])))
        return out

    ids = [p["id"] for p in panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", f"{panel['title']}: use the datasource variable"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
    text = " ".join(expr for _, expr in dashboard_exprs(dashboard))
    for needle in (
        "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_DEV_FB_USED",
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "histogram_quantile(0.50",
        "histogram_quantile(0.95",
        "histogram_quantile(0.99",
        "vllm:request_success_total",
        "vllm:generation_tokens_total",
        "vllm:kv_cache_usage_perc",
        'up{job="vllm"}',
        "mineru_vllm_circuit_breaker_state",
        "mkg_pipeline_pages_processed_total",
        "mkg_pipeline_pages_failed_total",
        "mkg:vllm_client_failures:increase10m",
    ):
        assert needle in text, f"dashboard lacks a panel on {needle}"
