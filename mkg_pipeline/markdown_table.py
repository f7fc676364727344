"""Markdown tables for Dagster metadata and reports: one helper instead of a copy per asset.

Cells are made safe for a table row: whitespace (newlines included) collapsed, ``|`` escaped, cut to
``max_cell`` characters; an empty table renders as ``empty`` instead of a header with no rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def cell(value: object, max_cell: int = 200) -> str:
    """One table cell: single line, pipes escaped, at most ``max_cell`` characters ("∅" when empty)."""
    text = " ".join(str(value if value is not None else "").split()).replace("|", "\\|")
    if len(text) > max_cell:
        text = text[: max_cell - 1] + "…"
    return text or "∅"


def markdown_table(
    headers: Sequence[str], rows: Iterable[Sequence[object]], *, empty: str = "none", max_cell: int = 200
) -> str:
    """A GitHub-flavoured Markdown table, or ``empty`` when there are no rows."""
    lines: list[str] = []
    for row in rows:
        lines.append("| " + " | ".join(cell(v, max_cell) for v in row) + " |")
    if not lines:
        return empty
    head = "| " + " | ".join(headers) + " |\n|" + "---|" * len(headers)
    return head + "\n" + "\n".join(lines)
