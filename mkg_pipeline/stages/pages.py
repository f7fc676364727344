"""parsed_pages: route every page, render the VLM ones to PNG, read the text ones, documents in parallel.

Each page's route is decided here, where the page is open (``routing.mode``; docs/architecture.md, "Page routes"):

* a ``vlm`` page is drawn to ``pages/<doc_id>/<n>.png`` at the size its engine wants (``page_images``:
  longest side and pixel cap, not a DPI) and its vision tokens are estimated (Qwen2.5-VL's 28-px patches);
* a ``text`` page is not drawn: the text engine reads it in the render worker (CPU, no GPU) and its result
  is stored as a finished page record, exactly where and how the vlm stage stores VLM answers
  (``vlm/<doc_id>/pages/<n>.<cache_key>.json``, figure crops in ``vlm/<doc_id>/images/``), under the text
  engine's own identity (:func:`text_engine_identity`) and a cache key hashing the page's content. Its
  manifest entry has ``png_key: null`` and names the record (``cache_key``, ``record_key``).

Every manifest entry records ``route`` and ``routing`` (the decision, its score and features, the mode).
A ``vlm`` page is drawn upright where its text layer says which way is up (``rotation_applied``, degrees
clockwise beyond its /Rotate: :func:`mkg_pipeline.pdf.render.upright_turn`).

Per document this writes ``pages/<doc_id>/<n>.png`` and a page manifest ``pages/<doc_id>/manifest.json``
(sizes, image hash, text layer, failed pages). The manifest is written last, so a document with a manifest
at the current DPI is complete, and is skipped on re-materialization; a manifest with failed pages has only
those pages rendered again. A manifest is only believed when it proves itself: it parses, names this document,
and every page image it lists is in the bucket as written (one listing of ``pages/<doc_id>/`` compares each
image's size and ETag with the ones recorded when it was uploaded). A page image that is missing, empty or
replaced is drawn again by a plain re-run; an unreadable manifest counts as none (the document is rendered
again), never as a permanent failure.

:func:`render_batch` owns the loop and its failure policy:

* documents are rendered in worker processes (:func:`~mkg_pipeline.stages.batches.document_pool`), one per
  CPU available; each worker reads the PDF itself and uploads each page as soon as it is drawn, with at most
  :data:`UPLOADS_IN_FLIGHT` uploads pending, so a worker holds a few pages, never a document's worth;
* one document taking longer than ``workers.timeout_s`` has its worker killed; a document that cannot be
  rendered at all (timeout, error, worker died) gets ``pages/<doc_id>/failure.json`` with the reason and the
  number of attempts across materializations, and the others carry on. Writing the manifest removes it;
* only when no document of the selection could be rendered does the stage fail (:class:`NothingRendered`).
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from mkg_pipeline.config import ImageSizeConfig, PDFConfig, RoutingConfig, StorageConfig, WorkersConfig
from mkg_pipeline.document import page_record
from mkg_pipeline.engines.base import engine_identity, page_cache_key
from mkg_pipeline.pdf.pool import TaskFailed
from mkg_pipeline.pdf.render import (
    PageFailure,
    RenderedPage,
    TextPage,
    iter_rendered_pages,
    qwen25vl_vision_tokens,
)
from mkg_pipeline.records import is_text_page
from mkg_pipeline.stages.batches import accepted_doc_ids, document_pool, read_batch_manifest, storage_for
from mkg_pipeline.storage import PreconditionFailed, Storage

log = logging.getLogger(__name__)

#: 2: routes (text pages without an image), images sized per engine instead of by DPI;
#: 3: VLM pages drawn upright where their text layer says which way is up (``rotation_applied``, issue 19)
PAGE_MANIFEST_VERSION: Final = 3
#: bumped whenever the text engine's output for the same page changes (part of its identity: cache key)
TEXT_ENGINE_VERSION: Final = "1"
ROUTES: Final = ("text", "vlm")
#: page uploads a worker may have pending while it draws the next page (memory: this many PNGs + one pixmap)
UPLOADS_IN_FLIGHT: Final = 2

#: reasons of a document-level render failure (pages/<doc_id>/failure.json)
RENDER_TIMEOUT: Final = "render_timeout"
RENDER_ERROR: Final = "render_error"
RENDER_CRASHED: Final = "render_crashed"
#: a stalled worker (wall clock out, CPU budget not used) is recorded as a timeout: a render failure is retried
#: on the next materialization either way, and its message says which it was
_REASONS: Final = {
    "timeout": RENDER_TIMEOUT,
    "stalled": RENDER_TIMEOUT,
    "error": RENDER_ERROR,
    "crashed": RENDER_CRASHED,
}


class NothingRendered(Exception):
    """Not one document of the selection could be rendered (each has its failure record)."""


@dataclass(frozen=True)
class DocumentPages:
    """What became of one document's pages (returned by a worker: small, no images)."""

    doc_id: str
    pages: int  # pages with an image
    failed: list[dict[str, Any]]  # the manifest's failed_pages
    skipped: bool  # already complete at this image size and routing: nothing rendered
    routes: dict[str, int] = field(default_factory=dict)  # route -> pages
    vision_tokens: int = 0  # estimated for the VLM pages' images (Qwen2.5-VL)


@dataclass
class RenderSummary:
    documents: list[DocumentPages] = field(default_factory=list)
    failures: dict[str, dict[str, Any]] = field(default_factory=dict)  # doc_id -> its failure record

    @property
    def rendered(self) -> int:
        return sum(not d.skipped for d in self.documents)

    @property
    def skipped(self) -> int:
        return sum(d.skipped for d in self.documents)

    @property
    def pages(self) -> int:
        return sum(d.pages for d in self.documents)

    @property
    def pages_by_route(self) -> dict[str, int]:
        total: Counter[str] = Counter({route: 0 for route in ROUTES})
        for d in self.documents:
            total.update(d.routes)
        return dict(total)

    @property
    def vision_tokens(self) -> int:
        return sum(d.vision_tokens for d in self.documents)

    @property
    def failed_pages(self) -> list[dict[str, Any]]:
        return [{"doc_id": d.doc_id, **f} for d in self.documents for f in d.failed]


def text_engine_identity() -> str:
    """The text engine's identity in page records and cache keys: engine, PyMuPDF version, engine version."""
    import pymupdf

    return engine_identity("text_layer", f"pymupdf-{pymupdf.VersionBind}", TEXT_ENGINE_VERSION)


@dataclass(frozen=True)
class RenderPlan:
    """How one document's pages are routed and drawn (picklable: it crosses into the render workers)."""

    mode: str  # auto | vlm | text
    longest_side_px: int
    max_pixels: int

    def as_json(self) -> dict[str, Any]:
        return {"routing_mode": self.mode, "longest_side_px": self.longest_side_px, "max_pixels": self.max_pixels}


def plan_for(doc_id: str, routing: RoutingConfig | None, image: ImageSizeConfig | None) -> RenderPlan:
    routing, image = routing or RoutingConfig(), image or ImageSizeConfig()
    return RenderPlan(routing.mode_for(doc_id), image.longest_side_px, image.max_pixels)


def render_batch(
    storage: Storage,
    batch_id: str,
    pdf: PDFConfig,
    workers: WorkersConfig | None = None,
    *,
    doc_ids: list[str] | None = None,
    force: bool = False,
    progress: Callable[[str], None] = log.info,
    routing: RoutingConfig | None = None,
    image: ImageSizeConfig | None = None,
) -> RenderSummary:
    """Render the accepted documents of batch ``batch_id`` (or only ``doc_ids`` of them).

    ``routing`` (default: ``auto``) and ``image`` (the configured engine's page image size; default:
    page_markdown's) decide what each page becomes.
    """
    selected = accepted_doc_ids(read_batch_manifest(storage, batch_id), doc_ids)
    return render_documents(
        storage, selected, pdf, workers, force=force, progress=progress, routing=routing, image=image
    )


def render_documents(
    storage: Storage,
    doc_ids: list[str],
    pdf: PDFConfig,
    workers: WorkersConfig | None = None,
    *,
    force: bool = False,
    progress: Callable[[str], None] = log.info,
    routing: RoutingConfig | None = None,
    image: ImageSizeConfig | None = None,
) -> RenderSummary:
    summary = RenderSummary()
    if not doc_ids:
        return summary
    pool, target = document_pool(storage, workers or WorkersConfig(), len(doc_ids), preload=(__name__,))
    progress(f"rendering {len(doc_ids)} document(s) with {pool.processes} process(es)")
    calls = ((doc_id, (target, doc_id, pdf, force, plan_for(doc_id, routing, image))) for doc_id in doc_ids)
    with pool:
        for index, (doc_id, result) in enumerate(pool.run(render_document_task, calls), start=1):
            prefix = f"[{index}/{len(doc_ids)}] {doc_id}"
            if isinstance(result, TaskFailed):
                record = _record_failure(storage, doc_id, result)
                summary.failures[doc_id] = record
                progress(f"{prefix}: NOT rendered ({record['reason']}, attempt {record['attempts']}): {result.message}")
                continue
            summary.documents.append(result)
            routes = ", ".join(f"{n} {route}" for route, n in sorted(result.routes.items()))
            if result.skipped:
                progress(f"{prefix}: already rendered ({result.pages} pages: {routes})")
            else:
                failed = f", {len(result.failed)} page(s) failed" if result.failed else ""
                progress(f"{prefix}: {result.pages} page(s) ({routes}){failed}")
    if len(summary.failures) == len(doc_ids):
        raise NothingRendered(
            f"none of the {len(doc_ids)} document(s) could be rendered: "
            + "; ".join(f"{d}: {r['reason']}: {r['message']}" for d, r in summary.failures.items())
        )
    return summary


def render_document_task(
    target: Storage | StorageConfig, doc_id: str, pdf: PDFConfig, force: bool, plan: RenderPlan | None = None
) -> DocumentPages:
    """The unit of work of a render worker (module-level, so a worker process can run it)."""
    return render_document(storage_for(target), doc_id, pdf, force=force, plan=plan)


def _routes(pages: list[dict[str, Any]]) -> dict[str, int]:
    return dict(Counter(str(p.get("route", "vlm")) for p in pages))


def render_document(
    storage: Storage, doc_id: str, pdf: PDFConfig, *, force: bool = False, plan: RenderPlan | None = None
) -> DocumentPages:
    """Route and render one document's pages, then write its manifest; skip it when complete.

    A manifest of this plan (routing mode, image size, text engine) with failed pages has only those pages
    done again, the others are kept.
    """
    plan = plan or plan_for(doc_id, None, None)
    existing = None if force else _current_manifest(storage, doc_id, plan)
    retry: list[int] | None = None
    if existing is not None:
        damaged = _damaged_images(storage, doc_id, existing["pages"])
        if not existing["failed_pages"] and not damaged:
            return DocumentPages(
                doc_id,
                len(existing["pages"]),
                [],
                skipped=True,
                routes=_routes(existing["pages"]),
                vision_tokens=sum(int(p.get("vision_tokens", 0)) for p in existing["pages"]),
            )
        if damaged:
            log.warning("%s: page image(s) %s missing or damaged in the bucket; rendering them again", doc_id, damaged)
        retry = sorted({*(int(f["page"]) for f in existing["failed_pages"]), *damaged})
    data = storage.get_bytes(storage.raw_key(doc_id))
    source = _source_of(storage, doc_id)
    pages, failed = _render_and_upload(storage, doc_id, data, source, pdf, plan, retry)
    if existing is not None:
        redone = set(retry or ())
        kept = [p for p in existing["pages"] if int(p["page"]) not in redone]
        pages = sorted([*kept, *pages], key=lambda p: p["page"])
    storage.put_json(
        storage.page_manifest_key(doc_id),
        {
            "version": PAGE_MANIFEST_VERSION,
            "doc_id": doc_id,
            "source": source,
            "render": _render_key(plan),
            "page_count": len(pages) + len(failed),
            "pages": pages,
            "failed_pages": failed,
            "rendered_at": datetime.now(UTC).isoformat(),
        },
    )
    storage.delete(storage.render_failure_key(doc_id))  # superseded by the manifest (no-op when absent)
    return DocumentPages(
        doc_id,
        len(pages),
        failed,
        skipped=False,
        routes=_routes(pages),
        vision_tokens=sum(int(p.get("vision_tokens", 0)) for p in pages),
    )


def _render_key(plan: RenderPlan) -> dict[str, Any]:
    """What a manifest's pages depend on: a manifest with another one is rendered again."""
    return {**plan.as_json(), "text_engine": text_engine_identity()}


def _render_and_upload(
    storage: Storage, doc_id: str, data: bytes, source: str, pdf: PDFConfig, plan: RenderPlan, only: list[int] | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    pages: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    pending: deque[tuple[Future[str], dict[str, Any], str]] = deque()
    identity = text_engine_identity()

    def settle() -> None:
        # Raises if that upload failed: the document fails, no manifest. The ETag S3 answered is recorded, so a
        # later run can tell the object from a replaced one by the listing alone.
        upload, record, field_name = pending.popleft()
        record[field_name] = upload.result()

    pages_iter = iter_rendered_pages(
        data,
        source,
        pdf.dpi,
        pdf.max_render_pixels,
        page_numbers=only,
        size=(plan.longest_side_px, plan.max_pixels),
        routing_mode=plan.mode,
    )
    # Uploading page n overlaps drawing page n+1: S3 latency is hidden behind the CPU work.
    with ThreadPoolExecutor(max_workers=UPLOADS_IN_FLIGHT, thread_name_prefix=f"upload-{doc_id}") as uploads:
        for item in pages_iter:
            if isinstance(item, PageFailure):
                failed.append({"page": item.number, "reason": item.reason, "error": item.error})
                continue
            while len(pending) >= UPLOADS_IN_FLIGHT:
                settle()
            if isinstance(item, TextPage):
                entry, result_record = _text_entry(storage, doc_id, item, identity)
                upload = uploads.submit(_store_text_page, storage, doc_id, entry["record_key"], result_record, item)
                pending.append((upload, entry, "record_etag"))
                pages.append(entry)
                continue
            png_key = storage.page_png_key(doc_id, item.number)
            record = _page_record(item, png_key)
            pending.append((uploads.submit(storage.put_bytes, png_key, item.png, "image/png"), record, "png_etag"))
            pages.append(record)
        while pending:
            settle()
    return pages, failed


def _text_entry(storage: Storage, doc_id: str, item: TextPage, identity: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest entry of a text-route page, and its page record (the vlm stage's format)."""
    cache_key = page_cache_key(item.content_sha256, identity)
    record_key = storage.vlm_page_key(doc_id, item.number, cache_key)
    record = page_record(
        item.result,
        doc_id=doc_id,
        page=item.number,
        cache_key=cache_key,
        engine=identity,
        model=item.result.model,
        latency_s=item.seconds,  # the text engine's time on the page, in the render worker
    )
    record["route"] = "text"
    entry = {
        "page": item.number,
        "route": "text",
        "routing": item.routing,
        "png_key": None,  # a text-route page has no image
        "png_sha256": None,
        "vision_tokens": 0,
        "width_pt": item.width_pt,
        "height_pt": item.height_pt,
        "rotation": item.rotation,
        "text_layer": item.text_layer,
        "text_layer_chars": len(item.text_layer.strip()),
        "content_sha256": item.content_sha256,
        "engine": identity,
        "cache_key": cache_key,
        "record_key": record_key,
    }
    return entry, record


def _store_text_page(storage: Storage, doc_id: str, key: str, record: dict[str, Any], item: TextPage) -> str:
    """Figure crops first, then the page record (a record that exists is whole); returns the record's ETag."""
    for name, jpeg in item.result.images.items():
        with contextlib.suppress(PreconditionFailed):  # content-addressed: whoever wrote it first wrote the same
            storage.put_bytes(storage.vlm_image_key(doc_id, name), jpeg, "image/jpeg", if_none_match=True)
    return storage.put_json(key, record)


def _page_record(item: RenderedPage, png_key: str) -> dict[str, Any]:
    return {
        "page": item.number,
        "route": "vlm",
        "routing": item.routing,
        "png_key": png_key,
        "png_sha256": item.png_sha256,
        "png_bytes": len(item.png),
        "width_px": item.width_px,
        "height_px": item.height_px,
        "vision_tokens": qwen25vl_vision_tokens(item.width_px, item.height_px),
        "dpi": item.dpi,
        "width_pt": item.width_pt,
        "height_pt": item.height_pt,
        "rotation": item.rotation,
        # the turn (clockwise) beyond /Rotate that made the image upright (pdf.render.upright_turn)
        "rotation_applied": item.rotation_applied,
        "text_layer": item.text_layer,
        "text_layer_chars": len(item.text_layer.strip()),
    }


def _current_manifest(storage: Storage, doc_id: str, plan: RenderPlan) -> dict[str, Any] | None:
    """The document's page manifest if it was written by this version for this plan and is readable, else None.

    An unreadable manifest (not JSON, not an object, another document's, pages that are not page records) is
    treated as missing: the document is rendered again and a good manifest replaces it.
    """
    key = storage.page_manifest_key(doc_id)
    try:
        manifest = storage.get_json(key)
    except FileNotFoundError:
        return None
    except ValueError as exc:  # not JSON
        log.warning("%s: %s; rendering the document again", doc_id, exc)
        return None
    problem = _manifest_problem(storage, doc_id, manifest)
    if problem is not None:
        log.warning("%s: %s is not a usable page manifest (%s); rendering the document again", doc_id, key, problem)
        return None
    if manifest.get("render") != _render_key(plan) or manifest.get("version") != PAGE_MANIFEST_VERSION:
        return None
    manifest.setdefault("failed_pages", [])
    return manifest  # type: ignore[no-any-return]


def _manifest_problem(storage: Storage, doc_id: str, manifest: Any) -> str | None:
    """What makes ``manifest`` unusable as ``doc_id``'s page manifest, or None."""
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    if manifest.get("doc_id") != doc_id:
        return f"it names document {manifest.get('doc_id')!r}"
    pages, failed = manifest.get("pages"), manifest.get("failed_pages", [])
    if not isinstance(pages, list) or not isinstance(failed, list):
        return "pages or failed_pages is not a list"
    for page in pages:
        if not (
            isinstance(page, dict) and isinstance(page.get("page"), int) and _names_its_output(storage, doc_id, page)
        ):
            return f"a page record is not one of this document's pages: {str(page)[:200]}"
    if not all(isinstance(f, dict) and isinstance(f.get("page"), int) for f in failed):
        return "a failed page has no page number"
    numbers = [p["page"] for p in pages] + [f["page"] for f in failed]
    if len(set(numbers)) != len(numbers) or manifest.get("page_count", len(numbers)) != len(numbers):
        return "its pages do not add up to its page_count"
    return None


def _names_its_output(storage: Storage, doc_id: str, page: dict[str, Any]) -> bool:
    """A vlm page names its own image; a text page its own page record (and no image)."""
    n = page["page"]
    if page.get("route") == "text":
        key = page.get("cache_key")
        return (
            page.get("png_key") is None
            and isinstance(key, str)
            and page.get("record_key") == storage.vlm_page_key(doc_id, n, key)
        )
    return page.get("png_key") == storage.page_png_key(doc_id, n) and isinstance(page.get("png_sha256"), str)


def _damaged_images(storage: Storage, doc_id: str, pages: list[dict[str, Any]]) -> list[int]:
    """Pages whose output is not in the bucket as it was written: an image (or a text page's record) missing,
    empty, or of another size or ETag.

    One listing of ``pages/<doc_id>/`` (1000 keys a request), and one of the document's page records when it
    has text pages, not a GET per page: a complete document costs the same few requests to skip however many
    pages it has. Manifests written before sizes and ETags were recorded are checked for presence and a
    non-zero size.
    """
    listed = {o.key: o for o in storage.list_objects(storage.page_prefix(doc_id))}
    if any(is_text_page(p) for p in pages):
        listed.update({o.key: o for o in storage.list_objects(storage.vlm_page_prefix(doc_id))})
    damaged = []
    for page in pages:
        if is_text_page(page):
            found = listed.get(page["record_key"])
            if found is None or found.size == 0 or ("record_etag" in page and found.etag != page["record_etag"]):
                damaged.append(int(page["page"]))
            continue
        found = listed.get(page["png_key"])
        if (
            found is None
            or found.size == 0
            or ("png_bytes" in page and found.size != page["png_bytes"])
            or ("png_etag" in page and found.etag != page["png_etag"])
        ):
            damaged.append(int(page["page"]))
    return damaged


def _record_failure(storage: Storage, doc_id: str, failure: TaskFailed) -> dict[str, Any]:
    """Write (or update) ``pages/<doc_id>/failure.json``; attempts count across materializations."""
    key = storage.render_failure_key(doc_id)
    try:
        attempts = int(storage.get_json(key).get("attempts", 0))
    except FileNotFoundError:
        attempts = 0
    except ValueError:  # an unreadable record is replaced, not trusted
        attempts = 0
    record = {
        "doc_id": doc_id,
        "reason": _REASONS[failure.kind],
        "message": failure.message,
        "attempts": attempts + 1,
        "last_attempt": datetime.now(UTC).isoformat(),
    }
    log.warning("%s: rendering failed (%s): %s", doc_id, record["reason"], failure.message)
    storage.put_json(key, record)
    return record


def read_page_manifest(storage: Storage, doc_id: str) -> dict[str, Any]:
    """The document's page manifest; ``ValueError`` naming it and what is wrong when it is unreadable."""
    key = storage.page_manifest_key(doc_id)
    try:
        manifest = storage.get_json(key)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"document {doc_id} has no page manifest at {storage.uri(key)}; "
            "materialize parsed_pages for its batch first"
        ) from None
    # The readers need pages that are records with a page number; the render stage checks the rest.
    if not isinstance(manifest, dict):
        problem: str | None = f"a JSON {type(manifest).__name__}, not an object"
    elif manifest.get("doc_id", doc_id) != doc_id:
        problem = f"it names document {manifest.get('doc_id')!r}"
    elif not isinstance(manifest.get("pages"), list) or not all(
        isinstance(p, dict) and isinstance(p.get("page"), int) for p in manifest["pages"]
    ):
        problem = "its pages are not page records"
    else:
        problem = None
    if problem is not None:
        raise ValueError(
            f"{storage.uri(key)} is not a valid page manifest ({problem}); materialize parsed_pages for the "
            "document's batch again: it renders the document anew"
        )
    return manifest  # type: ignore[no-any-return]


def _source_of(storage: Storage, doc_id: str) -> str:
    try:
        return str(storage.get_json(storage.raw_meta_key(doc_id)).get("source", doc_id))
    except FileNotFoundError:
        return doc_id
