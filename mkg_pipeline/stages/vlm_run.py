"""What every part of one vlm_outputs run shares (:mod:`mkg_pipeline.stages.vlm`): what it reports, its
documents and page jobs, the batch's claim, the bucket's health and the record of each failed page.

The run's three workers each hold a :class:`RunContext`: the scheduler (:mod:`.vlm_scheduler`), the page
worker (:mod:`.vlm_page`) and the document assembler (:mod:`.vlm_assembly`); documents are opened by
:mod:`.vlm_documents`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from mkg_pipeline.config import AnswersConfig
from mkg_pipeline.engines.base import PageEngine
from mkg_pipeline.metrics.pipeline import PAGES_FAILED
from mkg_pipeline.storage import AsyncStorage
from mkg_pipeline.vllm.errors import VLLMClientError

log = logging.getLogger("mkg_pipeline.stages.vlm")

#: failure rows kept for asset metadata; the full list is in each document's status.json
MAX_FAILURE_ROWS = 200
#: latency samples kept for quantiles (reservoir), whatever the batch size
LATENCY_SAMPLES = 4096
#: stored records of one document read at once (proving cached results, assembling)
ASSEMBLY_READS = 32
#: consecutive failed S3 calls on the page path after which the bucket is taken as down for this step
S3_DOWN_AFTER = 8
#: exceptions that are not S3's: data or code, never counted towards "S3 is down"
NOT_S3 = (ValueError, TypeError, KeyError, AttributeError, IndexError)


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
class Document:
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
class PageJob:
    doc: Document
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


def first_cause(exc: VLLMClientError) -> tuple[str, str]:
    """The failure's real cause and message: a breaker that opened says why it opened."""
    first = getattr(exc, "first_cause", None)
    if exc.error_type == "circuit_open" and first:
        return str(first), f"{exc} (later attempts ended with circuit_open)"
    return exc.error_type, str(exc)


def utc_now() -> str:
    return datetime.now(UTC).isoformat()


class RunContext:
    """One call of :func:`~mkg_pipeline.stages.vlm.process_documents` (one Dagster step): its bucket
    session, engine, counters, claim and S3 health, shared by the scheduler, page worker and assembler."""

    def __init__(
        self,
        s3: AsyncStorage,
        engine: PageEngine,
        summary: VLMSummary,
        *,
        model: str,
        run_id: str,
        force_refresh: bool,
        progress: Callable[[str], None],
        claim: Callable[[], None] | None = None,
        answers: AnswersConfig | None = None,
    ) -> None:
        self.s3 = s3
        self.engine = engine
        self.summary = summary
        self.model = model
        self.run_id = run_id
        self.force_refresh = force_refresh
        self.progress = progress
        self.claim = claim
        self.claim_lost: str | None = None
        self.answers = answers or AnswersConfig()
        self.storage_errors_in_a_row = 0
        self.last_storage_error = ""

    def holds_claim(self) -> bool:
        """Whether this run still holds its batch; once another run took it over, start nothing more on it."""
        if self.claim_lost is None and self.claim is not None:
            try:
                self.claim()
            except Exception as exc:
                self.claim_lost = str(exc)
                self.progress(f"STOPPING: {exc}")
        return self.claim_lost is None

    async def get_or_none(self, key: str) -> bytes | None:
        """The object's bytes, or None if there is none; any other error is S3's and propagates."""
        try:
            return await self.s3.get_bytes(key)
        except FileNotFoundError:
            return None

    def unreadable(self, doc_id: str, page: int | None, key: str, problem: str | None, outcome: str) -> None:
        where = f"{doc_id} page {page}" if page is not None else doc_id
        self.summary.unreadable_records.append(f"{where}: {problem}")
        self.progress(f"{where}: {self.s3.uri(key)} is unreadable ({problem}): {outcome}")

    def fail(self, job: PageJob, reason: str, message: str) -> None:
        self.record_failure(job.doc, job.number, reason, message)

    def record_failure(self, doc: Document, n: int, reason: str, message: str) -> None:
        previous = doc.previous_failures.get(n, {})
        failure = {
            "page": n,
            "reason": reason,
            "message": message,
            "attempts": int(previous.get("attempts", 0)) + 1,
            "last_attempt": utc_now(),
        }
        doc.failures[n] = failure
        self.summary.failed += 1
        self.summary.failure_reasons[reason] += 1
        if len(self.summary.failure_rows) < MAX_FAILURE_ROWS:
            self.summary.failure_rows.append({"doc_id": doc.doc_id, "source": doc.source, **failure})
        PAGES_FAILED.labels(reason=reason).inc()

    @property
    def s3_down(self) -> bool:
        return self.storage_errors_in_a_row >= S3_DOWN_AFTER

    def s3_ok(self) -> None:
        self.storage_errors_in_a_row = 0

    def s3_failed(self, exc: BaseException) -> None:
        self.storage_errors_in_a_row += 1
        self.last_storage_error = f"{type(exc).__name__}: {exc}"
