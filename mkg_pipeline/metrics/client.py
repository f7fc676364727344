"""Prometheus metrics of the guarded vLLM client.

All metrics live in :data:`REGISTRY`, a registry of our own rather than the
process-global default, so that a run pod can push exactly these series to a
Pushgateway and tests can read them without interference. The names are a
contract with ``deploy/monitoring`` (alert rules and dashboard); a test holds
the monitoring files against the names registered here.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

# Buckets span a fast OCR call (tens of ms) to a long page on a busy GPU (minutes).
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)

REQUEST_DURATION = Histogram(
    "mineru_vllm_request_duration_seconds",
    "Wall time of one HTTP request to the VLM server (each attempt), by endpoint and outcome.",
    ["endpoint", "outcome"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
CLIENT_FAILURES = Counter(
    "mineru_vllm_client_failures_total",
    "Failed attempts by error type (timeout, connect, server_error, rate_limited, client_error, "
    "circuit_open, malformed_response).",
    ["error_type"],
    registry=REGISTRY,
)
CLIENT_RETRIES = Counter(
    "mineru_vllm_client_retries_total",
    "Retries scheduled after a retryable failure.",
    registry=REGISTRY,
)
CIRCUIT_BREAKER_STATE = Gauge(
    "mineru_vllm_circuit_breaker_state",
    "Circuit breaker state per server: 0 closed, 1 half-open, 2 open.",
    ["server"],
    registry=REGISTRY,
)
CONCURRENCY_LIMIT = Gauge(
    "mineru_vllm_concurrency_limit",
    "Requests this process may have in flight against the server: the adaptive limiter's current limit.",
    ["server"],
    registry=REGISTRY,
)
CONCURRENCY_FLOOR = Gauge(
    "mineru_vllm_concurrency_floor",
    "The adaptive limiter's floor (vllm.min_in_flight); absent while the limit is fixed (vllm.adaptive false).",
    ["server"],
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "mineru_vllm_requests_in_flight",
    "Requests this process has outstanding against the VLM server.",
    registry=REGISTRY,
)

BREAKER_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}
