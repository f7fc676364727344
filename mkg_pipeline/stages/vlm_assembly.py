"""Assembling a document of the vlm stage as soon as its last page finishes, beside the other documents'
pages: ``document.md``, ``content_list.json`` and ``status.json`` (its pages by route, failed and fallback
pages, the ETag of every result it counts), from this run's records in memory and earlier ones from S3.
"""

from __future__ import annotations

import asyncio
from typing import Any

from mkg_pipeline import records
from mkg_pipeline.document import assemble_document, document_status
from mkg_pipeline.stages.vlm_run import (
    ASSEMBLY_READS,
    Document,
    DocumentStatus,
    RunContext,
    log,
    utc_now,
)


class DocumentAssembler:
    """Writes each finished document's outputs, one task per document."""

    def __init__(self, run: RunContext) -> None:
        self.run = run
        self.tasks: set[asyncio.Task[None]] = set()

    def maybe_assemble(self, doc: Document) -> None:
        if doc.complete and doc.doc_id not in self.run.summary.documents and self.run.holds_claim():
            self.run.summary.documents[doc.doc_id] = "assembling"
            task = asyncio.create_task(self._assemble(doc), name=f"assemble {doc.doc_id}")
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _assemble(self, doc: Document) -> None:
        try:
            status = await self._write_outputs(doc)
        except Exception as exc:
            log.exception("%s: recording the document failed", doc.doc_id)
            self.run.summary.unrecorded.append(doc.doc_id)
            self.run.summary.documents[doc.doc_id] = "unrecorded"
            self.run.progress(f"{doc.doc_id} ({doc.source}): NOT RECORDED, {type(exc).__name__}: {exc}")
            return
        finally:
            doc.records.clear()  # the document's pages leave memory with it
            doc.raw_pdf = None
        self.run.summary.documents[doc.doc_id] = status.state
        self.run.progress(
            f"{doc.doc_id} ({status.source}): {status.state}, {status.done}/{status.pages_total} pages"
            + (f", {len(status.failed_pages)} failed" if status.failed_pages else "")
        )

    async def _write_outputs(self, doc: Document) -> DocumentStatus:
        s3 = self.run.s3
        pages = await self._page_records(doc)
        now = utc_now()
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
        over_budget = bool(fallback_pages) and len(fallback_pages) > self.run.answers.max_fallback_share * pages_total
        if over_budget:
            # Over the budget the document fails visibly (olmOCR drops it): its fallback pages are not served
            # as its content but listed as failed, with the VLM's reason, and asked again by the next run.
            for fallback in fallback_pages:
                n = int(fallback["page"])
                pages.pop(n, None)
                doc.records.pop(n, None)
                self.run.record_failure(
                    doc,
                    n,
                    str(fallback["reason"]),
                    f"{fallback['message']}; its text-layer fallback is not used: the document has "
                    f"{len(fallback_pages)} fallback page(s) of {pages_total}, over answers.max_fallback_share "
                    f"({self.run.answers.max_fallback_share:g})",
                )
                failed.append(doc.failures[n])
            self.run.summary.over_fallback_budget.append(doc.doc_id)
            log.warning(
                "%s: %d fallback page(s) of %d, over answers.max_fallback_share (%g): the document fails",
                doc.doc_id,
                len(fallback_pages),
                pages_total,
                self.run.answers.max_fallback_share,
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
            document_status(
                doc_id=doc.doc_id,
                source=status.source,
                engine=doc.identity,
                state=status.state,
                pages_total=status.pages_total,
                pages_done=status.done,
                failed_pages=failed,
                page_etags={n: doc.etags[n] for n in pages if n in doc.etags},
                page_routes=doc.routes,
                fallback_pages=fallback_pages,
                max_fallback_share=self.run.answers.max_fallback_share,
                over_fallback_budget=over_budget,
                run_id=self.run.run_id,
                updated_at=now,
            ),
        )
        return status

    async def _page_records(self, doc: Document) -> dict[int, dict[str, Any]]:
        """The finished pages of a document by number: this run's from memory, earlier ones from S3.

        An earlier result that no longer proves itself (replaced or deleted since the document was opened)
        becomes a failure of its page (``record_unreadable``), requested again by the next run; an S3 error
        propagates (the document is not recorded).
        """
        s3 = self.run.s3
        limit = asyncio.Semaphore(ASSEMBLY_READS)

        async def cached(n: int, key: str) -> dict[str, Any] | None:
            object_key = s3.vlm_page_key(doc.doc_id, n, key)
            async with limit:
                data = await self.run.get_or_none(object_key)
            if data is None:
                self.run.record_failure(doc, n, "record_unreadable", f"{s3.uri(object_key)} disappeared")
                return None
            record, problem = records.read_page_record(
                data, doc_id=doc.doc_id, page=n, cache_key=key, engine=doc.identities.get(n, doc.identity)
            )
            if record is None:
                self.run.unreadable(doc.doc_id, n, object_key, problem, "the page is requested again next run")
                self.run.record_failure(doc, n, "record_unreadable", f"{s3.uri(object_key)}: {problem}")
            return record

        numbers = sorted(doc.cached)
        earlier = await asyncio.gather(*(cached(n, doc.cached[n]) for n in numbers))
        found = {n: record for n, record in zip(numbers, earlier, strict=True) if record is not None}
        for n in numbers:
            if n not in found:
                del doc.cached[n]
                doc.etags.pop(n, None)
        return {**found, **doc.records}
