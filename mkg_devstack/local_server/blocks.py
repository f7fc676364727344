"""A page's blocks (paragraphs, titles, furniture, figures, tables) and their Markdown or plain text.

Built on :mod:`geometry`'s reading order. Block types are MinerU 2.x's
(``mineru_vl_utils.structs.BlockType``), so the layout answer can use them as
they are. Pure: no model, no numpy.

Paragraphs. Rows of one column join into a paragraph until a blank gap, a
change of type size (body text / title), or an indented first line. In a
column typeset with hanging indents (a reference list: most continuation rows
are indented), a row back at the left edge starts the next item instead. A
"display" row, indented from both sides (a centred formula), stands alone.
Hyphenation is undone as :func:`geometry.join_rows` says.
"""

from __future__ import annotations

import enum
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from mkg_devstack.local_server.geometry import (
    OcrLine,
    Rect,
    Row,
    Visual,
    VisualKind,
    body_height,
    group_rows,
    inside,
    join_rows,
    reading_order,
    split_furniture,
)
from mkg_devstack.local_server.tables import Grid, table_grid, to_markdown

PARAGRAPH_GAP = 0.6  # a blank gap taller than this (x body row height) starts a new paragraph
INDENT = 0.6  # a first line indented by more than this starts a new paragraph
HANGING_SHARE = 0.35  # a column whose rows are this often indented is typeset with hanging indents
DISPLAY_INDENT = 4.0  # a row indented this much from both column edges is a display line (a formula)
HEADING_RATIO = 1.3  # a row whose type is this much larger than body text is a heading…
HEADING_1_RATIO = 1.75  # …and a level-1 heading from here up
HEADING_MAX_CHARS = 200  # longer "headings" are large-print paragraphs
_DASHES = "-\u2013\u2014"
_PAGE_NUMBER_RE = re.compile(
    rf"^(?:page\s+)?(?:[{_DASHES}]\s*)?(?:\d{{1,4}}|[ivx]{{1,5}})(?:\s*[{_DASHES}])?(?:\s+(?:of|/)\s+\d{{1,4}})?$",
    re.IGNORECASE,
)


class BlockType(enum.StrEnum):
    """MinerU 2.x block types (``mineru_vl_utils.structs.BlockType``) the stand-in answers."""

    TEXT = "text"
    DOC_TITLE = "doc_title"
    PARAGRAPH_TITLE = "paragraph_title"
    HEADER = "header"
    FOOTER = "footer"
    PAGE_NUMBER = "page_number"
    ASIDE_TEXT = "aside_text"
    IMAGE = "image"
    TABLE = "table"


TITLE_TYPES = {1: BlockType.DOC_TITLE, 2: BlockType.PARAGRAPH_TITLE}


@dataclass
class Block:
    """A paragraph, a title, page furniture (consecutive rows), or a visual (its own region)."""

    type: BlockType
    rows: list[Row] = field(default_factory=list)
    level: int = 0
    """Heading level (1 or 2) for titles, 0 otherwise."""
    region: Visual | None = None
    """Figures and tables: the region; a table's rows are the text lines inside it."""

    @property
    def x1(self) -> float:
        return self.region.x1 if self.region is not None else min(row.x1 for row in self.rows)

    @property
    def y1(self) -> float:
        return self.region.y1 if self.region is not None else min(row.y1 for row in self.rows)

    @property
    def x2(self) -> float:
        return self.region.x2 if self.region is not None else max(row.x2 for row in self.rows)

    @property
    def y2(self) -> float:
        return self.region.y2 if self.region is not None else max(row.y2 for row in self.rows)

    @property
    def lines(self) -> list[OcrLine]:
        return [line for row in self.rows for line in row.lines]

    @property
    def text(self) -> str:
        return join_rows([row.text for row in self.rows])


# --------------------------------------------------------------------------- type size


def _has_text(row: Row) -> bool:
    return len(row.text.replace(" ", "")) >= 3


def row_size(row: Row, by_text: bool) -> float:
    """The row's type size: its mean character advance when the text is known, else its box height.

    Detection boxes are a noisy measure of type size (a 14 pt title can get
    the same box height as 10 pt body text), while width per character follows
    the font size closely.
    """
    if by_text and _has_text(row):
        chars = sum(len(line.text.strip()) for line in row.lines) + len(row.lines) - 1
        return sum(line.width for line in row.lines) / max(chars, 1)
    return row.height


@dataclass(frozen=True)
class SizeScale:
    by_text: bool
    body: float

    @classmethod
    def of(cls, rows: Sequence[Row]) -> SizeScale:
        with_text = [row for row in rows if _has_text(row)]
        by_text = bool(rows) and len(with_text) * 2 >= len(rows)
        # Body text: the rows long enough for their advance to be a stable average.
        sample = ([row for row in with_text if len(row.text) >= 20] or with_text) if by_text else list(rows)
        sizes = [row_size(row, by_text) for row in sample]
        return cls(by_text, statistics.median(sizes) if sizes else 0.0)

    def heading_level(self, row: Row) -> int:
        if self.body <= 0:
            return 0
        if self.by_text:
            text = row.text.replace(" ", "")
            # Too little text for a reliable advance (a stray glyph, a margin mark): never a heading.
            if not _has_text(row) or len(row.text) > HEADING_MAX_CHARS:
                return 0
            # Formulas are large too, but mostly not letters.
            if sum(char.isalpha() for char in text) < 0.6 * len(text):
                return 0
        ratio = row_size(row, self.by_text) / self.body
        if ratio >= HEADING_1_RATIO:
            return 1
        if ratio >= HEADING_RATIO:
            return 2
        return 0


# --------------------------------------------------------------------------- paragraphs


@dataclass(frozen=True)
class _Column:
    """The edges and style of one region's text rows."""

    left: float
    right: float
    hanging: bool
    body: float

    @classmethod
    def of(cls, rows: Sequence[Row], body: float) -> _Column:
        # Quartiles, not extremes: one row poking into the gutter must not make every other row "indented".
        lefts = sorted(row.x1 for row in rows)
        rights = sorted(row.x2 for row in rows)
        left, right = lefts[len(lefts) // 4], rights[(3 * len(rights)) // 4]
        indented = sum(1 for row in rows if row.x1 - left > INDENT * body)
        return cls(left, right, len(rows) >= 4 and indented >= HANGING_SHARE * len(rows), body)

    def indented(self, row: Row) -> bool:
        return row.x1 - self.left > INDENT * self.body

    def display(self, row: Row) -> bool:
        margin = DISPLAY_INDENT * self.body
        return row.x1 - self.left > margin and self.right - row.x2 > margin


def _starts_block(row: Row, previous: Row, current: Block, kind: BlockType, level: int, column: _Column) -> bool:
    body = column.body
    if kind != current.type or level != current.level:
        return True  # text size changed: heading after body text or the reverse
    if row.y1 - previous.y2 > PARAGRAPH_GAP * body:
        return True  # blank gap
    if kind != BlockType.TEXT:
        return False
    if column.display(row) or column.display(previous):
        return True  # a formula or a centred line stands alone
    if column.hanging:
        return column.indented(previous) and not column.indented(row)  # back at the left edge: the next item
    return column.indented(row) and not column.indented(previous)


def _text_blocks(rows: Sequence[Row], scale: SizeScale, body: float) -> list[Block]:
    if not rows:
        return []
    column = _Column.of(rows, body)
    blocks: list[Block] = []
    current: Block | None = None
    previous: Row | None = None
    for row in rows:
        level = scale.heading_level(row)
        kind = TITLE_TYPES[level] if level else BlockType.TEXT
        if current is None or previous is None or _starts_block(row, previous, current, kind, level, column):
            current = Block(type=kind, level=level)
            blocks.append(current)
        current.rows.append(row)
        previous = row
    return blocks


def _region_blocks(
    region: Sequence[OcrLine | Visual], owned: dict[int, list[OcrLine]], scale: SizeScale, body: float
) -> list[Block]:
    """Blocks of one region, top to bottom: runs of text rows, each visual where it sits."""
    rows = group_rows(item for item in region if isinstance(item, OcrLine))
    visuals = sorted((item for item in region if isinstance(item, Visual)), key=lambda item: item.cy)
    blocks: list[Block] = []
    start = 0
    for visual in visuals:
        end = start
        while end < len(rows) and (rows[end].y1 + rows[end].y2) / 2 < visual.cy:
            end += 1
        blocks += _text_blocks(rows[start:end], scale, body)
        if visual.kind is VisualKind.TABLE:
            blocks.append(Block(type=BlockType.TABLE, rows=group_rows(owned.get(id(visual), [])), region=visual))
        else:
            blocks.append(Block(type=BlockType.IMAGE, region=visual))
        start = end
    blocks += _text_blocks(rows[start:], scale, body)
    return blocks


def _furniture_blocks(lines: Sequence[OcrLine], kind: BlockType, body: float) -> list[Block]:
    """Blocks of an edge zone: pieces of a row far apart (a running head left, a page number right) are
    separate blocks; rows that follow each other closely and overlap sideways (an address) are one."""
    pieces: list[Row] = []
    for row in group_rows(lines):
        current = [row.lines[0]]
        for line in row.lines[1:]:
            if line.x1 - current[-1].x2 > 2 * body:
                pieces.append(Row(current))
                current = [line]
            else:
                current.append(line)
        pieces.append(Row(current))
    blocks: list[Block] = []
    for piece in pieces:
        above = next((block for block in reversed(blocks) if min(block.x2, piece.x2) > max(block.x1, piece.x1)), None)
        if above is not None and piece.y1 - above.y2 <= PARAGRAPH_GAP * body:
            above.rows.append(piece)
        else:
            blocks.append(Block(type=kind, rows=[piece]))
    return [mark_page_number(block) for block in blocks]


def mark_page_number(block: Block) -> Block:
    """A one-row furniture block whose every piece was read and whose text is a page number."""
    all_read = all(line.text for line in block.lines)
    if len(block.rows) == 1 and all_read and _PAGE_NUMBER_RE.match(block.text.strip()):
        return replace(block, type=BlockType.PAGE_NUMBER)
    return block


def _assign(lines: Sequence[OcrLine], visuals: Sequence[Visual]) -> tuple[list[OcrLine], dict[int, list[OcrLine]]]:
    """(free lines, lines owned by each visual): a line mostly inside a figure or table is the visual's."""
    owned: dict[int, list[OcrLine]] = {id(visual): [] for visual in visuals}
    free: list[OcrLine] = []
    for line in lines:
        owner = next((visual for visual in visuals if not line.vertical and inside(line, visual)), None)
        if owner is None:
            free.append(line)
        else:
            owned[id(owner)].append(line)
    return free, owned


def edge_zone_lines(lines: Sequence[OcrLine], *, height: float, visuals: Sequence[Visual] = ()) -> list[OcrLine]:
    """The lines :func:`build_page` will treat as page furniture (top and bottom zones)."""
    free, _owned = _assign(lines, visuals)
    top, _middle, bottom = split_furniture(
        [line for line in free if not line.vertical], visuals, height, body_height(lines)
    )
    return [*top, *bottom]


def build_page(
    lines: Sequence[OcrLine],
    *,
    height: float,
    visuals: Sequence[Visual] = (),
    rules: Sequence[Rect] = (),
) -> list[Block]:
    """The page's blocks in reading order: header zone, body (column by column), margin text, footer zone.

    Lines inside an image are the image's (axis labels); lines inside a table
    are its cells. ``rules`` (horizontal separators) cut column bands.
    """
    body = body_height(lines)
    free, owned = _assign(lines, visuals)
    upright = [line for line in free if not line.vertical]
    sideways = [line for line in free if line.vertical]
    top, middle, bottom = split_furniture(upright, visuals, height, body)
    scale = SizeScale.of(group_rows(middle))
    blocks = _furniture_blocks(top, BlockType.HEADER, body)
    for region in reading_order(middle, visuals, rules):
        blocks += _region_blocks(region, owned, scale, body)
    # Vertical text beside a body is margin text (an arXiv stamp); on a page with nothing else, it is the text.
    aside = BlockType.ASIDE_TEXT if upright else BlockType.TEXT
    blocks += [Block(type=aside, rows=[Row([line])]) for line in sideways]
    blocks += _furniture_blocks(bottom, BlockType.FOOTER, body)
    return blocks


def build_blocks(lines: Sequence[OcrLine], height: float | None = None) -> list[Block]:
    """Text blocks of lines alone (no visuals): a crop's paragraphs, or a page's without image analysis."""
    if not lines:
        return []
    page_height = height if height is not None else max(line.y2 for line in lines)
    return build_page(lines, height=page_height)


# --------------------------------------------------------------------------- answers


def block_grid(block: Block) -> Grid:
    """A table block's cells (its lines, cut by the rules found inside its region)."""
    region = block.region
    return table_grid(
        block.lines,
        row_rules=region.row_rules if region is not None else (),
        column_rules=region.column_rules if region is not None else (),
    )


def blocks_to_markdown(blocks: Sequence[Block]) -> str:
    """Paragraphs separated by a blank line; titles as ``#``/``##`` headings; tables as Markdown tables.

    Figures are left out, as the page-to-Markdown prompt asks ("do not describe images").
    """
    parts = []
    for block in blocks:
        if block.type is BlockType.IMAGE:
            continue
        if block.type is BlockType.TABLE:
            table = to_markdown(block_grid(block))
            if table:
                parts.append(table)
            continue
        text = block.text.strip()
        if not text:
            continue
        if block.level:
            parts.append(f"{'#' * block.level} {text}")
        else:
            parts.append(text)
    return "\n\n".join(parts)


def blocks_to_text(blocks: Sequence[Block]) -> str:
    """Recognition answer for a cropped block: one paragraph per line, rows joined with a space."""
    return "\n".join(text for text in (block.text.strip() for block in blocks) if text)


def lines_to_markdown(lines: Sequence[OcrLine]) -> str:
    return blocks_to_markdown(build_blocks(lines))


def lines_to_text(lines: Sequence[OcrLine]) -> str:
    return blocks_to_text(build_blocks(lines))
