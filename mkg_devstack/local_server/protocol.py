"""The request side of vLLM's OpenAI-compatible protocol: validation, routing, token estimates.

As in vLLM's own ``entrypoints/openai/protocol.py``, a chat-completions body
is validated by a pydantic model (:class:`ChatCompletionRequest`); fields the
stand-in does not use (sampling parameters, ``vllm_xargs``, ``priority``, …)
are accepted and ignored, as vLLM accepts them. A body the model refuses is a
:class:`RequestError`, answered with 400.

Everything here is pure: no model, no numpy, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import enum
import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

# --------------------------------------------------------------------------- routing

LAYOUT_MARKER = "Layout Detection:"
TABLE_MARKER = "Table Recognition:"
TEXT_MARKERS = ("Text Recognition:", "Formula Recognition:", "Image Analysis:")
#: a phrase of olmOCR-2's prompt (engines.prompts.OLMOCR_PROMPT); answered by answers.olmocr_answer
OLMOCR_MARKER = "with a front matter section on top specifying values for the primary_language"


class Route(enum.StrEnum):
    LAYOUT = "layout"
    """MinerU's first step: the page's blocks, in MinerU's layout format."""
    TABLE = "table"
    """MinerU's table recognition: the crop of one table, answered in OTSL."""
    RECOGNITION = "recognition"
    """MinerU's text (and formula, image) recognition: the text of one block's crop."""
    OLMOCR = "olmocr"
    """olmOCR-2's prompt: the whole page as YAML front matter (language, rotation, ...) and Markdown."""
    PAGE_MARKDOWN = "page_markdown"
    """Anything else: the whole page as Markdown."""


def route_for_prompt(prompt: str | None) -> Route:
    """MinerU's two-step prompts and olmOCR's are recognised by their markers; anything else is a page."""
    text = prompt or ""
    if LAYOUT_MARKER in text:
        return Route.LAYOUT
    if TABLE_MARKER in text:
        return Route.TABLE
    if any(marker in text for marker in TEXT_MARKERS):
        return Route.RECOGNITION
    if OLMOCR_MARKER in text:
        return Route.OLMOCR
    return Route.PAGE_MARKDOWN


# --------------------------------------------------------------------------- request model


class RequestError(ValueError):
    """A request vLLM would refuse with 400; the message goes back to the client."""


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class ImageURL(_Lenient):
    url: StrictStr = Field(min_length=1)


class TextPart(_Lenient):
    type: Literal["text"]
    text: StrictStr


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL | Annotated[StrictStr, Field(min_length=1)]
    """OpenAI nests ``{"url": ...}``; vLLM also takes a bare string."""

    @property
    def url(self) -> str:
        return self.image_url.url if isinstance(self.image_url, ImageURL) else self.image_url


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Lenient):
    role: StrictStr
    content: StrictStr | list[ContentPart] | None = None

    @property
    def texts(self) -> list[str]:
        if self.content is None:
            return []
        if isinstance(self.content, str):
            return [self.content]
        return [part.text for part in self.content if isinstance(part, TextPart)]

    @property
    def image_urls(self) -> list[str]:
        if not isinstance(self.content, list):
            return []
        return [part.url for part in self.content if isinstance(part, ImagePart)]


class StreamOptions(_Lenient):
    include_usage: StrictBool = False


class ChatCompletionRequest(_Lenient):
    """An OpenAI chat-completions body as vLLM accepts it; unknown sampling fields are ignored."""

    model: StrictStr | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @property
    def prompt(self) -> str:
        """The last text part of the last user message that has text: what routing looks at."""
        for message in reversed(self.messages):
            if message.role == "user" and message.texts:
                return message.texts[-1]
        return ""

    @property
    def text_chars(self) -> int:
        """All text in all messages, for the prompt-token estimate."""
        return sum(len(text) for message in self.messages for text in message.texts)

    @property
    def image_urls(self) -> tuple[str, ...]:
        return tuple(url for message in self.messages for url in message.image_urls)

    @property
    def token_limit(self) -> int | None:
        """The completion budget: vLLM prefers ``max_completion_tokens`` when both are given."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    return f"{where}: {first['msg']}"


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body; :class:`RequestError` (400) with the first problem found."""
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise RequestError(_describe(exc)) from None


_DATA_URL_RE = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^,;]*)*),(?P<data>.*)$", re.DOTALL)


def decode_data_url(url: str) -> bytes:
    """The bytes of a ``data:image/...;base64,`` URL (the only kind an offline server can read)."""
    match = _DATA_URL_RE.match(url)
    if match is None:
        raise RequestError("only data: URLs are supported for images (data:image/png;base64,...)")
    mime = (match.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise RequestError(f"data URL has media type {mime!r}, expected an image")
    if ";base64" not in match.group("params").lower():
        raise RequestError("image data URL must be base64-encoded")
    try:
        data = base64.b64decode(re.sub(r"\s+", "", match.group("data")), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"image data URL is not valid base64: {exc}") from None
    if not data:
        raise RequestError("image data URL is empty")
    return data


# --------------------------------------------------------------------------- tokens


def estimate_text_tokens(chars: int) -> int:
    """About four characters per token: good enough for counters and max_tokens."""
    return math.ceil(chars / 4)


def estimate_image_tokens(width: int, height: int) -> int:
    """Qwen2.5-VL spends one token per 28x28 pixel patch (14 px patches merged 2x2)."""
    return max(1, math.ceil(width / 28) * math.ceil(height / 28))


def truncate_to_tokens(text: str, max_tokens: int | None) -> tuple[str, str]:
    """(content, finish_reason): cut at ``max_tokens`` (about 4 chars each) like a length stop."""
    if max_tokens is not None and estimate_text_tokens(len(text)) > max_tokens:
        return text[: max_tokens * 4], "length"
    return text, "stop"
