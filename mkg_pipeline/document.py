"""What a document becomes: the stored page record, ``document.md`` and MinerU's ``content_list.json``.

- :data:`PAGE_RECORD_VERSION` / :func:`page_record`: one page's stored answer.
- :func:`page_marker`: the ``<!-- page N -->`` line that opens every page in ``document.md``.
- :func:`assemble_document`: page records in page order -> (document Markdown, content list), with a
  visible marker for every page that is not done; tables outside the allowlist become pipe tables.
- :data:`STATUS_VERSION` / :func:`document_status`: the document's ``status.json`` (state, failed and fallback
  pages, the ETag and route of every page it counts), which the audit and the next run read.
- :func:`document_preview` / :func:`preview_markdown`: a document for the Dagster UI: no raw HTML at all.

Every page goes through :mod:`mkg_pipeline.engines.page_safety` on its way in. Pure functions on strings
and dicts; no PIL, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from html.parser import HTMLParser
from typing import TYPE_CHECKING, Any

from mkg_pipeline.engines.page_safety import (
    PAGE_MARKER_RE,
    _escape_markup,
    _literal_lines,
    _open_fence,
    _parse,
    bbox_1000,
    clean_text,
    clean_value,
    safe_page_markdown,
    sanitize_table_html,
)

if TYPE_CHECKING:
    from mkg_pipeline.engines.base import PageResult

# --------------------------------------------------------------------------- documents

#: 3: a record of this version was made safe when it was stored (its Markdown by safe_page_markdown, its
#: tables by the allowlist), so assembling it does not do that again; older ones are (issue 22).
PAGE_RECORD_VERSION = 3


def page_record(
    result: PageResult,
    *,
    doc_id: str,
    page: int,
    cache_key: str,
    engine: str,
    model: str,
    latency_s: float,
) -> dict[str, Any]:
    """The JSON a finished page is stored as (``vlm/<doc_id>/pages/<n>.<cache_key>.json``).

    :func:`assemble_document` reads ``page``, ``markdown`` and ``content_list``; ``images`` names
    the crops stored once under ``vlm/<doc_id>/images/`` (their bytes are not in the record);
    ``raw_answer`` keeps what the model said, before any cleaning of Markdown. ``result`` comes from an
    engine, whose Markdown and tables are already safe (:class:`~mkg_pipeline.engines.base.PageResult`):
    the record says so with its :data:`PAGE_RECORD_VERSION`.
    """
    return {
        "version": PAGE_RECORD_VERSION,
        "doc_id": doc_id,
        "page": page,
        "cache_key": cache_key,
        "engine": engine,
        "model": model,
        "markdown": result.markdown,
        "content_list": result.content_list,
        "images": sorted(result.images),
        "raw_answer": result.raw_answer,
        "finish_reason": result.finish_reason,
        "requests": result.requests,
        "latency_s": round(latency_s, 4),
        "created_at": datetime.now(UTC).isoformat(),
    }


def page_marker(page: int) -> str:
    return f"<!-- page {page} -->"


def _missing_page(page: int, reason: str) -> str:
    reason = re.sub(r"[^a-z0-9_]+", "_", str(reason).lower()).strip("_") or "unknown"
    return (
        f"{page_marker(page)}\n\n"
        f"> **Page {page} is not in this document yet** (`{reason}`): it will be requested again "
        "on the next run of vlm_outputs."
    )


def _legacy_content(record: Mapping[str, Any], page_idx: int) -> list[dict[str, Any]]:
    """Content items of a page record written before content lists existed (``blocks``)."""
    items: list[dict[str, Any]] = []
    for block in record.get("blocks") or []:
        text = clean_text(str(block.get("text") or "")).strip()
        if not text:
            continue
        item: dict[str, Any] = {"type": "text", "text": text, "page_idx": page_idx}
        box = bbox_1000(block.get("bbox"))
        if box is not None:
            item["bbox"] = box
        items.append(item)
    return items


def is_current(record: Mapping[str, Any]) -> bool:
    """Whether ``record`` was written by :func:`page_record` of this version: already safe as stored."""
    version = record.get("version")
    return isinstance(version, int) and not isinstance(version, bool) and version == PAGE_RECORD_VERSION


def _page_items(record: Mapping[str, Any], page_idx: int, *, safe: bool) -> list[dict[str, Any]]:
    if "content_list" not in record:
        return _legacy_content(record, page_idx)
    items = []
    for raw in record["content_list"]:
        item = clean_value(dict(raw))
        item["page_idx"] = page_idx
        if not safe and item.get("type") == "table" and "table_body" in item:
            item["table_body"] = sanitize_table_html(item["table_body"])
        items.append(item)
    return items


def assemble_document(
    pages: Sequence[Mapping[str, Any] | None],
) -> tuple[str, list[dict[str, Any]]]:
    """One document's Markdown and content list from its page records, in page order.

    Each entry is a finished page record (a mapping with ``markdown`` and ``content_list``, as the
    vlm stage stores it), or a page that is not done: ``None`` (page number = position + 1) or a
    mapping without ``markdown`` (``{"page": n, "reason": ...}``). A page that is not done gets a
    visible note under its marker. A record older than :data:`PAGE_RECORD_VERSION` (cached before the
    engines made every page safe, or without a version: written by other code) goes through
    :func:`safe_page_markdown` and the table allowlist again, so nothing a model said can forge a
    marker or hide the pages after it; a current record was made safe when it was stored, and reading it
    again would only repeat that (the parse is most of the assembly's cost). Page numbers are 1-based;
    ``page_idx`` = page - 1.
    """
    parts: list[str] = []
    content: list[dict[str, Any]] = []
    for position, record in enumerate(pages):
        number = int(record.get("page", position + 1)) if record is not None else position + 1
        if record is None or "markdown" not in record:
            reason = (record or {}).get("reason") or "not_attempted"
            parts.append(_missing_page(number, reason))
            continue
        safe = is_current(record)
        body = str(record.get("markdown") or "")
        body = clean_text(body).strip("\n") if safe else safe_page_markdown(body)
        parts.append(f"{page_marker(number)}\n\n{body}" if body else page_marker(number))
        content.extend(_page_items(record, number - 1, safe=safe))
    return "\n\n".join(parts) + "\n", content


# --------------------------------------------------------------------------- preview


class _TableRows(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[list[tuple[str, int]]] = []
        self._cell: list[str] | None = None
        self._span = 1

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self.rows.append([])
        elif tag in {"td", "th"}:
            if not self.rows:
                self.rows.append([])
            self._cell = []
            span = dict(attrs).get("colspan") or "1"
            self._span = int(span) if span.isdigit() else 1
        elif tag == "br" and self._cell is not None:
            self._cell.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in {"td", "th"} and self._cell is not None:
            self.rows[-1].append((" ".join("".join(self._cell).split()), min(self._span, 50)))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _table_as_pipes(table_html: str) -> str:
    reader = _TableRows()
    reader.feed(table_html)
    reader.close()
    rows = [[cell for text, span in row for cell in [text] + [""] * (span - 1)] for row in reader.rows if row]
    if not rows:
        return ""
    width = max(len(row) for row in rows)

    def fmt(row: list[str]) -> str:
        cells = [c.replace("|", "\\|") for c in row] + [""] * (width - len(row))
        return "| " + " | ".join(_escape_markup(c, in_math=False) for c in cells) + " |"

    return "\n".join([fmt(rows[0]), "|" + " --- |" * width, *(fmt(row) for row in rows[1:])])


# A figure or table crop linked from document.md: ![caption](images/<sha256>.jpg). The UI cannot resolve the
# relative path (the image lives in S3), so the preview names the file instead of showing a broken image.
_FIGURE_RE = re.compile(r"!\[([^\]\n]*)\]\((images/[^)\s]+)\)")


def _note_figures(line: str) -> str:
    return _FIGURE_RE.sub(lambda m: f"*\\[figure: {m.group(2)}\\]*", line)


def _heading_text(text: str) -> str:
    """A file name as the text of a Markdown heading: one line, markup characters escaped."""
    text = " ".join(clean_text(text).split())
    return re.sub(r"([\\`*_{}\[\]()#+!|~<>-])", r"\\\1", text) or "(unnamed)"


def document_preview(title: str, markdown: str, max_chars: int | None = None, *, note: str = "") -> str:
    """One document's part of a batch preview: a heading naming it (``title``, the source file name), an
    optional ``note`` line (its doc id, state), then :func:`preview_markdown` of its Markdown, cut at
    ``max_chars`` characters of that Markdown."""
    head = f"### {_heading_text(title)}"
    if note:
        head += f"\n\n{_escape_markup(' '.join(note.split()), in_math=False)}"
    body = preview_markdown(markdown, max_chars) if markdown.strip() else "*(empty document)*"
    return f"{head}\n\n{body}"


def preview_markdown(markdown: str, max_chars: int | None = None) -> str:
    """A document for the Dagster UI's Markdown preview: no raw HTML at all.

    Page markers become visible rules, our HTML tables become pipe tables, linked figures a note
    ``[figure: images/<sha>.jpg]`` (the UI cannot load them), every other ``<`` that
    could start markup outside code is escaped, a fence left open by the cut is closed. With
    ``max_chars`` the preview is cut at a line boundary and says so.
    """
    text = clean_text(markdown)
    truncated = max_chars is not None and len(text) > max_chars
    if truncated:
        cut = text.rfind("\n", 0, max_chars)
        text = text[: cut if cut > 0 else max_chars]
    lines = text.split("\n")
    tokens = _parse(text)
    code, tables = _literal_lines(tokens, lines)
    closer = _open_fence(tokens, text)  # escaping and pipe tables leave every block's extent as it was
    out: list[str] = []
    for index, line in enumerate(lines):
        marker = PAGE_MARKER_RE.match(line)
        if index in code:
            out.append(line)
        elif marker:
            out.append(f"**— page {marker.group(1)} —**")
        elif index in tables and (pipes := _table_as_pipes(line)):
            out.append(pipes)
        else:
            out.append(_note_figures(_escape_markup(line, in_math=False)))
    text = "\n".join(out)
    if closer:
        text += "\n" + closer
    if truncated:
        text += f"\n\n*… preview cut at {max_chars:,} characters; the full document is in document.md*"
    return text


# --------------------------------------------------------------------------- status.json

STATUS_VERSION = 3  # 3: page_etags


def document_status(
    *,
    doc_id: str,
    source: str,
    engine: str,
    state: str,
    pages_total: int,
    pages_done: int,
    failed_pages: list[dict[str, Any]],
    page_etags: Mapping[int, str],
    page_routes: Mapping[int, str],
    fallback_pages: list[dict[str, Any]],
    max_fallback_share: float,
    over_fallback_budget: bool,
    run_id: str,
    updated_at: str,
) -> dict[str, Any]:
    """A document's ``status.json``: what :func:`mkg_pipeline.records.read_status` accepts and the audit reads.

    ``page_etags`` names the stored result of every page it counts, so the next run trusts that very object
    without reading it; ``fallback_pages`` are pages served from their text layer after invalid VLM answers
    (never cached: asked again next run).
    """
    return {
        "version": STATUS_VERSION,
        "doc_id": doc_id,
        "source": source,
        "engine": engine,
        "state": state,
        "pages_total": pages_total,
        "pages_done": pages_done,
        "failed_pages": failed_pages,
        "page_etags": {str(n): page_etags[n] for n in sorted(page_etags)},
        "page_routes": {str(n): page_routes[n] for n in sorted(page_routes)},
        "pages_by_route": {r: sum(1 for v in page_routes.values() if v == r) for r in ("text", "vlm")},
        "fallback_pages": fallback_pages,
        "fallback_budget": {
            "max_share": max_fallback_share,
            "pages": len(fallback_pages),
            "exceeded": over_fallback_budget,
        },
        **({"failure_reason": "fallback_budget"} if over_fallback_budget else {}),
        "run_id": run_id,
        "updated_at": updated_at,
    }
