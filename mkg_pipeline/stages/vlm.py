"""vlm_outputs: stream every page of a batch through the engine, cache each finished page, lose none.

The page path is the reason the split architecture exists, so it streams:

- one producer reads a document's page manifest, lists its cached results (one LIST), and starts the
  document's missing pages at once, as fast as the client's limiter has room for them: the number of
  pages in flight follows the limiter (the server's measured capacity), never a config knob. The next
  document is opened while this one's pages start, and enough pages beyond the limit fetch their image
  ahead (:func:`prefetch_margin`) that a freed slot finds one ready: with S3 in the path, the stage keeps
  the limiter as full as a client holding its pages in memory;
- each page task fetches its PNG, asks the engine, stores figure crops and the page record, and
  reports to its document; memory is bounded by pages in flight and by the bytes they hold (PNG, request
  body, answer: ``workers.vlm_page_memory_mb``), never by batch size; a page larger than the budget
  runs alone;
- a document is assembled (``document.md``, ``content_list.json``, ``status.json``) as soon as its
  last page finishes, concurrently with the other documents' pages.

What "nothing lost" means here (DESIGN.md, accounting invariant): every page ends as a cached result
``vlm/<doc_id>/pages/<n>.<cache_key>.json`` or as an entry of ``status.json``'s ``failed_pages`` with
its reason (the first real cause), message and attempts, and is retried by the next materialization.
Before a document is worked on, an existing status is marked ``stale`` (with this run's id), so a step
that dies leaves no status that claims an earlier, different result is current.

Pages take one of two routes (DESIGN.md, "Page routes"; decided by parsed_pages). A ``text`` page's result
was written by parsed_pages (the text engine, no GPU) as a page record under the text engine's identity;
here it is a finished page whose record already exists: it is checked (:mod:`mkg_pipeline.records`, with
that identity) and assembled with the VLM pages, never sent to the engine. A text page whose record is
missing fails visibly (``text_record_missing``) and parsed_pages writes it again. Each page's route is
recorded in status.json, and pages are counted by route (summary, metadata, ``pages_total{route}``).

A VLM page whose answers stay invalid after the engine's re-asks fails with that reason, or, with
``answers.text_fallback``, gets its text layer's result (:meth:`_BatchRun._fall_back`): flagged in the
record and in status.json's ``fallback_pages``, never cached (the next run asks the VLM again), and a
document with more than ``answers.max_fallback_share`` of its pages so served fails (``fallback_budget``).

Records prove themselves (:mod:`mkg_pipeline.records`): a cached page result counts only if it parses and
names its document, page, cache key and engine; status.json records the ETag of every result it counts,
so a re-run trusts a result whose ETag it recorded and reads (and checks) any other once. A result that
does not prove itself is requested again (its object overwritten), an unreadable status is treated as
missing and rewritten, an unreadable page manifest fails its document only (parsed_pages writes it). Only
S3 errors count towards "S3 is down"; corrupt data never does. Any error while
fetching, decoding, asking or storing one page fails that page only. If the bucket itself cannot be
written, the step fails with one message, and the next run resumes from what was recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from mkg_pipeline import records
from mkg_pipeline.config import AnswersConfig
from mkg_pipeline.document import assemble_document, page_record
from mkg_pipeline.engines.base import AnswerRejected, PageEngine, PageInput, page_cache_key
from mkg_pipeline.metrics.pipeline import PAGES_CACHED, PAGES_FAILED, PAGES_PROCESSED, PAGES_TOTAL
from mkg_pipeline.storage import AsyncStorage, PreconditionFailed, Storage
from mkg_pipeline.vllm.errors import VLLMClientError

log = logging.getLogger(__name__)

STATUS_VERSION = 3  # 3: page_etags
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
#: default bytes of pages in flight (config ``workers.vlm_page_memory_mb``)
DEFAULT_MEMORY_BUDGET = 1536 * 1024 * 1024
#: what one page in flight holds beyond its PNG, per PNG byte: the request body's base64 (4/3) and its JSON
#: envelope. The client builds the body in one piece and lets go of the base64 before it sends.
BODY_BYTES_PER_PNG_BYTE = 4 / 3
#: ... plus its answer, its parsed JSON and the page record: a bound of an ordinary answer, not of the cap
ANSWER_BYTES = 1024 * 1024
#: engines that decode the page image in this process (PIL, 4 bytes a pixel at most)
DECODING_ENGINES = frozenset({"mineru"})


class CapacityGate(Protocol):
    """How many more requests the server can take now: the client's adaptive limiter."""

    @property
    def limit(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def waiting(self) -> int: ...
    async def wait_for_capacity(self) -> None:
        """Resolve once a request could start at once (a slot freed, or the limit rose)."""


class StorageUnavailable(RuntimeError):
    """The bucket could not record a document's outcome; the step fails, the next run resumes."""


class ClaimLost(RuntimeError):
    """Another run took the batch over (this one's lease expired): this run stopped starting work on it."""


class DocumentsNotProcessed(RuntimeError):
    """Some documents could not be worked on for a reason of their own (an unreadable page manifest); the
    others were processed. The message names each document and what repairs it."""


# ---- what a run reports -----------------------------------------------------------------------------


@dataclass
class DocumentStatus:
    doc_id: str
    source: str
    pages_total: int
    done: int
    failed_pages: list[dict[str, Any]]
    #: pages whose result came from the text layer after the VLM's answers stayed invalid (``answers.text_fallback``)
    fallback_pages: list[dict[str, Any]] = field(default_factory=list)
    #: more fallback pages than ``answers.max_fallback_share`` allows: the document fails, whatever else is done
    over_fallback_budget: bool = False

    @property
    def state(self) -> str:
        if self.over_fallback_budget:
            return "failed"
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
    #: pages by route (text: from the text layer, no GPU; vlm: the engine), for the run and per document
    routes: Counter[str] = field(default_factory=Counter)
    #: text-route pages found finished (their records, written by parsed_pages, prove themselves)
    text_done: int = 0
    routes_by_document: dict[str, dict[str, int]] = field(default_factory=dict)
    #: doc_id -> why it could not be worked on (not S3: its own records), with what repairs it
    not_processed: dict[str, str] = field(default_factory=dict)
    #: pages whose result came from the text layer (``answers.text_fallback``): never cached, asked again next run
    fallback: int = 0
    #: doc_id -> its fallback pages, and the documents failed for having too many (``fallback_budget``)
    fallback_by_document: dict[str, int] = field(default_factory=dict)
    over_fallback_budget: list[str] = field(default_factory=list)
    #: stored records found unreadable (redone or rewritten): "doc page n: problem"
    unreadable_records: list[str] = field(default_factory=list)
    #: most bytes the pages in flight held at once (their estimated cost), against the memory budget
    peak_page_bytes: int = 0
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
    #: page number -> ETag of its stored result (this run's and earlier ones'), recorded in status.json
    etags: dict[int, str] = field(default_factory=dict)
    #: page number -> PNG size as listed (for admitting pages by bytes)
    png_sizes: dict[int, int] = field(default_factory=dict)
    failures: dict[int, dict[str, Any]] = field(default_factory=dict)
    scheduled_all: bool = False
    #: page number -> identity of the engine that wrote a text-route page's record (the text engine's)
    identities: dict[int, str] = field(default_factory=dict)
    #: page number -> route ("text" or "vlm")
    routes: dict[int, str] = field(default_factory=dict)
    #: page number -> why the VLM's answers were refused, for pages whose result is the text layer's (in records)
    fallbacks: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: the document's PDF, read from raw/ once for its fallback pages (dropped when it is assembled)
    raw_pdf: asyncio.Task[bytes] | None = None

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
    #: bytes this page holds while in flight (PNG, request body, answer): what it takes of the budget
    cost: int = 0
    #: the identity its record is written under: the text engine's for a text-route page, else the engine's
    identity: str = ""

    @property
    def number(self) -> int:
        return int(self.page["page"])

    @property
    def label(self) -> str:
        return f"doc={self.doc.doc_id} page={self.number}"


class _Mean:
    """An exponentially weighted mean of durations (None before the first)."""

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self.value: float | None = None

    def observe(self, seconds: float) -> None:
        self.value = seconds if self.value is None else self.value + self.weight * (seconds - self.value)


def prefetch_margin(limit: int, fetch_s: float | None, answer_s: float | None) -> int:
    """Pages to start beyond the limiter's limit, so that one is ready whenever a slot frees.

    Slots free at ``limit / answer_s`` a second and a page takes ``fetch_s`` to be ready (its image read
    from S3): twice as many as free during one fetch, at least ``max(2, limit // 8)``, at most the limit
    (the byte budget bounds their memory in any case).
    """
    least = max(2, limit // 8)
    if not fetch_s or not answer_s:
        return least
    return max(least, min(limit, math.ceil(2 * limit * fetch_s / answer_s)))


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
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        answers: AnswersConfig | None = None,
    ) -> None:
        self.s3 = s3
        self.answers = answers or AnswersConfig()
        self.memory_budget = memory_budget
        self.bytes_held = 0  # what the pages in flight hold (their jobs' cost), admitted against the budget
        self.peak_bytes_held = 0
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
        #: how long a page's image takes to fetch, and a page's request to be answered (for the prefetch)
        self.fetch_s = _Mean()
        self.answer_s = _Mean()

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
        # The limiter is the throughput knob. Pages beyond it fetch their image ahead, so a request can
        # start the moment a slot frees; the second bound only caps memory if requests stall.
        margin = prefetch_margin(limit, self.fetch_s.value, self.answer_s.value)
        return busy < limit + margin and len(self.page_tasks) < 2 * limit + 16

    def _bytes_fit(self, cost: int) -> bool:
        # A page larger than the whole budget still runs, alone: nothing else is admitted beside it.
        return self.bytes_held == 0 or self.bytes_held + cost <= self.memory_budget

    async def _wait_for_room(self, cost: int = 0) -> None:
        """Until the next page may start; woken by what makes room, never by a timer.

        Room is made by a page of this run reaching the engine, leaving it or ending (``changed``), or, while the
        limiter is what binds, by the limiter itself: a request of the process releasing its slot, or a
        reading of the server raising the limit (``wait_for_capacity``). A cold pod is thus woken by the
        reading that grows its limit, not by the next poll.
        """
        while not (self._has_room() and self._bytes_fit(cost)):
            self.changed.clear()
            waits = [asyncio.ensure_future(self.changed.wait())]
            gate = self.gate
            if gate.in_flight + gate.waiting >= gate.limit:
                waits.append(asyncio.ensure_future(gate.wait_for_capacity()))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waits:
                    waiter.cancel()

    def _spawn(self, job: _PageJob) -> None:
        self.preparing += 1
        self.bytes_held += job.cost
        self.peak_bytes_held = max(self.peak_bytes_held, self.bytes_held)
        task = asyncio.create_task(self._page(job), name=job.label)
        self.page_tasks.add(task)
        task.add_done_callback(self._page_done)

    def _page_done(self, task: asyncio.Task[None]) -> None:
        self.page_tasks.discard(task)
        self.changed.set()
        if not task.cancelled() and task.exception() is not None:  # _page records every error itself
            log.error("page task %s crashed: %r", task.get_name(), task.exception())

    # -- one document -------------------------------------------------------------------------------

    async def open_guarded(self, doc_id: str) -> tuple[_Document, list[_PageJob]] | None:
        """:meth:`open_document`, its failure that of this document only: None when it could not be opened."""
        try:
            return await self.open_document(doc_id)
        except _NOT_S3 as exc:  # a bug, not the bucket: this document only, and S3 is not blamed
            log.exception("%s: could not be opened", doc_id)
            self.summary.documents[doc_id] = "error"
            self.summary.not_processed[doc_id] = f"opening it failed: {type(exc).__name__}: {exc}"
            self.progress(f"{doc_id}: NOT STARTED, {type(exc).__name__}: {exc}")
        except Exception as exc:  # S3 failing on one document's manifest/status: not the others
            log.exception("%s: could not be opened", doc_id)
            self.s3_failed(exc)
            self.summary.unrecorded.append(doc_id)
            self.progress(f"{doc_id}: NOT STARTED, {type(exc).__name__}: {exc}")
        return None

    async def open_document(self, doc_id: str) -> tuple[_Document, list[_PageJob]] | None:
        """Read a document's manifest and cached results; None when there is nothing to do for it.

        Raises only S3 errors (which count towards "S3 is down"); a record that does not prove itself is
        handled here: an unreadable manifest fails this document, a status is treated as missing, a page
        result is requested again.
        """
        s3 = self.s3
        # The three reads at once, not one after another: the first document's are on the path to the
        # first request (the next documents are opened while this one's pages start).
        manifest_data, status_data, listed = await asyncio.gather(
            self._get_or_none(s3.page_manifest_key(doc_id)),
            self._get_or_none(s3.vlm_status_key(doc_id)),
            self._cached_keys(doc_id),
        )
        if manifest_data is None:
            self.summary.unrendered.append(doc_id)
            self.progress(f"{doc_id}: SKIPPED, no page manifest yet; materialize parsed_pages for its batch")
            return None
        manifest, problem = records.read_page_manifest(manifest_data, doc_id=doc_id)
        if manifest is None:
            self.summary.documents[doc_id] = "manifest_unreadable"
            self.summary.not_processed[doc_id] = (
                f"its page manifest {s3.uri(s3.page_manifest_key(doc_id))} is unreadable ({problem}); render it "
                f"again: materialize parsed_pages for this batch with config doc_ids=[{doc_id!r}] and force=true, "
                "then vlm_outputs"
            )
            self.progress(f"{doc_id}: NOT PROCESSED, {self.summary.not_processed[doc_id]}")
            return None
        previous = None
        if status_data is not None:
            previous, problem = records.read_status(status_data, doc_id=doc_id)
            if previous is None:
                self._unreadable(doc_id, None, s3.vlm_status_key(doc_id), problem, "treated as missing, rewritten")
        doc = _Document(
            doc_id=doc_id,
            source=str(manifest.get("source", doc_id)),
            pages=manifest["pages"],
            render_failures=manifest.get("failed_pages", []),
            previous_failures={int(f["page"]): f for f in (previous or {}).get("failed_pages", [])},
            identity=self.engine.identity,
        )
        png_sizes: dict[str, int] = {}
        if any(not isinstance(p.get("png_bytes"), int) for p in doc.pages if not records.is_text_page(p)):
            png_sizes = await self._png_sizes(doc_id)  # a manifest older than png_bytes: the listing's sizes
        recorded = (previous or {}).get("page_etags") or {}
        existing = {} if self.force_refresh else listed  # VLM results to reuse (none when refreshing)
        todo: list[_PageJob] = []
        unproven: list[_PageJob] = []
        missing_text: list[int] = []
        text_keys: dict[int, str] = {}  # text-route page -> the cache key of its record
        for page in doc.pages:
            n = int(page["page"])
            if records.is_text_page(page):
                # Finished by parsed_pages: its record exists, or the page fails (never sent to the engine).
                doc.routes[n] = "text"
                identity = str(page["engine"])
                doc.identities[n] = identity
                job = _PageJob(doc, page, str(page["cache_key"]), 0, identity)
                text_keys[n] = job.cache_key
                etag = listed.get(s3.vlm_page_key(doc_id, n, job.cache_key))
                if etag is None:
                    missing_text.append(n)
                elif recorded.get(str(n)) == etag:
                    doc.cached[n], doc.etags[n] = job.cache_key, etag
                else:
                    unproven.append(job)
                continue
            doc.routes[n] = "vlm"
            # The size parsed_pages recorded when it wrote the image, else the listing's: the page's cost
            # in memory (a bound from its pixels is 3 bytes a pixel, far above a document page's PNG).
            size = page.get("png_bytes") if isinstance(page.get("png_bytes"), int) else png_sizes.get(page["png_key"])
            if size is not None:
                doc.png_sizes[n] = size
            job = _PageJob(
                doc, page, page_cache_key(page["png_sha256"], self.engine.identity), self._page_cost(doc, page)
            )
            etag = existing.get(s3.vlm_page_key(doc_id, n, job.cache_key))
            if etag is None:
                todo.append(job)
            elif recorded.get(str(n)) == etag:  # the very object an earlier status counted: proven then
                doc.cached[n], doc.etags[n] = job.cache_key, etag
            else:
                unproven.append(job)
        for job, etag in zip(unproven, await self._prove(unproven, listed), strict=True):
            if etag is None and job.number in doc.identities:
                missing_text.append(job.number)
            elif etag is None:
                todo.append(job)
            else:
                doc.cached[job.number], doc.etags[job.number] = job.cache_key, etag
        todo.sort(key=lambda job: job.number)
        for n in sorted(missing_text):
            self._record_failure(
                doc,
                n,
                "text_record_missing",
                f"page {n} took the text route, but its result {s3.uri(s3.vlm_page_key(doc_id, n, text_keys[n]))} "
                f"is missing or unreadable; materialize parsed_pages for this batch (config doc_ids=[{doc_id!r}]): "
                "it writes text-route results again, then vlm_outputs",
            )
        self.summary.pages_total += len(doc.pages) + len(doc.render_failures)
        vlm_cached = sum(1 for n in doc.cached if n not in doc.identities)
        self.summary.cached += vlm_cached
        self.summary.text_done += len(doc.cached) - vlm_cached
        PAGES_CACHED.labels(engine=self.engine.name).inc(vlm_cached)
        by_route = {route: sum(1 for r in doc.routes.values() if r == route) for route in ("text", "vlm")}
        self.summary.routes.update(by_route)
        self.summary.routes_by_document[doc_id] = by_route
        for route, count in by_route.items():
            PAGES_TOTAL.labels(route=route).inc(count)
        if not todo and not unproven and not doc.failures and _is_current(previous, doc):
            # Every page cached and the assembled outputs say so: nothing to redo, nothing to rewrite.
            self.summary.documents[doc_id] = str(previous["state"]) if previous else "complete"
            return None
        if previous is not None:
            await self._mark_stale(doc_id, previous)
        if doc.cached:
            text = by_route["text"]
            self.progress(
                f"{doc_id} ({doc.source}): {vlm_cached}/{by_route['vlm']} VLM page(s) cached"
                + (f", {text} text-route page(s) done by parsed_pages" if text else "")
            )
        return doc, todo

    async def _prove(self, jobs: list[_PageJob], existing: dict[str, str]) -> list[str | None]:
        """Read and check the stored results no status vouches for: their ETag if valid, else None (redo)."""
        limit = asyncio.Semaphore(ASSEMBLY_READS)

        async def prove(job: _PageJob) -> str | None:
            key = self.s3.vlm_page_key(job.doc.doc_id, job.number, job.cache_key)
            async with limit:
                data = await self._get_or_none(key)
            if data is None:  # deleted since the listing
                return None
            _, problem = records.read_page_record(
                data,
                doc_id=job.doc.doc_id,
                page=job.number,
                cache_key=job.cache_key,
                engine=job.identity or self.engine.identity,
            )
            if problem is not None:
                self._unreadable(job.doc.doc_id, job.number, key, problem, "requested again")
                return None
            return existing[key]

        return list(await asyncio.gather(*(prove(job) for job in jobs)))

    def _unreadable(self, doc_id: str, page: int | None, key: str, problem: str | None, outcome: str) -> None:
        where = f"{doc_id} page {page}" if page is not None else doc_id
        self.summary.unreadable_records.append(f"{where}: {problem}")
        self.progress(f"{where}: {self.s3.uri(key)} is unreadable ({problem}): {outcome}")

    def _page_cost(self, doc: _Document, page: dict[str, Any]) -> int:
        """Bytes a page holds in flight: its PNG (as listed; else a bound from its pixels), the request body
        made of it, its answer; and the decoded image for engines that decode it here."""
        pixels = int(page.get("width_px") or 0) * int(page.get("height_px") or 0)
        png = doc.png_sizes.get(int(page["page"]))
        if png is None:
            png = 3 * pixels if pixels else ANSWER_BYTES
        cost = png + int(png * BODY_BYTES_PER_PNG_BYTE) + ANSWER_BYTES
        if self.engine.name in DECODING_ENGINES:
            cost += 4 * pixels
        return cost

    async def _get_or_none(self, key: str) -> bytes | None:
        """The object's bytes, or None if there is none; any other error is S3's and propagates."""
        try:
            return await self.s3.get_bytes(key)
        except FileNotFoundError:
            return None

    async def _cached_keys(self, doc_id: str) -> dict[str, str]:
        """Keys -> ETags of the page results stored for a document (none wanted when refreshing)."""
        # Listed even when refreshing: text-route pages' records are written by parsed_pages, never here.
        return {o.key: o.etag async for o in self.s3.list_objects(self.s3.vlm_page_prefix(doc_id))}

    async def _png_sizes(self, doc_id: str) -> dict[str, int]:
        """Sizes of the document's page images by key: one LIST, for admitting pages by their bytes."""
        return {
            o.key: o.size async for o in self.s3.list_objects(self.s3.page_prefix(doc_id)) if o.key.endswith(".png")
        }

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
            await self._wait_for_room(job.cost)
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
                self.fetch_s.observe(time.monotonic() - started)
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
            asked = time.monotonic()
            try:
                try:
                    result = await self.engine.extract(page)
                finally:
                    # Its slot is free: room for the next page now, not once this one is stored.
                    self.changed.set()
                self.answer_s.observe(time.monotonic() - asked)
            except VLLMClientError as exc:
                reason, message = _first_cause(exc)
                self._fail(job, reason, message)
                return
            except AnswerRejected as exc:
                self.summary.requests += exc.requests
                if not await self._fall_back(job, exc):
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
                etag = await self._store_page(job, record, result.images)
            except Exception as exc:  # an unencodable answer or S3 failing: this page only
                if not isinstance(exc, UnicodeError):
                    self.s3_failed(exc)
                self._fail(job, "storage_error", f"storing the result failed: {type(exc).__name__}: {exc}")
                return
            self.s3_ok()
            doc.records[n] = record
            doc.etags[n] = etag
            self.summary.processed += 1
            self.summary.observe_latency(latency)
            PAGES_PROCESSED.labels(engine=self.engine.name).inc()
        finally:
            if not reached_engine:
                self.preparing -= 1
            self.bytes_held -= job.cost
            self.changed.set()
            self._maybe_assemble(doc)

    # -- the text-layer fallback (answers.text_fallback) ------------------------------------------------

    async def _fall_back(self, job: _PageJob, rejected: AnswerRejected) -> bool:
        """Give a page whose answers stayed invalid its text layer's result instead; False to fail it.

        The stage holds only the page's PNG, so the text engine reads the page again from the document's PDF
        in ``raw/`` (one GET per document with fallback pages: cheaper than the text engine on every VLM page
        in the render worker, for pages that almost all succeed). ``raw/<doc_id>.pdf`` is content-addressed
        (the doc_id is its hash), and checked to be so. The result is kept for assembly only, flagged
        (``fallback``, ``fallback_reason``), and never stored as the page's VLM result: the next run asks the
        VLM again. A page without a text layer has nothing to fall back on and fails as before.
        """
        doc, n = job.doc, job.number
        if not self.answers.text_fallback or int(job.page.get("text_layer_chars", 0)) <= 0:
            return False
        started = time.monotonic()
        try:
            if doc.raw_pdf is None:
                doc.raw_pdf = asyncio.ensure_future(self._read_raw_pdf(doc.doc_id))
            data = await asyncio.shield(doc.raw_pdf)
            result, identity = await asyncio.to_thread(_text_layer_result, data, doc.doc_id, n)
            for name, jpeg in result.images.items():  # content-addressed crops: harmless if the page is redone
                with contextlib.suppress(PreconditionFailed):
                    await self.s3.put_bytes(
                        self.s3.vlm_image_key(doc.doc_id, name), jpeg, "image/jpeg", if_none_match=True
                    )
        except Exception as exc:  # the fallback itself failed: the page fails with the VLM's reason, as without it
            log.warning(
                "%s: the text-layer fallback failed (%s: %s); the page fails", job.label, type(exc).__name__, exc
            )
            return False
        record = page_record(
            result,
            doc_id=doc.doc_id,
            page=n,
            cache_key=job.cache_key,
            engine=identity,
            model=result.model,
            latency_s=round(time.monotonic() - started, 4),
        )
        record.update(
            route="vlm",
            fallback=True,
            fallback_reason=rejected.reason,
            fallback_message=str(rejected),
            run_id=self.run_id,
        )
        doc.records[n] = record
        doc.fallbacks[n] = {"page": n, "reason": rejected.reason, "message": str(rejected), "at": _now()}
        self.summary.fallback += 1
        self.summary.fallback_by_document[doc.doc_id] = len(doc.fallbacks)
        log.warning("%s: %s; its result is the text layer's (text_fallback), not cached", job.label, rejected)
        return True

    async def _read_raw_pdf(self, doc_id: str) -> bytes:
        from mkg_pipeline.ids import doc_id_for

        data = await self.s3.get_bytes(self.s3.raw_key(doc_id))
        if doc_id_for(data) != doc_id:
            raise ValueError(f"{self.s3.uri(self.s3.raw_key(doc_id))} is not document {doc_id} (its hash differs)")
        return data

    async def _store_page(self, job: _PageJob, record: dict[str, Any], images: dict[str, bytes]) -> str:
        s3, doc_id = self.s3, job.doc.doc_id
        for name, data in images.items():
            # Content-addressed: whoever wrote it first wrote the same bytes.
            with contextlib.suppress(PreconditionFailed):
                await s3.put_bytes(s3.vlm_image_key(doc_id, name), data, "image/jpeg", if_none_match=True)
        # Written after its figures and only once the whole answer is in hand: a page result that exists is whole.
        # Its ETag goes into status.json: the next run trusts this very object without reading it.
        return await s3.put_json(s3.vlm_page_key(doc_id, job.number, job.cache_key), record)

    def _fail(self, job: _PageJob, reason: str, message: str) -> None:
        self._record_failure(job.doc, job.number, reason, message)

    def _record_failure(self, doc: _Document, n: int, reason: str, message: str) -> None:
        previous = doc.previous_failures.get(n, {})
        failure = {
            "page": n,
            "reason": reason,
            "message": message,
            "attempts": int(previous.get("attempts", 0)) + 1,
            "last_attempt": _now(),
        }
        doc.failures[n] = failure
        self.summary.failed += 1
        self.summary.failure_reasons[reason] += 1
        if len(self.summary.failure_rows) < MAX_FAILURE_ROWS:
            self.summary.failure_rows.append({"doc_id": doc.doc_id, "source": doc.source, **failure})
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
            doc.raw_pdf = None
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
        fallback_pages = [doc.fallbacks[n] for n in sorted(doc.fallbacks)]
        pages_total = len(doc.pages) + len(doc.render_failures)
        over_budget = bool(fallback_pages) and len(fallback_pages) > self.answers.max_fallback_share * pages_total
        if over_budget:
            # Over the budget the document fails visibly (olmOCR drops it): its fallback pages are not served
            # as its content but listed as failed, with the VLM's reason, and asked again by the next run.
            for fallback in fallback_pages:
                n = int(fallback["page"])
                pages.pop(n, None)
                doc.records.pop(n, None)
                self._record_failure(
                    doc,
                    n,
                    str(fallback["reason"]),
                    f"{fallback['message']}; its text-layer fallback is not used: the document has "
                    f"{len(fallback_pages)} fallback page(s) of {pages_total}, over answers.max_fallback_share "
                    f"({self.answers.max_fallback_share:g})",
                )
                failed.append(doc.failures[n])
            self.summary.over_fallback_budget.append(doc.doc_id)
            log.warning(
                "%s: %d fallback page(s) of %d, over answers.max_fallback_share (%g): the document fails",
                doc.doc_id,
                len(fallback_pages),
                pages_total,
                self.answers.max_fallback_share,
            )
        failed.sort(key=lambda f: f["page"])
        by_page: dict[int, dict[str, Any]] = {**{int(f["page"]): f for f in failed}, **pages}
        markdown, content_list = assemble_document([by_page[n] for n in sorted(by_page)])
        await s3.put_bytes(s3.document_md_key(doc.doc_id), markdown.encode("utf-8"), "text/markdown")
        await s3.put_json(s3.content_list_key(doc.doc_id), content_list)
        status = DocumentStatus(
            doc_id=doc.doc_id,
            source=doc.source,
            pages_total=pages_total,
            done=len(doc.records) + len(doc.cached),
            failed_pages=failed,
            fallback_pages=fallback_pages,
            over_fallback_budget=over_budget,
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
                "page_etags": {str(n): doc.etags[n] for n in sorted(pages) if n in doc.etags},
                "page_routes": {str(n): doc.routes[n] for n in sorted(doc.routes)},
                "pages_by_route": {r: sum(1 for v in doc.routes.values() if v == r) for r in ("text", "vlm")},
                # pages served from the text layer after invalid VLM answers (not cached; asked again next run)
                "fallback_pages": fallback_pages,
                "fallback_budget": {
                    "max_share": self.answers.max_fallback_share,
                    "pages": len(fallback_pages),
                    "exceeded": over_budget,
                },
                **({"failure_reason": "fallback_budget"} if over_budget else {}),
                "run_id": self.run_id,
                "updated_at": now,
            },
        )
        return status

    async def _page_records(self, doc: _Document) -> dict[int, dict[str, Any]]:
        """The finished pages of a document by number: this run's from memory, earlier ones from S3.

        An earlier result that no longer proves itself (replaced or deleted since the document was opened)
        becomes a failure of its page (``record_unreadable``), requested again by the next run; an S3 error
        propagates (the document is not recorded).
        """
        s3 = self.s3
        limit = asyncio.Semaphore(ASSEMBLY_READS)

        async def cached(n: int, key: str) -> dict[str, Any] | None:
            object_key = s3.vlm_page_key(doc.doc_id, n, key)
            async with limit:
                data = await self._get_or_none(object_key)
            if data is None:
                self._record_failure(doc, n, "record_unreadable", f"{s3.uri(object_key)} disappeared")
                return None
            record, problem = records.read_page_record(
                data, doc_id=doc.doc_id, page=n, cache_key=key, engine=doc.identities.get(n, doc.identity)
            )
            if record is None:
                self._unreadable(doc.doc_id, n, object_key, problem, "the page is requested again next run")
                self._record_failure(doc, n, "record_unreadable", f"{s3.uri(object_key)}: {problem}")
            return record

        numbers = sorted(doc.cached)
        earlier = await asyncio.gather(*(cached(n, doc.cached[n]) for n in numbers))
        found = {n: record for n, record in zip(numbers, earlier, strict=True) if record is not None}
        for n in numbers:
            if n not in found:
                del doc.cached[n]
                doc.etags.pop(n, None)
        return {**found, **doc.records}

    # -- the whole step -----------------------------------------------------------------------------

    async def report_progress(self, started: float) -> None:
        from mkg_pipeline.progress import rate_and_eta  # here: this method is all that uses it

        while True:
            await asyncio.sleep(SUMMARY_EVERY_S)
            s = self.summary
            elapsed = time.monotonic() - started
            # Rate and ETA over the pages the server works on this run (answered or failed); cached pages cost
            # nothing. The total is of the pages seen so far: documents still to open add to it.
            rate = rate_and_eta(s.processed + s.failed, max(s.pages_total - s.cached, 0), elapsed)
            self.progress(
                f"progress: {s.processed} processed, {s.cached} cached, {s.failed} failed of {s.pages_total} pages "
                f"seen; {rate}; requests in flight {self.gate.in_flight}, "
                f"limit {self.gate.limit}; pages in flight hold {self.bytes_held / 2**20:.0f} of "
                f"{self.memory_budget / 2**20:.0f} MiB"
                + (f"; failures so far: {dict(s.failure_reasons)}" if s.failed else "")
            )


#: exceptions that are not S3's: data or code, never counted towards "S3 is down"
_NOT_S3 = (ValueError, TypeError, KeyError, AttributeError, IndexError)


def _is_current(previous: dict[str, Any] | None, doc: _Document) -> bool:
    return (
        previous is not None
        and previous.get("state") == "complete"
        and previous.get("engine") == doc.identity
        and int(previous.get("pages_done", -1)) == len(doc.pages)
        and not doc.render_failures
        # a fallback page is not the VLM's result: a later run asks the VLM again
        and not previous.get("fallback_pages")
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
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    answers: AnswersConfig | None = None,
) -> VLMSummary:
    """Send every page of ``doc_ids`` through ``engine``; returns the run's counters.

    Raises :class:`StorageUnavailable` when some document's outcome could not be recorded (the bucket is
    unreachable): everything that was recorded stays, and the next run resumes from it.

    ``claim`` (the batch lease's ``check``) is called before each document, page and assembly is started;
    once it raises, the run starts nothing more (pages in flight finish and are kept, documents are left to
    the run that took the batch over) and :class:`ClaimLost` is raised at the end.

    ``memory_budget``: bytes the pages in flight may hold (see :meth:`_BatchRun._page_cost`); a page is
    started only when it fits beside the others, or alone.

    ``answers``: the text-layer fallback and its per-document budget (``text_fallback``,
    ``max_fallback_share``); when None, the engine's own (``engine.answers``, from the same configuration),
    else the defaults (off).

    Raises :class:`DocumentsNotProcessed` at the end when some document could not be worked on for a reason
    of its own (an unreadable page manifest); every other document was processed.
    """
    started = time.monotonic()
    # The engine was built from the same configuration: its answer policy holds the fallback settings.
    answers = answers or getattr(engine, "answers", None)
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
            memory_budget=memory_budget,
            answers=answers,
        )
        reporter = asyncio.create_task(batch.report_progress(started))
        remaining = iter(doc_ids)

        def open_next() -> asyncio.Task[tuple[_Document, list[_PageJob]] | None] | None:
            for doc_id in remaining:
                if batch.s3_down:
                    summary.unrecorded.append(doc_id)
                    continue
                if not batch.holds_claim():
                    return None
                return asyncio.create_task(batch.open_guarded(doc_id), name=f"open {doc_id}")
            return None

        opening = open_next()
        try:
            while opening is not None:
                opened = await opening
                # The next document is opened while this one's pages are started: its reads are then
                # not on the path between this document's last page and the next one's first.
                opening = open_next()
                if opened is not None:
                    await batch.run_document(*opened)
            while batch.page_tasks or batch.assembly_tasks:
                await asyncio.gather(*list(batch.page_tasks), *list(batch.assembly_tasks))
        finally:
            reporter.cancel()
            if opening is not None:
                opening.cancel()
            for task in [*batch.page_tasks, *batch.assembly_tasks]:
                task.cancel()
    summary.wall_s = time.monotonic() - started
    summary.peak_page_bytes = batch.peak_bytes_held
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
    if summary.not_processed:
        listed = "; ".join(f"{d}: {why}" for d, why in list(summary.not_processed.items())[:10])
        more = len(summary.not_processed) - 10
        raise DocumentsNotProcessed(
            f"{len(summary.not_processed)} document(s) could not be processed (the other "
            f"{len(summary.documents) - len(summary.not_processed)} were): {listed}"
            + (f"; and {more} more" if more > 0 else "")
        )
    return summary


def _text_layer_result(data: bytes, doc_id: str, number: int) -> tuple[Any, str]:
    """Page ``number`` (1-based) of the PDF ``data`` through the text engine: (its PageResult, the engine identity)."""
    from mkg_pipeline.engines.text_layer import extract_text_page
    from mkg_pipeline.pdf.validate import open_pdf
    from mkg_pipeline.stages.pages import text_engine_identity

    with open_pdf(data, doc_id) as pdf:
        return extract_text_page(pdf.load_page(number - 1), number - 1), text_engine_identity()
