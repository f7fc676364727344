"""parsed_pages's stage in-process on the in-memory bucket: skips, retries, failure records, kills, doc_ids."""

from __future__ import annotations

from typing import Any

import pytest

from mkg_pipeline.config import ImageSizeConfig, PDFConfig, RoutingConfig
from mkg_pipeline.ids import doc_id_for
from mkg_pipeline.pdf.render import qwen25vl_vision_tokens
from mkg_pipeline.stages.batches import read_batch_manifest, write_batch_manifest
from mkg_pipeline.stages.ingest import ingest_batch
from mkg_pipeline.stages.pages import NothingRendered, RenderSummary, read_page_manifest, text_engine_identity
from mkg_pipeline.stages.pages import render_batch as _render_batch
from mkg_pipeline.storage import MemoryStorage
from mkg_pipeline_tests.fixtures.corpus import corpus_pdf
from mkg_pipeline_tests.fixtures.pathological import build_pdf, huge_page_pdf
from mkg_pipeline_tests.fixtures.routing_pages import TITLE, born_digital_pdf, mixed_pdf, rotated_pdf, scan_pdf
from mkg_pipeline_tests.stages.conftest import Killed, drop, fail_once, kill_at_write, record_ops

PDF = PDFConfig(dpi=36)
#: these tests are about rendering itself (skips, retries, failures): every page drawn, small images
VLM_ONLY = RoutingConfig(mode="vlm")
SMALL = ImageSizeConfig(longest_side_px=400, max_pixels=400 * 400)


def render_batch(*args: Any, **kwargs: Any) -> RenderSummary:
    kwargs.setdefault("routing", VLM_ONLY)
    kwargs.setdefault("image", SMALL)
    return _render_batch(*args, **kwargs)


TWO = corpus_pdf("two-pages.pdf").read_bytes()
FOUR = corpus_pdf("pdflatex-4-pages.pdf").read_bytes()
#: a page tree that claims three pages but holds one: pages 2 and 3 fail to load, page 1 renders
PARTIAL = build_pdf(
    [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 3 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 100] >>",
    ]
)


def ingested(files: dict[str, bytes]) -> tuple[MemoryStorage, str]:
    storage = MemoryStorage()
    batch = drop(storage, files)
    ingest_batch(storage, batch, PDF)
    return storage, batch


def png_puts(ops: list[tuple[str, str]]) -> list[str]:
    return [key for op, key in ops if op == "put" and key.endswith(".png")]


def test_every_page_is_rendered_and_complete_documents_are_skipped() -> None:
    storage, batch = ingested({"two.pdf": TWO, "four.pdf": FOUR})
    summary = render_batch(storage, batch, PDF)
    assert (summary.rendered, summary.skipped, summary.pages, summary.failures) == (2, 0, 6, {})
    manifest = storage.get_json(storage.page_manifest_key(doc_id_for(FOUR)))
    assert [p["page"] for p in manifest["pages"]] == [1, 2, 3, 4]
    assert (
        manifest["source"] == "four.pdf"
        and manifest["render"]["longest_side_px"] == 400
        and manifest["failed_pages"] == []
    )
    for page in manifest["pages"]:
        assert storage.get_bytes(page["png_key"])[:8] == b"\x89PNG\r\n\x1a\n"
    ops = record_ops(storage)
    again = render_batch(storage, batch, PDF)
    assert (again.rendered, again.skipped, again.pages) == (0, 2, 6)
    assert not [op for op in ops if op[0] in {"put", "delete"}]  # nothing written, not even a manifest
    # Another image size is another rendering, and so is another routing mode.
    assert render_batch(storage, batch, PDF, image=ImageSizeConfig(longest_side_px=500)).rendered == 2
    assert render_batch(storage, batch, PDF, image=ImageSizeConfig(longest_side_px=500)).skipped == 2
    assert (
        render_batch(storage, batch, PDF, routing=RoutingConfig(), image=ImageSizeConfig(longest_side_px=500)).rendered
        == 2
    )


def test_doc_ids_select_documents_of_the_batch() -> None:
    storage, batch = ingested({"two.pdf": TWO, "four.pdf": FOUR})
    summary = render_batch(storage, batch, PDF, doc_ids=[doc_id_for(TWO)])
    assert [d.doc_id for d in summary.documents] == [doc_id_for(TWO)]
    assert not storage.exists(storage.page_manifest_key(doc_id_for(FOUR)))
    with pytest.raises(ValueError, match="holds no accepted document 0000"):
        render_batch(storage, batch, PDF, doc_ids=["0000000000000000"])


def test_failed_pages_are_retried_alone() -> None:
    storage, batch = ingested({"partial.pdf": PARTIAL})
    first = render_batch(storage, batch, PDF)
    (document,) = first.documents
    assert document.pages == 1 and [f["page"] for f in document.failed] == [2, 3]
    assert {f["reason"] for f in first.failed_pages} == {"load_failed"}
    ops = record_ops(storage)
    again = render_batch(storage, batch, PDF)
    assert [f["page"] for f in again.documents[0].failed] == [2, 3]  # tried again, still broken
    assert png_puts(ops) == []  # page 1 was not drawn again
    manifest = storage.get_json(storage.page_manifest_key(doc_id_for(PARTIAL)))
    assert [p["page"] for p in manifest["pages"]] == [1] and manifest["page_count"] == 3


def test_a_document_that_cannot_be_rendered_is_recorded_with_its_attempts() -> None:
    storage, batch = ingested({"two.pdf": TWO, "four.pdf": FOUR})
    broken = doc_id_for(FOUR)
    storage.put_bytes(storage.raw_key(broken), b"%PDF-1.4\n" + b"\x00" * 64)  # damaged in storage since
    summary = render_batch(storage, batch, PDF)
    assert summary.rendered == 1
    record = storage.get_json(storage.render_failure_key(broken))
    assert set(record) == {"doc_id", "reason", "message", "attempts", "last_attempt"}
    assert (record["doc_id"], record["reason"], record["attempts"]) == (broken, "render_error", 1)
    assert "too damaged" in record["message"]
    assert render_batch(storage, batch, PDF).failures[broken]["attempts"] == 2  # counted across runs
    # Repaired: the manifest is written and the failure record goes away.
    storage.put_bytes(storage.raw_key(broken), FOUR)
    render_batch(storage, batch, PDF)
    assert storage.exists(storage.page_manifest_key(broken))
    assert not storage.exists(storage.render_failure_key(broken))


def test_nothing_rendered_fails_the_stage() -> None:
    storage, batch = ingested({"four.pdf": FOUR})
    storage.put_bytes(storage.raw_key(doc_id_for(FOUR)), b"%PDF-1.4\n" + b"\x00" * 64)
    with pytest.raises(NothingRendered, match="render_error"):
        render_batch(storage, batch, PDF)
    assert storage.get_json(storage.render_failure_key(doc_id_for(FOUR)))["attempts"] == 1


def test_a_failing_page_put_fails_the_document_without_a_manifest() -> None:
    storage, batch = ingested({"four.pdf": FOUR, "two.pdf": TWO})
    fail_once(storage, "put", lambda key: key.endswith("/3.png"), OSError("S3 said 500"))
    summary = render_batch(storage, batch, PDF)
    failed = doc_id_for(FOUR)
    assert summary.failures[failed]["reason"] == "render_error" and "S3 said 500" in summary.failures[failed]["message"]
    assert not storage.exists(storage.page_manifest_key(failed))  # no manifest that lists a missing PNG
    storage.memory.fault = None
    assert render_batch(storage, batch, PDF).rendered == 1
    assert len(storage.get_json(storage.page_manifest_key(failed))["pages"]) == 4


def test_killed_at_any_write_resumes() -> None:
    """A kill between two writes leaves no manifest for an unfinished document; the re-run completes it."""
    writes = 4 + 2 + 2 * 2  # PNGs, manifests, failure-record deletes
    for n in range(1, writes + 1):
        storage, batch = ingested({"four.pdf": FOUR, "two.pdf": TWO})
        kill_at_write(storage, n)
        with pytest.raises(Killed):
            render_batch(storage, batch, PDF)
        storage.memory.fault = None
        for doc_id in (doc_id_for(FOUR), doc_id_for(TWO)):
            key = storage.page_manifest_key(doc_id)
            if storage.exists(key):  # a manifest only ever lists PNGs that exist
                assert all(storage.exists(p["png_key"]) for p in storage.get_json(key)["pages"])
        render_batch(storage, batch, PDF)
        assert len(storage.get_json(storage.page_manifest_key(doc_id_for(FOUR)))["pages"]) == 4
        assert len(storage.get_json(storage.page_manifest_key(doc_id_for(TWO)))["pages"]) == 2


def test_every_raw_document_gets_a_manifest_after_a_killed_ingest() -> None:
    """Row 1's other half: documents written to raw/ by a killed ingest are rendered after the re-run."""
    for n in range(1, 8):
        storage = MemoryStorage()
        batch = drop(storage, {"two.pdf": TWO, "four.pdf": FOUR, "partial.pdf": PARTIAL})
        kill_at_write(storage, n)
        with pytest.raises(Killed):
            ingest_batch(storage, batch, PDF)
        storage.memory.fault = None
        ingest_batch(storage, batch, PDF)
        render_batch(storage, batch, PDF)
        raw = [k.removeprefix("raw/").removesuffix(".pdf") for k in storage.keys("raw/") if k.endswith(".pdf")]
        assert len(raw) == 3
        assert all(storage.exists(storage.page_manifest_key(doc_id)) for doc_id in raw), n


def test_golden_batches_list_documents_directly() -> None:
    storage, _ = ingested({"two.pdf": TWO})
    write_batch_manifest(storage, "golden", [], origin="test")
    manifest = read_batch_manifest(storage, "golden")
    manifest["doc_ids"] = [doc_id_for(TWO)]
    storage.put_json(storage.batch_key("golden"), manifest)
    assert render_batch(storage, "golden", PDF).rendered == 1
    assert storage.exists(storage.page_manifest_key(doc_id_for(TWO)))


def test_a_missing_or_damaged_page_image_is_rendered_again_by_a_plain_rerun() -> None:
    """Issue 21 row 11: a deleted page PNG was named by the audit, but the re-run said "already rendered"."""
    storage, batch = ingested({"four.pdf": FOUR})
    render_batch(storage, batch, PDF)
    doc_id = doc_id_for(FOUR)
    manifest = storage.get_json(storage.page_manifest_key(doc_id))
    good = {p["page"]: storage.get_bytes(p["png_key"]) for p in manifest["pages"]}
    storage.delete(storage.page_png_key(doc_id, 2))  # deleted
    storage.put_bytes(storage.page_png_key(doc_id, 3), b"")  # zero bytes
    storage.put_bytes(storage.page_png_key(doc_id, 4), bytes(len(good[4])))  # same size, not the image
    ops = record_ops(storage)
    again = render_batch(storage, batch, PDF)
    assert (again.rendered, again.skipped) == (1, 0)
    assert sorted(png_puts(ops)) == [storage.page_png_key(doc_id, n) for n in (2, 3, 4)]  # page 1 is kept
    for n, data in good.items():
        assert storage.get_bytes(storage.page_png_key(doc_id, n)) == data
    repaired = storage.get_json(storage.page_manifest_key(doc_id))
    assert [p["page"] for p in repaired["pages"]] == [1, 2, 3, 4] and repaired["failed_pages"] == []
    assert render_batch(storage, batch, PDF).skipped == 1  # and now it is complete again


@pytest.mark.parametrize(
    "manifest",
    [b"{not json", b"[]", b"null", b'{"version": 1, "dpi": 36}', b'{"version": 1, "dpi": 36, "doc_id": "other"}'],
    ids=["garbage", "list", "null", "no-pages", "other-document"],
)
def test_an_unreadable_page_manifest_is_treated_as_missing(manifest: bytes) -> None:
    """Issue 21 row 11's neighbour: an unreadable manifest failed the document on every run (or crashed)."""
    storage, batch = ingested({"two.pdf": TWO})
    render_batch(storage, batch, PDF)
    doc_id = doc_id_for(TWO)
    storage.put_bytes(storage.page_manifest_key(doc_id), manifest)
    with pytest.raises(ValueError, match=r"is not valid JSON|is not a valid page manifest"):
        read_page_manifest(storage, doc_id)  # what the baseline and quality stages read: a clear error
    again = render_batch(storage, batch, PDF)
    assert (again.rendered, again.failures) == (1, {})
    assert [p["page"] for p in read_page_manifest(storage, doc_id)["pages"]] == [1, 2]


def test_a_manifest_without_recorded_sizes_and_etags_is_checked_for_presence() -> None:
    """Manifests written before sizes and ETags were recorded: intact ones are still skipped, holes redrawn."""
    storage, batch = ingested({"two.pdf": TWO})
    render_batch(storage, batch, PDF)
    doc_id = doc_id_for(TWO)
    manifest = storage.get_json(storage.page_manifest_key(doc_id))
    for page in manifest["pages"]:
        del page["png_bytes"], page["png_etag"]
    storage.put_json(storage.page_manifest_key(doc_id), manifest)
    assert render_batch(storage, batch, PDF).skipped == 1
    storage.put_bytes(storage.page_png_key(doc_id, 2), b"")
    ops = record_ops(storage)
    assert render_batch(storage, batch, PDF).rendered == 1
    assert png_puts(ops) == [storage.page_png_key(doc_id, 2)]


def test_a_page_too_large_to_read_is_recorded_as_failed_not_rendered() -> None:
    """Issue 21 row 7: a 1e7 pt page went into the manifest as a blank 0.04 dpi image."""
    huge = huge_page_pdf(1e7)
    storage, batch = ingested({"huge.pdf": huge, "two.pdf": TWO})
    summary = render_batch(storage, batch, PDF)
    (failure,) = summary.failed_pages
    assert (failure["doc_id"], failure["page"], failure["reason"]) == (doc_id_for(huge), 1, "page_too_large")
    manifest = storage.get_json(storage.page_manifest_key(doc_id_for(huge)))
    assert manifest["pages"] == [] and manifest["page_count"] == 1
    assert not storage.keys(f"pages/{doc_id_for(huge)}/1.png")  # no blank image stored


# ---- routes (issue 19 items 1, 3, 5) ------------------------------------------------------------------


def test_auto_routing_reads_text_pages_in_the_worker_and_draws_only_vlm_pages() -> None:
    mixed = mixed_pdf()
    storage, batch = ingested({"mixed.pdf": mixed})
    doc_id = doc_id_for(mixed)
    ops = record_ops(storage)
    summary = _render_batch(storage, batch, PDF)  # defaults: routing auto, page_markdown's image size
    assert summary.pages_by_route == {"text": 1, "vlm": 1}
    assert summary.documents[0].routes == {"text": 1, "vlm": 1}
    text, scan = read_page_manifest(storage, doc_id)["pages"]
    # the born-digital page: no image, a finished page record where the vlm stage keeps its answers
    assert (text["route"], text["png_key"], text["vision_tokens"]) == ("text", None, 0)
    assert text["routing"]["route"] == "text" and text["routing"]["mode"] == "auto"
    assert text["routing"]["features"]["chars"] > 200
    assert text["record_key"] == storage.vlm_page_key(doc_id, 1, text["cache_key"])
    record = storage.get_json(text["record_key"])
    assert record["engine"] == text["engine"] == text_engine_identity() and record["route"] == "text"
    assert (record["doc_id"], record["page"], record["cache_key"], record["requests"]) == (
        doc_id,
        1,
        text["cache_key"],
        0,
    )
    assert TITLE in record["markdown"] and record["content_list"][0]["page_idx"] == 0
    # the scan: drawn at the engine's size (Qwen2.5-VL's 1280 x 28 x 28 pixel cap), its vision tokens recorded
    assert (scan["route"], scan["routing"]["decided_by"]) == ("vlm", "chars")
    assert scan["width_px"] * scan["height_px"] <= 1280 * 28 * 28
    assert scan["vision_tokens"] == qwen25vl_vision_tokens(scan["width_px"], scan["height_px"]) <= 1280
    assert png_puts(ops) == [storage.page_png_key(doc_id, 2)]
    assert summary.vision_tokens == scan["vision_tokens"]
    # a re-run finds both pages done; a text page whose record went missing is read again
    assert _render_batch(storage, batch, PDF).skipped == 1
    storage.delete(text["record_key"])
    ops = record_ops(storage)
    assert _render_batch(storage, batch, PDF).rendered == 1
    assert png_puts(ops) == [] and storage.exists(text["record_key"])


def test_mode_vlm_draws_every_page_and_an_override_wins_per_document() -> None:
    mixed = mixed_pdf()
    storage, batch = ingested({"mixed.pdf": mixed, "two.pdf": TWO})
    summary = _render_batch(storage, batch, PDF, routing=RoutingConfig(mode="vlm", overrides={doc_id_for(TWO): "text"}))
    routes = {d.doc_id: d.routes for d in summary.documents}
    assert routes == {doc_id_for(mixed): {"vlm": 2}, doc_id_for(TWO): {"text": 2}}
    pages = read_page_manifest(storage, doc_id_for(mixed))["pages"]
    assert all(p["png_key"] for p in pages)
    # the decision is still recorded: what auto would have chosen, and the mode that overrode it
    assert [(p["routing"]["decided"], p["routing"]["route"], p["routing"]["mode"]) for p in pages] == [
        ("text", "vlm", "vlm"),
        ("vlm", "vlm", "vlm"),
    ]
    assert not storage.keys(f"pages/{doc_id_for(TWO)}/1.png")


def test_vision_tokens_follow_qwen25vl_smart_resize() -> None:
    # 150 dpi letter page (the "about 2,700"), the 1280 x 28 x 28 cap, and a tiny image
    assert qwen25vl_vision_tokens(1275, 1650) == 46 * 59
    assert qwen25vl_vision_tokens(880, 1139) == 31 * 41
    assert qwen25vl_vision_tokens(10, 10) == 4


def _grey(png: bytes, size: tuple[int, int] | None = None) -> Any:
    import io

    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("L")
    return np.asarray(image if size is None else image.resize(size), dtype=float)


@pytest.mark.parametrize(("how", "turn"), [("page", 270), ("text", 90)])
def test_a_rotated_page_sent_to_the_vlm_is_drawn_upright_and_the_turn_recorded(how: str, turn: int) -> None:
    """Issue 19 item 4: /Rotate 90 over portrait content, and text drawn sideways on a landscape page, are
    both drawn as the upright portrait page (the image the VLM is sent), forced to the vlm route."""
    rotated, upright = rotated_pdf(how), born_digital_pdf()
    storage, batch = ingested({"rotated.pdf": rotated, "upright.pdf": upright})
    render_batch(storage, batch, PDF, routing=RoutingConfig(mode="vlm"))
    (page,) = read_page_manifest(storage, doc_id_for(rotated))["pages"]
    (reference,) = read_page_manifest(storage, doc_id_for(upright))["pages"]
    assert page["route"] == "vlm" and page["rotation_applied"] == turn and reference["rotation_applied"] == 0
    assert page["height_px"] > page["width_px"]  # portrait, like the content
    sent = _grey(storage.get_bytes(page["png_key"]))
    expected = _grey(storage.get_bytes(reference["png_key"]), (sent.shape[1], sent.shape[0]))
    upside_down = expected[::-1, ::-1]
    # the same page, pixel for pixel but for antialiasing; far from the same page turned over
    assert abs(sent - expected).mean() < 5 < abs(sent - upside_down).mean()


def test_a_scan_is_drawn_as_its_rotate_says() -> None:
    scan = scan_pdf()
    storage, batch = ingested({"scan.pdf": scan})
    render_batch(storage, batch, PDF)
    (page,) = read_page_manifest(storage, doc_id_for(scan))["pages"]
    assert page["rotation_applied"] == 0  # no text layer to say which way is up
