"""parsed_pages's page images on a real S3 API (moto server) and real worker processes: the ETags recorded at
upload match the listing, so a complete document is skipped and a damaged image is drawn again (issue 21 row 11)."""

from __future__ import annotations

import pytest

from mkg_pipeline.config import ImageSizeConfig, PDFConfig, RoutingConfig, WorkersConfig
from mkg_pipeline.ids import doc_id_for
from mkg_pipeline.stages.ingest import ingest_batch
from mkg_pipeline.stages.pages import render_batch
from mkg_pipeline.storage import Storage
from mkg_pipeline_tests.fixtures.corpus import corpus_pdf
from mkg_pipeline_tests.stages.conftest import drop

pytestmark = pytest.mark.integration

PDF = PDFConfig(dpi=36)
WORKERS = WorkersConfig(render_processes=1)
#: the page images are the point here: every page drawn, small
VLM = {"routing": RoutingConfig(mode="vlm"), "image": ImageSizeConfig(longest_side_px=400, max_pixels=400 * 400)}


def test_damaged_page_images_are_redrawn_and_intact_ones_skipped(storage: Storage) -> None:
    four = corpus_pdf("pdflatex-4-pages.pdf").read_bytes()
    batch = drop(storage, {"four.pdf": four})
    ingest_batch(storage, batch, PDF, WORKERS)
    assert render_batch(storage, batch, PDF, WORKERS, **VLM).rendered == 1
    assert render_batch(storage, batch, PDF, WORKERS, **VLM).skipped == 1  # recorded ETags match the listing

    doc_id = doc_id_for(four)
    first = storage.get_bytes(storage.page_png_key(doc_id, 1))
    storage.delete(storage.page_png_key(doc_id, 2))
    storage.put_bytes(storage.page_png_key(doc_id, 3), bytes(len(first)))  # replaced by zeros
    again = render_batch(storage, batch, PDF, WORKERS, **VLM)
    assert (again.rendered, again.skipped, again.failures) == (1, 0, {})
    assert storage.get_bytes(storage.page_png_key(doc_id, 2))[:4] == b"\x89PNG"
    assert storage.get_bytes(storage.page_png_key(doc_id, 3))[:4] == b"\x89PNG"
    assert render_batch(storage, batch, PDF, WORKERS, **VLM).skipped == 1


def test_text_route_records_are_written_by_the_worker_and_checked_by_their_etags(storage: Storage) -> None:
    four = corpus_pdf("pdflatex-4-pages.pdf").read_bytes()
    batch = drop(storage, {"four.pdf": four})
    ingest_batch(storage, batch, PDF, WORKERS)
    summary = render_batch(storage, batch, PDF, WORKERS)  # routing auto: a born-digital paper, all text
    assert summary.pages_by_route == {"text": 4, "vlm": 0}
    doc_id = doc_id_for(four)
    assert not storage.exists(storage.page_png_key(doc_id, 1))
    manifest = storage.get_json(storage.page_manifest_key(doc_id))
    assert all(storage.exists(p["record_key"]) and p["record_etag"] for p in manifest["pages"])
    assert render_batch(storage, batch, PDF, WORKERS).skipped == 1
    storage.put_bytes(manifest["pages"][1]["record_key"], b"{}")  # replaced: another ETag
    assert render_batch(storage, batch, PDF, WORKERS).rendered == 1
    assert storage.get_json(manifest["pages"][1]["record_key"])["page"] == 2
