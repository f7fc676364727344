"""MinerU's answer formats: the layout answer (boxes, types, rotation) and tables in OTSL.

A layout answer is one entry per block, newline-joined, in reading order::

    <|box_start|>x1 y1 x2 y2<|box_end|><|ref_start|>type<|ref_end|><|rotate_up|>

with integer coordinates in 0..1000 of the image received, as
``mineru_vl_utils.MinerUClientHelper.parse_layout_output`` reads it. Pure: no
model, no numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

from mkg_devstack.local_server.blocks import Block, BlockType
from mkg_devstack.local_server.geometry import OcrLine, body_height
from mkg_devstack.local_server.tables import Grid, to_otsl

ANGLE_TOKENS = {0: "<|rotate_up|>", 90: "<|rotate_right|>", 180: "<|rotate_down|>", 270: "<|rotate_left|>"}
"""MinerU's rotation tokens: the counter-clockwise turn (PIL ``rotate``) that sets the crop upright."""

Box = tuple[float, float, float, float]


def _normalise(value: float, size: float) -> int:
    return min(1000, max(0, round(value / size * 1000)))


def _separate_boxes(boxes: list[list[float]], tight: Sequence[Block]) -> None:
    """Cut vertically overlapping boxes of one column at the middle of their overlap (in place).

    Detection boxes of consecutive lines can overlap, more so on MinerU's
    layout image, which is squashed to a square; a crop of an overlapping box
    would catch half a line of its neighbour, which reads as noise.
    """
    for i, upper in enumerate(tight):
        for j, lower in enumerate(tight):
            if i == j or upper.y1 > lower.y1 or (upper.y1 == lower.y1 and i > j):
                continue
            shared_x = min(upper.x2, lower.x2) - max(upper.x1, lower.x1)
            if shared_x <= 0:
                continue
            tight_overlap = upper.y2 - lower.y1
            padded_overlap = boxes[i][3] - boxes[j][1]
            if padded_overlap <= 0 or tight_overlap > 0.5 * min(upper.y2 - upper.y1, lower.y2 - lower.y1):
                continue  # apart, or one inside the other: nothing sensible to cut
            middle = (upper.y2 + lower.y1) / 2
            boxes[i][3] = min(boxes[i][3], middle)
            boxes[j][1] = max(boxes[j][1], middle)


def layout_padding(lines: Sequence[OcrLine]) -> tuple[float, float]:
    """Padding (x, y) in pixels around text blocks: a fraction of the body line height."""
    body = body_height(lines)
    return max(2.0, 0.5 * body), max(1.0, 0.2 * body)


def layout_boxes(blocks: Sequence[Block], *, pad_x: float = 0.0, pad_y: float = 0.0) -> list[Box]:
    """Block boxes padded (pixels) so that a crop holds the whole glyphs, but not into a neighbour.

    Figures and tables keep their own region (found on the image, not from glyph boxes).
    """
    boxes = [
        [block.x1, block.y1, block.x2, block.y2]
        if block.region is not None
        else [block.x1 - pad_x, block.y1 - pad_y, block.x2 + pad_x, block.y2 + pad_y]
        for block in blocks
    ]
    _separate_boxes(boxes, blocks)
    return [(box[0], box[1], box[2], box[3]) for box in boxes]


def format_layout_boxes(
    boxes: Sequence[Box], types: Sequence[BlockType], width: float, height: float, angle: int = 0
) -> str:
    """MinerU's layout answer: one ``<|box_start|>…<|rotate_…|>`` entry per box, newline-joined.

    Coordinates are integers in 0..1000 of the received image, never
    collapsed to zero width or height (MinerU drops such boxes).
    """
    if width <= 0 or height <= 0:
        return ""
    token = ANGLE_TOKENS[angle]
    entries = []
    for (left, top, right, bottom), kind in zip(boxes, types, strict=True):
        x1, y1 = _normalise(left, width), _normalise(top, height)
        x2, y2 = _normalise(right, width), _normalise(bottom, height)
        if x2 <= x1:
            x1, x2 = (x1, x1 + 1) if x1 < 1000 else (999, 1000)
        if y2 <= y1:
            y1, y2 = (y1, y1 + 1) if y1 < 1000 else (999, 1000)
        entries.append(f"<|box_start|>{x1} {y1} {x2} {y2}<|box_end|><|ref_start|>{kind.value}<|ref_end|>{token}")
    return "\n".join(entries)


def format_layout(
    blocks: Sequence[Block], width: float, height: float, *, pad_x: float = 0.0, pad_y: float = 0.0
) -> str:
    """MinerU's layout answer for upright blocks of a ``width`` x ``height`` image (see layout_boxes)."""
    boxes = layout_boxes(blocks, pad_x=pad_x, pad_y=pad_y)
    return format_layout_boxes(boxes, [block.type for block in blocks], width, height)


def format_table(grid: Grid) -> str:
    """MinerU's table recognition answer: OTSL, which ``mineru_vl_utils`` turns into HTML."""
    return to_otsl(grid)
