"""vlm_outputs' metadata (mkg_pipeline/orchestration/metadata.py): the per-document table, its links, the named
preview with tables rendered and figures noted, and their bounds, over a real in-memory Storage."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from mkg_pipeline.orchestration import metadata as vm
from mkg_pipeline.stages.vlm import VLMSummary
from mkg_pipeline.storage import MemoryStorage

FIGURE = "images/" + "a" * 64 + ".jpg"
TABLE_DOC = (
    "<!-- page 1 -->\n\n# Results\n\n"
    "<table><tr><th>metal</th><th>yield</th></tr><tr><td>Pd</td><td>91%</td></tr></table>\n\n"
    "<!-- page 2 -->\n\n"
    f"![Figure 1: spectra]({FIGURE})\n\nFigure 1: spectra\n"
)


def _store(storage: MemoryStorage, doc_id: str, source: str, markdown: str | None, **status: object) -> None:
    storage.put_json(
        storage.vlm_status_key(doc_id),
        {"doc_id": doc_id, "source": source, "state": "complete", "pages_total": 2, "pages_done": 2,
         "failed_pages": [], **status},
    )  # fmt: skip
    if markdown is not None:
        storage.put_bytes(storage.document_md_key(doc_id), markdown.encode(), "text/markdown")


def _summary(**documents: str) -> VLMSummary:
    summary = VLMSummary(engine="mineru|x", model="m", server_url="http://127.0.0.1:8000")
    summary.documents.update(documents)
    return summary


def _table_rows(value: dg.TableMetadataValue) -> list[dict[str, object]]:
    return [dict(record.data) for record in value.records]


def test_one_row_per_document_in_batch_order_with_its_links() -> None:
    storage = MemoryStorage()
    _store(storage, "d1", "sci-tables-6p.pdf", TABLE_DOC)
    failed = [{"page": 2, "reason": "timeout"}]
    _store(storage, "d2", "zfn.pdf", "<!-- page 1 -->\n\ntext\n", state="partial", pages_done=1, failed_pages=failed)
    summary = _summary(d2="partial", d1="complete", d3="unrecorded")  # the order documents finished in
    rows = vm.read_documents(storage, ["d1", "d2", "d3"], {"d3": "lost.pdf"}, summary)
    metadata = vm.vlm_metadata(summary, rows, vm.read_previews(storage, rows), 3)

    table = metadata["documents_table"]
    assert isinstance(table, dg.TableMetadataValue)
    assert _table_rows(table) == [
        {"file": "sci-tables-6p.pdf", "doc_id": "d1", "state": "complete", "pages_done": 2, "pages_failed": 0,
         "pages_total": 2, "document_md": "s3://memory/vlm/d1/document.md"},
        {"file": "zfn.pdf", "doc_id": "d2", "state": "partial", "pages_done": 1, "pages_failed": 1,
         "pages_total": 2, "document_md": "s3://memory/vlm/d2/document.md"},
        # no status.json: named from the batch manifest, state from the run
        {"file": "lost.pdf", "doc_id": "d3", "state": "unrecorded", "pages_done": None, "pages_failed": None,
         "pages_total": None, "document_md": "s3://memory/vlm/d3/document.md"},
    ]  # fmt: skip
    names = [column.name for column in table.schema.columns]
    assert names == ["file", "state", "document_md", "pages_done", "pages_failed", "pages_total", "doc_id"]
    assert metadata["document.md: zfn.pdf"] == dg.MetadataValue.url("s3://memory/vlm/d2/document.md")
    assert metadata["server_url"] == dg.MetadataValue.url("http://127.0.0.1:8000")


def test_route_and_export_columns_only_when_there_is_data(tmp_path: Path) -> None:
    storage = MemoryStorage()
    _store(storage, "d1", "a.pdf", "x\n")
    _store(storage, "d2", "sub/a.pdf", "y\n")  # the same file name again: the export gives it -<doc_id>
    summary = _summary(d1="complete", d2="complete")
    summary.routes_by_document = {"d1": {"text": 1, "vlm": 1}, "d2": {"vlm": 2}}  # type: ignore[attr-defined]
    rows = vm.read_documents(storage, ["d1", "d2"], {}, summary, export_dir=tmp_path / "outputs")
    table = vm.documents_table(rows)
    assert [c.name for c in table.schema.columns] == [
        "file", "state", "document_md", "export_path", "pages_done", "pages_failed", "pages_total",
        "pages_text", "pages_vlm", "doc_id",
    ]  # fmt: skip
    records = _table_rows(table)
    assert (records[0]["pages_text"], records[0]["pages_vlm"], records[1]["pages_text"]) == (1, 1, 0)
    assert records[0]["export_path"] == str(tmp_path / "outputs" / "a" / "a.md")
    assert records[1]["export_path"] == str(tmp_path / "outputs" / "a-d2" / "a-d2.md")


def test_export_root_comes_from_the_environment_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(vm.EXPORT_DIR_ENV, raising=False)
    assert vm.export_root() is None
    monkeypatch.setenv(vm.EXPORT_DIR_ENV, str(tmp_path))
    assert vm.export_root() == tmp_path


def test_preview_names_each_document_renders_its_tables_and_notes_its_figures() -> None:
    storage = MemoryStorage()
    _store(storage, "d1", "first.pdf", "<!-- page 1 -->\n\nplain text of the first\n")
    _store(storage, "d2", "sci-tables-6p.pdf", TABLE_DOC)
    summary = _summary(d2="complete", d1="complete")  # d2 finished first: the preview still shows both
    rows = vm.read_documents(storage, ["d1", "d2"], {}, summary)
    preview = vm.vlm_metadata(summary, rows, vm.read_previews(storage, rows), 2)["preview"].value

    assert preview.index("### first.pdf") < preview.index("### sci\\-tables\\-6p.pdf")
    assert "plain text of the first" in preview
    assert "| metal | yield |\n| --- | --- |\n| Pd | 91% |" in preview  # a pipe table, not raw HTML
    assert "<table" not in preview and "<td" not in preview
    assert f"[figure: {FIGURE}\\]" in preview and f"]({FIGURE})" not in preview  # named, not a broken image
    assert "doc d2 · complete" in preview


def test_preview_is_bounded_per_document_and_in_all() -> None:
    storage = MemoryStorage()
    doc_ids = [f"d{i}" for i in range(vm.PREVIEW_DOCS + 3)]
    for doc_id in doc_ids:
        _store(storage, doc_id, f"{doc_id}.pdf", "".join(f"line {n} of {doc_id}\n" for n in range(5000)))
    summary = _summary(**dict.fromkeys(doc_ids, "complete"))
    rows = vm.read_documents(storage, doc_ids, {}, summary)
    previews = vm.read_previews(storage, rows)
    assert [row.doc_id for row, _ in previews] == doc_ids[: vm.PREVIEW_DOCS]  # batch order, first N
    preview = vm.batch_preview(previews, len(doc_ids))

    assert len(preview) <= vm.PREVIEW_TOTAL_CHARS + 2000  # headings, cut notes and the closing line
    for part in preview.split("\n\n---\n\n")[:-1]:
        assert len(part) <= vm.PREVIEW_DOC_CHARS + 300
        assert part.endswith("the full document is in document.md*")
    assert preview.count("### d") >= 3
    assert f"of {len(doc_ids)} documents previewed, in batch order" in preview


def test_table_rows_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vm, "MAX_TABLE_ROWS", 3)
    storage = MemoryStorage()
    doc_ids = [f"d{i}" for i in range(5)]
    for doc_id in doc_ids:
        _store(storage, doc_id, f"{doc_id}.pdf", "x\n")
    summary = _summary(**dict.fromkeys(doc_ids, "complete"))
    rows = vm.read_documents(storage, doc_ids, {}, summary)
    metadata = vm.vlm_metadata(summary, rows, [], len(doc_ids))
    assert len(metadata["documents_table"].records) == 3
    assert metadata["documents_table_note"] == "first 3 of 5 documents listed"
    assert metadata["preview"].value == "(no output yet)"


def test_sources_of_names_each_accepted_document_by_its_first_file() -> None:
    manifest = {
        "results": {
            "incoming/a.pdf": {"status": "accepted", "doc_id": "d1"},
            "incoming/b.pdf": {"status": "accepted", "doc_id": "d1"},
            "incoming/c.pdf": {"status": "rejected", "reason": "encrypted"},
        }
    }
    assert vm.sources_of(manifest) == {"d1": "a.pdf"}


def test_fallback_pages_are_counted_apart_per_document() -> None:
    """Text-layer fallback pages (answers.text_fallback) show in the run's metadata, never as plain successes."""
    storage = MemoryStorage()
    _store(storage, "d1", "a.pdf", "text", state="complete", pages_total=3, pages_done=3, failed_pages=[])
    summary = _summary(d1="failed")
    summary.fallback = 2
    summary.fallback_by_document = {"d1": 2}
    summary.over_fallback_budget = ["d1"]
    rows = vm.read_documents(storage, ["d1"], {"d1": "a.pdf"}, summary)
    metadata = vm.vlm_metadata(summary, rows, [], 1)
    assert metadata["pages_fallback"] == 2
    assert metadata["fallback_by_document"].value == {"d1": 2}
    assert metadata["over_fallback_budget"].value == ["d1"]
