"""The engine contract (docs/reference.md, "Engines"): what goes in, what comes out, and when an answer is refused.

No Dagster, no S3, no heavy imports here: the vlm stage and the tests import this module.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol

from mkg_pipeline.engines.validation import REJECT_REASONS


@dataclass(frozen=True)
class PageInput:
    """One rendered page as an engine sees it."""

    #: the page PNG as rendered; page_markdown sends it unchanged, mineru decodes it once (PIL)
    png: bytes
    #: 0-based page index, written into every content-list item
    page_idx: int
    #: characters of the PDF text layer on this page: > 0 makes an empty answer a failure ("empty")
    text_layer_chars: int
    #: "doc=<id> page=<n>", for logs and error messages
    label: str


@dataclass(frozen=True)
class PageResult:
    """An engine's accepted answer for one page."""

    #: this page's Markdown, already safe (see mkg_pipeline.engines.page_safety);
    #: figures linked as "images/<sha256>.jpg"
    markdown: str
    #: MinerU content-list items of this page (page_idx set), valid against outputs.CONTENT_LIST_SCHEMA
    content_list: list[dict[str, Any]]
    #: "images/<sha256>.jpg" -> JPEG bytes of the figure (and table) crops the page refers to
    images: dict[str, bytes]
    #: chat completions this page cost, re-asks included
    requests: int
    #: what the model said (surrogates replaced), kept in the page record; mineru: JSON list of its answers
    raw_answer: str
    #: the server's finish_reason: always "stop" (engines.validation); mineru: every answer stopped
    finish_reason: str | None
    #: the model that answered, as the answer names it: the configured model or one of its aliases
    #: (``vllm.served_model_aliases``); "" only from test doubles that do not say
    model: str = ""


class AnswerRejected(Exception):
    """The server answered, but the answer is not a page result: another model's, not finished with ``stop``
    (truncated, content filter, abort, ...), empty or a repetition loop (``engines.validation``).

    Raised by ``PageEngine.extract`` after its immediate re-asks (``answers.max_reasks``) are spent.
    The stage records a failed page with ``reason`` (never caches anything) so the next run asks again.
    """

    def __init__(self, reason: str, requests: int, message: str = "") -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}; expected one of {', '.join(REJECT_REASONS)}")
        super().__init__(message or reason)
        self.reason = reason
        #: chat completions the rejected answer(s) cost, re-asks included
        self.requests = requests

    @property
    def error_type(self) -> str:
        """Same attribute name as ``VLLMClientError.error_type``: the reason a failed page records."""
        return self.reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, self.requests, str(self)))


class PageEngine(Protocol):
    """Page image -> Markdown and a MinerU content list. Implementations know nothing of Dagster or S3."""

    name: str

    @property
    def identity(self) -> str:
        """engine|model|prompt_version: what makes an earlier answer reusable (cache key input)."""
        ...

    async def extract(self, page: PageInput) -> PageResult:
        """The page's result, or raises ``AnswerRejected`` / ``VLLMClientError``."""
        ...


def engine_identity(engine: str, model: str, prompt_version: str) -> str:
    """What makes an earlier answer reusable: same engine, same served model, same prompts."""
    return f"{engine}|{model}|{prompt_version}"


def page_cache_key(png_sha256: str, identity: str) -> str:
    """Key of one page's VLM result: the page image and everything that shapes the answer.

    A change of model, engine or prompt version gives a new key, so a stale answer
    is never reused; re-running with the same ones finds the finished page.
    """
    return hashlib.sha256(f"{png_sha256}\n{identity}".encode()).hexdigest()[:16]
