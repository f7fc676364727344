"""Non-text regions of a page image: figures, ruled tables and horizontal rules (numpy and OpenCV).

What MinerU's layout model finds with a neural network, found here with a few
morphological operations, good enough for a development stand-in:

- **Rules**: long thin runs of ink, horizontal (at least ``RULE_MIN_WIDTH`` of
  the page width) or vertical (``RULE_MIN_HEIGHT`` of its height), found by a
  morphological opening.
- **Figures**: ink that is neither text (the OCR line boxes) nor a rule,
  smeared by a body-line-sized kernel; a smear at least ``FIGURE_MIN_SIDE`` of
  the page in both directions, and not mostly text, seeds a figure. The figure
  grows over the rules it touches (a plot's frame), then over the short text
  lines inside it or next to it (a legend, tick labels, then axis titles),
  each line going to the nearest figure; a caption (a long line) stays out, and
  so does a short line of a text column beside the figure (an equation
  number at the end of its row, held between the ends of that column's long
  lines, which themselves do not reach the figure's side), and a line on the
  page's first or last text row beyond the figure (a running head). A region
  more than ``FIGURE_MAX_TEXT`` covered by text lines is a formula, not a figure.
- **Tables**: rules outside figures. Rules that touch each other (a grid, with
  its filled header bars) form one table; separate horizontal rules of the
  same width stacked with text rows between them (a booktabs table: at least
  ``BOOKTABS_MIN_RULES`` thin rules, or a filled header bar and a rule; two
  thin rules alone are as often two alike fraction bars) form another. A
  candidate is a table only if the text inside it falls into at least two
  columns. Its inner rules are kept as row/column separators.

Everything else that is a long horizontal rule is returned as a separator:
the reading order uses one crossing the column gutter to cut bands.

Coordinates in and out are pixels of ``rgb``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from mkg_devstack.local_server.geometry import OcrLine, Rect, Visual, VisualKind, body_height, inside
from mkg_devstack.local_server.tables import column_count, table_grid

INK_LEVEL = 200  # a pixel whose darkest channel is below this is ink
RULE_LEVEL = 235  # ...and a rule may be lighter (light-grey table rules)
RULE_MIN_WIDTH = 0.08  # horizontal rules: at least this share of the image width
RULE_MIN_HEIGHT = 0.03  # vertical rules: at least this share of the image height
FIGURE_MIN_SIDE = 0.08  # a figure is at least this share of the image in both directions
FIGURE_MAX_TEXT = 0.3  # ...and its area is at most this share covered by text lines (more: a formula)
FIGURE_MIN_INK = 0.005  # ...and at least this share of it is non-text ink
CAPTION_MIN_WIDTH = 8.0  # body heights: a caption's line is at least this long (a tick label is a few)
LABEL_MAX_WIDTH = 0.5  # text lines next to a figure narrower than this share of it are its labels
RULE_ROW_SHARE = 0.6  # a pixel row of a table this much covered by horizontal rules is a rule
RULE_COLUMN_SHARE = 0.2  # a pixel column this much covered by vertical rules is a column separator
THICK_RULE = 5  # pixels: a thicker "rule" is a filled bar (a header row's background)
BOOKTABS_MIN_RULES = 3  # thin rules of a booktabs table (top, header, bottom); fewer only with a filled bar


@dataclass(frozen=True)
class PageRegions:
    visuals: list[Visual]
    """Figures and tables, in no particular order."""
    rules: list[Rect]
    """Horizontal rules that are not part of a figure or a table."""


def _components(mask: np.ndarray) -> list[tuple[int, int, int, int, int]]:
    """(x, y, width, height, pixels) of the 8-connected components of a 0/1 mask."""
    import cv2

    count, _labels, stats, _centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    return [(int(x), int(y), int(w), int(h), int(a)) for x, y, w, h, a in stats[1:count]]


def _rect(component: tuple[int, int, int, int, int]) -> Rect:
    x, y, w, h, _pixels = component
    return Rect(float(x), float(y), float(x + w), float(y + h))


def _union(a: Rect, b: Rect) -> Rect:
    return Rect(min(a.x1, b.x1), min(a.y1, b.y1), max(a.x2, b.x2), max(a.y2, b.y2))


def _touches(a: Rect, b: Rect, margin: float = 0.0) -> bool:
    return a.x1 - margin <= b.x2 and b.x1 - margin <= a.x2 and a.y1 - margin <= b.y2 and b.y1 - margin <= a.y2


def _text_mask(shape: tuple[int, int], lines: Sequence[OcrLine]) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    height, width = shape
    for line in lines:
        pad = 0.2 * min(line.height, line.width)
        y1, y2 = max(0, int(line.y1 - pad)), min(height, int(line.y2 + pad) + 1)
        x1, x2 = max(0, int(line.x1 - pad)), min(width, int(line.x2 + pad) + 1)
        mask[y1:y2, x1:x2] = 1
    return mask


def _gap(a: Rect, b: Rect) -> float:
    """Distance between two boxes (0 when they touch or overlap)."""
    return max(0.0, b.x1 - a.x2, a.x1 - b.x2, b.y1 - a.y2, a.y1 - b.y2)


def _in_another_column(line: Rect, frame: Rect, lines: Sequence[OcrLine], body: float) -> bool:
    """The line lies within a text column beside the figure: at least two long lines that do not reach
    the figure's side hold it between their ends (an equation number at the end of its formula's row)."""
    holders = 0
    for other in lines:
        if other.width < max(3 * line.width, 8 * body) or (other.x1 < frame.x2 and other.x2 > frame.x1):
            continue
        if other.x1 - body / 2 <= line.x1 and line.x2 <= other.x2 + body / 2:
            holders += 1
            if holders >= 2:
                return True
    return False


def _edge_row(line: Rect, frame: Rect, first_row: float, last_row: float) -> bool:
    """The line is on the page's top (bottom) text row, wholly above (below) the figure: a running head,
    a page number."""
    return (line.y2 <= frame.y1 and line.y1 < first_row) or (line.y1 >= frame.y2 and line.y2 > last_row)


def _figures(
    residual: np.ndarray,
    text: np.ndarray,
    rule_boxes: list[Rect],
    lines: Sequence[OcrLine],
    body: float,
) -> list[Rect]:
    import cv2

    height, width = residual.shape
    size = max(3, round(body))
    smeared = cv2.dilate(residual, np.ones((size, size), np.uint8))
    frames: list[Rect] = []
    for component in _components(smeared):
        x, y, w, h, _pixels = component
        if w < FIGURE_MIN_SIDE * width or h < FIGURE_MIN_SIDE * height:
            continue
        texty = text[y : y + h, x : x + w].mean() > FIGURE_MAX_TEXT
        if texty or residual[y : y + h, x : x + w].mean() < FIGURE_MIN_INK:
            continue  # a formula (mostly text), or a few specks
        frame = _rect(component)
        for _ in range(2):  # the rules it touches: a plot's frame, its axes
            for box in rule_boxes:
                if _touches(frame, box, 2):
                    frame = _union(frame, box)
        if not any(inside(frame, other, 0.8) for other in frames):
            frames = [other for other in frames if not inside(other, frame, 0.8)] + [frame]
    if not frames:
        return []
    # Labels: short lines near a frame (tick labels, then the axis title beyond them) or inside it
    # (a legend); each goes to its nearest frame, so that neighbouring figures do not merge.
    figures = list(frames)
    # The last row of a caption is short too, but sits right under a long line it is aligned with;
    # the detector may return that row in pieces, each one short: the pieces beside it go with it.
    taken: set[int] = {
        index
        for index, line in enumerate(lines)
        if any(
            above.width >= max(1.2 * line.width, CAPTION_MIN_WIDTH * body)
            and abs(above.x1 - line.x1) <= body
            and 0 <= line.y1 - above.y2 <= body
            for above in lines
        )
    }
    for _ in range(2):
        taken |= {
            index
            for index, line in enumerate(lines)
            if any(
                _gap(lines[other], line) <= 2 * body and abs(lines[other].cy - line.cy) <= 0.25 * line.height
                for other in taken
            )
        }
    first_row = min(line.y2 for line in lines) if lines else 0.0  # the page's top text row ends here…
    last_row = max(line.y1 for line in lines) if lines else 0.0  # …and its bottom row starts here
    for _ring in range(2):
        grown = list(figures)
        for index, line in enumerate(lines):
            if index in taken:
                continue
            gaps = [_gap(figure, line) for figure in figures]
            nearest = min(range(len(figures)), key=gaps.__getitem__)
            frame = frames[nearest]
            if _in_another_column(line, frame, lines, body) or _edge_row(line, frame, first_row, last_row):
                continue  # the neighbour column's text (an equation number), a running head: never a label
            short = line.width <= LABEL_MAX_WIDTH * frame.width
            if inside(line, figures[nearest]) or (short and gaps[nearest] <= 1.5 * body):
                grown[nearest] = _union(grown[nearest], line)
                taken.add(index)
        figures = grown
    return figures


def _separators(mask: np.ndarray, share: float, axis: int) -> list[float]:
    """Positions (pixel rows for axis=1, columns for axis=0) of rules across ``share`` of the box;
    a thick filled bar gives its two edges."""
    covered = mask.mean(axis=axis) >= share
    positions: list[float] = []
    start: int | None = None
    for index, hit in enumerate([*covered.tolist(), False]):
        if hit and start is None:
            start = index
        elif not hit and start is not None:
            if index - start > THICK_RULE:
                positions += [float(start), float(index)]
            else:
                positions.append((start + index - 1) / 2)
            start = None
    return positions


def _table(box: Rect, horizontal: np.ndarray, vertical: np.ndarray, lines: Sequence[OcrLine]) -> Visual | None:
    x1, y1, x2, y2 = (round(box.x1), round(box.y1), round(box.x2), round(box.y2))
    if x2 - x1 < 4 or y2 - y1 < 4:
        return None
    # Detection alone (the layout route) gives boxes without text: the grid only needs the boxes.
    cells = [line if line.text else replace(line, text="?") for line in lines if inside(line, box)]
    if len({round(line.cy) for line in cells}) < 2:
        return None
    rows = tuple(y1 + y for y in _separators(horizontal[y1:y2, x1:x2], RULE_ROW_SHARE, 1))
    margin = 0.02 * (x2 - x1)
    columns = tuple(
        x1 + x for x in _separators(vertical[y1:y2, x1:x2], RULE_COLUMN_SHARE, 0) if margin < x < (x2 - x1) - margin
    )
    if column_count(table_grid(cells, row_rules=rows, column_rules=columns)) < 2:
        return None  # a boxed paragraph, a frame: not a table
    return Visual(box.x1, box.y1, box.x2, box.y2, VisualKind.TABLE, rows, columns)


def _tables(
    horizontal: np.ndarray,
    vertical: np.ndarray,
    lines: Sequence[OcrLine],
    figures: Sequence[Rect],
    body: float,
) -> tuple[list[Visual], list[Rect]]:
    import cv2

    joined = cv2.dilate(horizontal | vertical, np.ones((3, 3), np.uint8))
    structures = [_rect(component) for component in _components(joined)]
    structures = [box for box in structures if not any(_touches(box, figure, 2) for figure in figures)]
    tables: list[Visual] = []
    plain: list[Rect] = []  # lone horizontal rules: booktabs rules, separators
    for box in structures:
        is_line = box.height <= THICK_RULE + 2
        if is_line:
            plain.append(box)
            continue
        table = _table(box, horizontal, vertical, lines)
        if table is not None:
            tables.append(table)
        else:
            plain.append(box)
    # Booktabs: same-width rules stacked with text between them.
    plain.sort(key=lambda box: box.y1)
    used: set[int] = set()
    for first, top in enumerate(plain):
        if first in used:
            continue
        stack = [first]
        for other in range(first + 1, len(plain)):
            rule = plain[other]
            same = abs(rule.x1 - top.x1) <= body and abs(rule.x2 - top.x2) <= body
            if same and other not in used:
                stack.append(other)
        for count in range(len(stack), 1, -1):
            if count < BOOKTABS_MIN_RULES and all(plain[i].height <= THICK_RULE + 2 for i in stack[:count]):
                continue  # two thin rules alone: as often the fraction bars of a formula set twice
            box = _union(top, plain[stack[count - 1]])
            table = _table(box, horizontal, vertical, lines)
            if table is not None and not any(inside(table, other, 0.5) for other in tables):
                tables.append(table)
                used.update(stack[:count])
                break
    rules = [box for index, box in enumerate(plain) if index not in used and box.height <= THICK_RULE + 2]
    rules = [rule for rule in rules if not any(inside(rule, table, 0.5) for table in tables)]
    return tables, rules


def find_regions(rgb: np.ndarray, lines: Sequence[OcrLine]) -> PageRegions:
    """Figures, tables and free horizontal rules of an upright page (``lines``: its OCR lines, any text)."""
    import cv2

    height, width = rgb.shape[:2]
    if height < 32 or width < 32:
        return PageRegions([], [])
    upright = [line for line in lines if not line.vertical]
    body = body_height(upright) or 0.01 * height
    darkest = rgb.min(axis=2)
    ink = (darkest < INK_LEVEL).astype(np.uint8)
    light = (darkest < RULE_LEVEL).astype(np.uint8)
    horizontal = cv2.morphologyEx(
        light, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (max(20, round(RULE_MIN_WIDTH * width)), 1))
    )
    vertical = cv2.morphologyEx(
        light,
        cv2.MORPH_OPEN,
        cv2.getStructuringElement(cv2.MORPH_RECT, (1, max(20, round(RULE_MIN_HEIGHT * height)))),
    )
    text = _text_mask((height, width), lines)
    rules = cv2.dilate(horizontal | vertical, np.ones((3, 3), np.uint8))
    residual = ink & (1 - text) & (1 - rules)
    rule_boxes = [_rect(component) for component in _components(rules)]
    figures = _figures(residual, text, rule_boxes, upright, body)
    tables, free_rules = _tables(horizontal, vertical, upright, figures, body)
    visuals = [Visual(f.x1, f.y1, f.x2, f.y2, VisualKind.IMAGE) for f in figures]
    visuals += [table for table in tables if not any(inside(table, figure, 0.5) for figure in figures)]
    return PageRegions(visuals, free_rules)


def table_rules(rgb: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(row separators, column separators) of an image holding one table (a table block's crop)."""
    import cv2

    height, width = rgb.shape[:2]
    if height < 8 or width < 8:
        return (), ()
    light = (rgb.min(axis=2) < RULE_LEVEL).astype(np.uint8)
    horizontal = cv2.morphologyEx(
        light, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (max(8, round(0.3 * width)), 1))
    )
    vertical = cv2.morphologyEx(
        light, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (1, max(8, round(0.3 * height))))
    )
    margin = 0.02 * width
    rows = tuple(_separators(horizontal, RULE_ROW_SHARE, 1))
    columns = tuple(x for x in _separators(vertical, RULE_COLUMN_SHARE, 0) if margin < x < width - margin)
    return rows, columns
