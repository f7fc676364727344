"""Finished documents out of the bucket, in MinerU's output shape: one folder per source file.

MinerU users open ``<name>.md`` with its figures under ``images/`` and feed
``<name>_content_list.json`` to their own code. :func:`export_documents` writes exactly that from
``vlm/<doc_id>/`` (``document.md``, ``content_list.json``, ``images/``), and checks on the way what a
reader relies on::

    <target>/
      index.md, index.json                 what was written, per document (see ExportedDocument)
      <name>/<name>.md                     vlm/<doc_id>/document.md; its links images/<sha256>.jpg resolve here
      <name>/<name>_content_list.json      vlm/<doc_id>/content_list.json (CONTENT_LIST_SCHEMA)
      <name>/images/<sha256>.jpg           vlm/<doc_id>/images/*: figure and table crops

``<name>`` is the source file's name without ``.pdf``, made filesystem-safe
(:func:`mkg_pipeline.storage.sanitize_source_name`); a name already taken gets ``-<doc_id>``.
Used by ``make demo``; the core knows nothing of it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from mkg_pipeline.engines.page_safety import CONTENT_LIST_SCHEMA
from mkg_pipeline.storage import Storage, sanitize_source_name

INDEX_MD = "index.md"
INDEX_JSON = "index.json"
#: names a document folder may not take (the index files, and folders the caller writes beside)
RESERVED = frozenset({INDEX_MD, INDEX_JSON, "_pipeline"})

_SAFE_FILE_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
# A Markdown link or image target inside the document folder: ](images/<name>)
_IMAGE_LINK_RE = re.compile(r"\]\((images/[^)\s]+)\)")


@dataclass
class DocumentCheck:
    """What a reader of one exported document relies on, measured."""

    figures: int = 0  #: content-list items of type image
    tables: int = 0  #: content-list items of type table
    html_tables: int = 0  #: ``<table>`` elements in the Markdown
    images: int = 0  #: files under images/
    linked_images: int = 0  #: distinct images/… links in the Markdown
    missing_images: list[str] = field(default_factory=list)  #: linked (Markdown or content list) but not there
    unreferenced_images: list[str] = field(default_factory=list)  #: there, but neither linked nor in the list
    unreadable_images: list[str] = field(default_factory=list)  #: not a JPEG that opens
    content_items: int = 0
    content_list_error: str | None = None  #: the first schema violation, None when the list is valid

    @property
    def ok(self) -> bool:
        return not (
            self.missing_images or self.unreferenced_images or self.unreadable_images or self.content_list_error
        )


@dataclass
class ExportedDocument:
    source: str
    doc_id: str
    folder: str
    state: str
    pages_total: int
    pages_done: int
    failed_pages: list[dict[str, Any]]
    check: DocumentCheck
    #: each page's route (page number -> ``text`` or ``vlm``), from status.json
    page_routes: dict[str, str] = field(default_factory=dict)
    also_dropped_as: list[str] = field(default_factory=list)  #: other file names with the same bytes


def _opens_as_jpeg(data: bytes) -> bool:
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.format == "JPEG"
    except Exception:
        return False


def check_document(markdown: str, content_list: Any, images: Mapping[str, bytes]) -> DocumentCheck:
    """Measure one document: ``images`` maps ``images/<name>`` to the file's bytes."""
    import jsonschema

    check = DocumentCheck(images=len(images))
    error = next(iter(jsonschema.Draft202012Validator(CONTENT_LIST_SCHEMA).iter_errors(content_list)), None)
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "(root)"
        check.content_list_error = f"{where}: {error.message}"[:300]
    items = [item for item in content_list if isinstance(item, dict)] if isinstance(content_list, list) else []
    check.content_items = len(items)
    check.figures = sum(1 for item in items if item.get("type") == "image")
    check.tables = sum(1 for item in items if item.get("type") == "table")
    check.html_tables = len(re.findall(r"<table\b", markdown, flags=re.IGNORECASE))
    linked = set(_IMAGE_LINK_RE.findall(markdown))
    listed = {str(item["img_path"]) for item in items if item.get("img_path")}
    check.linked_images = len(linked)
    check.missing_images = sorted((linked | listed) - set(images))
    check.unreferenced_images = sorted(set(images) - linked - listed)
    check.unreadable_images = sorted(name for name, data in images.items() if not _opens_as_jpeg(data))
    return check


def folder_name(source: str, doc_id: str, taken: set[str]) -> str:
    """The folder (and file stem) for ``source``: its name without ``.pdf``, safe, not yet ``taken``."""
    name = PurePosixPath(source.replace("\\", "/")).name or doc_id
    if name.lower().endswith(".pdf"):
        name = name[:-4]
    name = sanitize_source_name(name or doc_id)
    if name.lower() in taken or name.lower() in RESERVED:
        name = f"{name}-{doc_id}"
    taken.add(name.lower())
    return name


def export_documents(storage: Storage, target: Path, documents: Sequence[tuple[str, str]]) -> list[ExportedDocument]:
    """Write each ``(source name, doc_id)`` that has a status (an assembled document) under ``target``.

    The same ``doc_id`` under several names (the same bytes dropped twice) is written once, under its
    first name. Writes ``index.md`` and ``index.json``; returns what it wrote, in ``documents`` order.
    """
    target.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    exported: dict[str, ExportedDocument] = {}
    for source, doc_id in documents:
        if doc_id in exported:
            exported[doc_id].also_dropped_as.append(source)
            continue
        try:
            status = storage.get_json(storage.vlm_status_key(doc_id))
        except FileNotFoundError:
            continue  # not assembled (never rendered, or its run stopped first): nothing to export
        markdown = storage.get_bytes(storage.document_md_key(doc_id))
        content_bytes = storage.get_bytes(storage.content_list_key(doc_id))
        image_prefix = f"{storage.vlm_prefix(doc_id)}images/"
        images = {
            "images/" + obj.key[len(image_prefix) :]: storage.get_bytes(obj.key)
            for obj in storage.list_objects(image_prefix)
            if _SAFE_FILE_RE.fullmatch(obj.key[len(image_prefix) :])  # a file name, never a path
        }
        name = folder_name(source, doc_id, taken)
        folder = target / name
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.md").write_bytes(markdown)
        (folder / f"{name}_content_list.json").write_bytes(content_bytes)
        for path, data in images.items():
            (folder / path).write_bytes(data)
        check = check_document(markdown.decode("utf-8"), json.loads(content_bytes), images)
        exported[doc_id] = ExportedDocument(
            source=source,
            doc_id=doc_id,
            folder=name,
            state=str(status.get("state")),
            pages_total=int(status.get("pages_total", 0)),
            pages_done=int(status.get("pages_done", 0)),
            failed_pages=list(status.get("failed_pages", [])),
            check=check,
            page_routes=dict(status.get("page_routes") or {}),
        )
    documents_out = list(exported.values())
    write_index(target, documents_out)
    return documents_out


def write_index(target: Path, documents: Iterable[ExportedDocument]) -> None:
    documents = list(documents)
    rows = []
    for doc in documents:
        record = asdict(doc)
        record["check"]["ok"] = doc.check.ok
        rows.append(record)
    (target / INDEX_JSON).write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    lines = [
        "# Exported documents",
        "",
        "One folder per source file, as MinerU writes it: `<name>.md` (figures linked as `images/<sha256>.jpg`),",
        "`<name>_content_list.json` (MinerU's content-list schema) and `images/`. Details in `index.json`.",
        "",
        "| source | folder | state | pages | figures | tables (HTML) | images | content list | links |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for doc in documents:
        c = doc.check
        content = "valid" if c.content_list_error is None else f"INVALID: {c.content_list_error}"
        problems = [
            f"{len(c.missing_images)} missing" if c.missing_images else "",
            f"{len(c.unreferenced_images)} unreferenced" if c.unreferenced_images else "",
            f"{len(c.unreadable_images)} unreadable" if c.unreadable_images else "",
        ]
        links = ", ".join(p for p in problems if p) or "ok"
        lines.append(
            f"| {_cell(doc.source)} | [{doc.folder}/]({doc.folder}/{doc.folder}.md) | {doc.state} | "
            f"{doc.pages_done}/{doc.pages_total} | {c.figures} | {c.tables} ({c.html_tables}) | {c.images} | "
            f"{_cell(content)} | {links} |"
        )
    (target / INDEX_MD).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
