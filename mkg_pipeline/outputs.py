"""One document's outputs from its page records: Markdown and a content list (minimal, pre-issue-10)."""

from __future__ import annotations

from typing import Any


def assemble_document(pages: list[dict[str, Any]], failed: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """``document.md`` and the content list from the finished page records and the failed pages."""
    parts: dict[int, str] = {}
    content: list[dict[str, Any]] = []
    for record in pages:
        parts[int(record["page"])] = f"<!-- page {record['page']} -->\n\n{record['markdown']}".rstrip()
        content.extend(record.get("content_list", []))
    for failure in failed:
        n = int(failure["page"])
        parts[n] = f"<!-- page {n}: not processed yet ({failure['reason']}); re-materialize vlm_outputs to retry -->"
    return "\n\n".join(parts[n] for n in sorted(parts)) + "\n", content


def preview_markdown(markdown: str) -> str:
    """Markdown for the Dagster UI with raw HTML shown as text."""
    import html

    return html.escape(markdown, quote=False)
