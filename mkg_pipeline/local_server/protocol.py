"""What the local server says, as pure functions: no model, no numpy, no I/O.

- parsing an OpenAI chat-completions body the way vLLM accepts it;
- routing by prompt (MinerU's ``Layout Detection:`` / ``… Recognition:`` or a
  plain page-to-Markdown request);
- turning OCR lines (boxes with text) into reading order, paragraphs and
  headings, then into Markdown, plain recognition text, or MinerU's layout
  answer (``<|box_start|>x1 y1 x2 y2<|box_end|><|ref_start|>type<|ref_end|>…``).

Coordinates are pixels of the image the server received, origin top-left.
"""

from __future__ import annotations

import base64
import binascii
import enum
import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

# --------------------------------------------------------------------------- routing

LAYOUT_MARKER = "Layout Detection:"
RECOGNITION_MARKERS = ("Text Recognition:", "Table Recognition:", "Formula Recognition:", "Image Analysis:")


class Route(enum.StrEnum):
    LAYOUT = "layout"
    RECOGNITION = "recognition"
    PAGE_MARKDOWN = "page_markdown"


def route_for_prompt(prompt: str | None) -> Route:
    """MinerU's two-step prompts are recognised by their markers; anything else is a page."""
    text = prompt or ""
    if LAYOUT_MARKER in text:
        return Route.LAYOUT
    if any(marker in text for marker in RECOGNITION_MARKERS):
        return Route.RECOGNITION
    return Route.PAGE_MARKDOWN


# --------------------------------------------------------------------------- request parsing


class RequestError(ValueError):
    """A request vLLM would refuse with 400; the message goes back to the client."""


@dataclass(frozen=True)
class ChatRequest:
    model: str | None
    prompt: str
    """The last text part of the last user message: what routing looks at."""
    text_chars: int
    """All text in all messages, for the prompt-token estimate."""
    image_urls: tuple[str, ...]
    max_tokens: int | None
    stream: bool = False
    include_usage: bool = False


def _positive_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(f"{key} must be a positive integer, got {value!r}")
    return value


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate an OpenAI chat body as vLLM does; unknown sampling fields are ignored."""
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model must be a string")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list")

    text_chars = 0
    image_urls: list[str] = []
    last_user_text: str | None = None
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(f"messages[{index}] must be an object with a string role")
        content = message.get("content")
        texts: list[str] = []
        if content is None:
            pass
        elif isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for part_index, part in enumerate(content):
                where = f"messages[{index}].content[{part_index}]"
                if not isinstance(part, dict):
                    raise RequestError(f"{where} must be an object")
                kind = part.get("type")
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise RequestError(f"{where}.text must be a string")
                    texts.append(part["text"])
                elif kind == "image_url":
                    image_url = part.get("image_url")
                    # OpenAI nests {"url": ...}; vLLM also takes a bare string.
                    url = image_url.get("url") if isinstance(image_url, dict) else image_url
                    if not isinstance(url, str) or not url:
                        raise RequestError(f"{where}.image_url.url must be a non-empty string")
                    image_urls.append(url)
                else:
                    raise RequestError(f"{where}: unsupported content part type {kind!r}")
        else:
            raise RequestError(f"messages[{index}].content must be a string or a list of parts")
        text_chars += sum(len(text) for text in texts)
        if message["role"] == "user" and texts:
            last_user_text = texts[-1]

    max_completion_tokens = _positive_int(body, "max_completion_tokens")
    max_tokens = _positive_int(body, "max_tokens")
    stream_options = body.get("stream_options")
    include_usage = bool(isinstance(stream_options, dict) and stream_options.get("include_usage"))
    return ChatRequest(
        model=model,
        prompt=last_user_text or "",
        text_chars=text_chars,
        image_urls=tuple(image_urls),
        # vLLM prefers the newer field when both are given.
        max_tokens=max_completion_tokens if max_completion_tokens is not None else max_tokens,
        stream=bool(body.get("stream", False)),
        include_usage=include_usage,
    )


_DATA_URL_RE = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^,;]*)*),(?P<data>.*)$", re.DOTALL)


def decode_data_url(url: str) -> bytes:
    """The bytes of a ``data:image/...;base64,`` URL (the only kind an offline server can read)."""
    match = _DATA_URL_RE.match(url)
    if match is None:
        raise RequestError("only data: URLs are supported for images (data:image/png;base64,...)")
    mime = (match.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise RequestError(f"data URL has media type {mime!r}, expected an image")
    if ";base64" not in match.group("params").lower():
        raise RequestError("image data URL must be base64-encoded")
    try:
        data = base64.b64decode(re.sub(r"\s+", "", match.group("data")), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"image data URL is not valid base64: {exc}") from None
    if not data:
        raise RequestError("image data URL is empty")
    return data


# --------------------------------------------------------------------------- tokens


def estimate_text_tokens(chars: int) -> int:
    """About four characters per token: good enough for counters and max_tokens."""
    return math.ceil(chars / 4)


def estimate_image_tokens(width: int, height: int) -> int:
    """Qwen2.5-VL spends one token per 28x28 pixel patch (14 px patches merged 2x2)."""
    return max(1, math.ceil(width / 28) * math.ceil(height / 28))


def truncate_to_tokens(text: str, max_tokens: int | None) -> tuple[str, str]:
    """(content, finish_reason): cut at ``max_tokens`` (about 4 chars each) like a length stop."""
    if max_tokens is not None and estimate_text_tokens(len(text)) > max_tokens:
        return text[: max_tokens * 4], "length"
    return text, "stop"


# --------------------------------------------------------------------------- OCR geometry


@dataclass(frozen=True)
class OcrLine:
    """One detected text line: an axis-aligned box in image pixels, with its text if recognised."""

    x1: float
    y1: float
    x2: float
    y2: float
    text: str = ""
    score: float = 1.0
    vertical: bool = False
    """Text running top-down or bottom-up (a rotated margin stamp, a table header on its side)."""

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def cy(self) -> float:
        return (self.y1 + self.y2) / 2


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


class BlockType(enum.StrEnum):
    TEXT = "text"
    TITLE = "title"
    PAGE_NUMBER = "page_number"


@dataclass
class Block:
    """A paragraph or a heading: consecutive rows of one column."""

    type: BlockType
    rows: list[Row] = field(default_factory=list)
    level: int = 0
    """Heading level (1 or 2) for titles, 0 otherwise."""

    @property
    def x1(self) -> float:
        return min(row.x1 for row in self.rows)

    @property
    def x2(self) -> float:
        return max(row.x2 for row in self.rows)

    @property
    def y1(self) -> float:
        return min(row.y1 for row in self.rows)

    @property
    def y2(self) -> float:
        return max(row.y2 for row in self.rows)

    @property
    def text(self) -> str:
        return " ".join(row.text for row in self.rows if row.text)


# Thresholds, as fractions of the body text's median row height (det boxes: glyph extent).
ROW_OVERLAP = 0.5  # vertical overlap (of the smaller height) for two boxes to share a row
PARAGRAPH_GAP = 0.6  # a blank gap taller than this starts a new paragraph
INDENT = 0.6  # a first line indented by more than this starts a new paragraph
HEADING_RATIO = 1.3  # a row whose type is this much larger than body text is a heading…
HEADING_1_RATIO = 1.75  # …and a level-1 heading from here up
HEADING_MAX_CHARS = 200  # longer "headings" are large-print paragraphs
EDGE_BAND = 0.07  # page-number candidates live in the top/bottom 7% of the page
_DASHES = "-\u2013\u2014"
_PAGE_NUMBER_RE = re.compile(rf"^(?:[{_DASHES}]\s*)?(?:\d{{1,4}}|[ivx]{{1,5}})(?:\s*[{_DASHES}])?$", re.IGNORECASE)


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


def crosses(line: OcrLine, x: float, tolerance: float) -> bool:
    return line.x1 < x - tolerance and line.x2 > x + tolerance


def find_gutter(lines: Sequence[OcrLine]) -> float | None:
    """The x of a clear vertical gutter between two text columns, or None for one column.

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
    gutter = (xs[first] + xs[last]) / 2
    columns = [line for line in lines if not crosses(line, gutter, tolerance)]
    left = [line for line in columns if (line.x1 + line.x2) / 2 < gutter]
    right = [line for line in columns if (line.x1 + line.x2) / 2 >= gutter]
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


def reading_order_regions(lines: Sequence[OcrLine]) -> list[list[OcrLine]]:
    """Split lines into regions read one after another.

    One column: a single region. Two columns: lines crossing the gutter cut
    the page into horizontal bands; each band reads its left column, then its
    right column, and the crossing lines stay where they are. Vertical lines
    come last, one region each.
    """
    # Rotated text (margin stamps, sideways labels) would interleave with the rows it sits
    # beside; it is read last, each line on its own.
    sideways = sorted((line for line in lines if line.vertical), key=lambda line: (line.x1, line.y1))
    lines = [line for line in lines if not line.vertical]
    return [*_horizontal_regions(lines), *([line] for line in sideways)]


def _horizontal_regions(lines: Sequence[OcrLine]) -> list[list[OcrLine]]:
    gutter = find_gutter(lines)
    if gutter is None:
        return [list(lines)] if lines else []
    tolerance = gutter_tolerance(lines)
    spanning = sorted((line for line in lines if crosses(line, gutter, tolerance)), key=lambda line: line.cy)
    columns = [line for line in lines if not crosses(line, gutter, tolerance)]

    def split(band: list[OcrLine]) -> list[list[OcrLine]]:
        left = [line for line in band if (line.x1 + line.x2) / 2 < gutter]
        return [left, [line for line in band if (line.x1 + line.x2) / 2 >= gutter]]

    regions: list[list[OcrLine]] = []
    previous_y = -math.inf
    index = 0
    while index < len(spanning):
        # Consecutive spanning lines with no column text between them form one region.
        group = [spanning[index]]
        while index + 1 < len(spanning) and not any(
            group[-1].cy <= line.cy < spanning[index + 1].cy for line in columns
        ):
            index += 1
            group.append(spanning[index])
        regions += split([line for line in columns if previous_y <= line.cy < group[0].cy])
        regions.append(group)
        previous_y = group[-1].cy
        index += 1
    regions += split([line for line in columns if line.cy >= previous_y])
    return [region for region in regions if region]


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
class _SizeScale:
    by_text: bool
    body: float

    @classmethod
    def of(cls, rows: Sequence[Row]) -> _SizeScale:
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


def _starts_block(row: Row, previous: Row, current: Block, kind: BlockType, level: int, body: float) -> bool:
    if kind != current.type or level != current.level:
        return True  # text size changed: heading after body text or the reverse
    if row.y1 - previous.y2 > PARAGRAPH_GAP * body:
        return True  # blank gap
    indented = row.x1 - previous.x1 > INDENT * body and row.x1 - current.x1 > INDENT * body
    return kind == BlockType.TEXT and indented


def build_blocks(lines: Sequence[OcrLine], body: float | None = None) -> list[Block]:
    """Paragraphs and headings in reading order.

    A new paragraph starts at a blank gap, at an indented first line, or where
    the text size changes between body text and a heading. ``body`` is the
    body text row height; by default the median row height of ``lines``.
    """
    if not lines:
        return []
    body = body if body is not None else body_height(lines)
    regions = [group_rows(region) for region in reading_order_regions(lines)]
    scale = _SizeScale.of([row for rows in regions for row in rows if not any(line.vertical for line in row.lines)])
    blocks: list[Block] = []
    for rows in regions:
        current: Block | None = None
        previous: Row | None = None
        if any(line.vertical for row in rows for line in row.lines):
            blocks.extend(Block(type=BlockType.TEXT, rows=[row]) for row in rows)
            continue
        for row in rows:
            level = scale.heading_level(row)
            kind = BlockType.TITLE if level else BlockType.TEXT
            new_block = current is None or previous is None or _starts_block(row, previous, current, kind, level, body)
            if new_block:
                current = Block(type=kind, level=level)
                blocks.append(current)
            assert current is not None
            current.rows.append(row)
            previous = row
    return blocks


def page_number_candidates(lines: Sequence[OcrLine], width: float, height: float) -> list[OcrLine]:
    """Short, isolated lines in the top or bottom band: only these need text to be typed."""
    if not lines or height <= 0:
        return []
    body = body_height(lines)
    candidates = []
    for line in lines:
        in_band = line.y2 <= height * EDGE_BAND or line.y1 >= height * (1 - EDGE_BAND)
        if in_band and line.width <= max(4 * body, 0.08 * width):
            candidates.append(line)
    return candidates


def mark_page_numbers(blocks: list[Block], width: float, height: float) -> list[Block]:
    """Type as page_number the one-row blocks in the page's edge bands whose text is a number.

    Conservative on purpose: running heads and footers stay ``text``, so
    nothing is dropped by clients that discard paratext.
    """
    marked = []
    for block in blocks:
        in_band = block.y2 <= height * EDGE_BAND or block.y1 >= height * (1 - EDGE_BAND)
        # Every piece must have been read: "1/34" beside an unread URL is not a page-number block.
        all_read = all(line.text for row in block.rows for line in row.lines)
        if in_band and len(block.rows) == 1 and all_read and _PAGE_NUMBER_RE.match(block.text.strip()):
            block = replace(block, type=BlockType.PAGE_NUMBER, level=0)
        marked.append(block)
    return marked


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


# --------------------------------------------------------------------------- answers


def blocks_to_markdown(blocks: Sequence[Block]) -> str:
    """Paragraphs separated by a blank line; titles as ``#``/``##`` headings."""
    parts = []
    for block in blocks:
        text = block.text.strip()
        if not text:
            continue
        if block.type == BlockType.TITLE:
            parts.append(f"{'#' * max(1, block.level)} {text}")
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


ANGLE_TOKENS = {0: "<|rotate_up|>", 90: "<|rotate_right|>", 180: "<|rotate_down|>", 270: "<|rotate_left|>"}
"""MinerU's rotation tokens: the counter-clockwise turn (PIL ``rotate``) that sets the crop upright."""

Box = tuple[float, float, float, float]


def layout_boxes(blocks: Sequence[Block], *, pad_x: float = 0.0, pad_y: float = 0.0) -> list[Box]:
    """Block boxes padded (pixels) so that a crop holds the whole glyphs, but not into a neighbour."""
    boxes = [[block.x1 - pad_x, block.y1 - pad_y, block.x2 + pad_x, block.y2 + pad_y] for block in blocks]
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


def layout_padding(lines: Sequence[OcrLine]) -> tuple[float, float]:
    """Padding (x, y) in pixels around layout blocks: a fraction of the body line height."""
    body = body_height(lines)
    return max(2.0, 0.5 * body), max(1.0, 0.2 * body)
