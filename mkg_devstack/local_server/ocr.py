"""Image decoding and the OCR model (RapidOCR's PP-OCRv4 ONNX det/rec models).

The model is imported and built only by :class:`EnginePool` at server start,
so importing this module stays cheap. RapidOCR's own pipeline is not used as
is: its angle classifier flips some upright English lines (they come back as
garbage with a 0.5 score) and its tight crops lose spaces between words. We
use its detector and recogniser directly, with padded crops and no classifier
except for vertical lines, whose direction is genuinely unknown.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import queue
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from mkg_devstack.local_server.geometry import OcrLine, find_gutter, gutter_tolerance

log = logging.getLogger(__name__)

MAX_IMAGE_PIXELS = 50_000_000  # larger is a mistake or a decompression bomb, not a page
DET_MAX_SIDE = 2000  # the detector works on at most this many pixels per side (downscaled, never upscaled)
MIN_SIDE = 32  # images smaller than this are upscaled before detection
MIN_USEFUL_SIDE = 12  # below this no glyph can be drawn legibly: answer empty text at once
BORDER = 16  # white border so glyphs touching a crop's edge are still detected
REC_MIN_SCORE = 0.5  # RapidOCR's own text_score: below it a line is noise
MIN_ADVANCE = 0.15  # a "line" narrower than this many line heights per character is a sliver, not text
CROP_PAD_Y = 0.15  # padding of a line crop, as a fraction of its height (spaces survive)
CROP_PAD_X = 0.3
SLIVER = 0.5  # a piece split off a line narrower than this many line heights is dropped
SPLIT_GAP = 1.2  # a blank run this many line-heights wide inside one detected line splits it
SMALL_TEXT = 12  # text lines thinner than this many pixels are enlarged and detected again…
TARGET_TEXT = 24  # …to about this thickness
MAX_ENLARGE = 4.0
PAGE_MIN_LONG_SIDE = 1600  # whole pages are read at least this large (about 140 DPI for A4)


class ImageDecodeError(ValueError):
    """The image bytes are not an image we can read (answered with 400)."""


def decode_image(data: bytes) -> np.ndarray:
    """PNG/JPEG/... bytes to an RGB uint8 array; transparent areas become white."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width < 1 or height < 1:
                raise ImageDecodeError(f"image has no pixels ({width}x{height})")
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageDecodeError(f"image too large: {width}x{height} pixels (max {MAX_IMAGE_PIXELS})")
            image.load()  # decode now: a truncated file fails here, not inside the model
            if image.mode in ("RGBA", "LA", "P", "PA") or "transparency" in image.info:
                rgba = image.convert("RGBA")
                canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                canvas.alpha_composite(rgba)
                rgb = canvas.convert("RGB")
            else:
                rgb = image.convert("RGB")
            return np.asarray(rgb, dtype=np.uint8)
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"cannot decode image: {exc}") from None


def _order_quad(points: np.ndarray) -> np.ndarray:
    """Top-left, top-right, bottom-right, bottom-left."""
    by_x = points[np.argsort(points[:, 0])]
    left, right = by_x[:2], by_x[2:]
    top_left, bottom_left = left[np.argsort(left[:, 1])]
    top_right, bottom_right = right[np.argsort(right[:, 1])]
    return np.array([top_left, top_right, bottom_right, bottom_left], dtype=np.float32)


def _quad_size(quad: np.ndarray) -> tuple[float, float]:
    top_left, top_right, bottom_right, bottom_left = quad
    width = float(max(np.linalg.norm(top_right - top_left), np.linalg.norm(bottom_right - bottom_left)))
    height = float(max(np.linalg.norm(bottom_left - top_left), np.linalg.norm(bottom_right - top_right)))
    return width, height


def _vertical_flags(quads: Sequence[np.ndarray]) -> list[bool]:
    """Which lines run vertically: much taller than wide, and taller than a few text lines are thick.

    RapidOCR turns every box with height >= 1.5 x width; that also turns a lone
    "1" (a page number) on its side and reads garbage. A genuinely vertical
    line is also long compared with the page's typical line thickness.
    """
    if not quads:
        return []
    sizes = [_quad_size(quad) for quad in quads]
    thickness = float(np.median([min(width, height) for width, height in sizes]))
    return [height >= 1.5 * width and height >= 2.5 * thickness for width, height in sizes]


def _blank_runs(gray: np.ndarray, quad: np.ndarray) -> tuple[int, int, list[tuple[int, int]]]:
    """(left x, line height, blank column runs relative to left x) of an upright line box."""
    x1, y1 = np.floor(quad.min(axis=0)).astype(int)
    x2, y2 = np.ceil(quad.max(axis=0)).astype(int)
    x1, y1 = max(0, int(x1)), max(0, int(y1))
    height = int(y2) - y1
    if height < 4:
        return x1, height, []
    # The middle of the line only: neighbouring lines' ascenders and descenders must not fill gaps.
    band = gray[y1 + height // 4 : int(y2) - height // 4, x1 : int(x2)]
    if band.size == 0:
        return x1, height, []
    low, high = int(band.min()), int(band.max())
    if high - low < 60:  # no contrast: nothing to measure
        return x1, height, []
    ink = (band < (low + high) / 2).any(axis=0)
    runs: list[tuple[int, int]] = []
    start: int | None = None
    seen_ink = False
    for x, has_ink in enumerate(ink):
        if has_ink:
            if start is not None and seen_ink:
                runs.append((start, x))
            start, seen_ink = None, True
        elif start is None:
            start = x
    return x1, height, runs  # a trailing run (no ink after it) is margin, not a gap


def _split_quad(quad: np.ndarray, cuts: Sequence[tuple[int, int]], left: int) -> list[np.ndarray]:
    y1, y2 = float(quad[:, 1].min()), float(quad[:, 1].max())
    edges = [float(quad[:, 0].min()), *(value for cut in cuts for value in (left + cut[0], left + cut[1]))]
    edges.append(float(quad[:, 0].max()))
    return [
        np.array([[a, y1], [b, y1], [b, y2], [a, y2]], dtype=np.float32)
        for a, b in zip(edges[::2], edges[1::2], strict=True)
        if b - a >= 2
    ]


def _split_at_gaps(
    gray: np.ndarray, quad: np.ndarray, gutter: float | None, tolerance: float = 0.0
) -> list[np.ndarray]:
    """Split an upright line box where the detector bridged a blank: a column gutter or a table gap.

    Any blank run wider than ``SPLIT_GAP`` line heights splits the line; a
    line crossing the page's column ``gutter`` is also split at the blank run
    nearest the gutter, however narrow (LaTeX gutters are under one line height).
    """
    left, height, runs = _blank_runs(gray, quad)
    if not runs:
        return [quad]
    cuts = [run for run in runs if run[1] - run[0] >= max(SPLIT_GAP * height, 8)]
    x1, x2 = float(quad[:, 0].min()), float(quad[:, 0].max())
    # Lines reaching into the gutter band, not only across it: a box of the right column may start with
    # the last glyph of its left neighbour (and read "1e eros" for "eros").
    if gutter is not None and x1 < gutter + tolerance and x2 > gutter - tolerance:
        # Only a blank clearly wider than this line's word spaces: a title that spans both
        # columns has an ordinary word space near the gutter and must stay whole.
        word_gaps = [run[1] - run[0] for run in runs if run[1] - run[0] >= 0.2 * height]
        typical = float(np.median(word_gaps)) if word_gaps else 0.0
        near = [
            run
            for run in runs
            if run[1] - run[0] >= max(0.4 * height, 1.6 * typical, 4)
            and left + run[0] - height <= gutter <= left + run[1] + height
        ]
        if near:
            closest = min(near, key=lambda run: abs(left + (run[0] + run[1]) / 2 - gutter))
            cuts = sorted({*cuts, closest})
            pieces = _split_quad(quad, cuts, left)
            # An end piece cut off at the gutter and narrower than a glyph is a neighbour's sliver.
            sliver = SLIVER * height
            return [
                piece
                for index, piece in enumerate(pieces)
                if not (
                    float(piece[:, 0].max() - piece[:, 0].min()) < sliver
                    and (
                        (index == 0 and piece[:, 0].max() == left + closest[0])
                        or (index == len(pieces) - 1 and piece[:, 0].min() == left + closest[1])
                    )
                )
            ]
    return _split_quad(quad, cuts, left) if cuts else [quad]


def _padded_crop(image: np.ndarray, quad: np.ndarray, vertical: bool) -> np.ndarray:
    """The line's quad, grown along its own axes, warped upright (vertical lines turned)."""
    import cv2

    top_left, top_right, bottom_right, bottom_left = quad
    width, height = _quad_size(quad)
    if width < 1 or height < 1:
        return np.zeros((0, 0, 3), np.uint8)
    across = width if vertical else height  # the text line's thickness
    unit_x = (top_right - top_left) / max(np.linalg.norm(top_right - top_left), 1e-6)
    unit_y = (bottom_left - top_left) / max(np.linalg.norm(bottom_left - top_left), 1e-6)
    pad_along, pad_across = CROP_PAD_X * across, CROP_PAD_Y * across
    if vertical:
        grow_x, grow_y = unit_x * pad_across, unit_y * pad_along
    else:
        grow_x, grow_y = unit_x * pad_along, unit_y * pad_across
    source = np.array(
        [
            top_left - grow_x - grow_y,
            top_right + grow_x - grow_y,
            bottom_right + grow_x + grow_y,
            bottom_left - grow_x + grow_y,
        ],
        dtype=np.float32,
    )
    out_w = max(1, round(width + 2 * float(np.linalg.norm(grow_x))))
    out_h = max(1, round(height + 2 * float(np.linalg.norm(grow_y))))
    target = np.array([[0, 0], [out_w, 0], [out_w, out_h], [0, out_h]], dtype=np.float32)
    matrix = cv2.getPerspectiveTransform(source, target)
    crop = cv2.warpPerspective(
        image,
        matrix,
        (out_w, out_h),
        flags=cv2.INTER_CUBIC,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(255, 255, 255),
    )
    if vertical:
        crop = np.ascontiguousarray(np.rot90(crop))
    return crop


@dataclass(frozen=True)
class Reading:
    """Lines of one image, in the frame of ``np.rot90(image, turn)`` (upright text)."""

    lines: list[OcrLine]
    turn: int = 0
    """np.rot90 k that made the text upright: 0, 1 (turned 90° counter-clockwise) or -1 (clockwise)."""
    width: int = 0
    height: int = 0


@dataclass
class _Work:
    bgr: np.ndarray
    scale: float
    quads: list[np.ndarray]
    flags: list[bool]


class OcrEngine:
    """One RapidOCR model set. Not thread-safe (its detector keeps per-call state): one per worker."""

    def __init__(self, threads: int) -> None:
        from rapidocr_onnxruntime import RapidOCR  # heavy (onnxruntime, cv2): only when a server starts

        self._ocr: Any = RapidOCR(
            intra_op_num_threads=threads,
            inter_op_num_threads=1,
            det_limit_type="max",
            det_limit_side_len=DET_MAX_SIDE,
        )

    # -- public API

    def detect(self, rgb: np.ndarray) -> Reading:
        """Text line boxes (no text) of the upright page; see :class:`Reading` for the frame."""
        return self._analyse(rgb, recognise=False)

    def read(self, rgb: np.ndarray, *, min_long_side: int = 0) -> Reading:
        """Detected and recognised lines of the upright page; noise (low score, empty text) left out.

        ``min_long_side``: enlarge smaller images to this long side first (a small page
        rendered at 150 DPI has type too small to read; enlarged, most of it reads).
        """
        return self._analyse(rgb, recognise=True, min_long_side=min_long_side)

    def read_boxes(self, rgb: np.ndarray, boxes: Sequence[OcrLine]) -> list[OcrLine]:
        """Recognise given boxes of ``rgb`` (upright); unreadable ones come back with empty text."""
        work = self._prepare(rgb)
        if work is None or not boxes:
            return [replace(box, text="", score=0.0) for box in boxes]
        quads = [
            np.array(
                [[x * work.scale + BORDER, y * work.scale + BORDER] for x, y in corners],
                dtype=np.float32,
            )
            for corners in (((b.x1, b.y1), (b.x2, b.y1), (b.x2, b.y2), (b.x1, b.y2)) for b in boxes)
        ]
        out = []
        recognised = self._recognise(work.bgr, quads, [box.vertical for box in boxes])
        for box, (text, score) in zip(boxes, recognised, strict=True):
            readable = score >= REC_MIN_SCORE and text.strip()
            out.append(replace(box, text=text.strip() if readable else "", score=score))
        return out

    # -- steps

    def _analyse(self, rgb: np.ndarray, *, recognise: bool, may_turn: bool = True, min_long_side: int = 0) -> Reading:
        height, width = rgb.shape[:2]
        enlarge = min(MAX_ENLARGE, min_long_side / max(height, width, 1))
        work = self._prepare(rgb, enlarge if enlarge >= 1.3 else 1.0)  # a few percent more only costs time
        if work is None:
            return Reading([], 0, width, height)
        work = self._detect(work, rgb)
        thickness = _median_thickness(work.quads)
        if work.quads and thickness < SMALL_TEXT:
            # Small type (a book page rendered small, MinerU's squashed layout image): the detector
            # and the recogniser both do better on enlarged text; bounded by the detector's input size.
            factor = min(TARGET_TEXT / max(thickness, 1.0), DET_MAX_SIDE / max(work.bgr.shape[:2]), MAX_ENLARGE)
            if factor >= 1.3:
                enlarged = self._prepare(rgb, work.scale * factor)
                if enlarged is not None:
                    work = self._detect(enlarged, rgb)
        if may_turn and _mostly_vertical(work.quads, work.flags):
            # A page on its side: turn it upright and start again, so that rows, columns and
            # paragraphs are found as on any page.
            turn = self._turn_direction(work)
            turned = np.ascontiguousarray(np.rot90(rgb, turn))
            reading = self._analyse(turned, recognise=recognise, may_turn=False, min_long_side=min_long_side)
            return Reading(reading.lines, turn, reading.width, reading.height)
        if not recognise:
            lines = [
                _to_line(quad, work.scale, rgb.shape, vertical=flag)
                for quad, flag in zip(work.quads, work.flags, strict=True)
            ]
            return Reading(lines, 0, width, height)
        lines = []
        recognised = self._recognise(work.bgr, work.quads, work.flags)
        for quad, flag, (text, score) in zip(work.quads, work.flags, recognised, strict=True):
            if score >= REC_MIN_SCORE and _plausible(quad, text.strip(), flag):
                lines.append(_to_line(quad, work.scale, rgb.shape, text.strip(), score, flag))
        return Reading(lines, 0, width, height)

    def _prepare(self, rgb: np.ndarray, scale: float = 1.0) -> _Work | None:
        """BGR working image at ``scale`` with a white border; None if too small to hold text."""
        import cv2

        height, width = rgb.shape[:2]
        if min(height, width) < MIN_USEFUL_SIDE:
            return None
        # Tiny crops (a formula, one short word) read better enlarged; keep the long side bounded.
        scale = max(scale, MIN_SIDE / min(height, width))
        scale = max(1.0, min(scale, DET_MAX_SIDE / max(height, width)))
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        if scale > 1.0:
            bgr = cv2.resize(bgr, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_CUBIC)
        bgr = cv2.copyMakeBorder(bgr, BORDER, BORDER, BORDER, BORDER, cv2.BORDER_CONSTANT, value=(255, 255, 255))
        return _Work(bgr, scale, [], [])

    def _detect(self, work: _Work, rgb: np.ndarray) -> _Work:
        """Line quads and their vertical flags; upright lines split at gutter-wide gaps."""
        import cv2

        boxes, _elapsed = self._ocr.text_det(work.bgr)
        if boxes is None or len(boxes) == 0:
            return _Work(work.bgr, work.scale, [], [])
        quads = [_order_quad(np.asarray(box, dtype=np.float32)) for box in boxes]
        flags = _vertical_flags(quads)
        gray = cv2.cvtColor(work.bgr, cv2.COLOR_BGR2GRAY)
        upright = [
            OcrLine(float(q[:, 0].min()), float(q[:, 1].min()), float(q[:, 0].max()), float(q[:, 1].max()))
            for q, vertical in zip(quads, flags, strict=True)
            if not vertical
        ]
        found = find_gutter(upright)
        gutter, tolerance = (found.x if found else None), gutter_tolerance(upright)
        out_quads: list[np.ndarray] = []
        out_flags: list[bool] = []
        for quad, vertical in zip(quads, flags, strict=True):
            pieces = [quad] if vertical else _split_at_gaps(gray, quad, gutter, tolerance)
            out_quads.extend(pieces)
            out_flags.extend([vertical] * len(pieces))
        return _Work(work.bgr, work.scale, out_quads, out_flags)

    def _turn_direction(self, work: _Work) -> int:
        """np.rot90 k (1 or -1) that sets a sideways page upright, by majority of the angle classifier."""
        sample = [quad for quad, flag in zip(work.quads, work.flags, strict=True) if flag][:12]
        # _padded_crop turns vertical lines counter-clockwise (k=1); "180" means the other way was right.
        crops = [_padded_crop(work.bgr, quad, True) for quad in sample]
        _turned, labels, _elapsed = self._ocr.text_cls([crop for crop in crops if crop.size > 0])
        flipped = sum(1 for label, _score in labels if str(label) == "180")
        return -1 if flipped * 2 > len(labels) else 1

    def _recognise(
        self, bgr: np.ndarray, quads: Sequence[np.ndarray], flags: Sequence[bool]
    ) -> list[tuple[str, float]]:
        crops = [_padded_crop(bgr, quad, vertical) for quad, vertical in zip(quads, flags, strict=True)]
        vertical = [index for index, flag in enumerate(flags) if flag and crops[index].size > 0]
        results: list[tuple[str, float]] = [("", 0.0)] * len(crops)
        valid = [index for index, crop in enumerate(crops) if crop.size > 0]
        if vertical:
            # A vertical line may read top-down or bottom-up; only here is the 180° classifier useful.
            turned, _cls, _elapsed = self._ocr.text_cls([crops[index] for index in vertical])
            for index, crop in zip(vertical, turned, strict=True):
                crops[index] = crop
        if valid:
            recognised, _elapsed = self._ocr.text_rec([crops[index] for index in valid])
            for index, (text, score) in zip(valid, recognised, strict=True):
                results[index] = (str(text), float(score))
        return results


def _plausible(quad: np.ndarray, text: str, vertical: bool) -> bool:
    """Text that fits its box: a glyph is at least ``MIN_ADVANCE`` line heights wide.

    Splitting a line at a gutter can leave a sliver of the next column's first
    glyph; the recogniser still reads a letter or two into it ("N", "Se").
    """
    if not text:
        return False
    width, height = _quad_size(quad)
    along, across = (height, width) if vertical else (width, height)
    return along >= MIN_ADVANCE * across * len(text)


def _median_thickness(quads: Sequence[np.ndarray]) -> float:
    return float(np.median([min(_quad_size(quad)) for quad in quads])) if quads else 0.0


def _mostly_vertical(quads: Sequence[np.ndarray], flags: Sequence[bool]) -> bool:
    """A page on its side: most long lines run vertically."""
    thickness = _median_thickness(quads)
    vertical = sum(flags)
    horizontal = sum(
        1
        for quad, flag in zip(quads, flags, strict=True)
        if not flag and (size := _quad_size(quad))[0] >= 1.5 * size[1] and size[0] >= 2.5 * thickness
    )
    return vertical >= 5 and vertical >= 2 * horizontal


def _to_line(
    quad: np.ndarray,
    scale: float,
    shape: tuple[int, ...],
    text: str = "",
    score: float = 1.0,
    vertical: bool = False,
) -> OcrLine:
    """A working-image quad as a box in the source image's pixels."""
    height, width = shape[:2]
    xs = (quad[:, 0] - BORDER) / scale
    ys = (quad[:, 1] - BORDER) / scale
    return OcrLine(
        x1=float(np.clip(xs.min(), 0, width)),
        y1=float(np.clip(ys.min(), 0, height)),
        x2=float(np.clip(xs.max(), 0, width)),
        y2=float(np.clip(ys.max(), 0, height)),
        text=text,
        score=score,
        vertical=vertical,
    )


def unturn_box(box: tuple[float, float, float, float], turn: int, width: int, height: int) -> tuple[float, ...]:
    """A box of the turned image (``np.rot90(image, turn)``, ``width`` x ``height``) in the original's pixels."""
    x1, y1, x2, y2 = box
    if turn == 1:  # np.rot90 k=1 moved original (x, y) to (y, original_width - x)
        return (height - y2, x1, height - y1, x2)
    if turn == -1:  # k=-1 moved original (x, y) to (original_height - y, x)
        return (y1, width - x2, y2, width - x1)
    return box


def threads_per_engine(engines: int) -> int:
    """Split the CPUs between concurrent OCR jobs so that they do not oversubscribe the machine."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, engines))


class EnginePool:
    """``size`` engines, one per concurrent OCR job (the server's ``--max-num-seqs``)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: queue.Queue[OcrEngine] = queue.Queue()

    def load(self) -> None:
        threads = threads_per_engine(self.size)
        for _ in range(self.size):
            self._free.put(OcrEngine(threads))
        log.info("OCR model ready: %d engine(s), %d CPU thread(s) each", self.size, threads)

    @contextlib.contextmanager
    def engine(self) -> Iterator[OcrEngine]:
        # The server's slot scheduler admits at most `size` jobs, so this never blocks for long.
        engine = self._free.get()
        try:
            yield engine
        finally:
            self._free.put(engine)
