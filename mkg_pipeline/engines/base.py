"""What every page engine produces, and the cache identity of its answers."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Block:
    """One piece of a page, MinerU content-list style.

    ``bbox`` is (x0, y0, x1, y1) relative to the page image (0..1), or None when
    the engine does not locate blocks (page_markdown).
    """

    type: str
    text: str
    bbox: tuple[float, float, float, float] | None = None
    angle: int | None = None

    def to_content_item(self, page_idx: int) -> dict[str, Any]:
        item = asdict(self)
        item["bbox"] = list(self.bbox) if self.bbox is not None else None
        item["page_idx"] = page_idx
        return item


@dataclass(frozen=True)
class PageInput:
    """One page as the stage hands it to an engine."""

    png: bytes
    page_idx: int  # 0-based, as in MinerU's content list
    text_layer_chars: int  # > 0: the page has text, so an empty answer is wrong
    label: str  # "doc=<id> page=<n>", for logs and errors


@dataclass(frozen=True)
class PageResult:
    """An engine's answer for one page."""

    markdown: str
    content_list: list[dict[str, Any]] = field(default_factory=list)
    #: "images/<sha256>.jpg" -> JPEG bytes of the figures cropped from the page
    images: dict[str, bytes] = field(default_factory=dict)
    #: chat-completion requests this page cost (MinerU: 1 layout + 1 per block)
    requests: int = 1
    raw_answer: str = ""
    finish_reason: str | None = None


class AnswerRejected(Exception):
    """The server answered, but the answer must not be cached (truncated, empty, repetition)."""

    def __init__(self, reason: str, message: str, *, requests: int = 1) -> None:
        self.reason = reason
        self.requests = requests
        super().__init__(message)


class PageEngine(Protocol):
    """Page image → Markdown. Implementations know nothing of Dagster or S3."""

    name: str

    @property
    def identity(self) -> str:
        """Engine + model + prompt version: what makes an earlier answer reusable."""
        ...

    async def extract(self, page: PageInput) -> PageResult: ...


def engine_identity(engine: str, model: str, prompt_version: str) -> str:
    """What makes an earlier answer reusable: same engine, same served model, same prompts."""
    return f"{engine}|{model}|{prompt_version}"


def page_cache_key(png_sha256: str, identity: str) -> str:
    """Key of one page's VLM result: the page image and everything that shapes the answer.

    A change of model, engine or prompt version gives a new key, so a stale answer
    is never reused; re-running with the same ones finds the finished page.
    """
    return hashlib.sha256(f"{png_sha256}\n{identity}".encode()).hexdigest()[:16]


def blocks_to_markdown(blocks: list[Block] | tuple[Block, ...]) -> str:
    """Markdown for MinerU-style blocks, in the order given (the engine's reading order)."""
    parts: list[str] = []
    for block in blocks:
        text = block.text.strip()
        if not text:
            continue
        if block.type in {"title", "doc_title"}:
            parts.append("# " + " ".join(text.split()))
        elif block.type == "paragraph_title":
            parts.append("## " + " ".join(text.split()))
        elif block.type in {"equation", "equation_block"} and not text.startswith("$$"):
            parts.append(f"$$\n{text}\n$$")
        elif block.type == "code":
            parts.append(f"```\n{text}\n```")
        else:
            parts.append(text)
    return "\n\n".join(parts)
