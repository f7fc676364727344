"""vlm_outputs: stream every page of a batch through the engine, cache each finished page, lose none.

The page path is the reason the split architecture exists, so it streams:

- one producer reads a document's page manifest, lists its cached results (one LIST), and starts the
  document's missing pages at once, as fast as the client's limiter has room for them: the number of
  pages in flight follows the limiter (the server's measured capacity), never a config knob;
- each page task fetches its PNG, asks the engine, stores figure crops and the page record, and
  reports to its document; memory is bounded by pages in flight, not by batch size;
- a document is assembled (``document.md``, ``content_list.json``, ``status.json``) as soon as its
  last page finishes, concurrently with the other documents' pages.

What "nothing lost" means here (DESIGN.md, accounting invariant): every page ends as a cached result
``vlm/<doc_id>/pages/<n>.<cache_key>.json`` or as an entry of ``status.json``'s ``failed_pages`` with
its reason (the first real cause), message and attempts, and is retried by the next materialization.
Before a document is worked on, an existing status is marked ``stale`` (with this run's id), so a step
that dies leaves no status that claims an earlier, different result is current. Any error while
fetching, decoding, asking or storing one page fails that page only. If the bucket itself cannot be
written, the step fails with one message, and the next run resumes from what was recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from mkg_pipeline.engines.base import AnswerRejected, PageEngine, PageInput, page_cache_key
from mkg_pipeline.outputs import assemble_document, page_record
from mkg_pipeline.pipeline_metrics import PAGES_CACHED, PAGES_FAILED, PAGES_PROCESSED
from mkg_pipeline.storage import AsyncStorage, PreconditionFailed, Storage
from mkg_pipeline.vllm.errors import VLLMClientError

log = logging.getLogger(__name__)

STATUS_VERSION = 2
#: failure rows kept for asset metadata; the full list is in each document's status.json
MAX_FAILURE_ROWS = 200
#: latency samples kept for quantiles (reservoir), whatever the batch size
LATENCY_SAMPLES = 4096
#: seconds between progress summaries in the step log (per page lines would be 100 per second)
SUMMARY_EVERY_S = 10.0
#: cached page records of one document read at once while assembling it
ASSEMBLY_READS = 32
#: consecutive failed S3 calls on the page path after which the bucket is taken as down for this step
S3_DOWN_AFTER = 8


class CapacityGate(Protocol):
    """How many more requests the server can take now: the client's adaptive limiter."""

    @property
    def limit(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def waiting(self) -> int: ...


class StorageUnavailable(RuntimeError):
    """The bucket could not record a document's outcome; the step fails, the next run resumes."""


class ClaimLost(RuntimeError):
    """Another run took the batch over (this one's lease expired): this run stopped starting work on it."""


# ---- what a run reports -----------------------------------------------------------------------------


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
    """Counters of one run; bounded whatever the batch size (no per-page list)."""

    engine: str
    model: str
    server_url: str
    pages_total: int = 0
    processed: int = 0
    cached: int = 0
    failed: int = 0
    requests: int = 0
    wall_s: float = 0.0
    failure_reasons: Counter[str] = field(default_factory=Counter)
    failure_rows: list[dict[str, Any]] = field(default_factory=list)
    documents: dict[str, str] = field(default_factory=dict)  # doc_id -> state
    unrendered: list[str] = field(default_factory=list)
    unrecorded: list[str] = field(default_factory=list)
    preview: str = ""
    _latencies: list[float] = field(default_factory=list)
    _latency_count: int = 0

    def observe_latency(self, seconds: float) -> None:
        self._latency_count += 1
        if len(self._latencies) < LATENCY_SAMPLES:
            self._latencies.append(seconds)
        else:  # reservoir sampling: every page equally likely to be kept
            slot = random.randrange(self._latency_count)
            if slot < LATENCY_SAMPLES:
                self._latencies[slot] = seconds

    def latency_quantile(self, q: float) -> float | None:
        values = sorted(self._latencies)
        if not values:
            return None
        return values[min(len(values) - 1, round(q * (len(values) - 1)))]

    @property
    def pages_per_s(self) -> float:
        return self.processed / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def failed_page_rate(self) -> float:
        return self.failed / self.pages_total if self.pages_total else 0.0


# ---- one document's progress ------------------------------------------------------------------------


@dataclass
class _Document:
    doc_id: str
    source: str
    pages: list[dict[str, Any]]  # the manifest's rendered pages
    render_failures: list[dict[str, Any]]
    previous_failures: dict[int, dict[str, Any]]
    identity: str
    #: page number -> the record stored this run (held only until the document is assembled)
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: page number -> cache key of a result stored by an earlier run
    cached: dict[int, str] = field(default_factory=dict)
    failures: dict[int, dict[str, Any]] = field(default_factory=dict)
    scheduled_all: bool = False

    @property
    def finished(self) -> int:
        return len(self.records) + len(self.cached) + len(self.failures)

    @property
    def complete(self) -> bool:
        return self.scheduled_all and self.finished == len(self.pages)


@dataclass(frozen=True)
class _PageJob:
    doc: _Document
    page: dict[str, Any]
    cache_key: str

    @property
    def number(self) -> int:
        return int(self.page["page"])

    @property
    def label(self) -> str:
        return f"doc={self.doc.doc_id} page={self.number}"


def _first_cause(exc: VLLMClientError) -> tuple[str, str]:
    """The failure's real cause and message: a breaker that opened says why it opened."""
    first = getattr(exc, "first_cause", None)
    if exc.error_type == "circuit_open" and first:
        return str(first), f"{exc} (later attempts ended with circuit_open)"
    return exc.error_type, str(exc)


def _now() -> str:
    return datetime.now(UTC).isoformat()


class _BatchRun:
    """State of one call of :func:`process_documents` (one Dagster step)."""

    def __init__(
        self,
        s3: AsyncStorage,
        engine: PageEngine,
        gate: CapacityGate,
        summary: VLMSummary,
        *,
        model: str,
        run_id: str,
        force_refresh: bool,
        progress: Callable[[str], None],
        claim: Callable[[], None] | None = None,
    ) -> None:
        self.s3 = s3
        self.claim = claim
        self.claim_lost: str | None = None
        self.engine = engine
        self.gate = gate
        self.summary = summary
        self.model = model
        self.run_id = run_id
        self.force_refresh = force_refresh
        self.progress = progress
        self.preparing = 0  # page tasks that have not reached the engine yet (not seen by the limiter)
        self.page_tasks: set[asyncio.Task[None]] = set()
        self.storage_errors_in_a_row = 0
        self.last_storage_error = ""
        self.assembly_tasks: set[asyncio.Task[None]] = set()
        self.changed = asyncio.Event()

    # -- scheduling ---------------------------------------------------------------------------------

    def holds_claim(self) -> bool:
        """Whether this run still holds its batch; once another run took it over, start nothing more on it."""
        if self.claim_lost is None and self.claim is not None:
            try:
                self.claim()
            except Exception as exc:
                self.claim_lost = str(exc)
                self.progress(f"STOPPING: {exc}")
        return self.claim_lost is None

    def _has_room(self) -> bool:
        gate = self.gate
        limit = gate.limit
        busy = gate.in_flight + gate.waiting + self.preparing
        # The limiter is the throughput knob. A few pages beyond it fetch their image ahead, so a request
        # can start the moment a slot frees; the second bound only caps memory if requests stall.
        return busy < limit + max(2, limit // 8) and len(self.page_tasks) < 2 * limit + 16

    async def _wait_for_room(self) -> None:
        while not self._has_room():
            self.changed.clear()
            # Woken by every page that starts or ends; the timeout notices the limiter growing meanwhile.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout=0.05)

    def _spawn(self, job: _PageJob) -> None:
        self.preparing += 1
        task = asyncio.create_task(self._page(job), name=job.label)
        self.page_tasks.add(task)
        task.add_done_callback(self._page_done)

    def _page_done(self, task: asyncio.Task[None]) -> None:
        self.page_tasks.discard(task)
        self.changed.set()
        if not task.cancelled() and task.exception() is not None:  # _page records every error itself
            log.error("page task %s crashed: %r", task.get_name(), task.exception())

    # -- one document -------------------------------------------------------------------------------

    async def open_document(self, doc_id: str) -> tuple[_Document, list[_PageJob]] | None:
        """Read a document's manifest and cached results; None when there is nothing to do for it."""
        s3 = self.s3
        # The three reads at once, not one after another: the first document's are on the path to the
        # first request, and every document's on the producer's.
        reads = await asyncio.gather(
            s3.get_json(s3.page_manifest_key(doc_id)),
            self._read_status(doc_id),
            self._cached_keys(doc_id),
            return_exceptions=True,
        )
        manifest, previous, existing = reads
        if isinstance(manifest, FileNotFoundError):
            self.summary.unrendered.append(doc_id)
            self.progress(f"{doc_id}: SKIPPED, no page manifest yet; materialize parsed_pages for its batch")
            return None
        for result in reads:
            if isinstance(result, BaseException):
                raise result
        doc = _Document(
            doc_id=doc_id,
            source=str(manifest.get("source", doc_id)),
            pages=manifest["pages"],
            render_failures=manifest.get("failed_pages", []),
            previous_failures={int(f["page"]): f for f in (previous or {}).get("failed_pages", [])},
            identity=self.engine.identity,
        )
        todo: list[_PageJob] = []
        for page in doc.pages:
            key = page_cache_key(page["png_sha256"], self.engine.identity)
            if s3.vlm_page_key(doc_id, page["page"], key) in existing:
                doc.cached[int(page["page"])] = key
            else:
                todo.append(_PageJob(doc, page, key))
        self.summary.pages_total += len(doc.pages) + len(doc.render_failures)
        self.summary.cached += len(doc.cached)
        PAGES_CACHED.labels(engine=self.engine.name).inc(len(doc.cached))
        if not todo and _is_current(previous, doc):
            # Every page cached and the assembled outputs say so: nothing to redo, nothing to rewrite.
            self.summary.documents[doc_id] = str(previous["state"]) if previous else "complete"
            return None
        if previous is not None:
            await self._mark_stale(doc_id, previous)
        if doc.cached:
            self.progress(f"{doc_id} ({doc.source}): {len(doc.cached)}/{len(doc.pages)} pages cached")
        return doc, todo

    async def _cached_keys(self, doc_id: str) -> set[str]:
        """Keys of the page results stored for a document (none wanted when refreshing)."""
        if self.force_refresh:
            return set()
        return {o.key async for o in self.s3.list_objects(self.s3.vlm_page_prefix(doc_id))}

    async def _read_status(self, doc_id: str) -> dict[str, Any] | None:
        try:
            return await self.s3.get_json(self.s3.vlm_status_key(doc_id))  # type: ignore[no-any-return]
        except FileNotFoundError:
            return None

    async def _mark_stale(self, doc_id: str, previous: dict[str, Any]) -> None:
        stale = {**previous, "state": "stale", "stale_since": _now(), "run_id": self.run_id}
        await self.s3.put_json(self.s3.vlm_status_key(doc_id), stale)

    @property
    def s3_down(self) -> bool:
        return self.storage_errors_in_a_row >= S3_DOWN_AFTER

    def s3_ok(self) -> None:
        self.storage_errors_in_a_row = 0

    def s3_failed(self, exc: BaseException) -> None:
        self.storage_errors_in_a_row += 1
        self.last_storage_error = f"{type(exc).__name__}: {exc}"

    async def run_document(self, doc: _Document, todo: list[_PageJob]) -> None:
        for job in todo:
            await self._wait_for_room()
            if self.s3_down:  # no point queueing pages that cannot be read or recorded; the next run resumes
                self.summary.unrecorded.append(doc.doc_id)
                return
            if not self.holds_claim():  # the batch is another run's now: it does this page
                return
            self._spawn(job)
        doc.scheduled_all = True
        self._maybe_assemble(doc)

    # -- one page -----------------------------------------------------------------------------------

    async def _page(self, job: _PageJob) -> None:
        doc, n = job.doc, job.number
        started = time.monotonic()
        reached_engine = False
        try:
            try:
                png = await self.s3.get_bytes(job.page["png_key"])
            except Exception as exc:  # the image is gone or S3 failed: this page only
                if not isinstance(exc, FileNotFoundError):
                    self.s3_failed(exc)
                self._fail(job, "storage_error", f"reading the page image failed: {type(exc).__name__}: {exc}")
                return
            self.s3_ok()
            self.preparing -= 1
            reached_engine = True
            self.changed.set()
            page = PageInput(
                png=png,
                page_idx=n - 1,
                text_layer_chars=int(job.page.get("text_layer_chars", 0)),
                label=job.label,
            )
            try:
                result = await self.engine.extract(page)
            except VLLMClientError as exc:
                reason, message = _first_cause(exc)
                self._fail(job, reason, message)
                return
            except AnswerRejected as exc:
                self.summary.requests += exc.requests
                self._fail(job, exc.reason, str(exc))
                return
            except Exception as exc:  # an engine bug or an undecodable image fails this page only
                log.exception("page %s: the engine failed", job.label)
                self._fail(job, "engine_error", f"{type(exc).__name__}: {exc}")
                return
            self.summary.requests += result.requests
            latency = time.monotonic() - started
            record = page_record(
                result,
                doc_id=doc.doc_id,
                page=n,
                cache_key=job.cache_key,
                engine=self.engine.identity,
                model=result.model or self.model,  # who answered: the configured model or an accepted alias
                latency_s=round(latency, 4),
            )
            record["run_id"] = self.run_id
            try:
                await self._store_page(job, record, result.images)
            except Exception as exc:  # an unencodable answer or S3 failing: this page only
                if not isinstance(exc, UnicodeError):
                    self.s3_failed(exc)
                self._fail(job, "storage_error", f"storing the result failed: {type(exc).__name__}: {exc}")
                return
            self.s3_ok()
            doc.records[n] = record
            self.summary.processed += 1
            self.summary.observe_latency(latency)
            PAGES_PROCESSED.labels(engine=self.engine.name).inc()
        finally:
            if not reached_engine:
                self.preparing -= 1
            self._maybe_assemble(doc)

    async def _store_page(self, job: _PageJob, record: dict[str, Any], images: dict[str, bytes]) -> None:
        s3, doc_id = self.s3, job.doc.doc_id
        for name, data in images.items():
            # Content-addressed: whoever wrote it first wrote the same bytes.
            with contextlib.suppress(PreconditionFailed):
                await s3.put_bytes(s3.vlm_image_key(doc_id, name), data, "image/jpeg", if_none_match=True)
        # Written after its figures and only once the whole answer is in hand: a page result that exists is whole.
        await s3.put_json(s3.vlm_page_key(doc_id, job.number, job.cache_key), record)

    def _fail(self, job: _PageJob, reason: str, message: str) -> None:
        previous = job.doc.previous_failures.get(job.number, {})
        failure = {
            "page": job.number,
            "reason": reason,
            "message": message,
            "attempts": int(previous.get("attempts", 0)) + 1,
            "last_attempt": _now(),
        }
        job.doc.failures[job.number] = failure
        self.summary.failed += 1
        self.summary.failure_reasons[reason] += 1
        if len(self.summary.failure_rows) < MAX_FAILURE_ROWS:
            self.summary.failure_rows.append({"doc_id": job.doc.doc_id, "source": job.doc.source, **failure})
        PAGES_FAILED.labels(reason=reason).inc()

    # -- assembly -----------------------------------------------------------------------------------

    def _maybe_assemble(self, doc: _Document) -> None:
        if doc.complete and doc.doc_id not in self.summary.documents and self.holds_claim():
            self.summary.documents[doc.doc_id] = "assembling"
            task = asyncio.create_task(self._assemble(doc), name=f"assemble {doc.doc_id}")
            self.assembly_tasks.add(task)
            task.add_done_callback(self.assembly_tasks.discard)

    async def _assemble(self, doc: _Document) -> None:
        try:
            status = await self._write_outputs(doc)
        except Exception as exc:
            log.exception("%s: recording the document failed", doc.doc_id)
            self.summary.unrecorded.append(doc.doc_id)
            self.summary.documents[doc.doc_id] = "unrecorded"
            self.progress(f"{doc.doc_id} ({doc.source}): NOT RECORDED, {type(exc).__name__}: {exc}")
            return
        finally:
            doc.records.clear()  # the document's pages leave memory with it
        self.summary.documents[doc.doc_id] = status.state
        self.progress(
            f"{doc.doc_id} ({status.source}): {status.state}, {status.done}/{status.pages_total} pages"
            + (f", {len(status.failed_pages)} failed" if status.failed_pages else "")
        )

    async def _write_outputs(self, doc: _Document) -> DocumentStatus:
        s3 = self.s3
        pages = await self._page_records(doc)
        now = _now()
        failed = sorted(doc.failures.values(), key=lambda f: f["page"])
        for render_failure in doc.render_failures:
            n = int(render_failure["page"])
            previous = doc.previous_failures.get(n, {})
            failed.append(
                {
                    "page": n,
                    "reason": f"render_{render_failure['reason']}",
                    "message": render_failure.get("error", ""),
                    "attempts": int(previous.get("attempts", 0)) + 1,
                    "last_attempt": now,
                }
            )
        failed.sort(key=lambda f: f["page"])
        by_page: dict[int, dict[str, Any]] = {**{int(f["page"]): f for f in failed}, **pages}
        markdown, content_list = assemble_document([by_page[n] for n in sorted(by_page)])
        await s3.put_bytes(s3.document_md_key(doc.doc_id), markdown.encode("utf-8"), "text/markdown")
        await s3.put_json(s3.content_list_key(doc.doc_id), content_list)
        status = DocumentStatus(
            doc_id=doc.doc_id,
            source=doc.source,
            pages_total=len(doc.pages) + len(doc.render_failures),
            done=len(doc.records) + len(doc.cached),
            failed_pages=failed,
        )
        await s3.put_json(
            s3.vlm_status_key(doc.doc_id),
            {
                "version": STATUS_VERSION,
                "doc_id": doc.doc_id,
                "source": status.source,
                "engine": doc.identity,
                "state": status.state,
                "pages_total": status.pages_total,
                "pages_done": status.done,
                "failed_pages": failed,
                "run_id": self.run_id,
                "updated_at": now,
            },
        )
        if not self.summary.preview:
            self.summary.preview = markdown
        return status

    async def _page_records(self, doc: _Document) -> dict[int, dict[str, Any]]:
        """The finished pages of a document by number: this run's from memory, earlier ones from S3."""
        s3 = self.s3
        limit = asyncio.Semaphore(ASSEMBLY_READS)

        async def cached(n: int, key: str) -> dict[str, Any]:
            async with limit:
                return await s3.get_json(s3.vlm_page_key(doc.doc_id, n, key))  # type: ignore[no-any-return]

        numbers = sorted(doc.cached)
        earlier = await asyncio.gather(*(cached(n, doc.cached[n]) for n in numbers))
        return {**dict(zip(numbers, earlier, strict=True)), **doc.records}

    # -- the whole step -----------------------------------------------------------------------------

    async def report_progress(self, started: float) -> None:
        while True:
            await asyncio.sleep(SUMMARY_EVERY_S)
            s = self.summary
            elapsed = time.monotonic() - started
            self.progress(
                f"progress: {s.processed} processed, {s.cached} cached, {s.failed} failed of {s.pages_total} pages "
                f"seen; {s.processed / elapsed:.1f} pages/s; requests in flight {self.gate.in_flight}, "
                f"limit {self.gate.limit}" + (f"; failures so far: {dict(s.failure_reasons)}" if s.failed else "")
            )


def _is_current(previous: dict[str, Any] | None, doc: _Document) -> bool:
    return (
        previous is not None
        and previous.get("state") == "complete"
        and previous.get("engine") == doc.identity
        and int(previous.get("pages_done", -1)) == len(doc.pages)
        and not doc.render_failures
    )


async def process_documents(
    storage: Storage,
    engine: PageEngine,
    doc_ids: list[str],
    gate: CapacityGate,
    *,
    server_url: str,
    model: str,
    run_id: str = "",
    force_refresh: bool = False,
    progress: Callable[[str], None] = log.info,
    claim: Callable[[], None] | None = None,
) -> VLMSummary:
    """Send every page of ``doc_ids`` through ``engine``; returns the run's counters.

    Raises :class:`StorageUnavailable` when some document's outcome could not be recorded (the bucket is
    unreachable): everything that was recorded stays, and the next run resumes from it.

    ``claim`` (the batch lease's ``check``) is called before each document, page and assembly is started;
    once it raises, the run starts nothing more (pages in flight finish and are kept, documents are left to
    the run that took the batch over) and :class:`ClaimLost` is raised at the end.
    """
    started = time.monotonic()
    summary = VLMSummary(engine=engine.identity, model=model, server_url=server_url)
    async with storage.session() as s3:
        batch = _BatchRun(
            s3,
            engine,
            gate,
            summary,
            model=model,
            run_id=run_id,
            force_refresh=force_refresh,
            progress=progress,
            claim=claim,
        )
        reporter = asyncio.create_task(batch.report_progress(started))
        try:
            for doc_id in doc_ids:
                if batch.s3_down:
                    summary.unrecorded.append(doc_id)
                    continue
                if not batch.holds_claim():
                    break
                try:
                    opened = await batch.open_document(doc_id)
                except Exception as exc:  # S3 failing on one document's manifest/status: not the others
                    log.exception("%s: could not be opened", doc_id)
                    batch.s3_failed(exc)
                    summary.unrecorded.append(doc_id)
                    progress(f"{doc_id}: NOT STARTED, {type(exc).__name__}: {exc}")
                    continue
                if opened is not None:
                    await batch.run_document(*opened)
            while batch.page_tasks or batch.assembly_tasks:
                await asyncio.gather(*list(batch.page_tasks), *list(batch.assembly_tasks))
        finally:
            reporter.cancel()
            for task in [*batch.page_tasks, *batch.assembly_tasks]:
                task.cancel()
    summary.wall_s = time.monotonic() - started
    if batch.claim_lost is not None:
        raise ClaimLost(
            f"{batch.claim_lost}. This run stopped starting pages and documents of the batch when it learned it; "
            f"the {summary.processed} page(s) it finished are stored. The run that took the batch over does the "
            "rest; if that one fails too, materialize vlm_outputs again (only missing pages are requested)"
        )
    if summary.unrecorded:
        cause = f"; last error: {batch.last_storage_error}" if batch.last_storage_error else ""
        raise StorageUnavailable(
            f"the outcome of {len(summary.unrecorded)} document(s) could not be recorded in s3://{storage.bucket} "
            f"({', '.join(summary.unrecorded[:10])}): is S3 reachable?{cause}. Every page result that was stored "
            "is kept; re-materialize vlm_outputs to resume (only the missing pages are requested)"
        )
    return summary
