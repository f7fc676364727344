"""vLLM's Prometheus metrics, by vLLM's names, on the server's own registry.

Dashboards, alerts and the pipeline's back-off read these names from vLLM in
production; the local server exposes the same ones so that they can be tested
here. Every vLLM metric carries the ``model_name`` label as in vLLM.

A few extra series, prefixed ``mkg_local_server_``, exist only here (peaks of
the queue gauges, faults fired) so that tests can assert queueing and faults
without racing a gauge.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# vLLM's own bucket boundaries.
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip


class ServerMetrics:
    def __init__(self, model_name: str, max_num_seqs: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.max_num_seqs = max_num_seqs
        labels = ["model_name"]
        self.running = Gauge(
            "vllm:num_requests_running", "Number of requests running.", labels, registry=self.registry
        ).labels(model_name)
        self.waiting = Gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", labels, registry=self.registry
        ).labels(model_name)
        # vLLM's KV-cache usage (0..1). An OCR model has no KV cache; busy slots / --max-num-seqs is
        # the closest stand-in: it reads 1.0 exactly when new requests start queueing.
        self.kv_cache_usage = Gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage (here: running / max_num_seqs).",
            labels,
            registry=self.registry,
        ).labels(model_name)
        self.e2e_latency = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            labels,
            buckets=E2E_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        # Answers are produced whole, so the first token arrives with the last one: time to the answer.
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self.queue_time = Histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            labels,
            buckets=E2E_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        # prometheus_client appends _total to counters: these expose vllm:request_success_total etc.
        self._success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*labels, "finished_reason"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", labels, registry=self.registry
        ).labels(model_name)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", labels, registry=self.registry
        ).labels(model_name)
        self.waiting_peak = Gauge(
            "mkg_local_server_num_requests_waiting_peak",
            "Highest vllm:num_requests_waiting since the server started (local server only).",
            labels,
            registry=self.registry,
        ).labels(model_name)
        self.running_peak = Gauge(
            "mkg_local_server_num_requests_running_peak",
            "Highest vllm:num_requests_running since the server started (local server only).",
            labels,
            registry=self.registry,
        ).labels(model_name)
        self._faults = Counter(
            "mkg_local_server_faults_injected",
            "Faults injected, by kind (local server only).",
            ["fault"],
            registry=self.registry,
        )
        self._lock = threading.Lock()
        self._peak_waiting = 0
        self._peak_running = 0
        self.set_queue(running=0, waiting=0)

    def set_queue(self, *, running: int, waiting: int) -> None:
        with self._lock:
            self.running.set(running)
            self.waiting.set(waiting)
            self.kv_cache_usage.set(running / self.max_num_seqs if self.max_num_seqs else 0.0)
            self._peak_waiting = max(self._peak_waiting, waiting)
            self._peak_running = max(self._peak_running, running)
            self.waiting_peak.set(self._peak_waiting)
            self.running_peak.set(self._peak_running)

    def record_success(
        self,
        *,
        finished_reason: str,
        prompt_tokens: int,
        generation_tokens: int,
        e2e_s: float,
        queue_s: float,
        first_token_s: float,
    ) -> None:
        self._success.labels(self.model_name, finished_reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generation_tokens)
        self.e2e_latency.observe(e2e_s)
        self.queue_time.observe(queue_s)
        self.ttft.observe(first_token_s)

    def record_fault(self, fault: str) -> None:
        self._faults.labels(fault).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
