"""One request per page with a page-to-Markdown prompt (Qwen2.5-VL-7B-Instruct and the like)."""

from __future__ import annotations

import re

from mkg_pipeline.engines.base import PageInput, PageResult, engine_identity
from mkg_pipeline.engines.prompts import PAGE_MARKDOWN_PROMPT, PAGE_MARKDOWN_SYSTEM_PROMPT
from mkg_pipeline.config import MinerUConfig
from mkg_pipeline.vllm.client import VLLMClient

ENGINE_NAME = "page_markdown"

# Instruction VLMs often wrap their answer in a ```markdown fence despite being asked not to.
_FENCE_RE = re.compile(r"^\s*```(?:markdown|md)?\s*\n(?P<body>.*?)\n?```\s*$", re.DOTALL | re.IGNORECASE)


def strip_markdown_fence(text: str) -> str:
    match = _FENCE_RE.match(text)
    return match.group("body") if match else text


def markdown_to_content_list(markdown: str, page_idx: int) -> list[dict]:
    """Split a page's Markdown into content-list items (no positions: the model gives none)."""
    items: list[dict] = []
    for chunk in re.split(r"\n\s*\n", markdown.strip()):
        chunk = chunk.strip()
        if chunk:
            items.append({"type": "text", "text": chunk, "page_idx": page_idx})
    return items


class PageMarkdownEngine:
    name = ENGINE_NAME

    def __init__(self, client: VLLMClient, settings: MinerUConfig) -> None:
        self._client = client
        self._prompt_version = settings.prompt_version
        self._max_tokens = settings.answers.max_tokens

    @property
    def identity(self) -> str:
        return engine_identity(self.name, self._client.model, self._prompt_version)

    async def extract(self, page: PageInput) -> PageResult:
        result = await self._client.chat_completion(
            PAGE_MARKDOWN_PROMPT,
            [page.png],
            system_prompt=PAGE_MARKDOWN_SYSTEM_PROMPT,
            max_tokens=self._max_tokens,
            label=page.label,
        )
        markdown = strip_markdown_fence(result.text).strip()
        return PageResult(
            markdown=markdown,
            content_list=markdown_to_content_list(markdown, page.page_idx),
            images={},
            requests=1,
            raw_answer=result.text,
            finish_reason=result.finish_reason,
        )
