"""The guarded client against a real local server that goes down and comes back."""

from __future__ import annotations

import asyncio
import io
import time

import pytest
from PIL import Image

from mkg_pipeline.config import CircuitBreakerConfig, HTTPClientConfig, VLLMServerConfig
from mkg_pipeline.vllm.breaker import CircuitBreaker
from mkg_pipeline.vllm.client import VLLMClient
from mkg_pipeline.vllm.errors import CircuitOpenError, VLLMClientError, VLLMServerError
from mkg_pipeline.vllm.metrics import REGISTRY

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
    breaker = CircuitBreaker(server.url, config)

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

        # No request is silently dropped: every concurrent caller gets an answer or an exception.
        results = await asyncio.gather(
            *(client.chat_completion("Text Recognition:", [png], label=f"burst-{i}") for i in range(20)),
            return_exceptions=True,
        )
        assert len(results) == 20
        assert all(isinstance(r, CircuitOpenError) for r in results)

    server.start()  # back on the same port
    await asyncio.sleep(0.6)  # past the recovery timeout: the next call is a probe
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
