"""The stages' worker processes against real S3 (moto): parallel documents, a wall-clock limit per document.

Issue 9, row 4: a 760-byte tiling-pattern PDF and an 88 KB PDF of 2 M path operations each keep MuPDF busy
for minutes. Validation and rendering run in worker processes that are killed at ``workers.timeout_s``, the
document is recorded (rejected ``validation_timeout`` / ``render_timeout``) and the others carry on.
Assertions are on outcomes, never on durations. The limit here is 10 s: far below the minutes these files
take, far above what a normal document needs even on a loaded 2-core machine. (With 4 s, a two-page
document, whose time includes its worker's first S3 client, was cut off in two whole-suite runs here.)
"""

from __future__ import annotations

import pytest

from mkg_pipeline.config import ImageSizeConfig, PDFConfig, RoutingConfig, WorkersConfig
from mkg_pipeline.ids import doc_id_for
from mkg_pipeline.stages.ingest import ingest_batch
from mkg_pipeline.stages.pages import render_batch
from mkg_pipeline.storage import Storage
from mkg_pipeline_tests.fixtures.corpus import corpus_pdf
from mkg_pipeline_tests.fixtures.pathological import path_flood_pdf, tiling_pattern_pdf
from mkg_pipeline_tests.stages.conftest import drop

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PDF = PDFConfig(dpi=36)
WORKERS = WorkersConfig(timeout_s=10, render_processes=2)
#: for tests about parallelism, not about the limit
GENEROUS = WorkersConfig(timeout_s=600, render_processes=2)
#: rendering in worker processes is the point here: every page drawn (small)
VLM = {"routing": RoutingConfig(mode="vlm"), "image": ImageSizeConfig(longest_side_px=400, max_pixels=400 * 400)}
TWO = corpus_pdf("two-pages.pdf").read_bytes()


def test_validation_past_the_time_limit_is_a_rejection(storage: Storage) -> None:
    batch = drop(
        storage,
        {"tiling.pdf": tiling_pattern_pdf(), "paths.pdf": path_flood_pdf(), "two-pages.pdf": TWO},
    )
    summary = ingest_batch(storage, batch, PDF, WORKERS)
    assert summary.accepted == {"incoming/two-pages.pdf": doc_id_for(TWO)}
    assert {k: r["reason"] for k, r in summary.rejected.items()} == {
        "incoming/tiling.pdf": "validation_timeout",
        "incoming/paths.pdf": "validation_timeout",
    }
    for name in ("tiling.pdf", "paths.pdf"):
        record = storage.get_json(storage.rejected_key(name))
        assert record["reason"] == "validation_timeout" and "workers.timeout_s" in record["message"]
    assert list(storage.list_objects(storage.incoming_prefix)) == []  # recorded, so drained


def test_rendering_past_the_time_limit_is_recorded_with_attempts(storage: Storage) -> None:
    batch = drop(storage, {"two-pages.pdf": TWO, "four.pdf": "pdflatex-4-pages.pdf"})
    ingest_batch(storage, batch, PDF, WORKERS)
    # A document that validated but is too expensive to draw: put the path flood under one accepted doc_id.
    slow = doc_id_for(corpus_pdf("pdflatex-4-pages.pdf").read_bytes())
    storage.put_bytes(storage.raw_key(slow), path_flood_pdf())
    summary = render_batch(storage, batch, PDF, WORKERS, **VLM)
    assert [d.doc_id for d in summary.documents] == [doc_id_for(TWO)]  # the other one was not held up
    assert storage.get_json(storage.page_manifest_key(doc_id_for(TWO)))["page_count"] == 2
    record = storage.get_json(storage.render_failure_key(slow))
    assert (record["doc_id"], record["reason"], record["attempts"]) == (slow, "render_timeout", 1)
    assert "workers.timeout_s" in record["message"]
    assert not storage.exists(storage.page_manifest_key(slow))
    again = render_batch(storage, batch, PDF, WORKERS, **VLM)
    assert again.skipped == 1 and again.failures[slow]["attempts"] == 2


def test_documents_render_in_parallel_processes_that_write_their_own_pages(storage: Storage) -> None:
    names = ["two-pages.pdf", "pdflatex-4-pages.pdf", "rotated-arabic-4p.pdf", "minimal-document.pdf"]
    batch = drop(storage, {name: name for name in names})
    ingest_batch(storage, batch, PDF, GENEROUS)
    summary = render_batch(storage, batch, PDF, GENEROUS, **VLM)
    assert summary.rendered == 4 and summary.pages == 11 and not summary.failures
    for name in names:
        manifest = storage.get_json(storage.page_manifest_key(doc_id_for(corpus_pdf(name).read_bytes())))
        for page in manifest["pages"]:
            assert storage.get_bytes(page["png_key"])[:4] == b"\x89PNG"
