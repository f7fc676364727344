"""One image to one answer, per route: the glue between the OCR model, the geometry and the formats."""

from __future__ import annotations

import statistics

import numpy as np

from mkg_pipeline.local_server.blocks import blocks_to_markdown, build_page, edge_zone_lines, lines_to_text
from mkg_pipeline.local_server.geometry import body_height, drop_edge_slivers
from mkg_pipeline.local_server.mineru_format import format_layout_boxes, format_table, layout_boxes, layout_padding
from mkg_pipeline.local_server.ocr import PAGE_MIN_LONG_SIDE, OcrEngine, Reading, unturn_box
from mkg_pipeline.local_server.protocol import Route
from mkg_pipeline.local_server.regions import find_regions, table_rules
from mkg_pipeline.local_server.tables import table_grid

# np.rot90 k that set the page upright -> MinerU's angle (PIL's counter-clockwise rotate).
_ANGLE_OF_TURN = {0: 0, 1: 90, -1: 270}
TURNED_MIN_SCORE = 0.8  # median recognition score that makes a reading turned 180° believable
PAGE_NUMBER_MAX_WIDTH = 8.0  # edge-zone lines wider than this many body heights are not read in layout


def _upright(image: np.ndarray, reading: Reading) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(image, reading.turn)) if reading.turn else image


def _read_either_way(engine: OcrEngine, image: np.ndarray, **options: int) -> tuple[np.ndarray, Reading]:
    """(the image as read, its reading): read as sent, and turned 180° only when nothing reads upright.

    Text upside down (a page rotated 180°) mostly reads as nothing above the recogniser's score
    threshold (rotated-arabic-4p page 2: nothing at all). The detector only turns pages on their side
    (90°), so such a page would answer empty on every run, and be rejected as ``empty`` every time.
    Upright text read upside down still passes the recogniser's threshold here and there, as garbage
    of middling scores; upside-down text read turned scores high. So the turned reading is kept only
    when its median score is at least ``TURNED_MIN_SCORE``. An image with no text at all costs a
    second detection only.
    """
    reading = engine.read(image, **options)
    if reading.lines:
        return image, reading
    turned = np.ascontiguousarray(np.rot90(image, 2))
    again = engine.read(turned, **options)
    if again.lines and statistics.median(line.score for line in again.lines) >= TURNED_MIN_SCORE:
        return turned, again
    return image, reading


def layout_answer(engine: OcrEngine, image: np.ndarray) -> str:
    """MinerU layout blocks from text detection and image analysis; only page-number candidates are read."""
    height, width = image.shape[:2]
    reading = engine.detect(image)
    lines = reading.lines
    if not lines:
        return ""
    upright = _upright(image, reading)
    regions = find_regions(upright, lines)
    body = body_height(lines)
    candidates = [
        line
        for line in edge_zone_lines(lines, visuals=regions.visuals, height=reading.height)
        if line.width <= max(PAGE_NUMBER_MAX_WIDTH * body, 0.1 * reading.width)
    ]
    if candidates:
        read = {id(box): line for box, line in zip(candidates, engine.read_boxes(upright, candidates), strict=True)}
        lines = [read.get(id(line), line) for line in lines]
    blocks = build_page(lines, height=reading.height, visuals=regions.visuals, rules=regions.rules)
    pad_x, pad_y = layout_padding(lines)
    boxes = layout_boxes(blocks, pad_x=pad_x, pad_y=pad_y)
    if reading.turn:
        # Blocks were found on the page turned upright; MinerU crops the page as sent, then turns each crop.
        boxes = [unturn_box(box, reading.turn, reading.width, reading.height) for box in boxes]
    types = [block.type for block in blocks]
    return format_layout_boxes(boxes, types, width, height, _ANGLE_OF_TURN[reading.turn])


def recognition_answer(engine: OcrEngine, image: np.ndarray) -> str:
    """Text of a cropped block: rows joined with a space, paragraphs with a newline."""
    _image, reading = _read_either_way(engine, image)
    return lines_to_text(drop_edge_slivers(reading.lines, reading.width, reading.height))


def table_answer(engine: OcrEngine, image: np.ndarray) -> str:
    """The cells of a cropped table in OTSL, cut by the table's own rules where it has them."""
    reading = engine.read(image)
    if not reading.lines:
        return ""
    row_rules, column_rules = table_rules(_upright(image, reading))
    return format_table(table_grid(reading.lines, row_rules=row_rules, column_rules=column_rules))


def page_markdown_answer(engine: OcrEngine, image: np.ndarray) -> str:
    """The whole page as Markdown, in reading order; figures left out, tables as Markdown tables."""
    image, reading = _read_either_way(engine, image, min_long_side=PAGE_MIN_LONG_SIDE)
    if not reading.lines:
        return ""
    regions = find_regions(_upright(image, reading), reading.lines)
    return blocks_to_markdown(
        build_page(reading.lines, height=reading.height, visuals=regions.visuals, rules=regions.rules)
    )


def answer(route: Route, engine: OcrEngine, image: np.ndarray) -> str:
    if route is Route.LAYOUT:
        return layout_answer(engine, image)
    if route is Route.TABLE:
        return table_answer(engine, image)
    if route is Route.RECOGNITION:
        return recognition_answer(engine, image)
    return page_markdown_answer(engine, image)
