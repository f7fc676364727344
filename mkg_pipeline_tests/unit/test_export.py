"""The MinerU-shaped export (``make demo``'s output folder): layout, names, and the checks it reports."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

from mkg_pipeline.export import export_documents, folder_name
from mkg_pipeline.storage import MemoryStorage


def _jpeg(color: str = "red") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def _document(storage: MemoryStorage, doc_id: str, *, figure: bytes | None = None, extra_md: str = "") -> str:
    """Store an assembled document as the vlm stage does; returns the figure's images/ path ("" without)."""
    path = f"images/{hashlib.sha256(figure).hexdigest()}.jpg" if figure else ""
    content: list[dict] = [{"type": "text", "text": "Title", "text_level": 1, "page_idx": 0, "bbox": [1, 2, 3, 4]}]
    markdown = "<!-- page 1 -->\n\n# Title\n"
    if figure:
        storage.put_bytes(storage.vlm_image_key(doc_id, path), figure, "image/jpeg")
        content.append(
            {"type": "image", "img_path": path, "image_caption": ["Fig. 1"], "image_footnote": [], "page_idx": 0}
        )
        markdown += f"\n![Fig. 1]({path})  \nFig. 1\n"
    markdown += extra_md
    storage.put_bytes(storage.document_md_key(doc_id), markdown.encode(), "text/markdown")
    storage.put_json(storage.content_list_key(doc_id), content)
    storage.put_json(
        storage.vlm_status_key(doc_id),
        {
            "doc_id": doc_id,
            "state": "complete",
            "pages_total": 1,
            "pages_done": 1,
            "failed_pages": [],
            "page_routes": {"1": "text"},
        },
    )
    return path


def test_one_folder_per_source_file_as_mineru_writes_it(tmp_path: Path) -> None:
    storage = MemoryStorage()
    figure = _jpeg()
    path = _document(storage, "aaaaaaaaaaaaaaaa", figure=figure)
    _document(storage, "bbbbbbbbbbbbbbbb")

    exported = export_documents(
        storage,
        tmp_path,
        [
            ("paper.pdf", "aaaaaaaaaaaaaaaa"),
            ("copy-of-paper.pdf", "aaaaaaaaaaaaaaaa"),  # the same bytes again: one document
            ("never-rendered.pdf", "cccccccccccccccc"),  # no status: not assembled, not exported
            ("Paper.PDF", "bbbbbbbbbbbbbbbb"),  # another document whose name collides (case-insensitively)
        ],
    )

    assert [d.folder for d in exported] == ["paper", "Paper-bbbbbbbbbbbbbbbb"]
    first = exported[0]
    assert first.also_dropped_as == ["copy-of-paper.pdf"]
    assert (tmp_path / "paper" / "paper.md").read_text().count(f"]({path})") == 1
    assert (tmp_path / "paper" / path).read_bytes() == figure  # the link resolves relative to the .md
    listed = json.loads((tmp_path / "paper" / "paper_content_list.json").read_text())
    assert [item["type"] for item in listed] == ["text", "image"]
    assert first.check.ok and first.check.figures == 1 and first.check.images == 1
    assert first.check.content_list_error is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Paper-bbbbbbbbbbbbbbbb", "index.json", "index.md", "paper"]
    index = json.loads((tmp_path / "index.json").read_text())
    assert [(row["source"], row["folder"], row["check"]["ok"]) for row in index] == [
        ("paper.pdf", "paper", True),
        ("Paper.PDF", "Paper-bbbbbbbbbbbbbbbb", True),
    ]
    assert index[0]["page_routes"] == {"1": "text"}  # benchmarks/route_quality.py counts routes from it
    assert "[paper/](paper/paper.md)" in (tmp_path / "index.md").read_text()


def test_broken_links_invalid_lists_and_bad_crops_are_reported(tmp_path: Path) -> None:
    storage = MemoryStorage()
    doc_id = "dddddddddddddddd"
    _document(storage, doc_id, figure=_jpeg(), extra_md="\n![](images/" + "0" * 64 + ".jpg)\n")
    storage.put_bytes(storage.vlm_image_key(doc_id, "f" * 64 + ".jpg"), b"not a jpeg", "image/jpeg")
    storage.put_json(storage.content_list_key(doc_id), [{"type": "text", "page_idx": 0}])  # text without text

    (doc,) = export_documents(storage, tmp_path, [("broken.pdf", doc_id)])

    assert not doc.check.ok
    assert doc.check.missing_images == ["images/" + "0" * 64 + ".jpg"]
    assert "images/" + "f" * 64 + ".jpg" in doc.check.unreferenced_images
    assert doc.check.unreadable_images == ["images/" + "f" * 64 + ".jpg"]
    assert "'text' is a required property" in (doc.check.content_list_error or "")
    assert "INVALID" in (tmp_path / "index.md").read_text()


def test_folder_names_are_safe_and_unique() -> None:
    taken: set[str] = set()
    assert folder_name("incoming/sub/report.pdf", "1" * 16, taken) == "report"
    assert folder_name("report.pdf", "2" * 16, taken) == "report-" + "2" * 16
    assert folder_name("index.md", "3" * 16, taken) == "index.md-" + "3" * 16  # the index file's name
    unsafe = folder_name("../Ünïcode name.pdf", "4" * 16, taken)
    assert re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", unsafe) and "code_name" in unsafe
