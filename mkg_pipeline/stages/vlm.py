"""vlm_outputs: send pages through the engine, cache every finished page, never lose one.

For each page the result lives at ``vlm/<doc_id>/pages/<n>.<cache_key>.json``
where the cache key hashes the page image with the engine identity (engine,
model, prompt version). A page whose key exists is not requested again. A page
that fails (after the client's retries, or at once while the breaker is open)
is recorded in ``vlm/<doc_id>/status.json`` with its reason and is retried by
the next materialization. ``document.md`` and ``content.json`` are assembled
from whatever pages are finished, with a visible marker for missing ones.

Pages of all documents of a batch run concurrently; ``max_pages_in_flight``
bounds the work held in memory and the client's semaphore bounds requests.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mkg_pipeline.engines.base import PageEngine, page_cache_key
from mkg_pipeline.pipeline_metrics import PAGES_CACHED, PAGES_FAILED, PAGES_PROCESSED
from mkg_pipeline.stages.pages import read_page_manifest
from mkg_pipeline.storage import Storage
from mkg_pipeline.vllm.errors import VLLMClientError

log = logging.getLogger(__name__)

STATUS_VERSION = 1


@dataclass(frozen=True)
class PageOutcome:
    doc_id: str
    page: int
    status: str  # "done" | "cached" | "failed"
    cache_key: str | None = None
    latency_s: float | None = None
    requests: int = 0
    reason: str | None = None
    message: str | None = None
    #: the stored result of a page computed in this run, so assembly need not download it again
    record: dict[str, Any] | None = None


@dataclass
class DocumentStatus:
    doc_id: str
    source: str
    pages_total: int
    done: int
    failed_pages: list[dict[str, Any]]

    @property
    def state(self) -> str:
        if not self.failed_pages:
            return "complete"
        return "failed" if self.done == 0 else "partial"


@dataclass
class VLMSummary:
    engine: str
    model: str
    server_url: str
    outcomes: list[PageOutcome] = field(default_factory=list)
    documents: list[DocumentStatus] = field(default_factory=list)
    wall_s: float = 0.0
    previews: dict[str, str] = field(default_factory=dict)
    #: documents of the batch with no page manifest (rendering failed): nothing could be sent for them
    unrendered: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def requests(self) -> int:
        return sum(o.requests for o in self.outcomes)

    @property
    def failure_reasons(self) -> dict[str, int]:
        return dict(Counter(o.reason or "unknown" for o in self.outcomes if o.status == "failed"))

    def latency_quantile(self, q: float) -> float | None:
        values = sorted(o.latency_s for o in self.outcomes if o.status == "done" and o.latency_s is not None)
        if not values:
            return None
        if len(values) == 1:
            return values[0]
        return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]

    @property
    def pages_per_s(self) -> float:
        done = self.count("done")
        return done / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class _PageJob:
    doc_id: str
    page: int
    png_key: str
    cache_key: str
    result_key: str


def _page_label(doc_id: str, page: int) -> str:
    return f"doc={doc_id} page={page}"


async def process_documents(
    storage: Storage,
    engine: PageEngine,
    doc_ids: list[str],
    *,
    server_url: str,
    model: str,
    max_pages_in_flight: int = 16,
    force_refresh: bool = False,
    progress: Callable[[str], None] = log.info,
) -> VLMSummary:
    started = time.monotonic()
    summary = VLMSummary(engine=engine.identity, model=model, server_url=server_url)
    manifests: dict[str, dict[str, Any]] = {}
    for doc_id in doc_ids:
        try:
            manifests[doc_id] = await asyncio.to_thread(read_page_manifest, storage, doc_id)
        except FileNotFoundError as exc:  # one unrendered document must not stop the batch
            summary.unrendered.append(doc_id)
            progress(f"{doc_id}: SKIPPED, {exc}")

    jobs: list[_PageJob] = []
    cached: list[PageOutcome] = []
    for doc_id, manifest in manifests.items():
        existing = set() if force_refresh else await asyncio.to_thread(_existing_results, storage, doc_id)
        doc_cached = 0
        for page in manifest["pages"]:
            key = page_cache_key(page["png_sha256"], engine.identity)
            result_key = storage.vlm_page_key(doc_id, page["page"], key)
            if result_key in existing:
                cached.append(PageOutcome(doc_id, page["page"], "cached", cache_key=key))
                doc_cached += 1
            else:
                jobs.append(_PageJob(doc_id, page["page"], page["png_key"], key, result_key))
        if doc_cached:
            progress(f"{doc_id} ({manifest.get('source', '')}): {doc_cached}/{len(manifest['pages'])} pages cached")
    PAGES_CACHED.labels(engine=engine.name).inc(len(cached))
    summary.outcomes.extend(cached)

    totals = {d: len(m["pages"]) for d, m in manifests.items()}
    finished: Counter[str] = Counter(o.doc_id for o in cached)
    limit = asyncio.Semaphore(max_pages_in_flight)

    async def run(job: _PageJob) -> PageOutcome:
        async with limit:
            outcome = await _process_page(storage, engine, job, model=model)
        finished[job.doc_id] += 1
        where = f"{job.doc_id} page {job.page} ({finished[job.doc_id]}/{totals[job.doc_id]})"
        if outcome.status == "done":
            progress(f"{where}: done in {outcome.latency_s:.1f}s, {outcome.requests} request(s)")
        else:
            progress(f"{where}: FAILED ({outcome.reason}), will retry next run: {outcome.message}")
        return outcome

    summary.outcomes.extend(await asyncio.gather(*(run(job) for job in jobs)))
    summary.wall_s = time.monotonic() - started

    for doc_id, manifest in manifests.items():
        status = await asyncio.to_thread(
            _assemble_document, storage, doc_id, manifest, engine.identity, summary.outcomes
        )
        summary.documents.append(status)
        progress(
            f"{doc_id} ({status.source}): {status.state}, {status.done}/{status.pages_total} pages"
            + (f", {len(status.failed_pages)} failed" if status.failed_pages else "")
        )
    if summary.documents:
        first = summary.documents[0].doc_id
        summary.previews[first] = (await asyncio.to_thread(storage.get_bytes, storage.document_md_key(first))).decode(
            "utf-8", errors="replace"
        )
    return summary


def _existing_results(storage: Storage, doc_id: str) -> set[str]:
    """One LIST per document instead of one HEAD per page."""
    return {obj.key for obj in storage.list_objects(storage.vlm_page_prefix(doc_id))}


async def _process_page(storage: Storage, engine: PageEngine, job: _PageJob, *, model: str) -> PageOutcome:
    label = _page_label(job.doc_id, job.page)
    started = time.monotonic()
    try:
        png = await asyncio.to_thread(storage.get_bytes, job.png_key)
        result = await engine.extract(png, label=label)
    except VLLMClientError as exc:
        PAGES_FAILED.labels(reason=exc.error_type).inc()
        return PageOutcome(job.doc_id, job.page, "failed", job.cache_key, reason=exc.error_type, message=str(exc))
    except Exception as exc:  # an engine bug or unreadable image fails this page only
        log.exception("page %s failed", label)
        PAGES_FAILED.labels(reason="engine_error").inc()
        return PageOutcome(
            job.doc_id, job.page, "failed", job.cache_key, reason="engine_error", message=f"{type(exc).__name__}: {exc}"
        )
    latency = time.monotonic() - started
    record = {
        "doc_id": job.doc_id,
        "page": job.page,
        "cache_key": job.cache_key,
        "engine": engine.identity,
        "model": model,
        "markdown": result.markdown,
        "blocks": [b.to_content_item(job.page - 1) for b in result.blocks],
        "requests": result.requests,
        "latency_s": round(latency, 4),
        "created_at": datetime.now(UTC).isoformat(),
    }
    # Written only after the whole answer is in hand: an interrupted page leaves no result that looks finished.
    await asyncio.to_thread(storage.put_json, job.result_key, record)
    PAGES_PROCESSED.labels(engine=engine.name).inc()
    return PageOutcome(
        job.doc_id, job.page, "done", job.cache_key, latency_s=latency, requests=result.requests, record=record
    )


def _assemble_document(
    storage: Storage, doc_id: str, manifest: dict[str, Any], identity: str, outcomes: list[PageOutcome]
) -> DocumentStatus:
    by_page = {o.page: o for o in outcomes if o.doc_id == doc_id}
    previous = _previous_status(storage, doc_id)
    previous_failures = {f["page"]: f for f in previous.get("failed_pages", [])}
    md_parts: list[str] = []
    content: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    done = 0
    now = datetime.now(UTC).isoformat()
    for page in manifest["pages"]:
        n = page["page"]
        outcome = by_page.get(n)
        if outcome is not None and outcome.status in {"done", "cached"}:
            record = outcome.record or storage.get_json(storage.vlm_page_key(doc_id, n, outcome.cache_key or ""))
            md_parts.append(f"<!-- page {n} -->\n\n{record['markdown']}".rstrip())
            content.extend(record.get("blocks", []))
            done += 1
            continue
        reason = outcome.reason if outcome else "not_attempted"
        message = outcome.message if outcome else "page was not attempted"
        attempts = int(previous_failures.get(n, {}).get("attempts", 0)) + 1
        failed.append({"page": n, "reason": reason, "message": message, "attempts": attempts, "last_attempt": now})
        md_parts.append(f"<!-- page {n}: not processed yet ({reason}); re-materialize vlm_outputs to retry -->")
    for render_failure in manifest.get("failed_pages", []):
        failed.append(
            {
                "page": render_failure["page"],
                "reason": f"render_{render_failure['reason']}",
                "message": render_failure["error"],
                "attempts": int(previous_failures.get(render_failure["page"], {}).get("attempts", 0)) + 1,
                "last_attempt": now,
            }
        )
    failed.sort(key=lambda f: f["page"])
    storage.put_bytes(storage.document_md_key(doc_id), ("\n\n".join(md_parts) + "\n").encode(), "text/markdown")
    storage.put_json(storage.content_list_key(doc_id), content)
    status = DocumentStatus(
        doc_id=doc_id,
        source=str(manifest.get("source", doc_id)),
        pages_total=int(manifest.get("page_count", len(manifest["pages"]))),
        done=done,
        failed_pages=failed,
    )
    storage.put_json(
        storage.vlm_status_key(doc_id),
        {
            "version": STATUS_VERSION,
            "doc_id": doc_id,
            "source": status.source,
            "engine": identity,
            "state": status.state,
            "pages_total": status.pages_total,
            "pages_done": done,
            "failed_pages": failed,
            "updated_at": now,
        },
    )
    return status


def _previous_status(storage: Storage, doc_id: str) -> dict[str, Any]:
    try:
        return storage.get_json(storage.vlm_status_key(doc_id))
    except FileNotFoundError:
        return {}
