"""MinerU blocks (after ``mineru_vl_utils``' post-processing) -> one page's Markdown and content list.

What MinerU itself writes, rebuilt on the blocks its client returns (issue 10):

========================================  ==================================================  =====================
block type(s)                             Markdown                                            content-list item
========================================  ==================================================  =====================
``doc_title``                             ``# title``                                         text, text_level 1
``title``, ``paragraph_title``            ``## title``                                        text, text_level 2
``text``, ``list_item``, ``ref_text``,    the text; ``\\(x\\)`` -> ``$x$``, ``\\[x\\]`` -> ``$$x$$``;   text
``index``, ``phonetic``                   ``merge_prev`` continues the previous paragraph
``equation``                              ``$$\\nlatex\\n$$`` (a ``formula_number`` -> ``\\tag``)    equation
``image``, ``chart``                      ``![caption](images/<sha256>.jpg)``, captions and   image (chart:
                                          footnotes on the following lines                    sub_type "chart")
``table``                                 captions, the HTML table (OTSL -> HTML by           table (+ img_path of
                                          ``mineru_vl_utils``, then allowlisted), footnotes;  the table crop)
                                          the crop's link when there is no HTML
``code``, ``algorithm``                   captions and a fenced block                         code
``*_caption``, ``*_footnote``,            attached to the nearest figure/table/code of the    in that item's lists
``caption``, ``footnote``                 right kind (vertical distance; a figure above its
                                          caption, a table below it preferred); text if none
``header``, ``footer``, ``page_number``,  nothing (page furniture)                            its own type, text
``page_footnote``, ``aside_text``
``list``, ``image_block``,                nothing (containers whose parts are blocks too)     none
``equation_block``, ``unknown``
========================================  ==================================================  =====================

Every item has ``page_idx`` and ``bbox`` (0..1000 of the page, as MinerU's content list).
Pure: no PIL, no I/O; the crops are made by the engine and passed in by block index.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mkg_pipeline.engines.page_safety import (
    FURNITURE_TYPES,
    bbox_1000,
    clean_text,
    safe_page_markdown,
    sanitize_table_html,
)

TITLE_LEVELS = {"doc_title": 1, "title": 2, "paragraph_title": 2}
TEXT_TYPES = frozenset({"text", "list_item", "ref_text", "index", "phonetic"})
FIGURE_TYPES = frozenset({"image", "chart"})
CODE_TYPES = frozenset({"code", "algorithm"})
#: blocks the engine crops from the page image (figures, and tables as MinerU's img_path)
CROPPED_TYPES = FIGURE_TYPES | {"table"}
_VISUALS = FIGURE_TYPES | {"table"} | CODE_TYPES
#: caption-like block -> (the container types it can belong to, which list it goes to)
CAPTION_TYPES: dict[str, tuple[frozenset[str], str]] = {
    "image_caption": (FIGURE_TYPES, "caption"),
    "image_footnote": (FIGURE_TYPES, "footnote"),
    "table_caption": (frozenset({"table"}), "caption"),
    "table_footnote": (frozenset({"table"}), "footnote"),
    "code_caption": (CODE_TYPES, "caption"),
    "caption": (_VISUALS, "caption"),
    "footnote": (_VISUALS, "footnote"),
}
#: caption-like block -> the side its container conventionally is on: a figure above its caption and
#: its notes, a table below its caption and above its notes (scientific typesetting, LaTeX's defaults)
CONVENTIONAL_SIDE: dict[str, str] = {
    "image_caption": "above",
    "image_footnote": "above",
    "table_caption": "below",
    "table_footnote": "above",
}
#: the conventional side wins unless the other side's candidate is more than this many times nearer.
#: Between two stacked figures a caption is often a little nearer the next figure than its own
#: (arxiv-0908.0054 p3: 10 pt below, 13 pt above, as LaTeX puts \abovecaptionskip under a figure and
#: \floatsep after its caption); a journal that sets captions on the other side puts them a few
#: points from their figure and a float separation from the next, so more than twice as near.
CONVENTIONAL_SIDE_FACTOR = 2.0
SKIPPED_TYPES = frozenset({"list", "image_block", "equation_block", "unknown"})

_INLINE_MATH_RE = re.compile(r"\\\((.+?)\\\)", re.DOTALL)
_DISPLAY_MATH_RE = re.compile(r"\\\[(.+?)\\\]", re.DOTALL)
_CJK_RE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")


def text_math_to_dollars(text: str) -> str:
    """MinerU's ``\\(…\\)`` / ``\\[…\\]`` in running text as ``$…$`` / ``$$…$$``."""
    text = _DISPLAY_MATH_RE.sub(lambda m: f"$${m.group(1).strip()}$$", text)
    return _INLINE_MATH_RE.sub(lambda m: f"${m.group(1).strip()}$", text)


def latex_body(content: str) -> str:
    """An equation's LaTeX without the ``\\[ \\]`` (MinerU's post-processing) or ``$$`` around it."""
    body = content.strip()
    for opening, closing in (("\\[", "\\]"), ("$$", "$$"), ("\\(", "\\)")):
        if body.startswith(opening) and body.endswith(closing) and len(body) >= len(opening) + len(closing):
            body = body[len(opening) : len(body) - len(closing)].strip()
            break
    return body


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _fence_for(code: str) -> str:
    longest = max((len(run) for run in re.findall(r"`+", code)), default=0)
    return "`" * max(3, longest + 1)


@dataclass
class _Entry:
    kind: str  # the MinerU block type
    item: dict[str, Any]
    bbox: Sequence[float] | None
    captions: list[str] = field(default_factory=list)
    footnotes: list[str] = field(default_factory=list)
    extra_text: str = ""  # a table recognition that is not a table (kept, below the table)


def _gap(a: Sequence[float] | None, b: Sequence[float] | None) -> float:
    """How far apart two 0..1 boxes are: vertical gap, plus a penalty when they share no column."""
    if a is None or b is None:
        return 10.0
    vertical = max(0.0, b[1] - a[3], a[1] - b[3])
    horizontal = max(0.0, b[0] - a[2], a[0] - b[2])
    return vertical + (0.5 + horizontal if horizontal > 0 else 0.0)


def _owner(kind: str, bbox: Sequence[float] | None, candidates: Sequence[_Entry]) -> _Entry:
    """The container a caption-like block belongs to: the nearest one on its kind's conventional
    side (CONVENTIONAL_SIDE), unless one on the other side is clearly nearer; the nearest otherwise."""
    nearest = min(candidates, key=lambda e: _gap(e.bbox, bbox))
    side = CONVENTIONAL_SIDE.get(kind)
    if side is None or bbox is None:
        return nearest
    middle = (bbox[1] + bbox[3]) / 2

    def above(entry: _Entry) -> bool:
        return entry.bbox is not None and (entry.bbox[1] + entry.bbox[3]) / 2 < middle

    conventional = [e for e in candidates if e.bbox is not None and above(e) == (side == "above")]
    if not conventional:
        return nearest
    best = min(conventional, key=lambda e: _gap(e.bbox, bbox))
    if _gap(nearest.bbox, bbox) * CONVENTIONAL_SIDE_FACTOR < _gap(best.bbox, bbox):
        return nearest
    return best


def blocks_to_page(
    blocks: Sequence[Mapping[str, Any]], page_idx: int, crops: Mapping[int, str]
) -> tuple[str, list[dict[str, Any]]]:
    """(safe page Markdown, content list) for MinerU ``blocks`` in reading order.

    ``crops`` maps a block's index to its image path (``images/<sha256>.jpg``); a figure without
    one (an empty region) is left out, a table without one simply has no ``img_path``.
    """
    entries: list[_Entry | None] = []
    pending_captions: list[tuple[int, str, str, Sequence[float] | None]] = []
    for index, block in enumerate(blocks):
        kind = str(block.get("type") or "text")
        content = clean_text(str(block.get("content") or "")).strip()
        bbox = block.get("bbox")
        box = bbox_1000(bbox)
        base: dict[str, Any] = {"page_idx": page_idx, **({"bbox": box} if box is not None else {})}
        if kind in SKIPPED_TYPES:
            continue
        if kind in CAPTION_TYPES:
            if content:
                pending_captions.append((len(entries), kind, content, bbox))
                entries.append(None)  # where the caption stays if nothing claims it
            continue
        if kind in TITLE_LEVELS:
            if content:
                item = {"type": "text", "text": _one_line(text_math_to_dollars(content))}
                entries.append(_Entry(kind, {**item, "text_level": TITLE_LEVELS[kind], **base}, bbox))
        elif kind in TEXT_TYPES:
            if not content:
                continue
            text = text_math_to_dollars(content)
            previous = next((e for e in reversed(entries) if e is not None), None)
            if (
                block.get("merge_prev")
                and previous is not None
                and previous.item["type"] == "text"
                and "text_level" not in previous.item
            ):
                joiner = "" if _CJK_RE.search(text[:1] or " ") else " "
                previous.item["text"] += joiner + text
                continue
            entries.append(_Entry(kind, {"type": "text", "text": text, **base}, bbox))
        elif kind == "equation":
            body = latex_body(content)
            if body:
                item = {"type": "equation", "text": f"$$\n{body}\n$$", "text_format": "latex", **base}
                entries.append(_Entry(kind, item, bbox))
        elif kind == "formula_number":
            if not content:
                continue
            previous = next((e for e in reversed(entries) if e is not None), None)
            if previous is not None and previous.kind == "equation":
                number = content.strip("()\uff08\uff09 ")
                body = latex_body(previous.item["text"])
                previous.item["text"] = f"$$\n{body} \\tag{{{number}}}\n$$"
            else:
                entries.append(_Entry("text", {"type": "text", "text": content, **base}, bbox))
        elif kind in FIGURE_TYPES:
            path = crops.get(index)
            if path is None:
                continue
            item = {"type": "image", "img_path": path, "image_caption": [], "image_footnote": [], **base}
            if kind == "chart":
                item["sub_type"] = "chart"
            entries.append(_Entry(kind, item, bbox))
        elif kind == "table":
            table = sanitize_table_html(content) if "<table" in content.lower() else ""
            item = {"type": "table", "table_body": table, "table_caption": [], "table_footnote": [], **base}
            if index in crops:
                item["img_path"] = crops[index]
            if not table and "img_path" not in item and not content:
                continue
            entries.append(_Entry(kind, item, bbox, extra_text="" if table else content))
        elif kind in CODE_TYPES:
            if content:
                item = {"type": "code", "sub_type": kind, "code_body": content, "code_caption": [], **base}
                entries.append(_Entry(kind, item, bbox))
        elif kind in FURNITURE_TYPES:
            if content:
                entries.append(_Entry(kind, {"type": kind, "text": content, **base}, bbox))
        elif content:  # a block type MinerU adds later: keep its text rather than lose it
            entries.append(_Entry(kind, {"type": "text", "text": text_math_to_dollars(content), **base}, bbox))

    for slot, kind, content, bbox in pending_captions:
        targets, role = CAPTION_TYPES[kind]
        candidates = [e for e in entries if e is not None and e.kind in targets]
        if not candidates:
            box = bbox_1000(bbox)
            item = {"type": "text", "text": text_math_to_dollars(content), "page_idx": page_idx}
            entries[slot] = _Entry("text", {**item, **({"bbox": box} if box else {})}, bbox)
            continue
        owner = _owner(kind, bbox, candidates)
        (owner.captions if role == "caption" else owner.footnotes).append(_one_line(text_math_to_dollars(content)))

    markdown: list[str] = []
    content_list: list[dict[str, Any]] = []
    for entry in entries:
        if entry is None:
            continue
        item = entry.item
        if item["type"] == "image":
            item["image_caption"], item["image_footnote"] = entry.captions, entry.footnotes
        elif item["type"] == "table":
            item["table_caption"], item["table_footnote"] = entry.captions, entry.footnotes
        elif item["type"] == "code":
            item["code_caption"] = entry.captions + entry.footnotes
        content_list.append(item)
        if entry.extra_text:
            extra = {"type": "text", "text": entry.extra_text, "page_idx": page_idx}
            content_list.append({**extra, **({"bbox": item["bbox"]} if "bbox" in item else {})})
        markdown.extend(_markdown_of(entry))
    return safe_page_markdown("\n\n".join(part for part in markdown if part)), content_list


def _alt_text(captions: Sequence[str]) -> str:
    alt = _one_line(" ".join(captions))
    return alt.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")


def _markdown_of(entry: _Entry) -> list[str]:
    item = entry.item
    kind = item["type"]
    if kind == "text":
        level = item.get("text_level")
        return [f"{'#' * level} {item['text']}" if level else item["text"]]
    if kind == "equation":
        return [item["text"]]
    if kind == "image":
        # MinerU: the image, then its captions and footnotes as hard-broken lines of one paragraph.
        lines = [f"![{_alt_text(entry.captions)}]({item['img_path']})", *entry.captions, *entry.footnotes]
        return ["  \n".join(lines)]
    if kind == "table":
        parts = ["  \n".join(entry.captions)] if entry.captions else []
        if item["table_body"]:
            parts.append(item["table_body"])
        elif "img_path" in item:
            parts.append(f"![{_alt_text(entry.captions)}]({item['img_path']})")
        if entry.extra_text:
            parts.append(entry.extra_text)
        if entry.footnotes:
            parts.append("  \n".join(entry.footnotes))
        return parts
    if kind == "code":
        fence = _fence_for(item["code_body"])
        return [*(["  \n".join(entry.captions)] if entry.captions else []), f"{fence}\n{item['code_body']}\n{fence}"]
    return []  # page furniture: content list only
