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
