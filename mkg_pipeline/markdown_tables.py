"""Markdown tables for asset metadata (the Dagster UI renders them)."""

from __future__ import annotations

from collections.abc import Sequence


def _cell(value: object) -> str:
    return " ".join(str(value).split()).replace("|", "\\|")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], empty: str = "none") -> str:
    """A Markdown table; ``empty`` when there are no rows. Cells are one line, pipes escaped."""
    if not rows:
        return empty
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)
