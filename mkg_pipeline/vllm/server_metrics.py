"""What the limiter reads from vLLM's ``/metrics``: the queue, the batch, KV-cache use, preemptions, latency.

Parsing only; the client's scrape loop fetches the page and hands the result to the limiter.
"""

from __future__ import annotations

from dataclasses import dataclass

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_USAGE = "vllm:kv_cache_usage_perc"
#: vLLM before V1 named it this way
GPU_CACHE_USAGE = "vllm:gpu_cache_usage_perc"
PREEMPTIONS = "vllm:num_preemptions_total"
LATENCY_SUM = "vllm:e2e_request_latency_seconds_sum"
LATENCY_COUNT = "vllm:e2e_request_latency_seconds_count"

_INDEX = {WAITING: 0, RUNNING: 1, LATENCY_SUM: 2, LATENCY_COUNT: 3, KV_USAGE: 4, GPU_CACHE_USAGE: 4, PREEMPTIONS: 5}


@dataclass(frozen=True)
class ServerMetrics:
    """One reading of vLLM's /metrics, summed over engines and models (KV use: the fullest engine)."""

    waiting: float
    running: float
    latency_sum: float | None = None
    latency_count: float | None = None
    #: share of the KV cache in use, 0..1 (``vllm:kv_cache_usage_perc`` is a fraction despite its name)
    kv_usage: float | None = None
    #: sequences preempted since the server started (a counter)
    preemptions: float | None = None


def parse_queue_metrics(text: str) -> ServerMetrics | None:
    """The queue (and latency, KV use and preemptions, if present) from vLLM's Prometheus text.

    None without a waiting-queue gauge: then it is not vLLM (or not a version we know), and the
    limiter steers by latency alone.
    """
    totals = [0.0] * 6
    found = [False] * 6
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        brace = line.find("{")
        if brace >= 0:
            name, rest = line[:brace], line[line.rfind("}") + 1 :]
        else:
            name, _, rest = line.partition(" ")
        index = _INDEX.get(name.strip())
        if index is None:
            continue
        try:
            value = float(rest.split()[0])
        except (ValueError, IndexError):
            continue
        # KV use is a share per engine: the fullest one is the one that preempts first.
        totals[index] = max(totals[index], value) if index == 4 else totals[index] + value
        found[index] = True
    if not found[0]:
        return None
    has_latency = found[2] and found[3]
    return ServerMetrics(
        waiting=totals[0],
        running=totals[1],
        latency_sum=totals[2] if has_latency else None,
        latency_count=totals[3] if has_latency else None,
        kv_usage=totals[4] if found[4] else None,
        preemptions=totals[5] if found[5] else None,
    )
