"""The guarded client against a real local server that goes down and comes back."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image

from mkg_devstack.local_stack import free_port
from mkg_pipeline.config import CircuitBreakerConfig, HTTPClientConfig, VLLMServerConfig
from mkg_pipeline.metrics.client import REGISTRY
from mkg_pipeline.vllm.breaker import CircuitBreaker
from mkg_pipeline.vllm.client import VLLMClient
from mkg_pipeline.vllm.errors import CircuitOpenError, VLLMClientError, VLLMServerError, VLLMTimeoutError
from mkg_pipeline_tests.fixtures.corpus import REPO_ROOT

pytestmark = pytest.mark.integration

THRESHOLD = 3
SUCCESSES = 2


def _blank_png() -> bytes:
    # A tiny blank page: exercises the whole HTTP path while costing the OCR almost nothing.
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buffer, format="PNG")
    return buffer.getvalue()


def _client(server, breaker: CircuitBreaker, attempts: int = 1) -> VLLMClient:
    return VLLMClient(
        VLLMServerConfig(url=server.url, model=server.model, api_key=server.api_key, connection_timeout_s=2),
        HTTPClientConfig(max_attempts=attempts, backoff_initial_s=0, backoff_max_s=0.05, timeout_s=30),
        breaker=breaker,
    )


def _breaker_gauge(url: str) -> float | None:
    return REGISTRY.get_sample_value("mineru_vllm_circuit_breaker_state", {"server": url})


async def test_breaker_opens_fails_fast_and_closes_when_server_returns(start_local_vlm_server) -> None:
    server = start_local_vlm_server()
    png = _blank_png()
    config = CircuitBreakerConfig(
        failure_threshold=THRESHOLD, recovery_timeout_s=0.5, success_threshold=SUCCESSES, half_open_max_calls=1
    )
    now = [0.0]  # the breaker's clock: its recovery timeout passes when the test says so
    breaker = CircuitBreaker(server.url, config, clock=lambda: now[0])

    async with _client(server, breaker) as client:
        assert (await client.chat_completion("Text Recognition:", [png], label="warm-up")).finish_reason == "stop"

    server.kill()
    async with _client(server, breaker) as client:
        errors: list[Exception] = []
        for i in range(THRESHOLD):
            with pytest.raises(VLLMClientError) as info:
                await client.chat_completion("Text Recognition:", [png], label=f"down-{i}")
            errors.append(info.value)
        assert not any(isinstance(e, CircuitOpenError) for e in errors)
        assert all(server.url in str(e) for e in errors)
        # Threshold reached: the breaker is open and further calls fail fast, without network I/O.
        assert _breaker_gauge(server.url) == 2
        started = time.perf_counter()
        for i in range(200):
            with pytest.raises(CircuitOpenError):
                await client.chat_completion("Text Recognition:", [png], label=f"fast-{i}")
        per_call = (time.perf_counter() - started) / 200
        assert per_call < 0.005, f"open breaker took {per_call * 1000:.2f} ms per call"
        # Issue 9 row 8: failing fast still names the real cause, the refused connections.
        with pytest.raises(CircuitOpenError) as opened:
            await client.chat_completion("Text Recognition:", [png], label="fast-cause")
        assert opened.value.first_cause == "connect"

        # No request is silently dropped: every concurrent caller gets an answer or an exception.
        results = await asyncio.gather(
            *(client.chat_completion("Text Recognition:", [png], label=f"burst-{i}") for i in range(20)),
            return_exceptions=True,
        )
        assert len(results) == 20
        assert all(isinstance(r, CircuitOpenError) for r in results)

    server.start()  # back on the same port
    assert breaker.seconds_until_probe() == 0.5  # the fake clock has not moved: still open
    now[0] += 0.6  # past the recovery timeout: the next call is a probe
    async with _client(server, breaker) as client:
        before = server.read_metric("vllm:request_success_total")
        for i in range(SUCCESSES):
            result = await client.chat_completion("Text Recognition:", [png], label=f"probe-{i}")
            assert result.finish_reason == "stop"
        assert server.read_metric("vllm:request_success_total") - before == SUCCESSES
    assert _breaker_gauge(server.url) == 0


async def test_server_errors_are_retried_then_reported(start_local_vlm_server) -> None:
    server = start_local_vlm_server(enable_fault_injection=True)
    server.set_faults(error_rate=1.0)
    breaker = CircuitBreaker(server.url, CircuitBreakerConfig(failure_threshold=50))
    retries = REGISTRY.get_sample_value("mineru_vllm_client_retries_total") or 0.0
    async with _client(server, breaker, attempts=3) as client:
        with pytest.raises(VLLMServerError) as info:
            await client.chat_completion("Text Recognition:", [_blank_png()], label="doc=x page=1")
    assert "doc=x page=1" in str(info.value)
    assert (REGISTRY.get_sample_value("mineru_vllm_client_retries_total") or 0.0) - retries == 2

    server.set_faults(error_rate=0.0)
    async with _client(server, breaker, attempts=3) as client:
        assert (await client.chat_completion("Text Recognition:", [_blank_png()])).finish_reason == "stop"


# -- hostile servers (issue 9 rows 5 and 6) --------------------------------------------------------
#
# A tiny asyncio HTTP server on 127.0.0.1, in a thread of its own, that answers every request the
# hostile way it is told to: dripping bytes, or streaming a gigantic answer.

HUGE_BYTES = 400 * 1024 * 1024


class HostileServer:
    def __init__(self, behaviour: str, interval_s: float = 0.5) -> None:
        self.behaviour = behaviour
        self.interval_s = interval_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.bytes_sent = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HostileServer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._handlers: set[asyncio.Task[None]] = set()
        server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self._ready.set()
        async with server:
            await self._stop.wait()
            for task in self._handlers:  # a dripping handler would outlive the test otherwise
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                ),
                0,
            )
            await reader.readexactly(length)
            body = json.dumps(
                {
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": "slow"}, "finish_reason": "stop"}
                    ]
                }
            ).encode()
            if self.behaviour == "trickle-headers":
                await self._drip(writer, b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
            elif self.behaviour == "trickle-body":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % 10**6)
                await self._drip(writer, b" " * 10**6)
            elif self.behaviour in ("huge-chunked", "huge-declared"):
                await self._huge(writer, chunked=self.behaviour == "huge-chunked")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _drip(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        for i in range(len(data)):  # one byte every interval: each read gets data well within a read timeout
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(self.interval_s)

    async def _huge(self, writer: asyncio.StreamWriter, *, chunked: bool) -> None:
        """A well-formed chat completion whose content is HUGE_BYTES long, generated on the fly."""
        head = b'{"choices":[{"index":0,"finish_reason":"stop","message":{"role":"assistant","content":"'
        tail = b'"}}]}'
        block = b"a" * 65536
        total = len(head) + HUGE_BYTES + len(tail)
        framing = b"transfer-encoding: chunked" if chunked else b"content-length: %d" % total
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + framing + b"\r\n\r\n")

        def send(data: bytes) -> None:
            writer.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            self.bytes_sent += len(data)

        send(head)
        for _ in range(HUGE_BYTES // len(block)):
            send(block)
            await writer.drain()
        send(tail)
        if chunked:
            writer.write(b"0\r\n\r\n")
        await writer.drain()


@pytest.mark.parametrize("where", ["headers", "body"])
async def test_trickling_server_fails_the_attempt_as_timeout_at_the_total_deadline(where: str) -> None:
    """Issue 9 row 5: one byte every 0.5 s never trips a per-read timeout of 1 s; the total deadline does."""
    with HostileServer(f"trickle-{where}", interval_s=0.5) as server:
        breaker = CircuitBreaker(server.url, CircuitBreakerConfig(failure_threshold=50))
        config = VLLMServerConfig(url=server.url, model="m", connection_timeout_s=2)
        async with VLLMClient(config, HTTPClientConfig(max_attempts=1, timeout_s=1), breaker=breaker) as client:
            # The guard only turns a hang into a test failure; the client must give up long before.
            with pytest.raises(VLLMTimeoutError) as info:
                await asyncio.wait_for(client.chat_completion("hi", label="doc=t page=1"), timeout=20)
    assert info.value.error_type == "timeout"
    assert "doc=t page=1" in str(info.value)


_HUGE_CLIENT = """
import asyncio, json, resource, sys
from mkg_pipeline.config import CircuitBreakerConfig, HTTPClientConfig, VLLMServerConfig
from mkg_pipeline.vllm.breaker import CircuitBreaker
from mkg_pipeline.vllm.client import VLLMClient
from mkg_pipeline.vllm.errors import VLLMClientError

url = sys.argv[1]

async def main():
    config = VLLMServerConfig(url=url, model="m")
    breaker = CircuitBreaker(url, CircuitBreakerConfig(failure_threshold=50))
    async with VLLMClient(config, HTTPClientConfig(max_attempts=1, timeout_s=120), breaker=breaker) as client:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            result = await client.chat_completion("hi", max_tokens=1000, label="doc=huge page=1")
            outcome = {"error_type": None, "chars": len(result.text)}
        except VLLMClientError as exc:
            outcome = {"error_type": exc.error_type, "message": str(exc)}
        outcome["rss_growth_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps(outcome))

asyncio.run(main())
"""


@pytest.mark.parametrize("framing", ["chunked", "declared"])
def test_huge_answer_is_cut_at_its_cap_without_buffering_it(framing: str) -> None:
    """Issue 9 row 6: a 400 MB answer fails as response_too_large and the client's memory barely moves."""
    with HostileServer(f"huge-{framing}") as server:
        process = subprocess.run(
            [sys.executable, "-c", _HUGE_CLIENT, server.url],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        assert process.returncode == 0, process.stderr[-3000:]
        outcome = json.loads(process.stdout.strip().splitlines()[-1])
        sent = server.bytes_sent
    assert outcome["error_type"] == "response_too_large", outcome
    assert "doc=huge page=1" in outcome["message"]
    assert outcome["rss_growth_kib"] < 8 * 1024, outcome  # a few MB at most, against 400 MB sent at it
    assert sent < HUGE_BYTES / 2  # reading stopped early: the server could not push the whole answer
