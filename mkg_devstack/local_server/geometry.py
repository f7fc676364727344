"""OCR geometry: lines, rows, columns, page furniture zones and the reading order of a page.

Pure functions over axis-aligned boxes in pixels of the image the server
received (origin top-left); no model, no numpy. Thresholds are fractions of
the body text's median row height, so they hold at any resolution.

Reading order, in one paragraph: page furniture (a running head, a page
number) in a zone at the top or bottom edge, cut off from the body by a clear
horizontal gap, is read first or last. The body is split at a column gutter
(an x crossed by few lines, with wide lines on both sides); lines, figures and
rules crossing the gutter cut the page into bands; each band is read left
column first, top to bottom, then right column, and each column may be split
again (a third column). Vertical text (margin stamps) is read last.
"""

from __future__ import annotations

import enum
import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Thresholds, as fractions of the body text's median row height (det boxes: glyph extent).
ROW_OVERLAP = 0.5  # vertical overlap (of the smaller height) for two boxes to share a row
FURNITURE_GAP = 1.0  # a blank band this tall cuts a page-edge zone (running head, page number) off the body
TOP_ZONE = 0.12  # page furniture lives above this share of the page height…
BOTTOM_ZONE = 0.80  # …or below this one
MAX_FURNITURE_ROWS = 6  # more rows than this in an edge zone is body text, not furniture
FURNITURE_MAX_SIZE = 1.3  # a row this much taller than body text is a title, never furniture
MAX_COLUMN_DEPTH = 2  # columns inside columns: at most three columns across
_SPLIT_WORD_RE = re.compile(r"[^\W\d_][-\u2010]+$")  # a hyphen right after a letter ends the text


@dataclass(frozen=True)
class Rect:
    """An axis-aligned box in image pixels."""

    x1: float
    y1: float
    x2: float
    y2: float

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def cx(self) -> float:
        return (self.x1 + self.x2) / 2

    @property
    def cy(self) -> float:
        return (self.y1 + self.y2) / 2

    def overlap_share(self, other: Rect) -> float:
        """Share of this box's area inside ``other``."""
        width = min(self.x2, other.x2) - max(self.x1, other.x1)
        height = min(self.y2, other.y2) - max(self.y1, other.y1)
        area = self.width * self.height
        if width <= 0 or height <= 0 or area <= 0:
            return 0.0
        return width * height / area


@dataclass(frozen=True)
class OcrLine(Rect):
    """One detected text line, with its text if recognised."""

    text: str = ""
    score: float = 1.0
    vertical: bool = False
    """Text running top-down or bottom-up (a rotated margin stamp, a table header on its side)."""


class VisualKind(enum.StrEnum):
    IMAGE = "image"
    TABLE = "table"


@dataclass(frozen=True)
class Visual(Rect):
    """A non-text region of the page: a figure (photo, chart, drawing) or a ruled table."""

    kind: VisualKind = VisualKind.IMAGE
    row_rules: tuple[float, ...] = ()
    """Tables: y of the horizontal rules inside (row separators), in the same pixels."""
    column_rules: tuple[float, ...] = ()
    """Tables: x of the vertical rules inside (column separators), outer border excluded."""


@dataclass
class Row:
    """Lines that share one text row, left to right."""

    lines: list[OcrLine]

    @property
    def x1(self) -> float:
        return min(line.x1 for line in self.lines)

    @property
    def x2(self) -> float:
        return max(line.x2 for line in self.lines)

    @property
    def y1(self) -> float:
        return min(line.y1 for line in self.lines)

    @property
    def y2(self) -> float:
        return max(line.y2 for line in self.lines)

    @property
    def height(self) -> float:
        # The median piece, not the union: one tall glyph box must not make the row a heading.
        return statistics.median(line.height for line in self.lines)

    @property
    def text(self) -> str:
        return " ".join(line.text.strip() for line in self.lines if line.text.strip())


def join_rows(texts: Sequence[str]) -> str:
    """Rows of one paragraph (or one cell) as one string, with hyphenation undone.

    Rows are joined with a space, except after a hyphen that ends a
    row right after a letter: if the next row starts with a lowercase letter the
    word was split by the typesetter and is joined without the hyphen ("exam-" +
    "ple" = "example"); otherwise the hyphen is kept and nothing is inserted
    ("Bose-" + "Einstein" = "Bose-Einstein", "COVID-" + "19" = "COVID-19"). The
    rule cannot tell a real hyphen followed by a lowercase word ("well-" +
    "known") from a split one and reads "wellknown": the price of a rule that
    needs no dictionary.
    """
    joined = ""
    for text in (text.strip() for text in texts):
        if not text:
            continue
        if not joined:
            joined = text
        elif _SPLIT_WORD_RE.search(joined) and text[0].islower():
            joined = joined.rstrip("-\u2010") + text
        elif _SPLIT_WORD_RE.search(joined) and text[0].isalnum():
            joined = joined.rstrip("-\u2010") + "-" + text
        else:
            joined += " " + text
    return joined


def group_rows(lines: Iterable[OcrLine]) -> list[Row]:
    """Lines sharing a text row (vertical overlap), rows top to bottom, pieces left to right."""
    rows: list[Row] = []
    for line in sorted(lines, key=lambda item: (item.y1, item.x1)):
        best: Row | None = None
        best_overlap = 0.0
        # Only recent rows can overlap: rows are built top-down.
        for row in rows[-3:]:
            overlap = min(row.y2, line.y2) - max(row.y1, line.y1)
            needed = ROW_OVERLAP * min(row.height, line.height)
            if overlap >= needed and overlap > best_overlap:
                best, best_overlap = row, overlap
        if best is None:
            rows.append(Row([line]))
        else:
            best.lines.append(line)
            best.lines.sort(key=lambda item: item.x1)
    rows.sort(key=lambda row: (row.y1, row.x1))
    return rows


def body_height(lines: Sequence[OcrLine]) -> float:
    """Median row height of the page: the body text size every threshold is relative to."""
    rows = group_rows(line for line in lines if not line.vertical)
    return statistics.median(row.height for row in rows) if rows else 0.0


def gutter_tolerance(lines: Sequence[OcrLine]) -> float:
    """How far a line may poke into a gutter without crossing it (detection boxes are generous)."""
    heights = [line.height for line in lines if not line.vertical]
    return 0.5 * statistics.median(heights) if heights else 0.0


def crosses(box: Rect, x: float, tolerance: float) -> bool:
    return box.x1 < x - tolerance and box.x2 > x + tolerance


@dataclass(frozen=True)
class Gutter:
    """The blank vertical band between two text columns."""

    x: float
    half_width: float
    tolerance: float

    def spans(self, box: Rect) -> bool:
        """Reaches well across the gutter, or sits centred on it (a page number, a centred formula).

        A column's line whose box pokes into the gutter by a glyph or two (a
        sliver of the neighbour column read with it) still belongs to its column.
        """
        reach = self.half_width + 4 * self.tolerance
        return crosses(box, self.x, reach) or abs(box.cx - self.x) <= max(self.half_width, self.tolerance)

    def is_left(self, box: Rect) -> bool:
        return box.cx < self.x


def find_gutter(lines: Sequence[OcrLine]) -> Gutter | None:
    """The clear vertical gutter between two text columns, or None for one column.

    A gutter is an x in the middle of the text area crossed by few lines (the
    ones that span both columns: titles, full-width abstracts), with enough
    wide lines on each side that share a vertical range. Narrow left/right
    items (tables, "label value" lists) do not count as columns, so their rows
    keep reading left to right.
    """
    lines = [line for line in lines if not line.vertical]
    if len(lines) < 6:
        return None
    tolerance = gutter_tolerance(lines)
    left_edge = min(line.x1 for line in lines)
    right_edge = max(line.x2 for line in lines)
    text_width = right_edge - left_edge
    if text_width <= 0:
        return None
    steps = 200
    xs = [left_edge + text_width * step / steps for step in range(int(steps * 0.3), int(steps * 0.7) + 1)]
    counts = [sum(1 for line in lines if crosses(line, x, tolerance)) for x in xs]
    fewest = min(counts)
    if fewest > 0.3 * len(lines):
        return None
    # The middle of the first run of x positions crossed by the fewest lines.
    first = counts.index(fewest)
    last = first
    while last + 1 < len(counts) and counts[last + 1] == fewest:
        last += 1
    gutter = Gutter((xs[first] + xs[last]) / 2, (xs[last] - xs[first]) / 2, tolerance)
    columns = [line for line in lines if not gutter.spans(line)]
    left = [line for line in columns if gutter.is_left(line)]
    right = [line for line in columns if not gutter.is_left(line)]
    if len(left) < 3 or len(right) < 3:
        return None
    for side in (left, right):
        if statistics.median(line.width for line in side) < 0.3 * text_width:
            return None
    overlap = min(max(line.y2 for line in left), max(line.y2 for line in right)) - max(
        min(line.y1 for line in left), min(line.y1 for line in right)
    )
    shorter = min(
        max(line.y2 for line in left) - min(line.y1 for line in left),
        max(line.y2 for line in right) - min(line.y1 for line in right),
    )
    if shorter <= 0 or overlap < 0.3 * shorter:
        return None
    return gutter


# --------------------------------------------------------------------------- page furniture zones


def _zone_rows(rows: Sequence[Rect], body: float, limit: float, *, top: bool) -> int:
    """How many of ``rows`` (sorted from the page edge inwards) form a furniture zone (0: none)."""
    reach = rows[0].y2 if top else rows[0].y1
    for index in range(1, min(len(rows), MAX_FURNITURE_ROWS + 1)):
        row = rows[index]
        gap = row.y1 - reach if top else reach - row.y2
        if gap >= FURNITURE_GAP * body:
            near_edge = reach <= limit if top else reach >= limit
            return index if near_edge else 0
        reach = max(reach, row.y2) if top else min(reach, row.y1)
    return 0


def _smallest(row: Row) -> float:
    return min(line.height for line in row.lines)


def split_furniture(
    lines: Sequence[OcrLine], visuals: Sequence[Visual], height: float, body: float
) -> tuple[list[OcrLine], list[OcrLine], list[OcrLine]]:
    """(top zone, body, bottom zone) of the upright lines.

    A zone is the few rows next to the top (bottom) edge of the page that a
    blank band at least ``FURNITURE_GAP`` body rows tall cuts off from the rest,
    within ``TOP_ZONE`` (beyond ``BOTTOM_ZONE``) of the page height: running
    heads, page numbers, footers. Rows set in title-sized type only (a logo
    beside a letterhead is fine), or figures, are never furniture; then there is
    no zone.
    """
    rows = group_rows(lines)
    if len(rows) < 2 or body <= 0 or height <= 0:
        return [], list(lines), []
    items: list[Rect] = [*rows, *visuals]

    def zone(ordered: list[Rect], limit: float, *, top: bool) -> list[OcrLine]:
        count = _zone_rows(ordered, body, limit, top=top)
        chosen = ordered[:count]
        if any(not isinstance(item, Row) or _smallest(item) > FURNITURE_MAX_SIZE * body for item in chosen):
            return []
        return [line for item in chosen if isinstance(item, Row) for line in item.lines]

    top = zone(sorted(items, key=lambda item: item.y1), TOP_ZONE * height, top=True)
    bottom = zone(sorted(items, key=lambda item: -item.y2), BOTTOM_ZONE * height, top=False)
    taken = {id(line) for line in (*top, *bottom)}
    middle = [line for line in lines if id(line) not in taken]
    if not middle:  # a page of nothing but "furniture" is a page of text
        return [], list(lines), []
    return top, middle, bottom


# --------------------------------------------------------------------------- reading order

Item = OcrLine | Visual


def reading_order(
    lines: Sequence[OcrLine], visuals: Sequence[Visual] = (), rules: Sequence[Rect] = ()
) -> list[list[Item]]:
    """Split upright lines and visuals into regions read one after another (each top to bottom).

    One column: a single region. Columns: items spanning the gutter (titles,
    full-width figures) and horizontal ``rules`` across it cut the page into
    bands; each band reads its left column, then its right column; spanning
    items stay where they are. Vertical lines come last, one region each.
    """
    sideways = sorted((line for line in lines if line.vertical), key=lambda line: (line.x1, line.y1))
    upright: list[Item] = [line for line in lines if not line.vertical]
    return [*_regions([*upright, *visuals], rules, 0), *([line] for line in sideways)]


def _regions(items: Sequence[Item], rules: Sequence[Rect], depth: int) -> list[list[Item]]:
    if not items:
        return []
    text = [item for item in items if isinstance(item, OcrLine)]
    gutter = find_gutter(text) if depth < MAX_COLUMN_DEPTH else None
    if gutter is None:
        return [list(items)]
    # Cuts: spanning items (read in place) and rules across the gutter (no text of their own).
    cuts: list[tuple[Rect, Item | None]] = [(item, item) for item in items if gutter.spans(item)]
    cuts += [(rule, None) for rule in rules if crosses(rule, gutter.x, gutter.tolerance)]
    cuts.sort(key=lambda cut: cut[0].cy)
    columns = [item for item in items if not gutter.spans(item)]

    def split(band: list[Item]) -> list[list[Item]]:
        left = [item for item in band if gutter.is_left(item)]
        right = [item for item in band if not gutter.is_left(item)]
        inner = [rule for rule in rules if not crosses(rule, gutter.x, gutter.tolerance)]
        return [*_regions(left, inner, depth + 1), *_regions(right, inner, depth + 1)]

    regions: list[list[Item]] = []
    previous_y = -math.inf
    index = 0
    while index < len(cuts):
        # Consecutive cuts with no column item between them form one region.
        group = [cuts[index]]
        while index + 1 < len(cuts) and not any(group[-1][0].cy <= item.cy < cuts[index + 1][0].cy for item in columns):
            index += 1
            group.append(cuts[index])
        regions += split([item for item in columns if previous_y <= item.cy < group[0][0].cy])
        regions.append([item for _box, item in group if item is not None])
        previous_y = group[-1][0].cy
        index += 1
    regions += split([item for item in columns if item.cy >= previous_y])
    return [region for region in regions if region]


def inside(line: Rect, region: Rect, share: float = 0.5) -> bool:
    """At least ``share`` of the line's box lies inside ``region``."""
    return line.overlap_share(region) >= share


def drop_edge_slivers(lines: Sequence[OcrLine], width: float, height: float, margin: float = 2.0) -> list[OcrLine]:
    """Drop thin lines cut by the top or bottom edge of a crop.

    A block crop padded for safety may catch the tops or bottoms of the
    neighbouring block's glyphs; those read as noise, not text.
    """
    if len(lines) < 2:
        return list(lines)
    median = statistics.median(line.height for line in lines)
    kept = []
    for line in lines:
        touches_edge = line.y1 <= margin or line.y2 >= height - margin
        if touches_edge and line.height < 0.75 * median:
            continue
        kept.append(line)
    return kept
