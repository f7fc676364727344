"""Opening a document for the vlm stage: its page manifest, previous status and stored results, read
once; which pages are done (cached or finished by the text route), which to send, and what each costs.

A record that does not prove itself (:mod:`mkg_pipeline.records`) is handled here: an unreadable manifest
fails its document only, an unreadable status is treated as missing, a stored result no status vouches
for is read and checked once, and requested again if it fails.
"""

from __future__ import annotations

import asyncio
from typing import Any

from mkg_pipeline import records
from mkg_pipeline.engines.base import page_cache_key
from mkg_pipeline.metrics.pipeline import PAGES_CACHED, PAGES_TOTAL
from mkg_pipeline.stages.vlm_run import (
    ASSEMBLY_READS,
    NOT_S3,
    Document,
    PageJob,
    RunContext,
    log,
    utc_now,
)

#: what one page in flight holds beyond its PNG, per PNG byte: the request body's base64 (4/3) and its JSON
#: envelope. The client builds the body in one piece and lets go of the base64 before it sends.
BODY_BYTES_PER_PNG_BYTE = 4 / 3
#: ... plus its answer, its parsed JSON and the page record: a bound of an ordinary answer, not of the cap
ANSWER_BYTES = 1024 * 1024
#: engines that decode the page image in this process (PIL, 4 bytes a pixel at most)
DECODING_ENGINES = frozenset({"mineru"})


class DocumentOpener:
    """Reads what a document needs before its pages start; None when there is nothing to do for it."""

    def __init__(self, run: RunContext) -> None:
        self.run = run

    async def open(self, doc_id: str) -> tuple[Document, list[PageJob]] | None:
        """:meth:`open_document`, its failure that of this document only: None when it could not be opened."""
        try:
            return await self.open_document(doc_id)
        except NOT_S3 as exc:  # a bug, not the bucket: this document only, and S3 is not blamed
            log.exception("%s: could not be opened", doc_id)
            self.run.summary.documents[doc_id] = "error"
            self.run.summary.not_processed[doc_id] = f"opening it failed: {type(exc).__name__}: {exc}"
            self.run.progress(f"{doc_id}: NOT STARTED, {type(exc).__name__}: {exc}")
        except Exception as exc:  # S3 failing on one document's manifest/status: not the others
            log.exception("%s: could not be opened", doc_id)
            self.run.s3_failed(exc)
            self.run.summary.unrecorded.append(doc_id)
            self.run.progress(f"{doc_id}: NOT STARTED, {type(exc).__name__}: {exc}")
        return None

    async def open_document(self, doc_id: str) -> tuple[Document, list[PageJob]] | None:
        """Read a document's manifest and cached results; None when there is nothing to do for it.

        Raises only S3 errors (which count towards "S3 is down"); a record that does not prove itself is
        handled here: an unreadable manifest fails this document, a status is treated as missing, a page
        result is requested again.
        """
        s3 = self.run.s3
        # The three reads at once, not one after another: the first document's are on the path to the
        # first request (the next documents are opened while this one's pages start).
        manifest_data, status_data, listed = await asyncio.gather(
            self.run.get_or_none(s3.page_manifest_key(doc_id)),
            self.run.get_or_none(s3.vlm_status_key(doc_id)),
            self._cached_keys(doc_id),
        )
        if manifest_data is None:
            self.run.summary.unrendered.append(doc_id)
            self.run.progress(f"{doc_id}: SKIPPED, no page manifest yet; materialize parsed_pages for its batch")
            return None
        manifest, problem = records.read_page_manifest(manifest_data, doc_id=doc_id)
        if manifest is None:
            self.run.summary.documents[doc_id] = "manifest_unreadable"
            self.run.summary.not_processed[doc_id] = (
                f"its page manifest {s3.uri(s3.page_manifest_key(doc_id))} is unreadable ({problem}); render it "
                f"again: materialize parsed_pages for this batch with config doc_ids=[{doc_id!r}] and force=true, "
                "then vlm_outputs"
            )
            self.run.progress(f"{doc_id}: NOT PROCESSED, {self.run.summary.not_processed[doc_id]}")
            return None
        previous = None
        if status_data is not None:
            previous, problem = records.read_status(status_data, doc_id=doc_id)
            if previous is None:
                self.run.unreadable(doc_id, None, s3.vlm_status_key(doc_id), problem, "treated as missing, rewritten")
        doc = Document(
            doc_id=doc_id,
            source=str(manifest.get("source", doc_id)),
            pages=manifest["pages"],
            render_failures=manifest.get("failed_pages", []),
            previous_failures={int(f["page"]): f for f in (previous or {}).get("failed_pages", [])},
            identity=self.run.engine.identity,
        )
        png_sizes: dict[str, int] = {}
        if any(not isinstance(p.get("png_bytes"), int) for p in doc.pages if not records.is_text_page(p)):
            png_sizes = await self._png_sizes(doc_id)  # a manifest older than png_bytes: the listing's sizes
        recorded = (previous or {}).get("page_etags") or {}
        existing = {} if self.run.force_refresh else listed  # VLM results to reuse (none when refreshing)
        todo: list[PageJob] = []
        unproven: list[PageJob] = []
        missing_text: list[int] = []
        text_keys: dict[int, str] = {}  # text-route page -> the cache key of its record
        for page in doc.pages:
            n = int(page["page"])
            if records.is_text_page(page):
                # Finished by parsed_pages: its record exists, or the page fails (never sent to the engine).
                doc.routes[n] = "text"
                identity = str(page["engine"])
                doc.identities[n] = identity
                job = PageJob(doc, page, str(page["cache_key"]), 0, identity)
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
            job = PageJob(
                doc, page, page_cache_key(page["png_sha256"], self.run.engine.identity), self.page_cost(doc, page)
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
            self.run.record_failure(
                doc,
                n,
                "text_record_missing",
                f"page {n} took the text route, but its result {s3.uri(s3.vlm_page_key(doc_id, n, text_keys[n]))} "
                f"is missing or unreadable; materialize parsed_pages for this batch (config doc_ids=[{doc_id!r}]): "
                "it writes text-route results again, then vlm_outputs",
            )
        self.run.summary.pages_total += len(doc.pages) + len(doc.render_failures)
        vlm_cached = sum(1 for n in doc.cached if n not in doc.identities)
        self.run.summary.cached += vlm_cached
        self.run.summary.text_done += len(doc.cached) - vlm_cached
        PAGES_CACHED.labels(engine=self.run.engine.name).inc(vlm_cached)
        by_route = {route: sum(1 for r in doc.routes.values() if r == route) for route in ("text", "vlm")}
        self.run.summary.routes.update(by_route)
        self.run.summary.routes_by_document[doc_id] = by_route
        for route, count in by_route.items():
            PAGES_TOTAL.labels(route=route).inc(count)
        if not todo and not unproven and not doc.failures and is_current(previous, doc):
            # Every page cached and the assembled outputs say so: nothing to redo, nothing to rewrite.
            self.run.summary.documents[doc_id] = str(previous["state"]) if previous else "complete"
            return None
        if previous is not None:
            await self._mark_stale(doc_id, previous)
        if doc.cached:
            text = by_route["text"]
            self.run.progress(
                f"{doc_id} ({doc.source}): {vlm_cached}/{by_route['vlm']} VLM page(s) cached"
                + (f", {text} text-route page(s) done by parsed_pages" if text else "")
            )
        return doc, todo

    async def _prove(self, jobs: list[PageJob], existing: dict[str, str]) -> list[str | None]:
        """Read and check the stored results no status vouches for: their ETag if valid, else None (redo)."""
        limit = asyncio.Semaphore(ASSEMBLY_READS)

        async def prove(job: PageJob) -> str | None:
            key = self.run.s3.vlm_page_key(job.doc.doc_id, job.number, job.cache_key)
            async with limit:
                data = await self.run.get_or_none(key)
            if data is None:  # deleted since the listing
                return None
            _, problem = records.read_page_record(
                data,
                doc_id=job.doc.doc_id,
                page=job.number,
                cache_key=job.cache_key,
                engine=job.identity or self.run.engine.identity,
            )
            if problem is not None:
                self.run.unreadable(job.doc.doc_id, job.number, key, problem, "requested again")
                return None
            return existing[key]

        return list(await asyncio.gather(*(prove(job) for job in jobs)))

    def page_cost(self, doc: Document, page: dict[str, Any]) -> int:
        """Bytes a page holds in flight: its PNG (as listed; else a bound from its pixels), the request body
        made of it, its answer; and the decoded image for engines that decode it here."""
        pixels = int(page.get("width_px") or 0) * int(page.get("height_px") or 0)
        png = doc.png_sizes.get(int(page["page"]))
        if png is None:
            png = 3 * pixels if pixels else ANSWER_BYTES
        cost = png + int(png * BODY_BYTES_PER_PNG_BYTE) + ANSWER_BYTES
        if self.run.engine.name in DECODING_ENGINES:
            cost += 4 * pixels
        return cost

    async def _cached_keys(self, doc_id: str) -> dict[str, str]:
        """Keys -> ETags of the page results stored for a document (none wanted when refreshing)."""
        # Listed even when refreshing: text-route pages' records are written by parsed_pages, never here.
        return {o.key: o.etag async for o in self.run.s3.list_objects(self.run.s3.vlm_page_prefix(doc_id))}

    async def _png_sizes(self, doc_id: str) -> dict[str, int]:
        """Sizes of the document's page images by key: one LIST, for admitting pages by their bytes."""
        return {
            o.key: o.size
            async for o in self.run.s3.list_objects(self.run.s3.page_prefix(doc_id))
            if o.key.endswith(".png")
        }

    async def _mark_stale(self, doc_id: str, previous: dict[str, Any]) -> None:
        stale = {**previous, "state": "stale", "stale_since": utc_now(), "run_id": self.run.run_id}
        await self.run.s3.put_json(self.run.s3.vlm_status_key(doc_id), stale)


def is_current(previous: dict[str, Any] | None, doc: Document) -> bool:
    return (
        previous is not None
        and previous.get("state") == "complete"
        and previous.get("engine") == doc.identity
        and int(previous.get("pages_done", -1)) == len(doc.pages)
        and not doc.render_failures
        # a fallback page is not the VLM's result: a later run asks the VLM again
        and not previous.get("fallback_pages")
    )
