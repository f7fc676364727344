"""olmOCR-2's answer format: YAML front matter, then the page as Markdown (tables as HTML).

What ``allenai/olmOCR-2-7B-1025`` answers to its prompt (allenai/olmocr: olmocr/prompts/prompts.py
``build_no_anchoring_v4_yaml_prompt`` and ``PageResponse``; olmocr/train/dataloader.py
``FrontMatterOutputFormat`` writes the training targets, booleans as Python's ``True``/``False``)::

    ---
    primary_language: en
    is_rotation_valid: True
    rotation_correction: 0
    is_table: False
    is_diagram: False
    ---
    # Title

    The page text, <table><tr><th>tables</th></tr></table> as HTML,
    ![figures labelled](page_<x>_<y>_<w>_<h>.png) in pixels of the image.

``rotation_correction`` is the counter-clockwise turn (PIL ``ROTATE_<n>``) that sets the image
upright. Pure: no model, no numpy.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

from mkg_devstack.local_server.tables import Grid, column_count

# Unicode ranges -> a two-letter code. The stand-in reads no language, only scripts: Latin text is
# answered as "en" (most of any corpus here), which is what the field is mostly used for (filtering).
_SCRIPTS: tuple[tuple[int, int, str], ...] = (
    (0x0370, 0x03FF, "el"),
    (0x0400, 0x04FF, "ru"),
    (0x0590, 0x05FF, "he"),
    (0x0600, 0x06FF, "ar"),
    (0x0900, 0x097F, "hi"),
    (0x0E00, 0x0E7F, "th"),
    (0x3040, 0x30FF, "ja"),
    (0xAC00, 0xD7AF, "ko"),
    (0x4E00, 0x9FFF, "zh"),
)


@dataclass(frozen=True)
class OlmOcrPage:
    text: str
    primary_language: str | None = None
    rotation_correction: int = 0
    is_table: bool = False
    is_diagram: bool = False

    @property
    def is_rotation_valid(self) -> bool:
        return self.rotation_correction == 0


def primary_language(text: str) -> str | None:
    """The most frequent script's code among the letters of ``text``; None when it has no letters."""
    counts: dict[str, int] = {}
    for char in text:
        if not char.isalpha():
            continue
        code = ord(char)
        language = next((lang for low, high, lang in _SCRIPTS if low <= code <= high), "en" if code < 0x0250 else "")
        if language:
            counts[language] = counts.get(language, 0) + 1
    return max(counts, key=lambda key: counts[key]) if counts else None


def format_answer(page: OlmOcrPage) -> str:
    """The answer as olmOCR-2 writes it (module docstring)."""
    language = page.primary_language if page.primary_language else "null"
    head = (
        "---\n"
        f"primary_language: {language}\n"
        f"is_rotation_valid: {page.is_rotation_valid}\n"
        f"rotation_correction: {page.rotation_correction}\n"
        f"is_table: {page.is_table}\n"
        f"is_diagram: {page.is_diagram}\n"
        "---"
    )
    return f"{head}\n{page.text.strip()}" if page.text.strip() else head


def figure_label(x1: float, y1: float, x2: float, y2: float) -> str:
    """olmOCR's figure label: ``page_<x>_<y>_<width>_<height>.png`` in whole pixels of the image."""
    x, y = max(0, round(x1)), max(0, round(y1))
    return f"![Figure](page_{x}_{y}_{max(1, round(x2) - x)}_{max(1, round(y2) - y)}.png)"


def table_html(grid: Grid) -> str:
    """An HTML table as olmOCR-2 writes them: the first row as ``<th>``, spans as ``colspan``."""
    width = column_count(grid)
    if not grid or width == 0:
        return ""
    rows: list[str] = []
    for index, row in enumerate(grid):
        tag = "th" if index == 0 else "td"
        by_column = {cell.column: cell for cell in row}
        cells: list[str] = []
        column = 0
        while column < width:
            cell = by_column.get(column)
            if cell is None:
                cells.append(f"<{tag}></{tag}>")
                column += 1
                continue
            span = f' colspan="{cell.span}"' if cell.span > 1 else ""
            cells.append(f"<{tag}{span}>{html.escape(cell.text, quote=False)}</{tag}>")
            column += cell.span
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return "<table>" + "".join(rows) + "</table>"


def covered_share(boxes: Sequence[tuple[float, float, float, float]], width: float, height: float) -> float:
    """The share of a ``width`` x ``height`` page that ``boxes`` cover (overlaps counted once, on a grid)."""
    if not boxes or width <= 0 or height <= 0:
        return 0.0
    step = max(width, height) / 100
    columns, rows = max(1, int(width / step)), max(1, int(height / step))
    covered = 0
    for row in range(rows):
        y = (row + 0.5) * step
        for column in range(columns):
            x = (column + 0.5) * step
            if any(x1 <= x <= x2 and y1 <= y <= y2 for x1, y1, x2, y2 in boxes):
                covered += 1
    return covered / (columns * rows)
