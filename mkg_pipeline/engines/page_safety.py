"""One page's safety: what a page answer may contain once it is stored, shown or put into a document.

- :data:`CONTENT_LIST_SCHEMA`: MinerU's content-list schema, as this pipeline writes it (docs/reference.md).
- :func:`clean_text`: lone surrogates and NULs -> U+FFFD, applied to every model answer before it is
  stored or encoded (issue 9 row 7).
- :func:`sanitize_table_html` / :func:`html_to_text`: the table-HTML allowlist (on nh3) and its
  plain-text form.
- :func:`parse_page` / :func:`safe_page_markdown`: one page's Markdown with everything that could reach
  past the page made inert (issue 9 row 10). The page is read once with a CommonMark parser, as a
  viewer reads it, and the content-list builder shares that reading (issue 22): raw HTML
  is escaped except a small allowlist (table markup, a few inline tags), balanced and
  re-serialised; comments are escaped; a code fence left open is closed at the end of the page and a
  ``$$`` block left open loses its opening delimiter; lines inside code that look like our page
  markers are indented so that they no longer match :data:`PAGE_MARKER_RE`; ``javascript:``/``data:``
  link targets are defused. It is idempotent, so assembling already-safe pages changes nothing (and
  :mod:`mkg_pipeline.document` does not run it on current page records at all).

The engines use these on every answer, so this module imports nothing from them
(:mod:`mkg_pipeline.document` builds on it). Pure functions on strings and dicts; no PIL, no I/O.
"""

from __future__ import annotations

import functools
import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nh3

if TYPE_CHECKING:
    from markdown_it import MarkdownIt
    from markdown_it.token import Token

# --------------------------------------------------------------------------- content list schema

#: Item types we write. MinerU's own: text (titles are text with text_level), equation, image, table,
#: code, and the page furniture it keeps out of the Markdown.
FURNITURE_TYPES = ("header", "footer", "page_number", "page_footnote", "aside_text")
CONTENT_TYPES = ("text", "equation", "image", "table", "code", *FURNITURE_TYPES)

_STRINGS = {"type": "array", "items": {"type": "string"}}
_IMG_PATH = {"type": "string", "pattern": r"^images/[0-9a-f]{64}\.jpg$"}

#: JSON Schema (draft 2020-12) of ``content_list.json``: MinerU's content-list fields, nothing else.
CONTENT_LIST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://mkg-pipeline/schemas/content_list.json",
    "title": "MinerU content list",
    "type": "array",
    "items": {
        "type": "object",
        "additionalProperties": False,
        "required": ["type", "page_idx"],
        "properties": {
            "type": {"enum": list(CONTENT_TYPES)},
            "page_idx": {"type": "integer", "minimum": 0},
            "bbox": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 1000},
                "minItems": 4,
                "maxItems": 4,
            },
            "text": {"type": "string"},
            "text_level": {"type": "integer", "minimum": 1, "maximum": 6},
            "text_format": {"const": "latex"},
            "img_path": _IMG_PATH,
            "image_caption": _STRINGS,
            "image_footnote": _STRINGS,
            "table_body": {"type": "string"},
            "table_caption": _STRINGS,
            "table_footnote": _STRINGS,
            "code_body": {"type": "string"},
            "code_caption": _STRINGS,
            "sub_type": {"enum": ["chart", "code", "algorithm"]},
        },
        "allOf": [
            {
                "if": {"properties": {"type": {"enum": ["text", "equation", *FURNITURE_TYPES]}}},
                "then": {"required": ["text"]},
            },
            {
                "if": {"properties": {"type": {"const": "equation"}}},
                "then": {"required": ["text_format"]},
            },
            {
                "if": {"properties": {"type": {"const": "image"}}},
                "then": {"required": ["img_path", "image_caption", "image_footnote"]},
            },
            {
                "if": {"properties": {"type": {"const": "table"}}},
                "then": {"required": ["table_body", "table_caption", "table_footnote"]},
            },
            {
                "if": {"properties": {"type": {"const": "code"}}},
                "then": {"required": ["code_body", "code_caption", "sub_type"]},
            },
            {
                "if": {"not": {"properties": {"type": {"const": "text"}}}},
                "then": {"not": {"required": ["text_level"]}},
            },
        ],
    },
}


def bbox_1000(bbox: Sequence[float] | None) -> list[int] | None:
    """A 0..1 page-relative box as MinerU's content list has it: integers in 0..1000."""
    if bbox is None or len(bbox) != 4:
        return None
    return [min(1000, max(0, round(float(v) * 1000))) for v in bbox]


# --------------------------------------------------------------------------- text hygiene

_UNENCODABLE_RE = re.compile("[\ud800-\udfff\x00]")


def clean_text(text: str) -> str:
    """``text`` with lone surrogates and NULs replaced by U+FFFD: always encodable as UTF-8 and JSON."""
    return _UNENCODABLE_RE.sub("\ufffd", text)


def clean_value(value: Any) -> Any:
    """:func:`clean_text` applied to every string inside a JSON-like value."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, Mapping):
        return {clean_text(str(k)): clean_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_value(v) for v in value]
    return value


# --------------------------------------------------------------------------- HTML allowlist

#: Table markup we keep (MinerU's OTSL -> HTML and model-written HTML tables), and inline tags
#: that may appear inside cells and, attribute-less, in running text.
TABLE_TAGS = frozenset({"table", "caption", "colgroup", "col", "thead", "tbody", "tfoot", "tr", "th", "td"})
INLINE_TAGS = frozenset({"br", "sup", "sub", "b", "i", "em", "strong", "u", "code"})
_VOID_TAGS = frozenset({"br", "col"})  # inline <br> in running text is kept unclosed
# Elements whose content is not text a reader should see (dropped whole inside a table).
_DROP_CONTENT_TAGS = frozenset(
    {"script", "style", "template", "textarea", "title", "noscript", "iframe", "object", "embed", "svg", "math"}
    | {"head", "xmp", "noembed", "noframes", "plaintext", "select"}
)
_SPAN_ATTRS = frozenset({"rowspan", "colspan"})
_WHITESPACE_RE = re.compile(r"\s+")
# A space where a table holds no text: after a tag that leaves the parser between rows or cells.
_STRUCTURE_GAP_RE = re.compile(
    r"(<(?:table|thead|tbody|tfoot|tr|colgroup|col)>|</(?:table|thead|tbody|tfoot|tr|colgroup|caption|td|th)>) (?=<)"
)


def _span(tag: str, name: str, value: str) -> str | None:
    """``rowspan``/``colspan`` kept as a number in 1..1000 (a browser's own limits are 65534 and 1000)."""
    value = value.strip()
    # isascii: "²".isdigit() is true, but int() does not take it
    return str(min(1000, max(1, int(value)))) if name in _SPAN_ATTRS and value.isascii() and value.isdigit() else None


@functools.cache
def _cleaner(allowed: frozenset[str]) -> nh3.Cleaner:
    """nh3 (ammonia, on html5ever): the fragment parsed as a browser parses it, then only ``allowed``
    tags kept, ``rowspan``/``colspan`` on cells only, comments and the content of script-like
    elements dropped, text escaped. Built once per allowlist."""
    return nh3.Cleaner(
        tags=set(allowed),
        clean_content_tags=set(_DROP_CONTENT_TAGS),
        attributes={tag: set(_SPAN_ATTRS) for tag in ("td", "th") if tag in allowed},
        attribute_filter=_span,
        strip_comments=True,
        link_rel=None,
        url_schemes=set(),
    )


def _allowlisted(fragment: str, allowed: frozenset[str]) -> str:
    """``fragment`` re-serialised with only ``allowed`` tags, balanced, on one line."""
    # One line, whitespace collapsed (as HTML shows text); nothing allowed keeps whitespace as written.
    fragment = _WHITESPACE_RE.sub(" ", clean_text(fragment))
    out = _cleaner(allowed).clean(fragment)
    if "<tbody" not in fragment.lower():
        # html5ever adds the tbody a browser adds; a table written without it stays without it.
        out = out.replace("<tbody>", "").replace("</tbody>", "")
    # Removed tags leave the spaces around them side by side.
    return _STRUCTURE_GAP_RE.sub(r"\1", _WHITESPACE_RE.sub(" ", out)).strip()


def sanitize_table_html(fragment: str) -> str:
    """An HTML table made safe: allowlisted table/inline tags only, ``rowspan``/``colspan`` only,
    every element closed, text escaped, on one line (so a Markdown HTML block cannot run on).

    The fragment is read as a browser reads it (nh3), so a cell left open is closed by the next one
    and text a browser shows above the table comes before it."""
    return _allowlisted(fragment, TABLE_TAGS | INLINE_TAGS)


def html_to_text(fragment: str) -> str:
    """The visible text of an HTML fragment (no tags), whitespace collapsed."""
    return _WHITESPACE_RE.sub(" ", html.unescape(_allowlisted(fragment, frozenset()))).strip()


# --------------------------------------------------------------------------- safe Markdown

#: Our page markers, exactly: ``<!-- page 3 -->`` on a line of its own (a missing page adds ": …").
PAGE_MARKER_RE = re.compile(r"^<!-- page (\d+)(?::[^\n]*)? -->$", re.MULTILINE)

_FENCE_OPEN_RE = re.compile(r"^( {0,3})(`{3,}|~{3,})(.*)$")
_INLINE_TAG_RE = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9]*)\s*(/?)>")
_MARKUP_START_RE = re.compile(r"<(?=[A-Za-z/!?])")
_AUTOLINK_RE = re.compile(r"<https?://[^\s<>]*>", re.IGNORECASE)
_LINK_TARGET_RE = re.compile(r"(\]\(\s*<?|^ {0,3}\[[^\]\n]+\]:\s*<?)([^\s)>]+)", re.MULTILINE)
_UNSAFE_SCHEMES = ("javascript:", "vbscript:", "data:", "file:")
_MATH_DELIM_RE = re.compile(r"(?<!\\)\$\$")


def _defuse_links(line: str) -> str:
    def repl(match: re.Match[str]) -> str:
        target = match.group(2)
        normal = re.sub(r"[\s\x00-\x1f]", "", html.unescape(target)).lower()
        if normal.startswith(_UNSAFE_SCHEMES):
            return f"{match.group(1)}#{target}"
        return match.group(0)

    return _LINK_TARGET_RE.sub(repl, line)


def _escape_markup(text: str, *, in_math: bool) -> str:
    """Every ``<`` that could open a tag, comment or declaration made inert.

    In running text as ``&lt;`` (renders as ``<``); in math as ``< `` (a space is invisible in
    LaTeX, where an entity would not be decoded by math renderers). Backslash-escaped ``\\<`` stays.
    """
    out: list[str] = []
    last = 0
    for match in _MARKUP_START_RE.finditer(text):
        start = match.start()
        backslashes = len(text[:start]) - len(text[:start].rstrip("\\"))
        if backslashes % 2:
            continue
        out.append(text[last:start])
        out.append("< " if in_math else "&lt;")
        last = start + 1
    out.append(text[last:])
    return "".join(out)


def _split_inline_math(line: str) -> list[tuple[str, bool]]:
    """(segment, is_math) pieces of one line, split at pairs of unescaped single ``$``.

    A heuristic: both escapes are safe, so a wrong guess only changes how an escaped ``<`` looks.
    """
    dollars = [m.start() for m in re.finditer(r"(?<![\\$])\$(?!\$)", line)]
    if len(dollars) < 2:
        return [(line, False)]
    pieces: list[tuple[str, bool]] = []
    last = 0
    for opening, closing in zip(dollars[0::2], dollars[1::2], strict=False):
        pieces.append((line[last:opening], False))
        pieces.append((line[opening : closing + 1], True))
        last = closing + 1
    pieces.append((line[last:], False))
    return pieces


def _safe_text_line(line: str, *, in_math: bool) -> str:
    """One Markdown line outside code fences: allowlisted inline tags kept (balanced on the line),
    http(s) autolinks kept, every other ``<`` escaped, unsafe link targets defused."""
    line = _defuse_links(line)
    if in_math:
        return _escape_markup(line, in_math=True)
    kept: dict[str, str] = {}
    open_tags: list[str] = []

    def keep(markup: str) -> str:
        token = f"\x00{len(kept)}\x00"
        kept[token] = markup
        return token

    def tag_repl(match: re.Match[str]) -> str:
        closing, name, self_closing = match.group(1), match.group(2).lower(), match.group(3)
        before = line[: match.start()]
        if name not in INLINE_TAGS or (len(before) - len(before.rstrip("\\"))) % 2:
            return match.group(0)  # escaped below
        if name in _VOID_TAGS:
            return "" if closing else keep(f"<{name}>")
        if self_closing:
            return match.group(0)
        if not closing:
            open_tags.append(name)
            return keep(f"<{name}>")
        if name not in open_tags:
            return match.group(0)  # a stray close
        closes = []
        while open_tags:
            top = open_tags.pop()
            closes.append(f"</{top}>")
            if top == name:
                break
        return keep("".join(closes))

    # NULs cannot be in the line (clean_text), so they delimit placeholders safely.
    line = _AUTOLINK_RE.sub(lambda m: keep(m.group(0)), line)
    line = _INLINE_TAG_RE.sub(tag_repl, line)
    pieces = _split_inline_math(line)
    line = "".join(_escape_markup(piece, in_math=is_math) for piece, is_math in pieces)
    for token, markup in kept.items():
        line = line.replace(token, markup)
    closers = "".join(f"</{tag}>" for tag in reversed(open_tags))
    if closers and (len(line) - len(line.rstrip("\\"))) % 2:
        line += " "  # a trailing backslash would escape the closer's "<"
    return line + closers


@functools.cache
def markdown_parser() -> MarkdownIt:
    """The CommonMark parser (raw HTML on, GFM tables) a Markdown viewer reads pages with: built once
    per process, on first use (its rules are compiled then), and shared, since parsing does not change it."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").enable("table")


def _parse(markdown: str) -> list[Token]:
    """Block tokens of ``markdown`` as a CommonMark renderer (raw HTML on, GFM tables) sees them."""
    return markdown_parser().parse(markdown)


def _normalise(markdown: str) -> str:
    return clean_text(markdown).replace("\r\n", "\n").replace("\r", "\n")


@dataclass(frozen=True)
class ParsedPage:
    """A page answer read once: its text (:func:`clean_text`, ``\\n`` line ends) and markdown-it's block
    tokens of that text. :func:`safe_page_markdown` and the content-list builder share it, so an answer
    is parsed once for both (issue 22). The tokens are read, never changed."""

    text: str
    tokens: list[Token]


def parse_page(markdown: str) -> ParsedPage:
    text = _normalise(markdown)
    return ParsedPage(text, _parse(text))


def _line_count(text: str) -> int:
    """How many lines markdown-it sees in ``text`` (a final line end opens no line)."""
    return text.count("\n") + (0 if not text or text.endswith("\n") else 1)


def _is_safe_table(block: str) -> bool:
    return "\n" not in block and block.lower().startswith("<table") and sanitize_table_html(block) == block


_TABLE_EDGE_RE = re.compile(r"(</?table>)")


def _table_lines(sanitized: str) -> list[str]:
    """Sanitized table HTML as lines set apart by blank lines: each top-level table on a line of its own
    (an HTML block), and text a browser shows outside them (moved there by the HTML parser) as
    paragraphs of their own, so that no line mixes the two."""
    pieces: list[str] = []
    depth, current = 0, ""
    for part in _TABLE_EDGE_RE.split(sanitized):
        if part == "<table>":
            if depth == 0 and current.strip():
                pieces.append(current.strip())
                current = ""
            depth += 1
        current += part
        if part == "</table>":
            depth -= 1
            if depth == 0:
                pieces.append(current.strip())
                current = ""
    if current.strip():
        pieces.append(current.strip())
    lines = [""]
    for piece in pieces:
        lines += [piece, ""]
    return lines


def _shifted(tokens: list[Token], replacements: list[tuple[int, int, list[str]]]) -> list[Token]:
    """``tokens`` of a text in which top-level HTML tables were replaced by one-line tables set apart by
    blank lines (``replacements``: start, end, new lines), as a parse of the new text would give them.

    A top-level ``<table`` HTML block starts after a paragraph (it may interrupt one) or a blank line,
    and ends at a blank line or the end of the page; its one-line form between blank lines does the
    same, so every other block keeps its extent and only moves by the lines gained or lost before it.
    """
    from markdown_it.token import Token

    def moved(line: int) -> int:
        return line + sum(len(new) - (end - start) for start, end, new in replacements if end <= line)

    replaced = {start: new for start, _, new in replacements}
    out: list[Token] = []
    for token in tokens:
        if token.map is None:
            out.append(token)
            continue
        start, end = token.map
        if token.type == "html_block" and token.level == 0 and start in replaced:
            new = replaced[start]
            if len(new) == 3:  # ["", table, ""]; [""] for a table with nothing left
                line = moved(start) + 1
                out.append(Token("html_block", "", 0, content=new[1] + "\n", map=[line, line + 1], block=True))
            continue
        out.append(token.copy(map=[moved(start), moved(end)]))
    return out


def _defuse_html_blocks(text: str, tokens: list[Token]) -> tuple[str, list[Token]]:
    """Every HTML block made inert: a top-level table re-serialised by the allowlist and set apart by
    blank lines, any other block's lines escaped. Returns the new text and its tokens.

    An escaped block becomes Markdown again (and may hold, say, a code fence of its own), so then the
    text is read again, until nothing changes; re-serialised tables change no other block, so their
    tokens are moved rather than parsed again (:func:`_shifted`)."""
    for _ in range(50):
        lines = text.split("\n")
        replacements: list[tuple[int, int, list[str]]] = []
        only_tables = True
        for token in tokens:
            if token.type != "html_block" or token.map is None:
                continue
            start, end = token.map
            block = "\n".join(lines[start:end]).strip("\n")
            if token.level == 0 and _is_safe_table(block):
                continue
            if token.level == 0 and block.lstrip(" ").lower().startswith("<table"):
                replacement = _table_lines(sanitize_table_html(block))
                # Text a browser shows beside the table is a paragraph now, which may be Markdown.
                alone = len(replacement) == 1 or (len(replacement) == 3 and replacement[1].startswith("<table>"))
                only_tables = only_tables and alone
            else:
                replacement = [_escape_markup(line, in_math=False) for line in lines[start:end]]
                only_tables = False
            replacements.append((start, end, replacement))
        if not replacements:
            return text, tokens
        for start, end, replacement in reversed(replacements):
            lines[start:end] = replacement
        text = "\n".join(lines)
        tokens = _shifted(tokens, replacements) if only_tables else _parse(text)
        if only_tables:
            return text, tokens
    text = "\n".join(_escape_markup(line, in_math=False) for line in text.split("\n"))
    return text, _parse(text)


def _literal_lines(tokens: list[Token], lines: list[str]) -> tuple[set[int], set[int]]:
    """(code lines, table lines): the content of fenced and indented code blocks, which a CommonMark
    renderer shows literally, and our allowlisted tables, which stay as they are."""
    code: set[int] = set()
    tables: set[int] = set()
    for token in tokens:
        if token.map is None:
            continue
        start, end = token.map
        if token.type in {"fence", "code_block"}:
            code.update(range(start + 1 if token.type == "fence" else start, end))
        elif token.type == "html_block" and token.level == 0 and _is_safe_table("\n".join(lines[start:end]).strip()):
            tables.update(index for index in range(start, end) if lines[index].strip())
    return code, tables


def _open_fence(tokens: list[Token], text: str) -> str | None:
    """The markup of a top-level code fence that ``text`` (read as ``tokens``) leaves open, or None.

    Such a fence would swallow whatever follows the page. markdown-it ends an unclosed fence at the last
    line, with every line after the opening one as its content; a closed fence's content stops one line
    earlier, at its closing line. (Nothing else at the top level can run past the page once HTML blocks
    are defused: a list, quote or indented code ends at the next page's unindented marker.)
    """
    last = next((t for t in reversed(tokens) if t.level == 0 and t.map is not None), None)
    if last is None or last.type != "fence" or last.map is None:
        return None
    start, end = last.map
    lines_total = _line_count(text)
    content_lines = _line_count(last.content)
    if end == lines_total and content_lines == end - start - 1:
        return last.markup
    return None


def _math_opener(line: str) -> bool:
    """A line that opens a ``$$`` display block (and does not close it on the same line)."""
    stripped = line.strip()
    return stripped.startswith("$$") and not _MATH_DELIM_RE.search(stripped, 2)


def safe_page_markdown(markdown: str | ParsedPage) -> str:
    """One page's Markdown made inert towards other pages and browsers (see the module docstring).

    The structure is read with a CommonMark parser (markdown-it), as a Markdown viewer reads it, once
    (``markdown`` may be a :class:`ParsedPage` already read for the content list):

    1. HTML blocks: tables are re-serialised by the allowlist, anything else is escaped;
    2. every line outside code blocks is escaped (allowlisted inline tags kept, balanced per line);
       lines inside code stay as written, except that one looking like our page marker is indented;
    3. ``$$`` display math: inside it ``<`` is escaped with a space (invisible in LaTeX); an opening
       ``$$`` never closed on the page is escaped itself, so no math block runs into the next page;
    4. a code fence still open at the end of the page is closed.

    Steps 2 and 3 change no block's extent (they turn ``<`` into entities, prefix link targets and
    close inline tags on their own line; fence lines keep their backticks or tildes), so the tokens
    read before them still say which fence step 4 must close.
    """
    if isinstance(markdown, ParsedPage):
        text, tokens = markdown.text, markdown.tokens
    else:
        text = _normalise(markdown)
        # Parsing is most of the cost of a page (the client's own work is a few ms): skip it when nothing
        # can apply. HTML starts with "<"; code is fenced (` or ~) or indented; only a fence can swallow.
        structured = (
            "<" in text
            or "`" in text
            or "~" in text
            or any(line.startswith(("    ", "\t")) for line in text.split("\n"))
        )
        tokens = _parse(text) if structured else []
    if "<" in text:
        text, tokens = _defuse_html_blocks(text, tokens)
    lines = text.split("\n")
    code, tables = _literal_lines(tokens, lines)
    closer = _open_fence(tokens, text)
    out: list[str] = []
    math_opened_at: int | None = None
    for index, line in enumerate(lines):
        if math_opened_at is not None:
            out.append(_safe_text_line(line, in_math=True))
            if _MATH_DELIM_RE.search(line):
                math_opened_at = None
        elif index in code:
            # Shown literally, but a line there must still not read as one of our markers.
            out.append(" " + line if line.startswith("<!--") else line)
        elif index in tables:
            out.append(line)
        elif _math_opener(line):
            math_opened_at = len(out)
            out.append(_safe_text_line(line, in_math=True))
        else:
            out.append(_safe_text_line(line, in_math=False))
    if math_opened_at is not None:
        out[math_opened_at] = out[math_opened_at].replace("$$", "\\$\\$", 1)
    text = "\n".join(out).strip("\n")
    return text + "\n" + closer if closer else text
