"""Issue 10's outputs end to end: raw_pdfs -> parsed_pages -> vlm_outputs with the real local server, moto S3
and a Dagster instance (``pipeline_env``).

- MinerU-shaped outputs (mineru engine): a figure page's crops are stored under ``vlm/<doc_id>/images/``,
  open as JPEG and are linked from ``document.md``; a table page has an HTML table; ``content_list.json``
  validates against the documented schema; the demo's export writes the same, per source file.
- Validated answers (page_markdown engine): a truncated, an empty and a repeating answer each end as a
  recorded failure with its reason, nothing is cached for them, the run fails visibly, and the next run
  with the faults off asks for exactly those pages again and completes the document.

Both build a small PDF from just the corpus pages they need, so a run costs only those pages.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import jsonschema
import pytest

from mkg_pipeline.engines.page_safety import CONTENT_LIST_SCHEMA, PAGE_MARKER_RE
from mkg_pipeline_tests.e2e.campaign import tiny_pdf
from mkg_pipeline_tests.e2e.conftest import PipelineEnv
from mkg_pipeline_tests.fixtures.corpus import corpus_pdf

pytestmark = pytest.mark.e2e

FIGURE_PAGE = ("zfn-chemistry-2p.pdf", 1)  # two 3-D plots with captions, beside a column of equations
TABLE_PAGE = ("sci-tables-6p.pdf", 1)  # four ruled tables (appendices A-D)


def pdf_of_pages(*pages: tuple[str, int]) -> bytes:
    """One PDF made of the given (corpus file, 0-based page) pages, in that order."""
    import pymupdf

    out = pymupdf.open()
    for name, index in pages:
        with pymupdf.open(corpus_pdf(name)) as source:
            out.insert_pdf(source, from_page=index, to_page=index)
    data: bytes = out.tobytes()
    out.close()
    return data


def _accepted_doc_id(env: PipelineEnv, batch: str) -> str:
    manifest = env.storage.get_json(env.storage.batch_key(batch))
    (result,) = manifest["results"].values()
    assert result["status"] == "accepted", result
    return str(result["doc_id"])


def _pages_of(markdown: str) -> dict[int, str]:
    """document.md split at our page markers: page number -> that page's Markdown."""
    markers = list(PAGE_MARKER_RE.finditer(markdown))
    return {
        int(m.group(1)): markdown[m.end() : markers[i + 1].start() if i + 1 < len(markers) else len(markdown)]
        for i, m in enumerate(markers)
    }


def test_mineru_figures_tables_and_content_list_end_to_end(
    pipeline_env: PipelineEnv, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from PIL import Image

    from mkg_pipeline.export import export_documents

    monkeypatch.setenv("MKG_ENGINE", "mineru")
    monkeypatch.setenv("MKG_EXPORT_DIR", str(tmp_path))  # as the demo would: the export column appears
    pipeline_env.upload("figure-and-table.pdf", data=pdf_of_pages(FIGURE_PAGE, TABLE_PAGE))
    pipeline_env.upload("minimal-document.pdf")  # a second row in the metadata table
    batch = pipeline_env.tick().run_requests[0].partition_key
    result = pipeline_env.materialize(batch)
    storage = pipeline_env.storage
    manifest = storage.get_json(storage.batch_key(batch))
    doc_ids = {key.rsplit("/", 1)[-1]: r["doc_id"] for key, r in manifest["results"].items()}
    doc_id = doc_ids["figure-and-table.pdf"]
    status = storage.get_json(storage.vlm_status_key(doc_id))
    assert result.success, status
    assert status["state"] == "complete" and status["pages_done"] == 2, status
    assert status["engine"].startswith("mineru|")

    markdown = storage.get_bytes(storage.document_md_key(doc_id)).decode("utf-8")
    content = storage.get_json(storage.content_list_key(doc_id))
    jsonschema.validate(content, CONTENT_LIST_SCHEMA)
    pages = _pages_of(markdown)
    assert sorted(pages) == [1, 2]

    # Figures: cropped, stored once under vlm/<doc_id>/images/<sha256>.jpg, JPEG, linked from document.md.
    prefix = f"{storage.vlm_prefix(doc_id)}images/"
    stored = {obj.key[len(prefix) :]: storage.get_bytes(obj.key) for obj in storage.list_objects(prefix)}
    for name, data in stored.items():
        assert name == f"{hashlib.sha256(data).hexdigest()}.jpg"  # content-addressed
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "JPEG" and min(image.size) > 20
    figures = [item for item in content if item["type"] == "image"]
    assert figures and {item["page_idx"] for item in figures} == {0}, [(i["type"], i["page_idx"]) for i in content]
    for figure in figures:
        assert figure["img_path"].removeprefix("images/") in stored
        assert f"]({figure['img_path']})" in pages[1]
    linked = set(re.findall(r"\]\(images/([0-9a-f]{64}\.jpg)\)", markdown))
    assert linked and linked <= set(stored)

    # Tables: HTML in the Markdown of the table page, and table items whose body is that HTML.
    tables = [item for item in content if item["type"] == "table" and item["page_idx"] == 1]
    assert tables, [(i["type"], i["page_idx"]) for i in content]
    assert all(item["table_body"].startswith("<table>") for item in tables)
    assert "<table>" in pages[2] and "<td>" in pages[2]
    assert any(item["table_body"] in pages[2] for item in tables)
    assert "<table" not in pages[1]

    # The demo's export: the same document as MinerU lays it out, every link resolving beside the .md.
    (exported,) = export_documents(storage, tmp_path, [("figure-and-table.pdf", doc_id)])
    assert exported.check.ok, exported.check
    assert exported.check.figures == len(figures) and exported.check.html_tables >= len(tables)
    folder = tmp_path / "figure-and-table"
    assert (folder / "figure-and-table.md").read_text(encoding="utf-8") == markdown
    assert (folder / "figure-and-table_content_list.json").exists()
    for figure in figures:
        assert (folder / figure["img_path"]).is_file()

    _check_vlm_metadata(pipeline_env, doc_ids, tmp_path)


def _check_vlm_metadata(env: PipelineEnv, doc_ids: dict[str, str], export_dir: Path) -> None:
    """What the UI shows for the run: one table row per document, each with a document.md that exists in S3 (and
    its export path), the server as a URL, a preview naming both documents with the table page's table rendered."""
    import dagster as dg

    event = env.instance.get_latest_materialization_event(dg.AssetKey("vlm_outputs"))
    assert event is not None and event.asset_materialization is not None
    metadata = event.asset_materialization.metadata
    table = metadata["documents_table"]
    assert isinstance(table, dg.TableMetadataValue)
    rows = [dict(record.data) for record in table.records]
    assert sorted(row["file"] for row in rows) == sorted(doc_ids)  # one row per document
    storage = env.storage
    for row in rows:
        assert row["doc_id"] == doc_ids[row["file"]] and row["state"] == "complete", row
        key = storage.document_md_key(row["doc_id"])
        assert row["document_md"] == storage.uri(key) and storage.exists(key), row
        assert metadata[f"document.md: {row['file']}"] == dg.MetadataValue.url(row["document_md"])
        stem = row["file"].removesuffix(".pdf")
        assert row["export_path"] == str(export_dir / stem / f"{stem}.md"), row
    exported = next(row for row in rows if row["file"] == "figure-and-table.pdf")
    assert Path(exported["export_path"]).is_file()  # the path the export above wrote
    assert isinstance(metadata["server_url"], dg.UrlMetadataValue)

    preview = metadata["preview"].value
    assert "### figure\\-and\\-table.pdf" in preview and "### minimal\\-document.pdf" in preview, preview[:500]
    assert "<table" not in preview and re.search(r"^\| .+ \|\n\|( --- \|)+$", preview, re.MULTILINE), preview
    assert "[figure: images/" in preview, preview


def _cached_pages(env: PipelineEnv, doc_id: str) -> set[int]:
    """Page numbers with a stored result (``vlm/<doc_id>/pages/<n>.<cache_key>.json``)."""
    prefix = env.storage.vlm_page_prefix(doc_id)
    return {int(obj.key[len(prefix) :].split(".")[0]) for obj in env.storage.list_objects(prefix)}


def _seed_for(fates: list[str | None], rates: dict[str, float]) -> int:
    """A fault seed whose first ``len(fates)`` requests meet exactly these fates, in some order.

    The local server draws the same random numbers for every request whatever the rates
    (faults.py), so with this seed the n-th request's fate is known in advance.
    """
    from mkg_devstack.local_server.faults import FaultInjector
    from mkg_devstack.local_server.settings import FaultSettings

    wanted = sorted(map(str, fates))
    for seed in range(10_000):
        injector = FaultInjector(FaultSettings(**rates), seed)
        if sorted(str(injector.decide().answer) for _ in fates) == wanted:
            return seed
    raise AssertionError(f"no seed gives {fates}")


def test_truncated_empty_and_repeating_answers_fail_their_pages_and_are_asked_again(
    pipeline_env: PipelineEnv, start_local_vlm_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    rates = {"truncated_rate": 0.25, "empty_rate": 0.25, "repetition_rate": 0.25}
    seed = _seed_for(["truncated", "empty", "repetition", None], rates)
    server = start_local_vlm_server(api_key="fault-test-key", seed=seed, **rates)
    monkeypatch.setenv("MKG_VLLM__URL", server.url)
    monkeypatch.setenv("MKG_VLLM__API_KEY", server.api_key)
    monkeypatch.setenv("MKG_ENGINE", "page_markdown")
    # One request per page, so the seed decides each request's fate; the immediate re-ask is
    # covered by the engine tests (test_engines.py, test_engine_answers.py).
    monkeypatch.setenv("MKG_ANSWERS__MAX_REASKS", "0")
    # Four one-line pages, each with a text layer (so an empty answer is a failure), cheap to read.
    pipeline_env.upload("four-pages.pdf", data=tiny_pdf("answers", 4))
    storage = pipeline_env.storage
    batch = pipeline_env.tick().run_requests[0].partition_key

    first = pipeline_env.materialize(batch)
    doc_id = _accepted_doc_id(pipeline_env, batch)
    status = storage.get_json(storage.vlm_status_key(doc_id))
    assert not first.success  # visibly: the blocking page_failure_rate check failed the run
    checks = pipeline_env.check_evaluations()
    assert [e.passed for e in checks["page_failure_rate"]] == [False]
    assert [e.passed for e in checks["no_failed_pages"]] == [False]
    assert status["state"] == "partial" and status["pages_done"] == 1, status
    reasons = {f["page"]: f["reason"] for f in status["failed_pages"]}
    assert sorted(reasons.values()) == ["empty", "repetition", "truncated"], status["failed_pages"]
    assert all(f["attempts"] == 1 and f["message"] for f in status["failed_pages"])
    # Nothing cached for a failed page: the only page result is the one that succeeded.
    cached = {
        int(o.key.rsplit("/", 1)[-1].split(".")[0]) for o in storage.list_objects(storage.vlm_page_prefix(doc_id))
    }
    assert cached == {1, 2, 3, 4} - set(reasons)
    markdown = storage.get_bytes(storage.document_md_key(doc_id)).decode("utf-8")
    for page, reason in reasons.items():
        assert f"**Page {page} is not in this document yet** (`{reason}`)" in markdown

    server.set_faults(truncated_rate=0.0, empty_rate=0.0, repetition_rate=0.0)
    before = server.read_metric("vllm:request_success_total")
    second = pipeline_env.materialize(batch)
    status = storage.get_json(storage.vlm_status_key(doc_id))
    assert second.success, status
    assert server.read_metric("vllm:request_success_total") - before == len(reasons)  # exactly those pages
    assert status["state"] == "complete" and status["pages_done"] == 4 and not status["failed_pages"]
    cached = {
        int(o.key.rsplit("/", 1)[-1].split(".")[0]) for o in storage.list_objects(storage.vlm_page_prefix(doc_id))
    }
    assert cached == {1, 2, 3, 4}
    assert "is not in this document yet" not in storage.get_bytes(storage.document_md_key(doc_id)).decode("utf-8")
