"""One request per page with a page-to-Markdown prompt (Qwen2.5-VL-7B-Instruct and the like).

The answer is validated (:mod:`mkg_pipeline.engines.validation`): an answer from another model
(``model_mismatch``), any ``finish_reason`` but ``"stop"`` (``truncated`` for ``length``,
``finish_<reason>`` otherwise), an empty answer on a page with a text layer (``empty``) or a runaway
repetition (``repetition``) is asked again at once, up to ``answers.max_reasks`` times (``max_tokens``
doubled after a truncation; the first ask greedy, re-ask *n* at olmOCR's temperature for attempt *n*,
:mod:`mkg_pipeline.engines.schedule`), then rejected with :class:`AnswerRejected`; every ask counts in
``requests``. The result records the model that answered.

An accepted answer becomes the page's Markdown (made safe by :func:`safe_page_markdown`) and a
MinerU content list parsed from it with a CommonMark parser (markdown-it, with GFM tables): one
``text`` item per paragraph or list item, headings with ``text_level``, ``$$`` blocks as
``equation``, Markdown pipe tables and HTML tables as ``table`` items whose ``table_body`` is HTML,
fenced code as ``code``. The model gives no positions, so items have no ``bbox``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mkg_pipeline.engines.base import AnswerRejected, PageInput, PageResult, engine_identity
from mkg_pipeline.engines.content_list import latex_body, text_math_to_dollars
from mkg_pipeline.engines.page_safety import (
    ParsedPage,
    clean_text,
    html_to_text,
    markdown_parser,
    parse_page,
    safe_page_markdown,
    sanitize_table_html,
)
from mkg_pipeline.engines.prompts import PAGE_MARKDOWN_PROMPT, PAGE_MARKDOWN_SYSTEM_PROMPT
from mkg_pipeline.engines.schedule import reask_temperature
from mkg_pipeline.engines.validation import answer_problem, log_rejected, next_max_tokens

if TYPE_CHECKING:
    from mkg_pipeline.config import PipelineConfig
    from mkg_pipeline.vllm.client import VLLMClient

ENGINE_NAME = "page_markdown"

# Instruction VLMs often wrap their answer in a ```markdown fence despite being asked not to.
_FENCE_RE = re.compile(r"^\s*```(?:markdown|md)?\s*\n(?P<body>.*?)\n?```\s*$", re.DOTALL | re.IGNORECASE)
_FENCE_LINE_RE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def strip_markdown_fence(text: str) -> str:
    match = _FENCE_RE.match(text)
    return match.group("body") if match else text


def outside_code(markdown: str, change: Callable[[str], str]) -> str:
    """``change`` applied to the text outside fenced code blocks (code is left as written)."""
    chunks: list[str] = []
    prose: list[str] = []
    fence: str | None = None
    for line in markdown.split("\n"):
        marker = _FENCE_LINE_RE.match(line)
        if fence is None and marker:
            if prose:
                chunks.append(change("\n".join(prose)))
                prose = []
            fence = marker.group(1)
            chunks.append(line)
        elif fence is not None:
            chunks.append(line)
            if marker and marker.group(1)[0] == fence[0] and len(marker.group(1)) >= len(fence):
                fence = None
        else:
            prose.append(line)
    if prose:
        chunks.append(change("\n".join(prose)))
    return "\n".join(chunks)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _is_display_math(text: str) -> bool:
    body = text.strip()
    return (body.startswith("$$") and body.endswith("$$") and len(body) > 4) or (
        body.startswith("\\[") and body.endswith("\\]")
    )


def _closing(tokens: list[Any], start: int) -> int:
    """Index of the token closing the block opened at ``start``."""
    depth = 0
    for index in range(start, len(tokens)):
        depth += tokens[index].nesting
        if depth == 0:
            return index
    return len(tokens) - 1


def markdown_to_content_list(markdown: str | ParsedPage, page_idx: int) -> list[dict[str, Any]]:
    """MinerU content-list items for a page's Markdown (see the module docstring); ``markdown`` may be
    the page as :func:`parse_page` read it for :func:`safe_page_markdown`, so it is not parsed again."""
    page = markdown if isinstance(markdown, ParsedPage) else parse_page(markdown)
    parser = markdown_parser()
    tokens = page.tokens
    lines = page.text.split("\n")
    items: list[dict[str, Any]] = []

    def add(item: dict[str, Any]) -> None:
        items.append({**item, "page_idx": page_idx})

    def source(token: Any) -> str:
        start, end = token.map or (0, 0)
        return "\n".join(lines[start:end]).strip()

    index = 0
    while index < len(tokens):
        token = tokens[index]
        end = _closing(tokens, index) if token.nesting == 1 else index
        if token.type == "heading_open":
            text = _one_line(tokens[index + 1].content)
            if text:
                add({"type": "text", "text": text, "text_level": int(token.tag[1:])})
        elif token.type == "paragraph_open":
            text = tokens[index + 1].content.strip()
            if _is_display_math(text):
                add({"type": "equation", "text": f"$$\n{latex_body(text)}\n$$", "text_format": "latex"})
            elif text:
                add({"type": "text", "text": text})
        elif token.type == "table_open":
            table = sanitize_table_html(parser.renderer.render(tokens[index : end + 1], parser.options, {}))
            add({"type": "table", "table_body": table, "table_caption": [], "table_footnote": []})
        elif token.type == "html_block":
            if "<table" in token.content.lower():
                table = sanitize_table_html(token.content)
                add({"type": "table", "table_body": table, "table_caption": [], "table_footnote": []})
            else:
                text = html_to_text(token.content)
                if text:
                    add({"type": "text", "text": text})
        elif token.type in {"fence", "code_block"}:
            code = token.content.rstrip("\n")
            if code.strip():
                add({"type": "code", "sub_type": "code", "code_body": code, "code_caption": []})
        elif token.type in {"bullet_list_open", "ordered_list_open"}:
            for inner in tokens[index:end]:
                if inner.type == "list_item_open" and inner.level == token.level + 1:
                    text = source(inner)
                    if text:
                        add({"type": "text", "text": text})
        elif token.type == "blockquote_open":
            text = source(token)
            if text:
                add({"type": "text", "text": text})
        index = end + 1
    return items


#: the first ask is greedy: the answer almost every page keeps, reproducible (``engines.schedule``)
FIRST_TEMPERATURE = 0.0


class PageMarkdownEngine:
    name = ENGINE_NAME

    def __init__(self, client: VLLMClient, settings: PipelineConfig) -> None:
        self._client = client
        self._prompt_version = settings.prompt_version
        self._max_tokens = settings.answers.max_tokens
        self._max_reasks = settings.answers.max_reasks
        #: the answer policy, also read by the vlm stage (the text-layer fallback and its budget)
        self.answers = settings.answers

    @property
    def identity(self) -> str:
        return engine_identity(self.name, self._client.model, self._prompt_version)

    async def extract(self, page: PageInput) -> PageResult:
        max_tokens = self._max_tokens
        requests = 0
        reason, detail = "", ""
        for ask in range(1, self._max_reasks + 2):
            label = page.label if ask == 1 else f"{page.label} ask={ask}"
            result = await self._client.chat_completion(
                PAGE_MARKDOWN_PROMPT,
                [page.png],
                system_prompt=PAGE_MARKDOWN_SYSTEM_PROMPT,
                max_tokens=max_tokens,
                # Greedy first; each re-ask a step up olmOCR's schedule (engines.schedule).
                temperature=reask_temperature(ask, FIRST_TEMPERATURE),
                label=label,
            )
            requests += 1
            raw = clean_text(result.text)
            body = strip_markdown_fence(raw).strip()
            problem = answer_problem(
                body,
                result.finish_reason,
                model=result.model,
                accepted_models=self._client.accepted_models,
                require_text=page.text_layer_chars > 0,
            )
            if problem is None:
                # One parse of the answer for both its safe Markdown and its content list.
                parsed = parse_page(outside_code(body, text_math_to_dollars))
                return PageResult(
                    markdown=safe_page_markdown(parsed),
                    content_list=markdown_to_content_list(parsed, page.page_idx),
                    images={},
                    requests=requests,
                    raw_answer=raw,
                    finish_reason=result.finish_reason,
                    model=result.model or self._client.model,  # never empty: a nameless answer is a mismatch
                )
            reason, detail = problem
            log_rejected(label, reason, detail, ask=ask, max_reasks=self._max_reasks)
            max_tokens = next_max_tokens(max_tokens, reason)
        raise AnswerRejected(reason, requests, f"{page.label}: {reason} answer ({detail}) after {requests} asks")


ENGINE_CLASS = PageMarkdownEngine
