"""What goes on the wire for a chat completion: vLLM's JSON body, its server-sent events, and the
hostile bodies of fault injection (a body that trickles, a body too large to hold)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from fastapi.responses import Response, StreamingResponse

STREAM_PIECE = 64  # characters of content per server-sent event, as a model streams a few tokens at a time
HUGE_CHUNK = 1 << 20  # bytes of filler per chunk of a huge answer: memory stays flat whatever its size
HUGE_FILLER = "all work and no play makes a huge answer. "


@dataclass(frozen=True)
class Completion:
    """One finished answer and what it is reported with."""

    completion_id: str
    created: int
    model: str
    content: str
    finish_reason: str | None  # None only from fault injection (no_finish)
    usage: dict[str, int]

    def body(self) -> dict[str, Any]:
        return {
            "id": self.completion_id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.content, "tool_calls": []},
                    "logprobs": None,
                    "finish_reason": self.finish_reason,
                    "stop_reason": None,
                }
            ],
            "usage": self.usage,
        }

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        payload = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }
        return f"data: {_dumps(payload)}\n\n".encode()


def _dumps(payload: Any) -> str:
    """JSON as vLLM sends it (UTF-8, not ASCII-escaped), except that a lone surrogate, which has no
    UTF-8 form, goes out as its JSON escape (``\\ud800``), as a Python or JavaScript server would send it."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(payload, ensure_ascii=True, separators=(",", ":"))
    return text


def json_response(completion: Completion) -> Response:
    return Response(_dumps(completion.body()).encode(), media_type="application/json")


def _choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def _events(completion: Completion, include_usage: bool) -> list[bytes]:
    """Server-sent events as vLLM streams them: role, content pieces, finish, [usage], [DONE]."""
    content = completion.content
    events = [completion.chunk([_choice({"role": "assistant", "content": ""})])]
    events += [
        completion.chunk([_choice({"content": content[start : start + STREAM_PIECE]})])
        for start in range(0, len(content), STREAM_PIECE)
    ]
    events.append(completion.chunk([_choice({}, completion.finish_reason)]))
    if include_usage:
        events.append(completion.chunk([], usage=completion.usage))
    events.append(b"data: [DONE]\n\n")
    return events


async def _iterate(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def stream_response(completion: Completion, include_usage: bool) -> StreamingResponse:
    return StreamingResponse(_iterate(_events(completion, include_usage)), media_type="text/event-stream")


async def _trickle(filler: bytes, body: bytes, interval_s: float, duration_s: float) -> AsyncIterator[bytes]:
    """One ``filler`` byte per ``interval_s`` for ``duration_s``, then ``body``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + duration_s
    while loop.time() < deadline:
        yield filler
        await asyncio.sleep(interval_s)
    yield body


def trickle_response(completion: Completion, interval_s: float, duration_s: float, stream: bool) -> StreamingResponse:
    """A 200 whose body dribbles in one byte every ``interval_s``: a server that never finishes.

    The bytes are leading whitespace of the JSON body, or empty lines of the
    event stream, so whatever finally arrives is well formed. Starlette stops the
    generator when the client goes away.
    """
    if stream:
        body, filler, media_type = b"".join(_events(completion, True)), b"\n", "text/event-stream"
    else:
        body, filler, media_type = _dumps(completion.body()).encode(), b" ", "application/json"
    return StreamingResponse(_trickle(filler, body, interval_s, duration_s), media_type=media_type)


async def _huge_json(completion: Completion, size: int) -> AsyncIterator[bytes]:
    head, tail = _dumps(completion.body()).encode().split(b'"content":""', 1)
    yield head + b'"content":"'
    filler = (HUGE_FILLER * (HUGE_CHUNK // len(HUGE_FILLER) + 1))[:HUGE_CHUNK].encode()
    remaining = max(0, size - len(head) - len(tail) - len(b'"content":""'))
    while remaining > 0:
        piece = filler[:remaining]
        remaining -= len(piece)
        yield piece
        await asyncio.sleep(0)  # let the loop notice a client that gave up
    yield b'"' + tail


async def _huge_events(completion: Completion, size: int) -> AsyncIterator[bytes]:
    filler = (HUGE_FILLER * (HUGE_CHUNK // len(HUGE_FILLER) + 1))[:HUGE_CHUNK]
    yield completion.chunk([_choice({"role": "assistant", "content": ""})])
    sent = 0
    while sent < size:
        event = completion.chunk([_choice({"content": filler})])
        sent += len(event)
        yield event
        await asyncio.sleep(0)
    yield completion.chunk([_choice({}, completion.finish_reason)])
    yield b"data: [DONE]\n\n"


def huge_response(completion: Completion, size: int, stream: bool) -> StreamingResponse:
    """An answer of about ``size`` bytes, produced chunk by chunk (never held in memory), without a
    Content-Length: only reading it tells how large it is."""
    empty = replace(completion, content="")
    if stream:
        return StreamingResponse(_huge_events(empty, size), media_type="text/event-stream")
    return StreamingResponse(_huge_json(empty, size), media_type="application/json")
