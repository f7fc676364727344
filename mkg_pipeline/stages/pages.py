"""parsed_pages: render every page to PNG and keep its text layer, one page in memory at a time.

Per document this writes ``pages/<doc_id>/<n>.png`` and a page manifest
``pages/<doc_id>/manifest.json`` (sizes, image hash, text layer, failures).
The manifest is written last, so a document with a manifest at the current
DPI is complete and is skipped on re-materialization.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mkg_pipeline.config import PDFConfig
from mkg_pipeline.pdf.render import PageFailure, iter_rendered_pages
from mkg_pipeline.storage import Storage

log = logging.getLogger(__name__)

PAGE_MANIFEST_VERSION = 1


@dataclass
class DocumentPages:
    doc_id: str
    pages: int
    failed: list[dict[str, Any]]
    skipped: bool  # already rendered at this DPI


@dataclass
class PagesSummary:
    documents: list[DocumentPages] = field(default_factory=list)

    @property
    def pages(self) -> int:
        return sum(d.pages for d in self.documents)

    @property
    def failed(self) -> int:
        return sum(len(d.failed) for d in self.documents)


def render_document(
    storage: Storage,
    doc_id: str,
    pdf: PDFConfig,
    *,
    force: bool = False,
    progress: Callable[[str], None] = log.info,
) -> DocumentPages:
    manifest_key = storage.page_manifest_key(doc_id)
    if not force and storage.exists(manifest_key):
        existing = storage.get_json(manifest_key)
        complete = not existing.get("failed_pages")  # failed renders are retried on every materialization
        if complete and existing.get("dpi") == pdf.dpi and existing.get("version") == PAGE_MANIFEST_VERSION:
            return DocumentPages(doc_id, len(existing["pages"]), existing.get("failed_pages", []), skipped=True)
    data = storage.get_bytes(storage.raw_key(doc_id))
    source = _source_of(storage, doc_id)
    pages: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for item in iter_rendered_pages(data, source, pdf.dpi, pdf.max_render_pixels):
        if isinstance(item, PageFailure):
            failed.append({"page": item.number, "reason": item.reason, "error": item.error})
            progress(f"{doc_id} page {item.number}: render FAILED ({item.reason}): {item.error}")
            continue
        png_key = storage.page_png_key(doc_id, item.number)
        storage.put_bytes(png_key, item.png, content_type="image/png")
        pages.append(
            {
                "page": item.number,
                "png_key": png_key,
                "png_sha256": item.png_sha256,
                "width_px": item.width_px,
                "height_px": item.height_px,
                "dpi": item.dpi,
                "width_pt": item.width_pt,
                "height_pt": item.height_pt,
                "rotation": item.rotation,
                "text_layer": item.text_layer,
                "text_layer_chars": len(item.text_layer.strip()),
            }
        )
    storage.put_json(
        manifest_key,
        {
            "version": PAGE_MANIFEST_VERSION,
            "doc_id": doc_id,
            "source": source,
            "dpi": pdf.dpi,
            "page_count": len(pages) + len(failed),
            "pages": pages,
            "failed_pages": failed,
            "rendered_at": datetime.now(UTC).isoformat(),
        },
    )
    progress(f"{doc_id} ({source}): rendered {len(pages)} pages" + (f", {len(failed)} failed" if failed else ""))
    return DocumentPages(doc_id, len(pages), failed, skipped=False)


def read_page_manifest(storage: Storage, doc_id: str) -> dict[str, Any]:
    try:
        return storage.get_json(storage.page_manifest_key(doc_id))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"document {doc_id} has no page manifest at {storage.uri(storage.page_manifest_key(doc_id))}; "
            "materialize parsed_pages for its batch first"
        ) from None


def _source_of(storage: Storage, doc_id: str) -> str:
    try:
        return str(storage.get_json(storage.raw_meta_key(doc_id)).get("source", doc_id))
    except FileNotFoundError:
        return doc_id
