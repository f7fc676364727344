"""A scripted OpenAI-compatible server for engine unit tests: our real VLLMClient over httpx.MockTransport.

``ScriptedVLM(answer)`` answers every chat completion with ``answer(body)``: a string (finish_reason
"stop"), a ``(text, finish_reason)`` pair, or an ``httpx.Response``. Every request body is kept in
``.bodies`` so a test can check what was asked (prompts, max_tokens) and how often.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx

from mkg_pipeline.config import CircuitBreakerConfig, HTTPClientConfig, VLLMServerConfig
from mkg_pipeline.vllm.breaker import CircuitBreaker
from mkg_pipeline.vllm.client import VLLMClient

URL = "http://scripted-vlm.test:8000"
MODEL = "scripted/model"

Answer = str | tuple[str, str | None] | httpx.Response


def chat_response(text: str, finish_reason: str | None = "stop") -> httpx.Response:
    body = {
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 10, "completion_tokens": max(1, len(text) // 4)},
    }
    # ensure_ascii keeps a lone surrogate as the JSON escape "\ud800", as a real server may send it
    return httpx.Response(
        200, content=json.dumps(body, ensure_ascii=True).encode(), headers={"content-type": "application/json"}
    )


def prompt_of(body: dict[str, Any]) -> str:
    """The last text part of the last message: what MinerU's prompts and ours are recognised by."""
    content = body["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return [part["text"] for part in content if part.get("type") == "text"][-1]


class ScriptedVLM:
    def __init__(self, answer: Callable[[dict[str, Any]], Answer]) -> None:
        self._answer = answer
        self.bodies: list[dict[str, Any]] = []

    def _handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        answer = self._answer(body)
        if isinstance(answer, httpx.Response):
            return answer
        if isinstance(answer, tuple):
            return chat_response(*answer)
        return chat_response(answer)

    def client(self) -> VLLMClient:
        return VLLMClient(
            VLLMServerConfig(url=URL, model=MODEL),
            HTTPClientConfig(max_attempts=1),
            transport=httpx.MockTransport(self._handle),
            breaker=CircuitBreaker(URL, CircuitBreakerConfig()),
        )

    @property
    def prompts(self) -> list[str]:
        return [prompt_of(body) for body in self.bodies]


# ----------------------------------------------------------------------------- olmOCR-2-style answers


def image_of(body: dict[str, Any]) -> bytes:
    """The PNG bytes of the first ``data:`` image in a chat body."""
    import base64

    for part in body["messages"][-1]["content"]:
        if isinstance(part, dict) and part.get("type") == "image_url":
            return base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
    raise AssertionError("the request has no image")


def olmocr_answer(
    text: str,
    *,
    language: str | None = "en",
    rotation_valid: bool = True,
    rotation_correction: int = 0,
    is_table: bool = False,
    is_diagram: bool = False,
) -> str:
    """An answer as olmOCR-2 writes it: YAML front matter (Python-style ``True``/``False``, ``None`` as
    ``null``), then the page text (olmocr/train/dataloader.py ``FrontMatterOutputFormat``)."""
    return (
        "---\n"
        f"primary_language: {'null' if language is None else language}\n"
        f"is_rotation_valid: {rotation_valid}\n"
        f"rotation_correction: {rotation_correction}\n"
        f"is_table: {is_table}\n"
        f"is_diagram: {is_diagram}\n"
        "---\n"
        f"{text}"
    ).strip()


def marked_page_png(width: int = 120, height: int = 160) -> bytes:
    """A white portrait page with a black square in its top-left corner: its orientation is visible."""
    import io

    from PIL import Image

    image = Image.new("RGB", (width, height), "white")
    image.paste((0, 0, 0), (0, 0, width // 4, width // 4))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def correction_for(png: bytes) -> int:
    """olmOCR's ``rotation_correction`` for an image of :func:`marked_page_png`: the PIL
    ``ROTATE_<n>`` (counter-clockwise) turn that sets it upright (portrait, mark top-left)."""
    import io

    from PIL import Image

    turns = {0: None, 90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}
    with Image.open(io.BytesIO(png)) as opened:
        image = opened.convert("L")
    for degrees, turn in turns.items():
        turned = image if turn is None else image.transpose(turn)
        if (
            turned.height > turned.width
            and turned.getpixel((2, 2)) < 128
            and turned.getpixel((turned.width - 3, 2)) > 128
        ):
            return degrees
    raise AssertionError("not a marked page")
