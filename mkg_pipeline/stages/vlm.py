"""vlm_outputs: stream every page of a batch through the engine, cache each finished page, lose none.

This module is the stage's entry point (:func:`process_documents`) and what it reports; the work is done by
a document opener (:mod:`.vlm_documents`), a scheduler (:mod:`.vlm_scheduler`), a page worker
(:mod:`.vlm_page`) and a document assembler (:mod:`.vlm_assembly`), sharing one :class:`~.vlm_run.RunContext`.

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

What "nothing lost" means here (docs/architecture.md, "The accounting invariant"): every page ends as a cached result
``vlm/<doc_id>/pages/<n>.<cache_key>.json`` or as an entry of ``status.json``'s ``failed_pages`` with
its reason (the first real cause), message and attempts, and is retried by the next materialization.
Before a document is worked on, an existing status is marked ``stale`` (with this run's id), so a step
that dies leaves no status that claims an earlier, different result is current.

Pages take one of two routes (docs/architecture.md, "Page routes"; decided by parsed_pages). A ``text`` page's result
was written by parsed_pages (the text engine, no GPU) as a page record under the text engine's identity;
here it is a finished page whose record already exists: it is checked (:mod:`mkg_pipeline.records`, with
that identity) and assembled with the VLM pages, never sent to the engine. A text page whose record is
missing fails visibly (``text_record_missing``) and parsed_pages writes it again. Each page's route is
recorded in status.json, and pages are counted by route (summary, metadata, ``pages_total{route}``).

A VLM page whose answers stay invalid after the engine's re-asks fails with that reason, or, with
``answers.text_fallback``, gets its text layer's result (:meth:`.vlm_page.PageWorker.fall_back`): flagged
in the record and in status.json's ``fallback_pages``, never cached (the next run asks the VLM again), and
a document with more than ``answers.max_fallback_share`` of its pages so served fails (``fallback_budget``).

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
import time
from collections.abc import Callable

from mkg_pipeline.config import AnswersConfig
from mkg_pipeline.document import STATUS_VERSION
from mkg_pipeline.engines.base import PageEngine
from mkg_pipeline.stages.vlm_assembly import DocumentAssembler
from mkg_pipeline.stages.vlm_documents import (
    ANSWER_BYTES,
    BODY_BYTES_PER_PNG_BYTE,
    DECODING_ENGINES,
    DocumentOpener,
)
from mkg_pipeline.stages.vlm_page import PageWorker
from mkg_pipeline.stages.vlm_run import (
    LATENCY_SAMPLES,
    MAX_FAILURE_ROWS,
    S3_DOWN_AFTER,
    CapacityGate,
    ClaimLost,
    Document,
    DocumentsNotProcessed,
    DocumentStatus,
    PageJob,
    RunContext,
    StorageUnavailable,
    VLMSummary,
    log,
)
from mkg_pipeline.stages.vlm_scheduler import DEFAULT_MEMORY_BUDGET, SUMMARY_EVERY_S, PageScheduler, prefetch_margin
from mkg_pipeline.storage import Storage

__all__ = [
    "ANSWER_BYTES",
    "BODY_BYTES_PER_PNG_BYTE",
    "DECODING_ENGINES",
    "DEFAULT_MEMORY_BUDGET",
    "LATENCY_SAMPLES",
    "MAX_FAILURE_ROWS",
    "S3_DOWN_AFTER",
    "STATUS_VERSION",
    "SUMMARY_EVERY_S",
    "CapacityGate",
    "ClaimLost",
    "DocumentStatus",
    "DocumentsNotProcessed",
    "StorageUnavailable",
    "VLMSummary",
    "prefetch_margin",
    "process_documents",
]


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

    ``memory_budget``: bytes the pages in flight may hold (see :meth:`.vlm_documents.DocumentOpener.page_cost`);
    a page is started only when it fits beside the others, or alone.

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
        run = RunContext(
            s3,
            engine,
            summary,
            model=model,
            run_id=run_id,
            force_refresh=force_refresh,
            progress=progress,
            claim=claim,
            answers=answers,
        )
        opener = DocumentOpener(run)
        assembler = DocumentAssembler(run)
        scheduler = PageScheduler(run, gate, PageWorker(run), assembler, memory_budget)
        reporter = asyncio.create_task(scheduler.report_progress(started))
        remaining = iter(doc_ids)

        def open_next() -> asyncio.Task[tuple[Document, list[PageJob]] | None] | None:
            for doc_id in remaining:
                if run.s3_down:
                    summary.unrecorded.append(doc_id)
                    continue
                if not run.holds_claim():
                    return None
                return asyncio.create_task(opener.open(doc_id), name=f"open {doc_id}")
            return None

        opening = open_next()
        try:
            while opening is not None:
                opened = await opening
                # The next document is opened while this one's pages are started: its reads are then
                # not on the path between this document's last page and the next one's first.
                opening = open_next()
                if opened is not None:
                    await scheduler.run_document(*opened)
            while scheduler.tasks or assembler.tasks:
                await asyncio.gather(*list(scheduler.tasks), *list(assembler.tasks))
        finally:
            reporter.cancel()
            if opening is not None:
                opening.cancel()
            for task in [*scheduler.tasks, *assembler.tasks]:
                task.cancel()
    summary.wall_s = time.monotonic() - started
    summary.peak_page_bytes = scheduler.peak_bytes_held
    if run.claim_lost is not None:
        raise ClaimLost(
            f"{run.claim_lost}. This run stopped starting pages and documents of the batch when it learned it; "
            f"the {summary.processed} page(s) it finished are stored. The run that took the batch over does the "
            "rest; if that one fails too, materialize vlm_outputs again (only missing pages are requested)"
        )
    if summary.unrecorded:
        cause = f"; last error: {run.last_storage_error}" if run.last_storage_error else ""
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
