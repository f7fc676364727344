"""One image to one answer, per route: the glue between the OCR model and the protocol."""

from __future__ import annotations

import numpy as np

from mkg_pipeline.local_server import protocol
from mkg_pipeline.local_server.ocr import PAGE_MIN_LONG_SIDE, OcrEngine, unturn_box
from mkg_pipeline.local_server.protocol import Route

# np.rot90 k that set the page upright -> MinerU's angle (PIL's counter-clockwise rotate).
_ANGLE_OF_TURN = {0: 0, 1: 90, -1: 270}


def layout_answer(engine: OcrEngine, image: np.ndarray) -> str:
    """MinerU layout blocks from text detection; only page-number candidates are read."""
    height, width = image.shape[:2]
    reading = engine.detect(image)
    lines = reading.lines
    if not lines:
        return ""
    candidates = protocol.page_number_candidates(lines, reading.width, reading.height)
    if candidates:
        upright = np.ascontiguousarray(np.rot90(image, reading.turn)) if reading.turn else image
        read = {(line.x1, line.y1, line.x2, line.y2): line for line in engine.read_boxes(upright, candidates)}
        lines = [read.get((line.x1, line.y1, line.x2, line.y2), line) for line in lines]
    blocks = protocol.build_blocks(lines, protocol.body_height(lines))
    blocks = protocol.mark_page_numbers(blocks, reading.width, reading.height)
    pad_x, pad_y = protocol.layout_padding(lines)
    boxes = protocol.layout_boxes(blocks, pad_x=pad_x, pad_y=pad_y)
    if reading.turn:
        # Blocks were found on the page turned upright; MinerU crops the page as sent, then turns each crop.
        boxes = [unturn_box(box, reading.turn, reading.width, reading.height) for box in boxes]
    types = [block.type for block in blocks]
    return protocol.format_layout_boxes(boxes, types, width, height, _ANGLE_OF_TURN[reading.turn])


def recognition_answer(engine: OcrEngine, image: np.ndarray) -> str:
    """Text of a cropped block: rows joined with a space, paragraphs with a newline."""
    reading = engine.read(image)
    return protocol.lines_to_text(protocol.drop_edge_slivers(reading.lines, reading.width, reading.height))


def page_markdown_answer(engine: OcrEngine, image: np.ndarray) -> str:
    return protocol.lines_to_markdown(engine.read(image, min_long_side=PAGE_MIN_LONG_SIDE).lines)


def answer(route: Route, engine: OcrEngine, image: np.ndarray) -> str:
    if route is Route.LAYOUT:
        return layout_answer(engine, image)
    if route is Route.RECOGNITION:
        return recognition_answer(engine, image)
    return page_markdown_answer(engine, image)
