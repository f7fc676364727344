"""Render PDF pages to PNG one at a time, with the text layer of each page.

:func:`iter_rendered_pages` is a generator: it yields one page, and the caller
uploads and drops it before the next one is drawn, so memory stays at one page
image whatever the length of the document (a 2000-page book is fine on a 4 GiB
pod). One page that cannot be loaded or drawn yields a :class:`PageFailure`
and the document carries on.

Images are what a human sees: the page's /Rotate is applied (``page.rect`` is
the rotated page, and MuPDF draws through the page's rotation matrix), RGB
without alpha (a VLM has no use for transparency, and PNGs are smaller).

Image size is set by the engine, not by a DPI (issue 19 item 5): with ``size`` = (longest side, pixel
cap) each page is drawn at the resolution that gives its longest side that many pixels, lowered until
the image holds at most the cap (and ``max_render_pixels``). :func:`qwen25vl_vision_tokens` estimates
what such an image costs the model.

Images for the VLM are upright (issue 19 item 4). MuPDF already applies the page's /Rotate; but a
/Rotate may as well turn upright content sideways (the routing fixture's ``rotated_page``: portrait
content, /Rotate 90), and text may be drawn sideways on an unrotated page. So where the text layer says
which way is up, the page is drawn turned so that its main text direction, as displayed, reads left to
right: :func:`upright_turn` from the routing features (``text_direction`` in the page's own space, plus
its /Rotate), only when the text layer has at least :data:`MIN_DIRECTION_CHARS` characters and most of
them run that way (decided with the route: a page drawn without ``routing_mode`` is not turned). A page
without such a text layer (a scan) is drawn as its /Rotate says, which is what
a viewer shows. The extra turn is recorded as ``rotation_applied`` (degrees clockwise) in the page
manifest; the olmocr engine still corrects the rest from the model's own answer.

With ``routing`` set, each page's route is decided here, where the page is open
(:mod:`mkg_pipeline.pdf.routing`): a ``text`` page is not drawn at all; its Markdown comes from the text
engine (:func:`mkg_pipeline.engines.text_layer.extract_text_page`) in this worker, and it is yielded as a
:class:`TextPage`. A page whose text engine fails is drawn and sent to the VLM instead (sound over greedy).

The per-page path is lean: one pixmap, one PNG encode, one text extraction, one
hash. PNG encoding is most of the cost of a page (MuPDF's own encoder deflates at
zlib's default level 6), so pages are encoded here at :data:`PNG_COMPRESSION`:
level 3 took 19 ms instead of MuPDF's 54 ms per 150 DPI page, for files 4 % larger;
level 1 saves 1.5 ms more for 8 %, level 4 costs 11 ms more for 1 %
(``benchmarks/render.py --levels``, 33 corpus pages). The bytes are a
deterministic function of the page, as the VLM cache key requires.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import pymupdf

from mkg_pipeline import png
from mkg_pipeline.pdf.validate import error_text, open_pdf

log = logging.getLogger(__name__)

#: a page's shorter side gets at least this many pixels: degenerate pages (the corpus has 3.84 pt ones)
#: would otherwise become 1-2 px images, or an empty pixmap that MuPDF refuses to encode
MIN_SIDE_PX: Final = 16
#: MuPDF's resource store (decoded fonts and images, process-wide, up to 256 MiB) is emptied every this many
#: pages: a 2,000-page document then peaks at about 250 MiB RSS in its worker instead of 550 (measured with
#: benchmarks/render.py --rss-pages 2000), at no measurable render cost (fonts are decoded again 1 page in 32)
STORE_TRIM_EVERY: Final = 32
#: zlib level of the page PNGs (0-9), chosen by measurement: see the module doc and benchmarks/render.py
PNG_COMPRESSION: Final = 3

#: a page that fits the pixel budget only below this resolution is a failure (PAGE_TOO_LARGE), not an image.
#: Type is drawn at size x dpi / 72 pixels: at 10 dpi a 72 pt heading is 10 px tall, body text 1-2 px, so below it
#: nothing on a page is readable by OCR or a VLM. Posters scale their type with the page: the largest page PDF
#: allows without /UserUnit (14,400 pt, 200 in) is drawn at 31.6 dpi within 40 Mpx and is kept. A 1e7 pt page
#: would come out at 0.04 dpi: 30 Mpx of white, recorded as a rendered page (issue 21 row 7).
MIN_READABLE_DPI: Final = 10.0

#: PageFailure.reason codes
LOAD_FAILED: Final = "load_failed"
EMPTY_PAGE: Final = "empty_page"
RENDER_FAILED: Final = "render_failed"
PAGE_TOO_LARGE: Final = "page_too_large"

#: Qwen2.5-VL's image processor: 14-px patches merged 2 x 2, so one vision token per 28 x 28 pixels
#: (transformers ``Qwen2VLImageProcessor``: patch_size 14, merge_size 2), and its pixel bounds
#: (the checkpoint's preprocessor_config.json: min_pixels 3,136, max_pixels 12,845,056)
QWEN_PATCH_PX: Final = 28
QWEN_MIN_PIXELS: Final = 56 * 56
QWEN_MAX_PIXELS: Final = 28 * 28 * 16384


def qwen25vl_vision_tokens(
    width: int, height: int, *, min_pixels: int = QWEN_MIN_PIXELS, max_pixels: int = QWEN_MAX_PIXELS
) -> int:
    """Vision tokens Qwen2.5-VL spends on a ``width`` x ``height`` image: its ``smart_resize`` (sides rounded
    to multiples of 28, scaled into [min_pixels, max_pixels]), then one token per 28 x 28 pixels."""
    if width <= 0 or height <= 0:
        return 0
    f = QWEN_PATCH_PX
    h_bar, w_bar = max(f, round(height / f) * f), max(f, round(width / f) * f)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar, w_bar = max(f, math.floor(height / beta / f) * f), max(f, math.floor(width / beta / f) * f)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
    return (h_bar // f) * (w_bar // f)


def size_dpi(width_pt: float, height_pt: float, longest_side_px: int) -> float:
    """The DPI that draws a ``width_pt`` x ``height_pt`` page with ``longest_side_px`` pixels on its longest side
    (floored to 0.01 dpi, as manifests record it)."""
    if width_pt <= 0 or height_pt <= 0:
        raise ValueError(f"page size must be positive, got {width_pt} x {height_pt} pt")
    return max(0.01, math.floor(72 * longest_side_px / max(width_pt, height_pt) * 100) / 100)


@dataclass(frozen=True)
class RenderedPage:
    """One page as an image plus its embedded text layer."""

    number: int  # 1-based
    png: bytes
    width_px: int
    height_px: int
    dpi: float  # effective: lowered for huge pages (max_render_pixels), raised for degenerate ones
    width_pt: float  # as displayed, i.e. after /Rotate
    height_pt: float
    rotation: int  # the page's /Rotate in degrees (0, 90, 180, 270)
    text_layer: str  # PyMuPDF get_text(); empty for scans
    png_sha256: str
    #: the page's route decision (``RouteDecision.as_json()`` plus ``mode``), when routing was asked for
    routing: dict[str, Any] | None = None
    #: degrees (clockwise) the drawn page was turned, beyond its /Rotate, to be upright (:func:`upright_turn`)
    rotation_applied: int = 0

    def __repr__(self) -> str:  # never dump megabytes of PNG into a log line
        return (
            f"RenderedPage(number={self.number}, {self.width_px}x{self.height_px}px @ {self.dpi} dpi, "
            f"png={len(self.png)} bytes, text_layer={len(self.text_layer)} chars)"
        )


@dataclass(frozen=True)
class TextPage:
    """A page that takes the text route: no image, its result from the text layer (``engines.text_layer``)."""

    number: int  # 1-based
    result: Any  # engines.base.PageResult (requests=0)
    width_pt: float
    height_pt: float
    rotation: int
    text_layer: str
    #: sha256 of what the text engine reads: the page's content streams, text, size and rotation
    content_sha256: str
    routing: dict[str, Any]
    seconds: float = 0.0  # the text engine's wall time on this page

    def __repr__(self) -> str:
        return f"TextPage(number={self.number}, text_layer={len(self.text_layer)} chars)"


@dataclass(frozen=True)
class PageFailure:
    """A page that could not be rendered; the rest of the document still is."""

    number: int  # 1-based
    reason: str  # load_failed | empty_page | render_failed | page_too_large
    error: str  # exception type and message, for the page manifest and logs


def effective_dpi(width_pt: float, height_pt: float, dpi: float, max_render_pixels: int) -> float:
    """The DPI a ``width_pt`` x ``height_pt`` page is rendered at, given the requested ``dpi``.

    Raised so the shorter side gets at least :data:`MIN_SIDE_PX` pixels, then lowered (this wins) so that
    the image, as MuPDF rounds it (outwards, to whole pixels), holds at most ``max_render_pixels``.
    Rounded to 0.01 DPI so the value stored in manifests is the one actually used.
    """
    if width_pt <= 0 or height_pt <= 0:
        raise ValueError(f"page size must be positive, got {width_pt} x {height_pt} pt")
    chosen = float(dpi)
    shorter = min(width_pt, height_pt)
    if shorter * chosen / 72 < MIN_SIDE_PX:
        chosen = math.ceil(MIN_SIDE_PX * 72 / shorter * 100) / 100

    def pixels(d: float) -> int:
        # MuPDF's own rounding of the transformed page rect (outwards, with a small tolerance): exact sizes.
        box = (pymupdf.Rect(0, 0, width_pt, height_pt) * pymupdf.Matrix(d / 72, d / 72)).irect
        return box.width * box.height

    if pixels(chosen) > max_render_pixels:
        chosen = math.floor(72 * math.sqrt(max_render_pixels / (width_pt * height_pt)) * 100) / 100
        # Outward rounding can add a row and a column: step down until the rounded image fits.
        while chosen > 0.01 and pixels(chosen) > max_render_pixels:
            chosen = math.floor(chosen * 0.995 * 100) / 100
    return max(chosen, 0.01)


def encode_png(pix: pymupdf.Pixmap, level: int = PNG_COMPRESSION) -> bytes:
    """An 8-bit RGB (or grey) PNG of ``pix`` (no alpha), deflated at zlib ``level``, rows unfiltered.

    The same image MuPDF's ``tobytes("png")`` writes (filter type 0, one IDAT), at a chosen compression
    level (:mod:`mkg_pipeline.png`).
    """
    if pix.alpha or pix.n not in (1, 3):
        raise ValueError(f"encode_png takes grey or RGB pixmaps without alpha, got n={pix.n} alpha={pix.alpha}")
    return png.encode(pix.samples_mv, pix.width, pix.height, pix.n, pix.stride, level)


#: a text layer names which way is up only with this many characters (routing's floor for a text layer)
MIN_DIRECTION_CHARS: Final = 50
#: ... and when at most this share of them runs across the main direction
MAX_OFF_DIRECTION_SHARE: Final = 0.3


def upright_turn(features: dict[str, Any] | None) -> int:
    """Degrees (clockwise, 0/90/180/270) to turn the displayed page so its main text reads left to right.

    ``features``: the routing features (``RouteDecision.as_json()["features"]``). The main direction is
    measured in the page's own space; /Rotate turns the display clockwise by ``rotation``, so the displayed
    direction is their sum, and the turn that undoes it is its opposite. 0 when the text layer is too thin
    or too mixed to say (a scan, a page of rotated tables).
    """
    if not features:
        return 0
    chars = int(features.get("chars") or 0)
    if chars < MIN_DIRECTION_CHARS or int(features.get("off_direction_chars") or 0) > MAX_OFF_DIRECTION_SHARE * chars:
        return 0
    displayed = (int(features.get("text_direction") or 0) + int(features.get("rotation") or 0)) % 360
    return (360 - displayed) % 360


def _render_png(page: pymupdf.Page, dpi: float, turn: int = 0) -> tuple[bytes, int, int]:
    zoom = dpi / 72
    # MuPDF's prerotate is counter-clockwise in y-up terms, i.e. clockwise on the y-down image.
    matrix = pymupdf.Matrix(zoom, zoom).prerotate(turn) if turn else pymupdf.Matrix(zoom, zoom)
    pix = page.get_pixmap(matrix=matrix, colorspace=pymupdf.csRGB, alpha=False)
    return encode_png(pix), pix.width, pix.height


def _decide_route(page: pymupdf.Page, mode: str, source: str, number: int) -> dict[str, Any]:
    """The page's route under ``mode`` and what decided it (the features are recorded in every mode)."""
    from mkg_pipeline.pdf.routing import route_page

    try:
        decision: dict[str, Any] = route_page(page).as_json()
    except Exception as exc:  # an unreadable text layer cannot vouch for itself: the VLM reads the page
        log.warning("%s page %d: routing failed, sending the page to the VLM: %s", source, number, exc)
        decision = {"route": "vlm", "decided_by": "routing_error", "error": error_text(exc)}
    decision["decided"] = decision["route"]
    if mode in ("vlm", "text"):
        decision["route"] = mode
    decision["mode"] = mode
    return decision


def text_content_sha256(page: pymupdf.Page, text: str) -> str:
    """What the text engine's answer depends on, hashed: the page's content streams (drawing and images'
    placement), its text, its size and rotation. The same page of the same PDF always gives the same hash."""
    digest = hashlib.sha256()
    try:
        digest.update(page.read_contents())
    except Exception:  # a broken content stream: the text alone still names what was read
        digest.update(b"<unreadable contents>")
    digest.update(f"\n{page.rect}\n{page.rotation}\n".encode())
    digest.update(text.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def _text_page(page: pymupdf.Page, number: int, rotation: int, routing: dict[str, Any], source: str) -> TextPage | None:
    from mkg_pipeline.engines.text_layer import extract_text_page

    started = time.perf_counter()
    try:
        text = page.get_text("text")
        result = extract_text_page(page, number - 1)
    except Exception as exc:  # the text engine failed on this page: the VLM reads it instead
        log.warning("%s page %d: the text engine failed, sending the page to the VLM: %s", source, number, exc)
        routing.update(route="vlm", text_engine_error=error_text(exc))
        return None
    return TextPage(
        number=number,
        result=result,
        width_pt=float(page.rect.width),
        height_pt=float(page.rect.height),
        rotation=rotation,
        text_layer=text,
        content_sha256=text_content_sha256(page, text),
        routing=routing,
        seconds=time.perf_counter() - started,
    )


def _render_one(
    doc: pymupdf.Document,
    number: int,
    source: str,
    dpi: float,
    max_render_pixels: int,
    min_dpi: float,
    size: tuple[int, int] | None = None,
    routing_mode: str | None = None,
) -> RenderedPage | TextPage | PageFailure:
    try:
        page = doc.load_page(number - 1)
        rect = page.rect
        rotation = int(page.rotation)
    except Exception as exc:
        log.warning("%s page %d: cannot be loaded: %s", source, number, exc)
        return PageFailure(number, LOAD_FAILED, error_text(exc))
    if rect.width <= 0 or rect.height <= 0:
        return PageFailure(number, EMPTY_PAGE, f"page area is empty ({rect.width} x {rect.height} pt)")
    routing = None
    if routing_mode is not None:
        routing = _decide_route(page, routing_mode, source, number)
        if routing["route"] == "text":
            text_page = _text_page(page, number, rotation, routing, source)
            if text_page is not None:
                return text_page
    pixel_cap = max_render_pixels
    if size is not None:
        longest_side_px, max_pixels = size
        dpi = size_dpi(rect.width, rect.height, longest_side_px)
        pixel_cap = min(max_pixels, max_render_pixels)
    # Readability is judged against the renderer's pixel budget, not the engine's image size: a poster is
    # drawn small for the model (the model would shrink it anyway), a page no budget can draw legibly fails.
    if effective_dpi(rect.width, rect.height, min_dpi, max_render_pixels) < min_dpi:
        budget_dpi = effective_dpi(rect.width, rect.height, dpi, max_render_pixels)
        # Decided before drawing: the pixel budget would go to an image nobody can read.
        message = (
            f"page is {rect.width:.0f} x {rect.height:.0f} pt ({rect.width / 72:.0f} x {rect.height / 72:.0f} in): "
            f"within pdf.max_render_pixels ({max_render_pixels}) it would be drawn at {budget_dpi} dpi, below the "
            f"{min_dpi:g} dpi at which anything on it can be read; crop the page, or raise pdf.max_render_pixels"
        )
        log.warning("%s page %d: %s", source, number, message)
        return PageFailure(number, PAGE_TOO_LARGE, message)
    used_dpi = effective_dpi(rect.width, rect.height, dpi, pixel_cap)
    # The routing features say which way is up; drawn without routing (benchmarks), a page is as /Rotate says.
    turn = upright_turn(routing.get("features") if routing else None)
    try:
        png, width_px, height_px = _render_png(page, used_dpi, turn)
    except Exception as exc:
        log.warning("%s page %d: rendering at %s dpi failed: %s", source, number, used_dpi, exc)
        return PageFailure(number, RENDER_FAILED, error_text(exc))
    try:
        text = page.get_text("text")
    except Exception as exc:  # the image is the product; a broken text layer only loses the cross-check
        log.warning("%s page %d: text layer unreadable, keeping the image only: %s", source, number, exc)
        text = ""
    return RenderedPage(
        number=number,
        png=png,
        width_px=width_px,
        height_px=height_px,
        dpi=used_dpi,
        width_pt=float(rect.width),
        height_pt=float(rect.height),
        rotation=rotation,
        text_layer=text,
        png_sha256=hashlib.sha256(png).hexdigest(),
        routing=routing,
        rotation_applied=turn,
    )


def iter_rendered_pages(
    data: bytes,
    source: str,
    dpi: int,
    max_render_pixels: int,
    page_numbers: Iterable[int] | None = None,
    *,
    min_dpi: float = MIN_READABLE_DPI,
    size: tuple[int, int] | None = None,
    routing_mode: str | None = None,
) -> Iterator[RenderedPage | TextPage | PageFailure]:
    """Yield each page of the PDF in ``data`` (or only ``page_numbers``, 1-based) as it is rendered.

    A page that ``max_render_pixels`` would only hold below ``min_dpi`` is a :class:`PageFailure`
    ``page_too_large`` instead of an unreadable image.

    ``size`` = (longest side px, pixel cap): images sized for the engine, ``dpi`` unused. ``routing_mode``
    (auto | vlm | text): decide each page's route; ``text`` pages come as :class:`TextPage` (not drawn).

    Raises :class:`~mkg_pipeline.pdf.validate.PDFRejected` if the document itself cannot be opened
    (not a PDF, encrypted) and ``ValueError`` for page numbers outside the document. The document is
    closed when the generator is exhausted or closed early.
    """
    if dpi <= 0:
        raise ValueError(f"dpi must be positive, got {dpi}")
    if max_render_pixels <= 0:
        raise ValueError(f"max_render_pixels must be positive, got {max_render_pixels}")
    with open_pdf(data, source) as doc:
        count = doc.page_count
        numbers = range(1, count + 1) if page_numbers is None else list(page_numbers)
        outside = [n for n in numbers if not 1 <= n <= count]
        if outside:
            raise ValueError(f"{source}: page number(s) {outside[:10]} outside 1..{count}")
        for done, number in enumerate(numbers, start=1):
            # Only the current page is referenced here; the caller owns the yielded bytes.
            yield _render_one(doc, number, source, dpi, max_render_pixels, min_dpi, size, routing_mode)
            if done % STORE_TRIM_EVERY == 0:
                pymupdf.TOOLS.store_shrink(100)
