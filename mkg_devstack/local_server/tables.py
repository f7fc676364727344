"""A table's cell grid from its text lines, and the ruling lines when the table has them.

Rows: one per text row; where the table has horizontal rules, a text row
with nothing in the first column continues the row above it, unless a rule
lies between them (a cell's text wraps). Columns: the vertical rules inside the table when there are any, else
the x ranges that (almost) no row's text covers. A text line reaching across a
column boundary is one cell spanning those columns.

Pure: no model, no numpy. Rendered as OTSL (MinerU's table answer, see
:mod:`mineru_format`) or as a Markdown table (the page-to-Markdown answer).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from mkg_devstack.local_server.geometry import OcrLine, Row, body_height, group_rows, join_rows

EMPTY_COLUMN_SHARE = 0.25  # an x range covered by at most this share of rows is a gap between columns
MIN_COLUMN_GAP = 0.5  # ...and must be at least this many body heights wide


@dataclass(frozen=True)
class Cell:
    text: str
    column: int
    span: int = 1


Grid = list[list[Cell]]
"""Table rows, each a list of its non-empty cells by column."""


def _table_rows(rows: list[Row], row_rules: Sequence[float], first_column_end: float) -> list[list[Row]]:
    """Text rows grouped into table rows: between two rules, a text row with nothing in the first
    column continues the table row above it (a wrapped cell); without rules, each text row is one."""
    if not row_rules:
        return [[row] for row in rows]
    rules = sorted(row_rules)
    groups: list[list[Row]] = []
    band: int | None = None
    for row in rows:
        row_band = bisect.bisect_left(rules, (row.y1 + row.y2) / 2)
        starts_row = any(line.x1 < first_column_end for line in row.lines)
        if groups and row_band == band and not starts_row:
            groups[-1].append(row)
        else:
            groups.append([row])
        band = row_band
    return groups


def _column_gaps(table_rows: list[list[Row]], body: float) -> list[float]:
    """x of the middle of each blank vertical band between columns (text-only tables)."""
    lines = [line for group in table_rows for row in group for line in row.lines]
    left = int(min(line.x1 for line in lines))
    right = int(max(line.x2 for line in lines)) + 1
    coverage = [0] * (right - left)
    for group in table_rows:
        covered = [False] * (right - left)
        for row in group:
            for line in row.lines:
                for x in range(int(line.x1) - left, int(line.x2) - left):
                    covered[x] = True
        for x, hit in enumerate(covered):
            coverage[x] += hit
    limit = EMPTY_COLUMN_SHARE * len(table_rows)
    gaps: list[float] = []
    start: int | None = None
    for x, count in enumerate(coverage):
        if count <= limit:
            start = x if start is None else start
            continue
        if start is not None and x - start >= MIN_COLUMN_GAP * body and start > 0:
            gaps.append(left + (start + x) / 2)
        start = None
    return gaps


def table_grid(
    lines: Sequence[OcrLine], *, row_rules: Sequence[float] = (), column_rules: Sequence[float] = ()
) -> Grid:
    """The cells of a table, row by row (see the module docstring)."""
    lines = [line for line in lines if line.text.strip() and not line.vertical]
    if not lines:
        return []
    body = body_height(lines)
    rows = group_rows(lines)
    boundaries = sorted(column_rules) if column_rules else _column_gaps([[row] for row in rows], body)
    first_column_end = (boundaries[0] if boundaries else float("inf")) - 0.5 * body
    table_rows = _table_rows(rows, row_rules, first_column_end)
    tolerance = 0.5 * body
    grid: Grid = []
    for group in table_rows:
        texts: dict[int, list[str]] = {}
        spans: dict[int, int] = {}
        for line in sorted((line for row in group for line in row.lines), key=lambda item: (item.y1, item.x1)):
            first = bisect.bisect_left(boundaries, line.x1 + tolerance)
            last = max(first, bisect.bisect_left(boundaries, line.x2 - tolerance))
            texts.setdefault(first, []).append(line.text.strip())
            spans[first] = max(spans.get(first, 1), last - first + 1)
        cells = [Cell(join_rows(texts[column]), column, spans[column]) for column in sorted(texts)]
        grid.append(_without_overlaps(cells))
    return grid


def _without_overlaps(cells: list[Cell]) -> list[Cell]:
    """A spanning cell cannot cover the next cell: shorten its span."""
    out: list[Cell] = []
    for index, cell in enumerate(cells):
        following = cells[index + 1].column if index + 1 < len(cells) else None
        span = cell.span if following is None else min(cell.span, following - cell.column)
        out.append(Cell(cell.text, cell.column, max(1, span)))
    return out


def column_count(grid: Grid) -> int:
    return max((cell.column + cell.span for row in grid for cell in row), default=0)


def to_otsl(grid: Grid) -> str:
    """OTSL, the table language MinerU's VLM answers in: ``<fcel>text``, ``<ecel>``, ``<lcel>``, ``<nl>``."""
    width = column_count(grid)
    out: list[str] = []
    for row in grid:
        by_column = {cell.column: cell for cell in row}
        column = 0
        while column < width:
            cell = by_column.get(column)
            if cell is None or not cell.text:
                out.append("<ecel>")
                column += 1
                continue
            out.append("<fcel>" + cell.text + "<lcel>" * (cell.span - 1))
            column += cell.span
        out.append("<nl>")
    return "".join(out)


def to_markdown(grid: Grid) -> str:
    """A Markdown (GFM) table; the first row is the header, spanning cells repeat nothing."""
    width = column_count(grid)
    if not grid or width == 0:
        return ""

    def line(row: list[Cell]) -> str:
        cells = [""] * width
        for cell in row:
            cells[cell.column] = cell.text.replace("|", "\\|")
        return "| " + " | ".join(cells) + " |"

    return "\n".join([line(grid[0]), "|" + "---|" * width, *(line(row) for row in grid[1:])])
