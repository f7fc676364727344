"""The pipeline's own Prometheus metrics (pages, documents), in the client's registry.

Run pods are short-lived Kubernetes Jobs that Prometheus cannot scrape
reliably, so each step pushes :data:`mkg_pipeline.metrics.client.REGISTRY` to a
Pushgateway when ``MKG_PUSHGATEWAY_URL`` is set (see :func:`push_metrics`).
"""

from __future__ import annotations

import logging
import os

from prometheus_client import Counter, push_to_gateway

from mkg_pipeline.metrics.client import REGISTRY

log = logging.getLogger(__name__)

PAGES_PROCESSED = Counter(
    "mkg_pipeline_pages_processed_total",
    "Pages whose VLM output was produced (cached pages excluded), by engine.",
    ["engine"],
    registry=REGISTRY,
)
PAGES_CACHED = Counter(
    "mkg_pipeline_pages_cached_total",
    "Pages answered from the page cache without a request.",
    ["engine"],
    registry=REGISTRY,
)
PAGES_FAILED = Counter(
    "mkg_pipeline_pages_failed_total",
    "Pages recorded as failed (to be retried on the next materialization), by reason.",
    ["reason"],
    registry=REGISTRY,
)
PAGES_FALLBACK = Counter(
    "mkg_pipeline_pages_fallback_total",
    "Pages given their text layer's result after every VLM answer stayed invalid (answers.text_fallback), by the "
    "answers' reason; counted when served, so a document over answers.max_fallback_share also counts them failed.",
    ["reason"],
    registry=REGISTRY,
)
PAGES_TOTAL = Counter(
    "mkg_pipeline_pages_total",
    "Pages vlm_outputs saw, by route: text (read from the text layer, no GPU) or vlm (sent to the engine).",
    ["route"],
    registry=REGISTRY,
)
DOCUMENTS_REJECTED = Counter(
    "mkg_pipeline_documents_rejected_total",
    "Input files refused at validation, by reason.",
    ["reason"],
    registry=REGISTRY,
)

PUSHGATEWAY_ENV = "MKG_PUSHGATEWAY_URL"


def push_metrics(job: str = "mkg_pipeline", grouping_key: dict[str, str] | None = None) -> bool:
    """Push the registry to the Pushgateway if one is configured; never fail the step over it."""
    url = os.environ.get(PUSHGATEWAY_ENV)
    if not url:
        return False
    try:
        push_to_gateway(url, job=job, registry=REGISTRY, grouping_key=grouping_key or {})
    except OSError as exc:  # metrics are best effort: losing a push must not lose pages
        log.warning("could not push metrics to %s: %s", url, exc)
        return False
    return True
