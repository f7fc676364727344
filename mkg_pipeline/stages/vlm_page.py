"""One page of the vlm stage: fetch its image, ask the engine, store its figures and record, and report
to its document; any error fails this page only (with its first real cause). A page whose answers stay
invalid gets its text layer's result instead with ``answers.text_fallback`` (:meth:`PageWorker.fall_back`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Protocol

from mkg_pipeline.document import page_record
from mkg_pipeline.engines.base import AnswerRejected, PageInput
from mkg_pipeline.metrics.pipeline import PAGES_FALLBACK, PAGES_PROCESSED
from mkg_pipeline.stages.vlm_run import PageJob, RunContext, first_cause, log, utc_now
from mkg_pipeline.storage import PreconditionFailed
from mkg_pipeline.vllm.errors import VLLMClientError


class PageEvents(Protocol):
    """What the scheduler learns from a page on its way (:class:`~.vlm_scheduler.PageScheduler`)."""

    def image_fetched(self, seconds: float) -> None:
        """The page's image is in hand: it now waits for a slot of the limiter, or holds one."""

    def left_engine(self, seconds: float | None) -> None:
        """The engine is done with the page (answered in ``seconds``, None if it failed): its slot is free."""


class PageWorker:
    """Works one page from its image to its stored record."""

    def __init__(self, run: RunContext) -> None:
        self.run = run

    async def page(self, job: PageJob, events: PageEvents) -> None:
        """Work ``job`` to its stored record, or record why it failed (this page only)."""
        doc, n = job.doc, job.number
        started = time.monotonic()
        try:
            png = await self.run.s3.get_bytes(job.page["png_key"])
        except Exception as exc:  # the image is gone or S3 failed: this page only
            if not isinstance(exc, FileNotFoundError):
                self.run.s3_failed(exc)
            self.run.fail(job, "storage_error", f"reading the page image failed: {type(exc).__name__}: {exc}")
            return
        self.run.s3_ok()
        events.image_fetched(time.monotonic() - started)
        page = PageInput(
            png=png,
            page_idx=n - 1,
            text_layer_chars=int(job.page.get("text_layer_chars", 0)),
            label=job.label,
        )
        asked = time.monotonic()
        answered: float | None = None
        try:
            try:
                result = await self.run.engine.extract(page)
                answered = time.monotonic() - asked
            finally:
                events.left_engine(answered)
        except VLLMClientError as exc:
            reason, message = first_cause(exc)
            self.run.fail(job, reason, message)
            return
        except AnswerRejected as exc:
            self.run.summary.requests += exc.requests
            if not await self.fall_back(job, exc):
                self.run.fail(job, exc.reason, str(exc))
            return
        except Exception as exc:  # an engine bug or an undecodable image fails this page only
            log.exception("page %s: the engine failed", job.label)
            self.run.fail(job, "engine_error", f"{type(exc).__name__}: {exc}")
            return
        self.run.summary.requests += result.requests
        latency = time.monotonic() - started
        record = page_record(
            result,
            doc_id=doc.doc_id,
            page=n,
            cache_key=job.cache_key,
            engine=self.run.engine.identity,
            model=result.model or self.run.model,  # who answered: the configured model or an accepted alias
            latency_s=round(latency, 4),
        )
        record["run_id"] = self.run.run_id
        try:
            etag = await self._store_page(job, record, result.images)
        except Exception as exc:  # an unencodable answer or S3 failing: this page only
            if not isinstance(exc, UnicodeError):
                self.run.s3_failed(exc)
            self.run.fail(job, "storage_error", f"storing the result failed: {type(exc).__name__}: {exc}")
            return
        self.run.s3_ok()
        doc.records[n] = record
        doc.etags[n] = etag
        self.run.summary.processed += 1
        self.run.summary.observe_latency(latency)
        PAGES_PROCESSED.labels(engine=self.run.engine.name).inc()

    async def fall_back(self, job: PageJob, rejected: AnswerRejected) -> bool:
        """Give a page whose answers stayed invalid its text layer's result instead; False to fail it.

        The stage holds only the page's PNG, so the text engine reads the page again from the document's PDF
        in ``raw/`` (one GET per document with fallback pages: cheaper than the text engine on every VLM page
        in the render worker, for pages that almost all succeed). ``raw/<doc_id>.pdf`` is content-addressed
        (the doc_id is its hash), and checked to be so. The result is kept for assembly only, flagged
        (``fallback``, ``fallback_reason``), and never stored as the page's VLM result: the next run asks the
        VLM again. A page without a text layer has nothing to fall back on and fails as before.
        """
        doc, n = job.doc, job.number
        if not self.run.answers.text_fallback or int(job.page.get("text_layer_chars", 0)) <= 0:
            return False
        started = time.monotonic()
        try:
            if doc.raw_pdf is None:
                doc.raw_pdf = asyncio.ensure_future(self._read_raw_pdf(doc.doc_id))
            data = await asyncio.shield(doc.raw_pdf)
            result, identity = await asyncio.to_thread(_text_layer_result, data, doc.doc_id, n)
            for name, jpeg in result.images.items():  # content-addressed crops: harmless if the page is redone
                with contextlib.suppress(PreconditionFailed):
                    await self.run.s3.put_bytes(
                        self.run.s3.vlm_image_key(doc.doc_id, name), jpeg, "image/jpeg", if_none_match=True
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
            run_id=self.run.run_id,
        )
        doc.records[n] = record
        doc.fallbacks[n] = {"page": n, "reason": rejected.reason, "message": str(rejected), "at": utc_now()}
        self.run.summary.fallback += 1
        PAGES_FALLBACK.labels(reason=rejected.reason).inc()
        self.run.summary.fallback_by_document[doc.doc_id] = len(doc.fallbacks)
        log.warning("%s: %s; its result is the text layer's (text_fallback), not cached", job.label, rejected)
        return True

    async def _read_raw_pdf(self, doc_id: str) -> bytes:
        from mkg_pipeline.ids import doc_id_for

        data = await self.run.s3.get_bytes(self.run.s3.raw_key(doc_id))
        if doc_id_for(data) != doc_id:
            raise ValueError(
                f"{self.run.s3.uri(self.run.s3.raw_key(doc_id))} is not document {doc_id} (its hash differs)"
            )
        return data

    async def _store_page(self, job: PageJob, record: dict[str, Any], images: dict[str, bytes]) -> str:
        s3, doc_id = self.run.s3, job.doc.doc_id
        for name, data in images.items():
            # Content-addressed: whoever wrote it first wrote the same bytes.
            with contextlib.suppress(PreconditionFailed):
                await s3.put_bytes(s3.vlm_image_key(doc_id, name), data, "image/jpeg", if_none_match=True)
        # Written after its figures and only once the whole answer is in hand: a page result that exists is whole.
        # Its ETag goes into status.json: the next run trusts this very object without reading it.
        return await s3.put_json(s3.vlm_page_key(doc_id, job.number, job.cache_key), record)


def _text_layer_result(data: bytes, doc_id: str, number: int) -> tuple[Any, str]:
    """Page ``number`` (1-based) of the PDF ``data`` through the text engine: (its PageResult, the engine identity)."""
    from mkg_pipeline.engines.text_layer import extract_text_page
    from mkg_pipeline.pdf.validate import open_pdf
    from mkg_pipeline.stages.pages import text_engine_identity

    with open_pdf(data, doc_id) as pdf:
        return extract_text_page(pdf.load_page(number - 1), number - 1), text_engine_identity()
