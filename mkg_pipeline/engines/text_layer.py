"""The GPU-free engine: a page's Markdown and MinerU content list from its PDF text layer.

Same output as the VLM engines (``PageResult``): the page is laid out here as MinerU *blocks*
(``doc_title``/``title``, ``text``, ``list_item``, ``table`` as HTML, ``image`` crops, ``*_caption``,
``header``/``footer``/``page_number``/``aside_text``) and handed to ``content_list.blocks_to_page``,
the code that already turns the mineru engine's blocks into safe Markdown and schema-valid items: one
place decides captions, furniture, table sanitising (``outputs.sanitize_table_html``) and Markdown safety.

What the layout step does, on one ``get_text("dict")`` (the one :mod:`mkg_pipeline.pdf.routing` reads):

- **direction**: the main text direction is turned left to right (a page drawn sideways, or with
  /Rotate, reads upright); lines across it (an arXiv stamp in the margin) become ``aside_text``;
- **furniture**: short blocks in the top / bottom 8 % of the page are ``header``/``footer``, or
  ``page_number`` when they are a number ("3", "- 3 -", "Page 3 of 9", "iv");
- **paragraphs**: MuPDF's blocks split where the font changes, at a vertical gap, at a first-line
  indent, after a short line ending a sentence, and at list markers; lines are joined with line-end
  hyphenation undone ("trans-" + "port" -> "transport" when the next line starts in lower case and
  neither part is hyphenated itself: "mass-" + "to-temperature" keeps its hyphen);
- **headings**: larger than the page's body size (the size holding most characters) by 15 %, or bold
  at body size on a single short line; the largest, at 1.5 x body or more, is the ``doc_title``;
- **lists**: bullets become "- "; numbered items keep their number;
- **tables**: ``page.find_tables()`` (only on pages drawing horizontal and vertical rules, which its
  line strategy needs: it costs 0.2-2 s a page), cells with their row/column spans, as HTML;
- **figures**: image blocks (merged where they touch, tiny ones dropped) rendered at
  :data:`FIGURE_DPI` from the page itself (what a reader sees there, labels included), JPEG-encoded
  and named by ``engines.figures``; a "Figure n" / "Table n" paragraph next to one is its caption;
- **reading order**: a recursive cut of the page into bands (horizontal gaps) and columns (vertical
  gutters); bands sharing a gutter are read as one, so a two-column page reads column by column even
  where both columns have a gap at the same height; a paragraph split by a column or page break
  (no end punctuation, next starts in lower case) is continued (``merge_prev``).

Taken from pymupdf4llm's ideas (not its code, not the package: see the closing note of issue 19):
the invisible-text test, body size as the most common size by characters with larger sizes as
headings, the bullet characters, skipping text inside images, and "text in the page's own order,
columns found from block boxes".
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import pymupdf

from mkg_pipeline.engines.base import PageResult
from mkg_pipeline.engines.content_list import blocks_to_page
from mkg_pipeline.engines.figures import crop_jpeg, image_name
from mkg_pipeline.pdf import routing

ENGINE_NAME: Final = "text_layer"
#: figure crops are rendered at this DPI (the VLM engines crop from the 150 DPI page image)
FIGURE_DPI: Final = 150
#: and never larger than this many pixels (a poster-sized image block would otherwise be huge)
FIGURE_MAX_PIXELS: Final = 4_000_000
#: image blocks smaller than this (points, either side) are decoration: rules, bullets, logos' dots
MIN_FIGURE_SIDE_PT: Final = 24.0
#: a figure covering more of the page than this is a background (or a scan): text on it stays text
BACKGROUND_COVERAGE: Final = 0.6
#: text lines this long on an image are running text (the image is a backdrop), not figure labels
BACKDROP_LINE_CHARS: Final = 40
#: top and bottom bands (share of the page height) where running headers, footers and numbers live
FURNITURE_BAND: Final = 0.08
#: find_tables() runs only on pages drawing rules that could bound two cells (see _may_hold_a_ruled_table);
#: a rule is at least this long: a plot's tick marks (3-5 pt) are not table rules
MIN_RULE_PT: Final = 12.0

#: characters that open a bulleted list item (followed by a space)
BULLETS: Final = frozenset(
    "\u2022\u25e6\u25aa\u25ab\u25cf\u25cb\u25a0\u25a1\u2023\u2043\u2219\u00b7\u27a2\u25ba\u2013-*"
)
#: numbered list items: "1." "12)" "(a)" "(iv)" "b)"; not "A." or "J." (initials open lines of prose)
_ENUM_RE = re.compile(r"^(?:\d{1,3}[.)]|\(\w{1,4}\)|[a-z]\))\s")
_PAGE_NUMBER_RE = re.compile(
    r"^(?:page|p\.|seite|página|pagina)?\s*[-\u2013\u2014(\[]?\s*(?:\d{1,4}|[ivxlcdm]{1,7})\s*[-\u2013\u2014)\]]?"
    r"(?:\s*(?:of|/|von|de)\s*\d{1,4})?$",
    re.IGNORECASE,
)
_CAPTION_RE = {
    "image": re.compile(r"^(?:fig\.?|figure|abb\.?|abbildung|photo|plate)\s*[\dIVX]+", re.IGNORECASE),
    "table": re.compile(r"^(?:table|tab\.|tabelle)\s*[\dIVX]+", re.IGNORECASE),
}
_MD_BLOCK_START_RE = re.compile(r"^(#{1,6}\s|>|[-+*]\s|=+\s*$|\d{1,9}[.)]\s)")
_SENTENCE_END = ".!?:;\u3002\uff01\uff1f"
_HYPHENS = "-\u00ad\u2010"


def _model_name() -> str:
    return f"pymupdf-{pymupdf.VersionBind}"


@dataclass
class _Line:
    box: pymupdf.Rect  # in the reading frame (main direction left to right, y down)
    page_box: pymupdf.Rect  # in the page's unrotated space
    text: str
    size: float
    bold: bool
    block: int


@dataclass
class _Unit:
    """A block of the page being laid out: a paragraph, a table or a figure."""

    kind: str  # MinerU block type
    box: pymupdf.Rect  # reading frame
    page_box: pymupdf.Rect  # unrotated page space
    lines: list[_Line] = field(default_factory=list)
    content: str = ""
    size: float = 0.0
    bold: bool = False
    crop: bytes | None = None


# --------------------------------------------------------------------------- geometry


def _frame_matrix(direction: int) -> pymupdf.Matrix:
    """Turns the page's unrotated space so that text of ``direction`` (degrees, y down) reads left to right."""
    return pymupdf.Matrix(-direction) if direction else pymupdf.Matrix(1, 1)


def _to_frame(rect: pymupdf.Rect | Sequence[float], matrix: pymupdf.Matrix) -> pymupdf.Rect:
    return (pymupdf.Rect(rect) * matrix).normalize()


def _relative_box(page: pymupdf.Page, rect: pymupdf.Rect) -> list[float]:
    """An unrotated-space rect as 0..1 of the page as displayed (the rendered image's frame)."""
    shown = (rect * page.rotation_matrix).normalize()
    width, height = page.rect.width or 1.0, page.rect.height or 1.0
    return [shown.x0 / width, shown.y0 / height, shown.x1 / width, shown.y1 / height]


def _union(rects: Iterable[pymupdf.Rect]) -> pymupdf.Rect:
    out = pymupdf.Rect(pymupdf.EMPTY_RECT())
    for rect in rects:
        out |= rect
    return out


def _centre_in(rect: pymupdf.Rect, area: pymupdf.Rect) -> bool:
    x, y = (rect.x0 + rect.x1) / 2, (rect.y0 + rect.y1) / 2
    return area.x0 <= x <= area.x1 and area.y0 <= y <= area.y1


# --------------------------------------------------------------------------- lines


def _is_bold(span: dict[str, Any]) -> bool:
    return bool(
        span.get("flags", 0) & pymupdf.TEXT_FONT_BOLD or span.get("char_flags", 0) & pymupdf.mupdf.FZ_STEXT_BOLD
    )


def _lines(
    blocks: Sequence[dict[str, Any]], box: pymupdf.Rect, matrix: pymupdf.Matrix, direction: int, invisible: bool
) -> tuple[list[_Line], list[_Line]]:
    """(lines in the main direction, lines across it), each the visible (or, for an OCR layer, the
    invisible) spans inside the page box, in MuPDF's order."""
    main: list[_Line] = []
    across: list[_Line] = []
    for number, block in enumerate(blocks):
        for line in block.get("lines", ()):
            spans = [
                s
                for s in line.get("spans", ())
                if routing._inside(box, s["bbox"]) and routing.is_invisible_span(s) == invisible
            ]
            text = "".join(s.get("text", "") for s in spans)
            if not text.strip():
                continue
            weights: Counter[float] = Counter()
            for s in spans:
                weights[round(float(s.get("size", 0.0)) * 2) / 2] += len(s.get("text", "").strip())
            size = weights.most_common(1)[0][0]
            bold = all(_is_bold(s) for s in spans if s.get("text", "").strip())
            page_box = _union(pymupdf.Rect(s["bbox"]) for s in spans)
            item = _Line(_to_frame(page_box, matrix), page_box, " ".join(text.split()), size, bold, number)
            (main if routing.direction_of(line) == direction else across).append(item)
    return _join_fragments(main), across


def _join_fragments(lines: list[_Line]) -> list[_Line]:
    """MuPDF cuts a visual line where words are far apart (justified text, a tab): pieces on the same
    baseline, close together, in the same column, become one line again (pymupdf4llm does the same)."""
    out: list[_Line] = []
    for line in lines:
        prev = out[-1] if out else None
        if (
            prev is not None
            and abs((line.box.y0 + line.box.y1) - (prev.box.y0 + prev.box.y1)) / 2 < 0.3 * max(prev.box.height, 1.0)
            and 0 <= line.box.x0 - prev.box.x1 + 1.0 < 1.5 * max(prev.size, line.size, 1.0)
        ):
            out[-1] = _Line(
                prev.box | line.box,
                prev.page_box | line.page_box,
                f"{prev.text} {line.text}",
                prev.size if len(prev.text) >= len(line.text) else line.size,
                prev.bold and line.bold,
                prev.block,
            )
            continue
        out.append(line)
    return out


def body_size(lines: Iterable[_Line]) -> float:
    """The font size holding the most characters (pymupdf4llm's rule), 0 without text."""
    weights: Counter[float] = Counter()
    for line in lines:
        weights[line.size] += len(line.text)
    return max(sorted(weights), key=lambda size: weights[size]) if weights else 0.0


# --------------------------------------------------------------------------- furniture


def _furniture(lines: list[_Line], frame: pymupdf.Rect) -> tuple[list[_Unit], list[_Line]]:
    """(header/footer/page-number units, remaining lines): MuPDF blocks lying wholly in the top or
    bottom band, short (at most 2 lines, 160 characters), with body text elsewhere; and a lone page
    number above or below all the rest, wherever it is."""
    band = FURNITURE_BAND * frame.height
    by_block: dict[int, list[_Line]] = {}
    for line in lines:
        by_block.setdefault(line.block, []).append(line)
    furniture: list[_Unit] = []
    taken: set[int] = set()
    for number, group in by_block.items():
        box = _union(line.box for line in group)
        top, bottom = box.y1 <= frame.y0 + band, box.y0 >= frame.y1 - band
        text = " ".join(line.text for line in group)
        if len(group) > 2 or len(text) > 160 or len(by_block) == 1:
            continue
        others = [line.box for line in lines if line.block != number]
        is_number = bool(_PAGE_NUMBER_RE.match(text.strip()))
        # a lone number below (or above) everything else is the page number wherever the margin is
        lowest = bool(others) and box.y0 >= max(o.y1 for o in others) - 1.0
        highest = bool(others) and box.y1 <= min(o.y0 for o in others) + 1.0
        if is_number and (top or bottom or lowest or highest):
            kind = "page_number"
        elif top or bottom:
            kind = "header" if top else "footer"
        else:
            continue
        furniture.append(_Unit(kind, box, _union(line.page_box for line in group), group, text))
        taken.add(number)
    return furniture, [line for line in lines if line.block not in taken]


# --------------------------------------------------------------------------- paragraphs


def _starts_item(text: str) -> bool:
    return (text[:1] in BULLETS and text[1:2] == " ") or bool(_ENUM_RE.match(text))


def join_lines(lines: Sequence[str]) -> str:
    """Lines of one paragraph as one line: line-end hyphenation undone before a lower-case letter
    ("trans-" + "port"), a hyphen kept without a space in a compound broken at its own hyphen: before
    a capital or digit ("Navier-Stokes", "COVID-19") or when either part has a hyphen of its own
    ("mass-" + "to-temperature", "state-of-the-" + "art"); a space between lines otherwise (none
    between two CJK characters)."""
    out = ""
    for line in lines:
        line = line.strip()
        if not out:
            out = line
            continue
        broken_word = out[-1] in _HYPHENS and len(out) > 1 and out[-2].isalpha() and line[:1].isalnum()
        if broken_word and out[-1] != "\u00ad" and (not line[:1].islower() or _in_compound(out, line)):
            out += line  # a compound broken at its own hyphen: "Navier-" + "Stokes"
        elif (broken_word and line[:1].islower()) or out[-1] == "\u00ad":
            out = out[:-1] + line
        elif _is_cjk(out[-1]) and _is_cjk(line[:1]):
            out += line
        else:
            out += " " + line
    return out.replace("\u00ad", "")


def _in_compound(before: str, after: str) -> bool:
    """Whether the words either side of a line-end hyphen are hyphenated themselves. TeX (most
    scientific PDFs) breaks a word that has a hyphen only at that hyphen, so "mass-" + "to-temperature"
    is the compound mass-to-temperature, not a syllable break of "massto-temperature"."""
    last = before[:-1].rsplit(maxsplit=1)[-1] if before[:-1].strip() else ""
    first = after.split(maxsplit=1)[0]
    return any(h in word for word in (last, first) for h in "-\u2010")


def _is_cjk(char: str) -> bool:
    return bool(char) and unicodedata.east_asian_width(char) in {"W", "F"}


def _paragraphs(lines: list[_Line], body: float) -> list[_Unit]:
    """Lines grouped into paragraphs: MuPDF's blocks, split where a new paragraph visibly starts."""
    units: list[_Unit] = []
    current: list[_Line] = []

    def close() -> None:
        if current:
            units.append(
                _Unit(
                    "text",
                    _union(line.box for line in current),
                    _union(line.page_box for line in current),
                    list(current),
                    size=body_size(current),
                    bold=all(line.bold for line in current),
                )
            )
            current.clear()

    for line in lines:
        if current:
            prev = current[-1]
            height = max(prev.box.height, line.box.height, 1.0)
            gap = line.box.y0 - prev.box.y1
            left = min(other.box.x0 for other in current)
            right = max(other.box.x1 for other in current)
            new = (
                abs(line.size - prev.size) > 0.6
                or line.bold != prev.bold
                or gap > 0.7 * height
                # MuPDF's own block break, with some space before it (its blocks alone over-split
                # text drawn line by line, e.g. rotated)
                # (nor does it split a heading set in two lines)
                or (line.block != prev.block and gap > 0.25 * height and line.size < body * 1.15)
                or line.box.y1 < prev.box.y0  # back up the page: another column
                or line.box.x0 > prev.box.x1  # to the right: another column or cell
                or _starts_item(line.text)
                # a first-line indent under a line that was not indented
                or (line.box.x0 - left > 0.8 * line.size and prev.box.x0 - left < 0.4 * prev.size)
                # a short line ending a sentence closes its paragraph
                or (prev.text[-1:] in _SENTENCE_END and prev.box.x1 < right - 4 * prev.size)
            )
            if new:
                close()
        current.append(line)
    close()
    return units


def _label_headings(units: list[_Unit], body: float) -> None:
    """Headings: larger than body text by 15 %, or bold, short and alone at body size."""
    if not body:
        return
    candidates = [
        u
        for u in units
        if u.kind == "text" and len(u.lines) <= 3 and len(u.content) <= 200 and any(c.isalpha() for c in u.content)
    ]
    largest = max((u.size for u in candidates), default=0.0)
    for unit in candidates:
        if unit.size >= body * 1.15 and not (unit.content[:1] in BULLETS and unit.content[1:2] == " "):
            unit.kind = "doc_title" if unit.size == largest and unit.size >= body * 1.5 else "title"
        elif (
            unit.bold
            and len(unit.lines) == 1
            and len(unit.content) <= 100
            and unit.size >= body - 0.6
            and unit.content[-1:] not in ",;"
            and not unit.content[:1].islower()
            and not (unit.content[:1] in BULLETS and unit.content[1:2] == " ")
        ):
            unit.kind = "title"


# --------------------------------------------------------------------------- tables and figures


def _may_hold_a_ruled_table(page: pymupdf.Page, drawings: Sequence[dict[str, Any]] | None = None) -> bool:
    """Whether the page draws rules that could bound two cells: horizontal and vertical rules (lines,
    or rectangle sides, :data:`MIN_RULE_PT` or longer) at two or more positions each, three or more
    on one axis. find_tables' line strategy finds nothing on other pages, and costs 0.2-2 s a page."""
    rows: set[int] = set()
    columns: set[int] = set()
    for path in page.get_cdrawings() if drawings is None else drawings:
        for item in path.get("items", ()):
            if item[0] == "l":
                (x0, y0), (x1, y1) = item[1], item[2]
                if abs(y1 - y0) < 1 and abs(x1 - x0) >= MIN_RULE_PT:
                    rows.add(round(y0))
                elif abs(x1 - x0) < 1 and abs(y1 - y0) >= MIN_RULE_PT:
                    columns.add(round(x0))
            elif item[0] == "re":
                rect = pymupdf.Rect(item[1])
                if rect.width >= MIN_RULE_PT and rect.height >= MIN_RULE_PT:
                    rows.update((round(rect.y0), round(rect.y1)))
                    columns.update((round(rect.x0), round(rect.x1)))
            if len(rows) >= 2 and len(columns) >= 2 and max(len(rows), len(columns)) >= 3:
                return True
    return False


def table_html(table: Any) -> str:
    """A ``find_tables`` table as HTML: spanning cells with rowspan/colspan, covered cells left out."""
    xs = sorted({round(c[0], 1) for c in table.cells if c} | {round(c[2], 1) for c in table.cells if c})
    ys = sorted({round(c[1], 1) for c in table.cells if c} | {round(c[3], 1) for c in table.cells if c})

    def span(lo: float, hi: float, edges: list[float]) -> int:
        return max(1, sum(1 for e in edges if round(lo, 1) < e <= round(hi, 1)))

    texts = table.extract()
    rows = []
    for r, row in enumerate(table.rows):
        cells = []
        for c, cell in enumerate(row.cells):
            if cell is None:
                continue
            text = texts[r][c] if r < len(texts) and c < len(texts[r]) else ""
            text = join_lines(str(text or "").split("\n"))
            attrs = ""
            colspan, rowspan = span(cell[0], cell[2], xs), span(cell[1], cell[3], ys)
            if colspan > 1:
                attrs += f' colspan="{colspan}"'
            if rowspan > 1:
                attrs += f' rowspan="{rowspan}"'
            tag = "th" if r == 0 and not table.header.external else "td"
            cells.append(f"<{tag}{attrs}>{_escape_html(text)}</{tag}>")
        if cells:
            rows.append("<tr>" + "".join(cells) + "</tr>")
    return "<table>" + "".join(rows) + "</table>" if rows else ""


def _escape_html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _horizontal_rules(drawings: Sequence[dict[str, Any]], matrix: pymupdf.Matrix) -> list[pymupdf.Rect]:
    """Drawn horizontal rules (lines, or rectangles under 2 pt high), :data:`MIN_RULE_PT` or longer, in the
    reading frame: where one crosses a column gutter, the columns above it end (see :func:`reading_order`)."""
    rules = []
    for path in drawings:
        for item in path.get("items", ()):
            if item[0] == "l":
                rect = _to_frame(pymupdf.Rect(item[1], item[2]), matrix)
            elif item[0] == "re":
                rect = _to_frame(item[1], matrix)
            else:
                continue
            if rect.height < 2 and rect.width >= MIN_RULE_PT:
                rules.append(rect)
    return rules


def _tables(
    page: pymupdf.Page, matrix: pymupdf.Matrix, drawings: Sequence[dict[str, Any]] | None = None
) -> list[_Unit]:
    if not _may_hold_a_ruled_table(page, drawings):
        return []
    if hasattr(pymupdf, "no_recommend_layout"):
        pymupdf.no_recommend_layout()  # find_tables would print an advert for pymupdf-layout (onnxruntime)
    units = []
    for table in page.find_tables().tables:
        html = table_html(table)
        if html:
            rect = pymupdf.Rect(table.bbox)
            units.append(_Unit("table", _to_frame(rect, matrix), rect, content=html))
    return units


def _figure_boxes(page: pymupdf.Page) -> list[pymupdf.Rect]:
    """Image blocks worth a figure: not tiny, touching ones merged (a figure tiled in strips)."""
    rects = [r for r in routing.image_boxes(page) if r.width >= MIN_FIGURE_SIDE_PT and r.height >= MIN_FIGURE_SIDE_PT]
    merged: list[pymupdf.Rect] = []
    for rect in sorted(rects, key=lambda r: (r.y0, r.x0)):
        for i, other in enumerate(merged):
            if pymupdf.Rect(other.x0 - 1, other.y0 - 1, other.x1 + 1, other.y1 + 1).intersects(rect):
                merged[i] = other | rect
                break
        else:
            merged.append(pymupdf.Rect(rect))
    return merged


def _is_backdrop(lines_on_image: Sequence[_Line]) -> bool:
    """An image under running text (a watermark, a transparent overlay) rather than a figure with
    labels: most of the text on it is in long lines."""
    chars = sum(len(line.text) for line in lines_on_image)
    long = sum(len(line.text) for line in lines_on_image if len(line.text) >= BACKDROP_LINE_CHARS)
    return chars >= 200 and long >= chars / 2


def render_crop(page: pymupdf.Page, rect: pymupdf.Rect) -> bytes | None:
    """JPEG of the page region ``rect`` (unrotated space) as displayed, at :data:`FIGURE_DPI` or less."""
    from PIL import Image

    shown = (rect * page.rotation_matrix).normalize() & page.rect
    if shown.is_empty:
        return None
    dpi = float(FIGURE_DPI)
    pixels = shown.width * shown.height * (dpi / 72) ** 2
    if pixels > FIGURE_MAX_PIXELS:
        dpi *= (FIGURE_MAX_PIXELS / pixels) ** 0.5
    pix = page.get_pixmap(clip=shown, dpi=max(1, int(dpi)), colorspace=pymupdf.csRGB, alpha=False)
    with Image.frombytes("RGB", (pix.width, pix.height), pix.samples) as image:
        return crop_jpeg(image, (0.0, 0.0, 1.0, 1.0))


# --------------------------------------------------------------------------- reading order


def _bands(units: list[_Unit]) -> list[list[_Unit]]:
    """Units grouped where a horizontal gap crosses the whole region, top to bottom."""
    bands: list[list[_Unit]] = []
    bottom = float("-inf")
    for unit in sorted(units, key=lambda u: (u.box.y0, u.box.x0)):
        if bands and unit.box.y0 < bottom - 1.0:
            bands[-1].append(unit)
            bottom = max(bottom, unit.box.y1)
        else:
            bands.append([unit])
            bottom = unit.box.y1
    return bands


def _gutter(units: Sequence[_Unit], min_width: float = 6.0) -> tuple[float, float] | None:
    """The widest vertical gap that no unit crosses, with units on both sides; None if none."""
    if len(units) < 2:
        return None
    spans = sorted((u.box.x0, u.box.x1) for u in units)
    best: tuple[float, float] | None = None
    reach = spans[0][1]
    for x0, x1 in spans[1:]:
        if x0 - reach >= min_width and (best is None or x0 - reach > best[1] - best[0]):
            best = (reach, x0)
        reach = max(reach, x1)
    return best


def _crosses(unit: _Unit, gutter: tuple[float, float]) -> bool:
    return unit.box.x0 < gutter[1] - 1.0 and unit.box.x1 > gutter[0] + 1.0


def _ruled_off(
    above: Sequence[_Unit], below: Sequence[_Unit], gutter: tuple[float, float], rules: Sequence[pymupdf.Rect]
) -> bool:
    """Whether a rule between ``above`` and ``below`` crosses the gutter: a two-column body and the
    two-column references under it (arXiv's last pages) are two regions, each read column by column."""
    bottom = max(u.box.y1 for u in above)
    top = min(u.box.y0 for u in below)
    return any(r.y0 >= bottom - 1.0 and r.y1 <= top + 1.0 and r.x0 < gutter[0] and r.x1 > gutter[1] for r in rules)


def reading_order(units: list[_Unit], rules: Sequence[pymupdf.Rect] = ()) -> list[_Unit]:
    """Units in reading order: bands top to bottom; consecutive bands that share a column gutter
    (none of their units crosses it, and no rule in ``rules`` crosses it between them) are one region,
    read column by column, recursively."""
    if len(units) <= 1:
        return list(units)
    groups: list[tuple[list[_Unit], tuple[float, float] | None]] = []
    for band in _bands(units):
        gutter = groups[-1][1] if groups else None
        if (
            gutter is not None
            and not any(_crosses(u, gutter) for u in band)
            and not _ruled_off(groups[-1][0], band, gutter, rules)
        ):
            groups[-1] = (groups[-1][0] + band, gutter)
            continue
        groups.append((band, _gutter(band)))
    out: list[_Unit] = []
    for members, gutter in groups:
        if gutter is None:
            out.extend(sorted(members, key=lambda u: (u.box.y0, u.box.x0)))
            continue
        left = [u for u in members if u.box.x1 <= gutter[0] + 1.0]
        right = [u for u in members if u.box.x1 > gutter[0] + 1.0]
        if not left or not right:
            out.extend(sorted(members, key=lambda u: (u.box.y0, u.box.x0)))
            continue
        out.extend(reading_order(left, rules))
        out.extend(reading_order(right, rules))
    return out


# --------------------------------------------------------------------------- the page


def _escape_markdown_start(text: str) -> str:
    """Text that would open a Markdown block (heading, quote, list, setext rule) made literal."""
    return "\\" + text if _MD_BLOCK_START_RE.match(text) else text


def _paragraph_content(unit: _Unit) -> tuple[str, str]:
    """(MinerU block type, content) of a text unit."""
    text = join_lines([line.text for line in unit.lines])
    if unit.kind in {"doc_title", "title"}:
        return unit.kind, text
    if text[:1] in BULLETS and text[1:2] == " ":
        return "list_item", "- " + text[2:].strip()
    if _ENUM_RE.match(text):
        return "list_item", text
    return "text", _escape_markdown_start(text).replace("$", "\\$")


def _continues(previous: dict[str, Any] | None, text: str) -> bool:
    """A paragraph split by a column break: the previous one did not end a sentence, this starts in lower case."""
    if previous is None or previous["type"] != "text":
        return False
    before = str(previous["content"]).rstrip()
    return bool(before) and before[-1] not in _SENTENCE_END and text[:1].islower()


def extract_text_page(page: pymupdf.Page, page_idx: int, *, invisible: bool | None = None) -> PageResult:
    """``page``'s Markdown, content list and figure crops from its text layer (no GPU, no page image).

    ``invisible``: use the invisible text (an OCR layer) instead of the visible one; by default
    whichever :func:`mkg_pipeline.pdf.routing.uses_invisible_text` says (as the routing measured it).
    """
    box = routing.unrotated_box(page)
    blocks = routing.text_blocks(page)
    if invisible is None:
        visible = hidden = 0
        for _line, span in routing.iter_spans(blocks):
            if routing._inside(box, span["bbox"]):
                n = len("".join(span.get("text", "").split()))
                hidden += n if routing.is_invisible_span(span) else 0
                visible += 0 if routing.is_invisible_span(span) else n
        invisible = routing.uses_invisible_text(visible, hidden)
    direction = routing.main_direction(blocks)
    matrix = _frame_matrix(direction)
    frame = _to_frame(box, matrix)
    lines, across = _lines(blocks, box, matrix, direction, invisible)

    furniture, lines = _furniture(lines, frame)
    drawings = page.get_cdrawings()  # once: the table gate and the rules that end column regions
    tables = _tables(page, matrix, drawings)
    page_area = abs(box) or 1.0
    figures = []
    for rect in _figure_boxes(page):
        on_it = [line for line in lines if _centre_in(line.page_box, rect)]
        if (abs(rect) / page_area >= BACKGROUND_COVERAGE and on_it) or _is_backdrop(on_it):
            continue  # the scan under an OCR layer, or a page's backdrop: the text on it is the content
        figures.append(_Unit("image", _to_frame(rect, matrix), rect))
    holders = [t.page_box for t in tables] + [f.page_box for f in figures]
    lines = [line for line in lines if not any(_centre_in(line.page_box, h) for h in holders)]

    body = body_size(lines)
    paragraphs = _paragraphs(lines, body)
    for unit in paragraphs:
        unit.content = join_lines([line.text for line in unit.lines])
    _label_headings(paragraphs, body)
    kinds = {u.kind for u in tables + figures}
    for unit in paragraphs:
        for target, pattern in _CAPTION_RE.items():
            if unit.kind == "text" and target in kinds and pattern.match(unit.content):
                unit.kind = f"{target}_caption"

    ordered = reading_order(paragraphs + tables + figures, _horizontal_rules(drawings, matrix))
    mineru_blocks: list[dict[str, Any]] = []
    crops: dict[int, str] = {}
    images: dict[str, bytes] = {}
    middle = (frame.y0 + frame.y1) / 2
    for unit in furniture:
        if unit.box.y0 >= middle:
            continue  # footers and bottom page numbers close the page, as MinerU lists them
        mineru_blocks.append({"type": unit.kind, "content": unit.content, "bbox": _relative_box(page, unit.page_box)})
    previous: dict[str, Any] | None = None
    for unit in ordered:
        block: dict[str, Any] = {"type": unit.kind, "bbox": _relative_box(page, unit.page_box)}
        if unit.kind == "image":
            jpeg = render_crop(page, unit.page_box)
            if jpeg is None:
                continue
            name = image_name(jpeg)
            images[name] = jpeg
            crops[len(mineru_blocks)] = name
        elif unit.kind == "table":
            block["content"] = unit.content
        elif unit.kind in {"doc_title", "title", "text"}:
            kind, content = _paragraph_content(unit)
            block.update(type=kind, content=content)
            if kind == "text" and _continues(previous, content):
                block["merge_prev"] = True
        else:  # captions
            block["content"] = unit.content
        mineru_blocks.append(block)
        previous = block
    # lines across the main direction (a stamp in the margin) are asides
    bottom = [u for u in furniture if u.box.y0 >= middle]
    mineru_blocks += [{"type": u.kind, "content": u.content, "bbox": _relative_box(page, u.page_box)} for u in bottom]
    mineru_blocks += [
        {"type": "aside_text", "content": line.text, "bbox": _relative_box(page, line.page_box)} for line in across
    ]
    markdown, content_list = blocks_to_page(mineru_blocks, page_idx, crops)
    return PageResult(
        markdown=markdown,
        content_list=content_list,
        images=images,
        requests=0,
        raw_answer="",
        finish_reason=None,
        model=_model_name(),
    )


def page_plain_text(result: PageResult) -> str:
    """Everything the engine read on the page, furniture and table cells included, in its order
    (for comparing with the PDF text layer)."""
    return content_list_text(result.content_list)


def content_list_text(content_list: Iterable[Mapping[str, Any]]) -> str:
    """The text of content-list items, furniture, table cells, captions and footnotes included, each once,
    in their order (any engine's content list: benchmarks/route_quality.py compares the routes with it)."""
    parts: list[str] = []
    for item in content_list:
        if "text" in item:
            parts.append(str(item["text"]))
        if item.get("table_body"):
            # the body is allowlisted HTML already: every tag becomes a space, so cells stay apart
            parts.append(html.unescape(re.sub(r"<[^>]*>", " ", str(item["table_body"]))))
        for key in ("image_caption", "table_caption", "image_footnote", "table_footnote"):
            parts.extend(str(v) for v in item.get(key, ()))
    return "\n".join(parts)
