"""Which route a page takes: its text layer (no GPU) or the VLM. A pure function of one ``pymupdf.Page``.

Sound beats greedy (docs/architecture.md, "Page routes"): a wrong ``text`` loses quality silently, a wrong
``vlm`` only costs GPU time. So every signal must vouch for the text layer, and the weakest one decides.

Signals (the peers' and a few more), all from one ``get_text("dict")`` without image bytes, the page's
font list and image boxes; no page rendering:

==========================  =======================================================  ==========================
signal                      what it catches                                          from
==========================  =======================================================  ==========================
``chars``                   no or almost no text (scans, outlined text, a picture     MinerU hybrid (< 50 clean
                            with a caption)                                          characters per page)
``bad_chars``               a broken Unicode map: U+FFFD, private use, control       MinerU (>= 4 %), Marker
                            characters                                               (> max(6, 3 %))
``unmapped_fonts``          text in a CID font (Identity-H/V) without /ToUnicode:    MinerU hybrid
                            glyph ids, not characters
``word_plausibility``       tokens that do not look like words (garbage OCR, a       FinePDFs-like; stricter
                            custom font encoding)                                    for an invisible OCR layer
``alnum_ratio``,            Marker's per-page checks                                 Marker
``space_ratio``,
``newline_ratio``
``image_coverage``          a page that is mostly picture: its text is not the page  MinerU hybrid (>= 0.8)
``outside_text``            text outside the page box: the layer is not the page     FinePDFs' features
``off_direction``           much text across the main direction (rotated tables)     here
==========================  =======================================================  ==========================

Each signal becomes a *margin* in 0..1 (0 at the peers' failure threshold, 1 where it is comfortably
good, linear between); the score is the smallest margin, and the page takes the text route only when
the score reaches :data:`TEXT_THRESHOLD`: a page that passes every peer's threshold by a hair still
goes to the VLM.

Invisible text (render mode 3, fully transparent, or Tesseract's GlyphLessFont) over the page is
someone's OCR. When it is most of the text, the page is an *OCR layer*: it is trusted only if it reads
like language (a stricter word-plausibility bar), and the page's image coverage is then expected rather
than held against it. Invisible text on a page that is mostly visible text is ignored (hidden junk), as
the text engine ignores it (:func:`uses_invisible_text`).

A page with nothing on it at all (no text, no image, only white fills or nothing drawn) is ``blank``:
it takes the text route, an empty page, rather than costing a VLM request.
"""

from __future__ import annotations

import itertools
import math
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

import pymupdf

Route = Literal["text", "vlm"]

#: the smallest margin that lets a page take the text route (see the module doc)
TEXT_THRESHOLD: Final = 0.25
#: flags of the one text extraction: whitespace and ligatures as written, no image blocks (no image
#: bytes are decoded), and no clip to the page box (text outside it is a signal)
TEXT_FLAGS: Final = pymupdf.TEXT_PRESERVE_WHITESPACE | pymupdf.TEXT_PRESERVE_LIGATURES
#: MuPDF's span char_flags bits: a glyph neither stroked nor filled is render mode 3 (invisible)
_STROKED: Final = int(pymupdf.mupdf.FZ_STEXT_STROKED)
_FILLED: Final = int(pymupdf.mupdf.FZ_STEXT_FILLED)
#: Tesseract's invisible font: its text is an OCR layer whatever the render mode says
OCR_FONT_NAMES: Final = frozenset({"GlyphLessFont"})
_SUBSET_PREFIX_RE = re.compile(r"^[A-Z]{6}\+")
_GRID: Final = 64  # image coverage is measured on a 64 x 64 grid of the page (union of boxes, cheap)

# (bad, good) ends of each margin's ramp: the value at "bad" gives 0, at "good" 1.
RAMPS: Final[dict[str, tuple[float, float]]] = {
    "chars": (50, 200),  # clean characters on the page (MinerU: < 50 is a scan)
    "bad_chars": (0.03, 0.005),  # share of U+FFFD / private-use / control characters (Marker 3 %, MinerU 4 %)
    "unmapped_fonts": (0.02, 0.0),  # share of characters drawn with a CID font lacking /ToUnicode
    "word_plausibility": (0.6, 0.85),  # share of word tokens that look like words
    "ocr_word_plausibility": (0.85, 0.95),  # the same, for an invisible OCR layer (someone else's OCR)
    "alnum_ratio": (0.3, 0.5),  # letters and digits among non-space characters (Marker: < 0.3 is bad)
    "space_ratio": (0.7, 0.4),  # spaces among characters (Marker: > 0.7 is bad)
    "newline_ratio": (0.6, 0.3),  # line breaks among characters (Marker: > 0.6 is bad)
    "image_coverage": (0.8, 0.5),  # share of the page under images (MinerU: >= 0.8 is a scan)
    "outside_text": (0.25, 0.05),  # share of the text layer outside the page box
    "off_direction": (0.3, 0.1),  # share of characters not in the page's main text direction
}


@dataclass(frozen=True)
class PageFeatures:
    """What the decision saw; JSON-serialisable (``dataclasses.asdict``), stored in the page manifest."""

    width_pt: float  # the page as displayed (after /Rotate)
    height_pt: float
    rotation: int  # the page's /Rotate
    text_direction: int  # degrees of the main text direction in the page's own space (0 = left to right)
    visible_chars: int  # non-space characters drawn visibly inside the page box
    invisible_chars: int  # non-space characters drawn invisibly inside the page box (OCR layers)
    outside_chars: int  # non-space characters outside the page box
    ocr_layer: bool  # the invisible text is most of the text: it is what the text route would use
    chars: int  # non-space characters of the text the text route would use
    bad_chars: int  # of those: U+FFFD, private use, control or unassigned characters
    unmapped_font_chars: int  # of those: drawn with a CID font (Identity-H/V) lacking /ToUnicode
    type3_chars: int  # of those: drawn with a Type3 font (recorded; judged by the text itself)
    unmapped_fonts: list[str]  # names of the CID fonts lacking /ToUnicode that draw text here
    words: int  # tokens holding a letter (symbol-only and formula tokens are not counted)
    plausible_words: int
    alnum_ratio: float
    space_ratio: float
    newline_ratio: float
    off_direction_chars: int
    image_count: int
    image_coverage: float  # share of the page box under images (union)
    blank: bool  # nothing drawn but white: no text, no image

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RouteDecision:
    """A page's route, its trust score and the features behind it."""

    route: Route
    score: float  # 0..1, the smallest margin (see the module doc); text iff score >= TEXT_THRESHOLD
    decided_by: str  # the weakest signal (or "blank")
    margins: dict[str, float]  # every signal's margin, rounded
    features: PageFeatures
    threshold: float = TEXT_THRESHOLD
    failed: list[str] = field(default_factory=list)  # signals below the threshold

    def as_json(self) -> dict[str, Any]:
        """For the page manifest: plain JSON types only."""
        return {
            "route": self.route,
            "score": self.score,
            "threshold": self.threshold,
            "decided_by": self.decided_by,
            "failed": list(self.failed),
            "margins": dict(self.margins),
            "features": self.features.as_json(),
        }


# --------------------------------------------------------------------------- text layer reading


def is_invisible_span(span: dict[str, Any]) -> bool:
    """Text nobody sees: render mode 3 (neither stroked nor filled), alpha 0, or Tesseract's font."""
    flags = int(span.get("char_flags", _FILLED))
    return span.get("font") in OCR_FONT_NAMES or span.get("alpha", 255) == 0 or not flags & (_STROKED | _FILLED)


def text_blocks(page: pymupdf.Page) -> list[dict[str, Any]]:
    """The page's text blocks (``get_text("dict")``, no images, not clipped to the page box), in the
    page's unrotated space. The routing and the text engine read the same extraction."""
    return [
        block
        for block in page.get_text("dict", flags=TEXT_FLAGS, clip=pymupdf.INFINITE_RECT())["blocks"]
        if block.get("type", 0) == 0
    ]


def unrotated_box(page: pymupdf.Page) -> pymupdf.Rect:
    """The page box in the space text and image coordinates are given in (before /Rotate)."""
    return (page.rect * page.derotation_matrix).normalize()


def iter_spans(blocks: Iterable[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(line, span) pairs of ``blocks``."""
    for block in blocks:
        for line in block.get("lines", ()):
            for span in line.get("spans", ()):
                yield line, span


def direction_of(line: dict[str, Any]) -> int:
    """A line's writing direction in whole quarter turns, as degrees (0 = left to right, 90 = top to
    bottom in the page's y-down space, 180, 270); 0 for a degenerate direction."""
    dx, dy = line.get("dir", (1.0, 0.0))
    if not dx and not dy:
        return 0
    return round(math.degrees(math.atan2(dy, dx)) / 90.0) % 4 * 90


def main_direction(blocks: Iterable[dict[str, Any]]) -> int:
    """The direction (degrees, see :func:`direction_of`) holding the most characters."""
    counts: dict[int, int] = {}
    for line, span in iter_spans(blocks):
        n = _nonspace(span.get("text", ""))
        if n:
            counts[direction_of(line)] = counts.get(direction_of(line), 0) + n
    return max(sorted(counts), key=lambda d: counts[d]) if counts else 0


def uses_invisible_text(visible_chars: int, invisible_chars: int) -> bool:
    """Whether a page's text is its invisible layer (an OCR layer) rather than its visible text."""
    return invisible_chars > visible_chars


def _inside(box: pymupdf.Rect, bbox: Sequence[float]) -> bool:
    """Whether a span's centre lies in the page box."""
    return box.x0 <= (bbox[0] + bbox[2]) / 2 <= box.x1 and box.y0 <= (bbox[1] + bbox[3]) / 2 <= box.y1


def _nonspace(text: str) -> int:
    return sum(1 for c in text if not c.isspace())


# --------------------------------------------------------------------------- character and word checks


def is_bad_char(char: str) -> bool:
    """A character that says the Unicode map is broken: U+FFFD, private use, control (not whitespace),
    unassigned, or a lone surrogate."""
    if char == "\ufffd":
        return True
    if char.isspace():
        return False
    return unicodedata.category(char) in {"Co", "Cc", "Cn", "Cs"}


# punctuation around a word: ASCII, and quotes, guillemets, dashes, bullets written as escapes
_STRIP = (
    "()[]{}<>.,;:!?\"'`\u00ab\u00bb\u201c\u201d\u201e\u2018\u2019\u201a\u2039\u203a-\u2013\u2014/\\*\u2022\u00b7\u2026"
)
_VOWELS = frozenset("aeiouyAEIOUYàáâãäåèéêëìíîïòóôõöùúûüýÿæœøÀÁÂÃÄÅÈÉÊËÌÍÎÏÒÓÔÕÖÙÚÛÜÝŸÆŒØ")
_PARTS_RE = re.compile("[-'\u2019./]")  # "e.g.", "kg/s", "well-known", "Müller's": checked part by part
_NUMBER_RE = re.compile("^[+\\-\u2212\u00b1]?[\\d.,:/%]*\\d[\\d.,:/%]*$")


def _latin(word: str) -> bool:
    return all(c.isascii() or "\u00c0" <= c <= "\u024f" for c in word)


def _case_transitions(word: str) -> int:
    return sum(1 for a, b in itertools.pairwise(word) if a.islower() and b.isupper())


def _plausible_part(part: str) -> bool:
    """One hyphen/apostrophe-free piece of a token."""
    if not part:
        return True
    if _NUMBER_RE.match(part):
        return True
    letters = sum(1 for c in part if c.isalpha())
    digits = sum(1 for c in part if c.isdigit())
    if letters + digits != len(part):
        return False  # symbols inside a word: "l|l", "w@rd", "5IF\x01"
    if digits:
        # "3D", "v1", "2008a", "10th"; more runs only as a chemical formula ("H2O", "C6H12O6"), not "rnm1I"
        runs = re.findall(r"[^\W\d_]+|\d+", part)
        if len(runs) <= 2:
            return True
        return all(r[0].isdigit() or (r[0].isupper() and len(r) <= 2) for r in runs)
    if not _latin(part):
        return True  # other scripts: no vowel or case rules that hold for all of them
    if len(part) >= 4 and not any(c in _VOWELS for c in part):
        return False
    # "tHiS", "rNmI": OCR noise, while "McDonald" and "iPhone" have one transition
    return len(part) < 3 or part.upper() == part or _case_transitions(part) <= 1


def word_stats(text: str) -> tuple[int, int]:
    """(word tokens, plausible ones): tokens holding a letter; formulas (math symbols) and symbol-only
    tokens are neither, so a page of mathematics is not held against its text."""
    words = plausible = 0
    for raw in text.split():
        token = raw.strip(_STRIP)
        if not token or not any(c.isalpha() for c in token):
            if any(is_bad_char(c) for c in raw):
                words += 1  # an unmapped glyph is not a symbol: it counts, implausibly
            continue
        if any(unicodedata.category(c) == "Sm" for c in token):
            continue
        words += 1
        if any(is_bad_char(c) for c in token):
            continue
        if all(_plausible_part(part) for part in _PARTS_RE.split(token)):
            plausible += 1
    return words, plausible


# --------------------------------------------------------------------------- fonts and images


def unmapped_cid_fonts(page: pymupdf.Page) -> set[str]:
    """Names (subset prefix removed, as text spans name them) of the page's Type0 fonts with an Identity
    encoding and no /ToUnicode: their text comes out as glyph ids. A name shared with a mapped font is
    included too (sound: the spans cannot tell them apart)."""
    names: set[str] = set()
    doc = page.parent
    for xref, _ext, ftype, basefont, _ref, encoding, *_ in page.get_fonts(full=True):
        if ftype != "Type0" or not str(encoding).startswith("Identity") or not xref:
            continue
        kind, _value = doc.xref_get_key(xref, "ToUnicode")
        if kind in {"null", "undefined"}:
            names.add(_SUBSET_PREFIX_RE.sub("", str(basefont)))
    return names


def _type3_names(page: pymupdf.Page) -> set[str]:
    return {_SUBSET_PREFIX_RE.sub("", str(f[3])) for f in page.get_fonts(full=True) if f[2] == "Type3"}


def image_boxes(page: pymupdf.Page) -> list[pymupdf.Rect]:
    """Boxes of the images drawn on the page (unrotated space), clipped to the page box; no image is
    decoded."""
    box = unrotated_box(page)
    rects = []
    for info in page.get_image_info():
        rect = pymupdf.Rect(info["bbox"]) & box
        if not rect.is_empty:
            rects.append(rect)
    return rects


def coverage(rects: Sequence[pymupdf.Rect], box: pymupdf.Rect) -> float:
    """Share of ``box`` under the union of ``rects``, on a :data:`_GRID` square grid (cell centres)."""
    if not rects or box.is_empty:
        return 0.0
    covered = 0
    for i in range(_GRID):
        y = box.y0 + (i + 0.5) * box.height / _GRID
        row = [r for r in rects if r.y0 <= y <= r.y1]
        if not row:
            continue
        for j in range(_GRID):
            x = box.x0 + (j + 0.5) * box.width / _GRID
            if any(r.x0 <= x <= r.x1 for r in row):
                covered += 1
    return covered / (_GRID * _GRID)


def _draws_only_white(page: pymupdf.Page) -> bool:
    for kind, _rect in page.get_bboxlog():
        if kind not in {"fill-path", "stroke-path"}:
            return False  # text (even invisible), images, shadings: something is there
    for path in page.get_drawings():
        fill, stroke = path.get("fill"), path.get("color")
        if stroke is not None and path.get("type") != "f":
            return False
        if fill is not None and any(c < 0.99 for c in fill):
            return False
    return True


# --------------------------------------------------------------------------- features and decision


def page_features(page: pymupdf.Page, blocks: list[dict[str, Any]] | None = None) -> PageFeatures:
    """The routing features of ``page`` (``blocks``: :func:`text_blocks` of it, if already extracted)."""
    blocks = text_blocks(page) if blocks is None else blocks
    box = unrotated_box(page)
    unmapped = unmapped_cid_fonts(page)
    type3 = _type3_names(page)
    direction = main_direction(blocks)

    visible = invisible = outside = 0
    for _line, span in iter_spans(blocks):
        n = _nonspace(span.get("text", ""))
        if not n:
            continue
        if not _inside(box, span["bbox"]):
            outside += n
        elif is_invisible_span(span):
            invisible += n
        else:
            visible += n
    ocr_layer = uses_invisible_text(visible, invisible)

    chars = bad = unmapped_chars = type3_chars = off = 0
    fonts_used: set[str] = set()
    lines: list[str] = []
    for block in blocks:
        for line in block.get("lines", ()):
            parts = []
            for span in line.get("spans", ()):
                if not _inside(box, span["bbox"]):
                    continue
                if is_invisible_span(span) != ocr_layer:
                    continue
                text = span.get("text", "")
                n = _nonspace(text)
                parts.append(text)
                if not n:
                    continue
                chars += n
                bad += sum(1 for c in text if is_bad_char(c))
                font = span.get("font", "")
                if font in unmapped:
                    unmapped_chars += n
                    fonts_used.add(font)
                if font in type3 or font.startswith("Type3"):
                    type3_chars += n
                if direction_of(line) != direction:
                    off += n
            if parts:
                lines.append("".join(parts))
    text = "\n".join(lines)
    words, plausible = word_stats(text)
    nonspace = max(1, chars)
    total = max(1, len(text))

    images = image_boxes(page)
    image_cover = coverage(images, box)
    blank = visible + invisible + outside == 0 and not images and _draws_only_white(page)
    return PageFeatures(
        width_pt=round(float(page.rect.width), 2),
        height_pt=round(float(page.rect.height), 2),
        rotation=int(page.rotation),
        text_direction=direction,
        visible_chars=visible,
        invisible_chars=invisible,
        outside_chars=outside,
        ocr_layer=ocr_layer,
        chars=chars,
        bad_chars=bad,
        unmapped_font_chars=unmapped_chars,
        type3_chars=type3_chars,
        unmapped_fonts=sorted(fonts_used),
        words=words,
        plausible_words=plausible,
        alnum_ratio=round(sum(1 for c in text if c.isalnum()) / nonspace, 4),
        space_ratio=round(text.count(" ") / total, 4),
        newline_ratio=round(text.count("\n") / total, 4),
        off_direction_chars=off,
        image_count=len(images),
        image_coverage=round(image_cover, 4),
        blank=blank,
    )


def ramp(value: float, bad: float, good: float) -> float:
    """0 at ``bad``, 1 at ``good``, linear between, clipped (either end may be the larger)."""
    if bad == good:
        return 1.0 if value == good else 0.0
    return min(1.0, max(0.0, (value - bad) / (good - bad)))


def margins(features: PageFeatures) -> dict[str, float]:
    """Every signal's margin (see the module doc)."""
    f = features
    n = max(1, f.chars)
    clean = f.chars - f.bad_chars
    plausibility = f.plausible_words / f.words if f.words else 0.0
    values = {
        "chars": ramp(clean, *RAMPS["chars"]),
        "bad_chars": ramp(f.bad_chars / n, *RAMPS["bad_chars"]),
        "unmapped_fonts": ramp(f.unmapped_font_chars / n, *RAMPS["unmapped_fonts"]),
        "word_plausibility": ramp(
            plausibility, *RAMPS["ocr_word_plausibility" if f.ocr_layer else "word_plausibility"]
        ),
        "alnum_ratio": ramp(f.alnum_ratio, *RAMPS["alnum_ratio"]),
        "space_ratio": ramp(f.space_ratio, *RAMPS["space_ratio"]),
        "newline_ratio": ramp(f.newline_ratio, *RAMPS["newline_ratio"]),
        # an OCR layer lies over the page image by nature: its trust is the stricter plausibility bar
        "image_coverage": 1.0 if f.ocr_layer else ramp(f.image_coverage, *RAMPS["image_coverage"]),
        "outside_text": ramp(f.outside_chars / max(1, f.chars + f.outside_chars), *RAMPS["outside_text"]),
        "off_direction": ramp(f.off_direction_chars / n, *RAMPS["off_direction"]),
    }
    return {name: round(value, 4) for name, value in values.items()}


def decide(features: PageFeatures, threshold: float = TEXT_THRESHOLD) -> RouteDecision:
    """The route for a page with these features."""
    if features.blank:
        return RouteDecision("text", 1.0, "blank", {}, features, threshold, [])
    values = margins(features)
    weakest = min(values, key=values.__getitem__)  # ties: the first in RAMPS order (chars before ratios)
    score = values[weakest]
    failed = sorted(name for name, value in values.items() if value < threshold)
    return RouteDecision("text" if score >= threshold else "vlm", score, weakest, values, features, threshold, failed)


def route_page(page: pymupdf.Page, threshold: float = TEXT_THRESHOLD) -> RouteDecision:
    """The route of ``page``: ``text`` when its text layer can be trusted, else ``vlm``."""
    return decide(page_features(page), threshold)
