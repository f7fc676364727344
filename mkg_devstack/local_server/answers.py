"""One image to one answer, per route: the glue between the OCR model, the geometry and the formats."""

from __future__ import annotations

import statistics
from dataclasses import replace

import numpy as np

from mkg_devstack.local_server.blocks import (
    Block,
    BlockType,
    block_grid,
    blocks_to_markdown,
    build_page,
    edge_zone_lines,
    lines_to_text,
)
from mkg_devstack.local_server.geometry import OcrLine, body_height, drop_edge_slivers
from mkg_devstack.local_server.mineru_format import format_layout_boxes, format_table, layout_boxes, layout_padding
from mkg_devstack.local_server.ocr import PAGE_MIN_LONG_SIDE, OcrEngine, Reading, unturn_box
from mkg_devstack.local_server.olmocr_format import (
    OlmOcrPage,
    covered_share,
    figure_label,
    format_answer,
    primary_language,
    table_html,
)
from mkg_devstack.local_server.protocol import Route
from mkg_devstack.local_server.regions import find_regions, table_rules
from mkg_devstack.local_server.tables import table_grid

# np.rot90 k that set the page upright -> MinerU's angle (PIL's counter-clockwise rotate).
_ANGLE_OF_TURN = {0: 0, 1: 90, -1: 270}
TURNED_MIN_SCORE = 0.8  # median recognition score that makes a reading turned 180° believable
PAGE_NUMBER_MAX_WIDTH = 8.0  # edge-zone lines wider than this many body heights are not read in layout
#: olmOCR-2 leaves running headers, footers and page numbers out (olmOCR-bench tests that it does)
OLMOCR_FURNITURE = frozenset({BlockType.HEADER, BlockType.FOOTER, BlockType.PAGE_NUMBER})
OLMOCR_TABLE_SHARE = 0.5  # is_table: at least this share of the page's text lines are in tables
OLMOCR_DIAGRAM_SHARE = 0.5  # is_diagram: figures cover at least this share of the page
ORIENTATION_SAMPLE = 8  # text lines recognised per candidate orientation (the longest ones)
# Median line score above which flat lines are taken as upright without reading them upside down.
# Corpus pages read upright: 0.94-0.98; the same pages turned 180°: 0.54-0.63 (their few lines that
# pass the recogniser's threshold are garbage).
UPRIGHT_MIN_SCORE = 0.85


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


def _turn_line(line: OcrLine, k: int, width: float, height: float) -> OcrLine:
    """``line`` (a box of a ``width`` x ``height`` image) in ``np.rot90(image, k)``, lying flat."""
    x1, y1, x2, y2 = line.x1, line.y1, line.x2, line.y2
    if k == 1:  # np.rot90 k=1 moves (x, y) to (y, width - x)
        box = (y1, width - x2, y2, width - x1)
    elif k == 2:  # (x, y) to (width - x, height - y)
        box = (width - x2, height - y2, width - x1, height - y1)
    elif k == 3:  # (x, y) to (height - y, x)
        box = (height - y2, x1, height - y1, x2)
    else:
        box = (x1, y1, x2, y2)
    return replace(line, x1=box[0], y1=box[1], x2=box[2], y2=box[3], vertical=False)


def _mean_score(engine: OcrEngine, image: np.ndarray, lines: list[OcrLine]) -> float:
    read = engine.read_boxes(np.ascontiguousarray(image), lines)
    return sum(line.score for line in read) / len(read) if read else 0.0


def extra_turn(engine: OcrEngine, image: np.ndarray, reading: Reading) -> int:
    """The ``np.rot90`` k (0..3) that still sets upright a page read as ``reading`` (in its own frame).

    The reading says how its lines lie: flat (the page is upright or upside down) or on their side
    (turned 90° one way or the other; the detector itself only turns pages with many vertical lines).
    Which of the two is right is decided by reading the ``ORIENTATION_SAMPLE`` longest lines both
    ways: text the right way up scores high, upside down it scores low. Cost: at most 2 x 8 line
    recognitions, a small part of reading the page, and none for flat lines that already read well
    (median score at least ``UPRIGHT_MIN_SCORE``): most pages.
    """
    if not reading.lines:
        return 0
    frame = np.rot90(image, reading.turn) if reading.turn else image
    height, width = frame.shape[:2]
    vertical = sum(line.vertical for line in reading.lines)
    sideways = vertical > len(reading.lines) - vertical
    if not sideways and statistics.median(line.score for line in reading.lines) >= UPRIGHT_MIN_SCORE:
        return 0
    sample = sorted(
        (line for line in reading.lines if line.vertical == sideways),
        key=lambda line: max(line.width, line.height),
        reverse=True,
    )[:ORIENTATION_SAMPLE]
    candidates = (1, 3) if sideways else (0, 2)
    scores = {
        k: _mean_score(engine, np.rot90(frame, k), [_turn_line(line, k, width, height) for line in sample])
        for k in candidates
    }
    return max(candidates, key=lambda k: scores[k])


def _olmocr_markdown(blocks: list[Block], *, label_figures: bool) -> str:
    """olmOCR-2's page text: furniture left out, tables as HTML, figures as its pixel labels."""
    parts: list[str] = []
    for block in blocks:
        if block.type in OLMOCR_FURNITURE:
            continue
        if block.type is BlockType.IMAGE:
            if label_figures:
                parts.append(figure_label(block.x1, block.y1, block.x2, block.y2))
            continue
        if block.type is BlockType.TABLE:
            table = table_html(block_grid(block))
            if table:
                parts.append(table)
            continue
        text = block.text.strip()
        if text:
            parts.append(f"{'#' * block.level} {text}" if block.level else text)
    return "\n\n".join(parts)


def olmocr_answer(engine: OcrEngine, image: np.ndarray) -> str:
    """The page in olmOCR-2's format (``olmocr_format``), with the rotation the OCR found.

    The rotation is what reading the page finds (the detector turns pages with many vertical lines,
    :func:`_read_either_way` pages that read as nothing), completed by :func:`extra_turn` (a few
    lines read both ways); only a page found turned that way is read a second time, upright. A page
    that needed turning answers ``is_rotation_valid: False`` with the turn, and still its text, as
    olmOCR-2 does (it was trained on turned pages labelled with the upright text); figure labels are
    only given for an upright page, since their pixels are of the image as sent.
    """
    read, reading = _read_either_way(engine, image, min_long_side=PAGE_MIN_LONG_SIDE)
    k = (reading.turn + (2 if read is not image else 0)) % 4
    extra = extra_turn(engine, read, reading)
    if extra:
        k = (k + extra) % 4
        reading = engine.read(np.ascontiguousarray(np.rot90(image, k)), min_long_side=PAGE_MIN_LONG_SIDE)
        read = np.ascontiguousarray(np.rot90(image, k))
        k = (k + reading.turn) % 4
    correction = 90 * k
    if not reading.lines:
        return format_answer(OlmOcrPage(text="", rotation_correction=correction))
    regions = find_regions(_upright(read, reading), reading.lines)
    blocks = build_page(reading.lines, height=reading.height, visuals=regions.visuals, rules=regions.rules)
    text = _olmocr_markdown(blocks, label_figures=correction == 0)
    in_tables = sum(len(block.lines) for block in blocks if block.type is BlockType.TABLE)
    figures = [(b.x1, b.y1, b.x2, b.y2) for b in blocks if b.type is BlockType.IMAGE]
    page = OlmOcrPage(
        text=text,
        primary_language=primary_language(text),
        rotation_correction=correction,
        is_table=in_tables >= OLMOCR_TABLE_SHARE * len(reading.lines),
        is_diagram=covered_share(figures, reading.width, reading.height) >= OLMOCR_DIAGRAM_SHARE,
    )
    return format_answer(page)


def answer(route: Route, engine: OcrEngine, image: np.ndarray) -> str:
    if route is Route.LAYOUT:
        return layout_answer(engine, image)
    if route is Route.TABLE:
        return table_answer(engine, image)
    if route is Route.RECOGNITION:
        return recognition_answer(engine, image)
    if route is Route.OLMOCR:
        return olmocr_answer(engine, image)
    return page_markdown_answer(engine, image)
