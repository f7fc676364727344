"""What one chat completion holds in this process while it is in flight (issue 21 row 6).

Measured with tracemalloc against the real local server: a PNG of a few pixels carrying a 16 MB private
chunk (PNG readers skip it), so the request body is large while the server's work stays small. The
client may hold the request body (4/3 of the PNG) and, while it builds it, the image's base64 once;
before issue 21 it also kept the data URL (another 4/3) for the whole request, and the event loop's
transport copied the unsent body (another 4/3) while the server read it.
"""

from __future__ import annotations

import asyncio
import os
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

from mkg_pipeline.config import PipelineConfig
from mkg_pipeline.vllm.client import VLLMClient

PAYLOAD_BYTES = 16 * 2**20


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def heavy_png(payload: int = PAYLOAD_BYTES) -> bytes:
    """An 8 x 8 white PNG with ``payload`` random bytes in a private ancillary chunk (``mkGz``)."""
    header = struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0)  # 8 bits, greyscale
    pixels = zlib.compress(b"".join(b"\x00" + b"\xff" * 8 for _ in range(8)))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"mkGz", os.urandom(payload))
        + _chunk(b"IDAT", pixels)
        + _chunk(b"IEND", b"")
    )


def test_a_request_in_flight_holds_its_body_once(start_local_vlm_server: Callable[..., Any]) -> None:
    server = start_local_vlm_server(latency_s=0.5)  # the request stays in flight a while
    png = heavy_png()
    config = PipelineConfig.model_validate({"vllm": {"url": server.url, "model": server.model}})

    async def ask() -> tuple[int, str]:
        async with VLLMClient.from_config(config) as client:
            await client.health_check()  # connections and imports before the measurement
            tracemalloc.start()
            try:
                result = await client.chat_completion("Convert this page to Markdown.", [png], max_tokens=64)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            return peak, result.finish_reason or ""

    peak, finish = asyncio.run(ask())
    assert finish == "stop"
    body = len(png) * 4 / 3
    print(f"chat_completion peak traced memory: {peak / 2**20:.1f} MiB for a {body / 2**20:.1f} MiB body")
    # The body, plus the base64 while it is joined into the body; nothing else of its size.
    assert peak < 2 * body + 2**20, f"peak {peak / 2**20:.1f} MiB for a {body / 2**20:.1f} MiB body"
