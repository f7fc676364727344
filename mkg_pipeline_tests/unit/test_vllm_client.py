"""VLLMClient against respx-mocked HTTP: retries, error mapping, breaker, limiter, answer cap, metrics, secrets.

No test sleeps: the client's ``sleep`` is a recorder and breakers get a fake clock.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
import respx

from mkg_pipeline.config import CircuitBreakerConfig, HTTPClientConfig, PipelineConfig, VLLMServerConfig
from mkg_pipeline.metrics.client import REGISTRY
from mkg_pipeline.vllm import (
    ChatResult,
    CircuitOpenError,
    ResponseTooLargeError,
    VLLMAuthError,
    VLLMClient,
    VLLMClientError,
    VLLMConnectionError,
    VLLMRateLimitedError,
    VLLMRequestError,
    VLLMResponseError,
    VLLMServerError,
    VLLMTimeoutError,
)
from mkg_pipeline.vllm.breaker import BreakerState, CircuitBreaker, breaker_for
from mkg_pipeline.vllm.client import ANSWER_BYTES_PER_TOKEN, ANSWER_ENVELOPE_BYTES, OUT_OF_BAND_CONNECTIONS
from mkg_pipeline.vllm.limiter import INITIAL_LIMIT, AdaptiveLimiter, limiter_for

URL = "http://vlm.test:8000"
MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
KEY = "sk-very-secret-test-key-0123456789"
LABEL = "doc=0123abcd page=7"
CHAT = f"{URL}/v1/chat/completions"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00fake-png-body\xff" * 4


def ok_body(text: str = "# Title\n\nHello", **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16},
        **extra,
    }


def ok() -> httpx.Response:
    return httpx.Response(200, json=ok_body())


class SleepRecorder:
    """Stands in for asyncio.sleep: records every requested delay, returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(float(seconds))


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=URL, assert_all_called=False) as mock:
        yield mock


@pytest.fixture
def sleeps() -> SleepRecorder:
    return SleepRecorder()


def make_client(
    sleep: SleepRecorder,
    *,
    api_key: str | None = None,
    max_attempts: int = 3,
    max_in_flight: int = 16,
    breaker: CircuitBreaker | None = None,
    limiter: AdaptiveLimiter | None = None,
    **http: Any,
) -> VLLMClient:
    server = VLLMServerConfig(url=URL, model=MODEL, api_key=api_key, max_in_flight=max_in_flight)
    http_config = HTTPClientConfig(max_attempts=max_attempts, **http)
    # A private breaker that never opens unless a test asks for one: retry tests must not trip it.
    breaker = breaker or CircuitBreaker(URL, CircuitBreakerConfig(failure_threshold=1000), clock=FakeClock())
    # A private fixed limit (no /metrics scraping) unless a test asks for an adaptive one.
    limiter = limiter or AdaptiveLimiter(URL, min_limit=1, max_limit=max_in_flight, adaptive=False)
    return VLLMClient(server, http_config, breaker=breaker, limiter=limiter, sleep=sleep)


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


# -- retry rules -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [httpx.ReadTimeout("read timed out"), httpx.ConnectError("connection refused"), httpx.RemoteProtocolError("eof")],
    ids=["timeout", "connect-error", "disconnected"],
)
async def test_network_failures_are_retried(
    router: respx.MockRouter, sleeps: SleepRecorder, failure: Exception
) -> None:
    route = router.post("/v1/chat/completions").mock(side_effect=[failure, ok()])
    async with make_client(sleeps) as client:
        result = await client.chat_completion("hi", label=LABEL)
    assert route.call_count == 2
    assert result.attempts == 2
    assert len(sleeps.delays) == 1


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_5xx_is_retried(router: respx.MockRouter, sleeps: SleepRecorder, status: int) -> None:
    route = router.post("/v1/chat/completions").mock(side_effect=[httpx.Response(status, text="busy"), ok()])
    async with make_client(sleeps) as client:
        result = await client.chat_completion("hi", label=LABEL)
    assert route.call_count == 2
    assert result.text == "# Title\n\nHello"


@pytest.mark.parametrize(("retry_after", "expected"), [("7", 7.0), ("0.5", 0.5), ("3600", 60.0)])
async def test_429_waits_exactly_retry_after_capped(
    router: respx.MockRouter, sleeps: SleepRecorder, retry_after: str, expected: float
) -> None:
    limited = httpx.Response(429, headers={"Retry-After": retry_after}, text="slow down")
    route = router.post("/v1/chat/completions").mock(side_effect=[limited, ok()])
    async with make_client(sleeps, retry_after_max_s=60) as client:
        await client.chat_completion("hi", label=LABEL)
    assert route.call_count == 2
    assert sleeps.delays == [expected]


async def test_429_retry_after_as_http_date_is_honoured_and_capped(
    router: respx.MockRouter, sleeps: SleepRecorder
) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(hours=2), usegmt=True)
    router.post("/v1/chat/completions").mock(side_effect=[httpx.Response(429, headers={"Retry-After": when}), ok()])
    async with make_client(sleeps, retry_after_max_s=45) as client:
        await client.chat_completion("hi")
    assert sleeps.delays == [45.0]


async def test_429_without_retry_after_uses_backoff(router: respx.MockRouter, sleeps: SleepRecorder) -> None:
    router.post("/v1/chat/completions").mock(side_effect=[httpx.Response(429), ok()])
    async with make_client(sleeps, backoff_initial_s=2, backoff_max_s=30) as client:
        await client.chat_completion("hi")
    assert len(sleeps.delays) == 1
    assert 0 <= sleeps.delays[0] <= 2


async def test_429_exhausted_raises_rate_limited(router: respx.MockRouter, sleeps: SleepRecorder) -> None:
    router.post("/v1/chat/completions").mock(return_value=httpx.Response(429, headers={"Retry-After": "1"}))
    async with make_client(sleeps, max_attempts=3) as client:
        with pytest.raises(VLLMRateLimitedError) as info:
            await client.chat_completion("hi", label=LABEL)
    assert isinstance(info.value, VLLMServerError)
    assert info.value.retry_after == 1.0
    assert sleeps.delays == [1.0, 1.0]


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_other_4xx_is_not_retried(router: respx.MockRouter, sleeps: SleepRecorder, status: int) -> None:
    error = {"object": "error", "message": "This model's maximum context length is 32768 tokens", "code": status}
    route = router.post("/v1/chat/completions").mock(return_value=httpx.Response(status, json=error))
    async with make_client(sleeps) as client:
        with pytest.raises(VLLMRequestError) as info:
            await client.chat_completion("hi", label=LABEL)
    assert route.call_count == 1
    assert sleeps.delays == []
    assert not isinstance(info.value, VLLMAuthError)
    assert info.value.status_code == status
    assert "maximum context length" in str(info.value)  # the server's reason, in a short snippet


@pytest.mark.parametrize("status", [401, 403])
async def test_auth_errors_are_not_retried(router: respx.MockRouter, sleeps: SleepRecorder, status: int) -> None:
    route = router.post("/v1/chat/completions").mock(
        return_value=httpx.Response(status, json={"error": "Unauthorized"})
    )
    async with make_client(sleeps) as client:
        with pytest.raises(VLLMAuthError) as info:
            await client.chat_completion("hi", label=LABEL)
    assert route.call_count == 1
    assert sleeps.delays == []
    assert info.value.retryable is False


async def test_long_error_body_is_cut_to_a_snippet(router: respx.MockRouter, sleeps: SleepRecorder) -> None:
    router.post("/v1/chat/completions").mock(return_value=httpx.Response(400, text="x" * 10_000))
    async with make_client(sleeps) as client:
        with pytest.raises(VLLMRequestError) as info:
            await client.chat_completion("hi")
    assert len(str(info.value)) < 600


@pytest.mark.parametrize("max_attempts", [1, 2, 5])
async def test_attempts_are_bounded_by_max_attempts(
    router: respx.MockRouter, sleeps: SleepRecorder, max_attempts: int
) -> None:
    route = router.post("/v1/chat/completions").mock(return_value=httpx.Response(503, text="overloaded"))
    async with make_client(sleeps, max_attempts=max_attempts) as client:
        with pytest.raises(VLLMServerError) as info:
            await client.chat_completion("hi", label=LABEL)
    assert route.call_count == max_attempts
    assert len(sleeps.delays) == max_attempts - 1
    assert f"attempt {max_attempts}/{max_attempts}" in str(info.value)


async def test_backoff_delays_stay_within_bounds(router: respx.MockRouter, sleeps: SleepRecorder) -> None:
    router.post("/v1/chat/completions").mock(return_value=httpx.Response(500))
    async with make_client(
        sleeps, max_attempts=8, backoff_initial_s=1, backoff_multiplier=2, backoff_max_s=10
    ) as client:
        for _ in range(5):
            with pytest.raises(VLLMServerError):
                await client.chat_completion("hi")
    assert len(sleeps.delays) == 5 * 7
    for i, delay in enumerate(sleeps.delays):
        assert 0 <= delay <= min(10, 2 ** (i % 7))


@pytest.mark.parametrize(("pick", "expected"), [("high", [1, 2, 4, 8, 10, 10]), ("low", [0, 0, 0, 0, 0, 0])])
async def test_backoff_bound_grows_exponentially_up_to_max(
    router: respx.MockRouter, sleeps: SleepRecorder, monkeypatch: pytest.MonkeyPatch, pick: str, expected: list[int]
) -> None:
    # Pin the jitter to either end of its range to see the bound itself.
    monkeypatch.setattr("random.uniform", lambda low, high: high if pick == "high" else low)
    router.post("/v1/chat/completions").mock(return_value=httpx.Response(502))
    async with make_client(
        sleeps, max_attempts=7, backoff_initial_s=1, backoff_multiplier=2, backoff_max_s=10
    ) as client:
        with pytest.raises(VLLMServerError):
            await client.chat_completion("hi")
    assert sleeps.delays == expected


# -- error mapping -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("effect", "error_class", "status"),
    [
        (httpx.ReadTimeout("timed out"), VLLMTimeoutError, None),
        (httpx.WriteTimeout("timed out"), VLLMTimeoutError, None),
        (httpx.ConnectTimeout("timed out"), VLLMConnectionError, None),
        (httpx.ConnectError("refused"), VLLMConnectionError, None),
        (httpx.Response(500, text="boom"), VLLMServerError, 500),
        (httpx.Response(429, text="later"), VLLMRateLimitedError, 429),
        (httpx.Response(400, text="bad"), VLLMRequestError, 400),
        (httpx.Response(401, text="no"), VLLMAuthError, 401),
        (httpx.Response(200, text="<html>not json</html>"), VLLMResponseError, 200),
    ],
    ids=["read-timeout", "write-timeout", "connect-timeout", "connect", "500", "429", "400", "401", "not-json"],
)
async def test_errors_map_to_classes_naming_server_and_label(
    router: respx.MockRouter, sleeps: SleepRecorder, effect: Any, error_class: type[VLLMClientError], status: int | None
) -> None:
    router.post("/v1/chat/completions").mock(side_effect=[effect])
    async with make_client(sleeps, max_attempts=1) as client:
        with pytest.raises(VLLMClientError) as info:
            await client.chat_completion("hi", label=LABEL)
    error = info.value
    assert type(error) is error_class
    assert URL in str(error)
    assert LABEL in str(error)
    assert error.server == URL
    assert error.label == LABEL
    assert error.status_code == status


@pytest.mark.parametrize(
    "body",
    [
        b"not json at all",
        b"[1, 2, 3]",
        json.dumps({"id": "x"}).encode(),
        json.dumps({"choices": []}).encode(),
        json.dumps({"choices": "nope"}).encode(),
    ],
    ids=["not-json", "json-list", "no-choices", "empty-choices", "choices-not-a-list"],
)
async def test_malformed_200_raises_response_error_after_retries(
    router: respx.MockRouter, sleeps: SleepRecorder, body: bytes
) -> None:
    route = router.post("/v1/chat/completions").mock(return_value=httpx.Response(200, content=body))
    async with make_client(sleeps, max_attempts=3) as client:
        with pytest.raises(VLLMResponseError) as info:
            await client.post_chat_completion({"model": MODEL, "messages": []}, label=LABEL)
    assert route.call_count == 3
    assert info.value.retryable
    assert LABEL in str(info.value)


async def test_malformed_then_good_answer_succeeds(router: respx.MockRouter, sleeps: SleepRecorder) -> None:
    route = router.post("/v1/chat/completions").mock(
        side_effect=[httpx.Response(200, json={"choices": []}), httpx.Response(200, json=ok_body("fine"))]
    )
    async with make_client(sleeps) as client:
        data = await client.post_chat_completion({"model": MODEL, "messages": []})
    assert data["choices"][0]["message"]["content"] == "fine"
    assert route.call_count == 2


async def test_chat_completion_without_text_content_is_malformed(
    router: respx.MockRouter, sleeps: SleepRecorder
) -> None:
    body = ok_body()
    body["choices"][0]["message"]["content"] = None
    router.post("/v1/chat/completions").mock(return_value=httpx.Response(200, json=body))
    async with make_client(sleeps, max_attempts=2) as client:
        with pytest.raises(VLLMResponseError):
            await client.chat_completion("hi")


async def test_non_retryable_unexpected_exception_is_not_wrapped(
    router: respx.MockRouter, sleeps: SleepRecorder
) -> None:
    router.post("/v1/chat/completions").mock(side_effect=RuntimeError("bug in a transport"))
    async with make_client(sleeps) as client:
        with pytest.raises(Exception, match="bug in a transport"):
            await client.chat_completion("hi")
    assert sleeps.delays == []


# -- request shape -----------------------------------------------------------------------------


async def test_chat_body_has_images_before_text_as_png_data_urls(
    router: respx.MockRouter, sleeps: SleepRecorder
) -> None:
    route = router.post("/v1/chat/completions").mock(return_value=ok())
    second = PNG + b"second"
    async with make_client(sleeps) as client:
        result = await client.chat_completion(
            "Convert this page to Markdown.",
            [PNG, second],
            system_prompt="You are an OCR engine.",
            max_tokens=256,
            temperature=0.1,
            extra_body={"top_p": 0.9, "repetition_penalty": 1.05},
            label=LABEL,
        )
    body = json.loads(route.calls.last.request.content)
    assert body["model"] == MODEL
    assert body["max_tokens"] == 256
    assert body["temperature"] == 0.1
    assert body["top_p"] == 0.9 and body["repetition_penalty"] == 1.05
    system, user = body["messages"]
    assert system == {"role": "system", "content": "You are an OCR engine."}
    assert user["role"] == "user"
    parts = user["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
    assert parts[-1]["text"] == "Convert this page to Markdown."
    for part, png in zip(parts[:2], [PNG, second], strict=True):
        url = part["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        assert base64.b64decode(url.removeprefix("data:image/png;base64,")) == png
    assert result == ChatResult(
        text="# Title\n\nHello",
        finish_reason="stop",
        model=MODEL,
        prompt_tokens=11,
        completion_tokens=5,
        latency_s=result.latency_s,
        attempts=1,
    )
    assert result.latency_s >= 0


async def test_chat_body_without_system_prompt_or_max_tokens(router: respx.MockRouter, sleeps: SleepRecorder) -> None:
    route = router.post("/v1/chat/completions").mock(return_value=ok())
    async with make_client(sleeps) as client:
        await client.chat_completion("text only")
    body = json.loads(route.calls.last.request.content)
    assert "max_tokens" not in body
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "text only"}]}]


async def test_post_chat_completion_sends_the_callers_body_unchanged(
    router: respx.MockRouter, sleeps: SleepRecorder
) -> None:
    route = router.post("/v1/chat/completions").mock(return_value=ok())
    body = {
        "model": "mineru",
        "messages": [{"role": "user", "content": "Layout Detection:"}],
        "skip_special_tokens": False,
    }
    async with make_client(sleeps) as client:
        data = await client.post_chat_completion(body, label=LABEL)
    assert json.loads(route.calls.last.request.content) == body
    assert data == ok_body()


# -- secrets -----------------------------------------------------------------------------------


async def test_authorization_header_present_with_key(router: respx.MockRouter, sleeps: SleepRecorder) -> None:
    route = router.post("/v1/chat/completions").mock(return_value=ok())
    models = router.get("/v1/models").mock(return_value=httpx.Response(200, json={"data": [{"id": MODEL}]}))
    async with make_client(sleeps, api_key=KEY) as client:
        await client.chat_completion("hi")
        await client.list_models()
    assert route.calls.last.request.headers["Authorization"] == f"Bearer {KEY}"
    assert models.calls.last.request.headers["Authorization"] == f"Bearer {KEY}"


async def test_authorization_header_absent_without_key(router: respx.MockRouter, sleeps: SleepRecorder) -> None:
    route = router.post("/v1/chat/completions").mock(return_value=ok())
    async with make_client(sleeps, api_key=None) as client:
        await client.chat_completion("hi")
    assert "Authorization" not in route.calls.last.request.headers


async def test_empty_key_means_no_header(router: respx.MockRouter, sleeps: SleepRecorder) -> None:
    route = router.post("/v1/chat/completions").mock(return_value=ok())
    async with make_client(sleeps, api_key="") as client:
        await client.chat_completion("hi")
    assert "Authorization" not in route.calls.last.request.headers


async def test_key_never_in_messages_repr_or_logs(
    router: respx.MockRouter, sleeps: SleepRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    # The server echoes the header back, as a misconfigured proxy might: the key must still not leak.
    router.post("/v1/chat/completions").mock(
        side_effect=[
            httpx.ReadTimeout("timed out"),
            httpx.Response(503, text=f"upstream rejected Authorization: Bearer {KEY}"),
            httpx.Response(401, text=f"invalid key {KEY}"),
        ]
    )
    router.get("/health").mock(side_effect=httpx.ConnectError("refused"))
    errors: list[BaseException] = []
    with caplog.at_level(logging.DEBUG):
        async with make_client(sleeps, api_key=KEY) as client:
            text = repr(client)
            with pytest.raises(VLLMAuthError) as info:
                await client.chat_completion("hi", label=LABEL)
            errors.append(info.value)
            assert await client.health_check() is False
    assert KEY not in text
    assert "api_key=set" in text
    for error in errors:
        assert KEY not in str(error)
        assert KEY not in repr(error)
    assert caplog.records, "expected debug/warning records"
    for record in caplog.records:
        assert KEY not in record.getMessage()
        assert KEY not in str(record.args)
        assert KEY not in (record.exc_text or "")


def test_repr_without_key() -> None:
    client = VLLMClient(VLLMServerConfig(url=URL, model=MODEL))
    assert "api_key=none" in repr(client)
    assert URL in repr(client)
    asyncio.run(client.aclose())


# -- logs and metrics --------------------------------------------------------------------------


async def test_debug_per_attempt_warning_per_retry(
    router: respx.MockRouter, sleeps: SleepRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    router.post("/v1/chat/completions").mock(side_effect=[httpx.Response(503), httpx.Response(503), ok()])
    with caplog.at_level(logging.DEBUG, logger="mkg_pipeline.vllm.client"):
        async with make_client(sleeps) as client:
            await client.chat_completion("hi", label=LABEL)
    records = [r for r in caplog.records if r.name == "mkg_pipeline.vllm.client"]
    debug = [r for r in records if r.levelno == logging.DEBUG and "attempt" in r.getMessage()]
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert len(debug) == 3
    assert len(warnings) == 2
    assert all(LABEL in r.getMessage() and URL in r.getMessage() for r in warnings)


async def test_metrics_count_retries_failures_and_durations(router: respx.MockRouter, sleeps: SleepRecorder) -> None:
    endpoint = "/v1/chat/completions"
    retries = "mineru_vllm_client_retries_total"
    failures = "mineru_vllm_client_failures_total"
    count = "mineru_vllm_request_duration_seconds_count"
    before = {
        "retries": sample(retries),
        "timeout": sample(failures, {"error_type": "timeout"}),
        "server_error": sample(failures, {"error_type": "server_error"}),
        "client_error": sample(failures, {"error_type": "client_error"}),
        "ok": sample(count, {"endpoint": endpoint, "outcome": "success"}),
        "t_obs": sample(count, {"endpoint": endpoint, "outcome": "timeout"}),
        "s_obs": sample(count, {"endpoint": endpoint, "outcome": "server_error"}),
    }
    router.post("/v1/chat/completions").mock(
        side_effect=[httpx.ReadTimeout("slow"), httpx.Response(500), ok(), httpx.Response(400)]
    )
    async with make_client(sleeps) as client:
        await client.chat_completion("hi")
        with pytest.raises(VLLMRequestError):
            await client.chat_completion("hi")
    assert sample(retries) - before["retries"] == 2
    assert sample(failures, {"error_type": "timeout"}) - before["timeout"] == 1
    assert sample(failures, {"error_type": "server_error"}) - before["server_error"] == 1
    assert sample(failures, {"error_type": "client_error"}) - before["client_error"] == 1
    assert sample(count, {"endpoint": endpoint, "outcome": "success"}) - before["ok"] == 1
    assert sample(count, {"endpoint": endpoint, "outcome": "timeout"}) - before["t_obs"] == 1
    assert sample(count, {"endpoint": endpoint, "outcome": "server_error"}) - before["s_obs"] == 1


# -- breaker integration -----------------------------------------------------------------------


def small_breaker(threshold: int = 3) -> CircuitBreaker:
    return CircuitBreaker(
        URL,
        CircuitBreakerConfig(failure_threshold=threshold, recovery_timeout_s=60, success_threshold=1),
        clock=FakeClock(),
    )


async def test_open_breaker_stops_calls_without_http(router: respx.MockRouter, sleeps: SleepRecorder) -> None:
    route = router.post("/v1/chat/completions").mock(return_value=httpx.Response(503))
    breaker = small_breaker(threshold=3)
    open_before = sample("mineru_vllm_client_failures_total", {"error_type": "circuit_open"})
    async with make_client(sleeps, max_attempts=1, breaker=breaker) as client:
        for _ in range(3):
            with pytest.raises(VLLMServerError):
                await client.chat_completion("hi", label=LABEL)
        assert breaker.state is BreakerState.OPEN
        calls = route.call_count
        for _ in range(10):
            with pytest.raises(CircuitOpenError) as info:
                await client.chat_completion("hi", label=LABEL)
        assert route.call_count == calls == 3
    assert URL in str(info.value) and LABEL in str(info.value)
    assert sample("mineru_vllm_client_failures_total", {"error_type": "circuit_open"}) - open_before == 10


async def test_breaker_opening_mid_retry_stops_retrying(router: respx.MockRouter, sleeps: SleepRecorder) -> None:
    route = router.post("/v1/chat/completions").mock(return_value=httpx.Response(502))
    breaker = small_breaker(threshold=2)
    async with make_client(sleeps, max_attempts=5, breaker=breaker) as client:
        with pytest.raises(CircuitOpenError):
            await client.chat_completion("hi", label=LABEL)
    assert route.call_count == 2
    # No point backing off before an attempt the open breaker will refuse at once.
    assert len(sleeps.delays) == 2 and sleeps.delays[-1] == 0


async def test_4xx_is_not_a_breaker_failure(router: respx.MockRouter, sleeps: SleepRecorder) -> None:
    router.post("/v1/chat/completions").mock(return_value=httpx.Response(422, text="bad request"))
    breaker = small_breaker(threshold=2)
    async with make_client(sleeps, breaker=breaker) as client:
        for _ in range(5):
            with pytest.raises(VLLMRequestError):
                await client.chat_completion("hi")
    assert breaker.state is BreakerState.CLOSED
    assert breaker.consecutive_failures == 0


async def test_malformed_body_is_a_breaker_failure(router: respx.MockRouter, sleeps: SleepRecorder) -> None:
    router.post("/v1/chat/completions").mock(return_value=httpx.Response(200, text="garbage"))
    breaker = small_breaker(threshold=2)
    async with make_client(sleeps, max_attempts=2, breaker=breaker) as client:
        with pytest.raises(VLLMResponseError):
            await client.post_chat_completion({"messages": []})
    assert breaker.state is BreakerState.OPEN


def test_clients_of_one_url_share_the_registered_breaker() -> None:
    cfg = PipelineConfig(vllm=VLLMServerConfig(url=URL))
    first, second = VLLMClient.from_config(cfg), VLLMClient.from_config(cfg)
    assert first.breaker is second.breaker is breaker_for(URL)
    assert first.breaker.config == cfg.circuit_breaker
    for client in (first, second):
        asyncio.run(client.aclose())


# -- the limiter: the one bound on requests in flight ------------------------------------------


async def test_limiter_bounds_concurrent_requests(router: respx.MockRouter, sleeps: SleepRecorder) -> None:
    gate = asyncio.Event()
    active = 0
    peak = 0

    async def slow_endpoint(request: httpx.Request) -> httpx.Response:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await gate.wait()
        active -= 1
        return ok()

    router.post("/v1/chat/completions").mock(side_effect=slow_endpoint)
    gauge_before = sample("mineru_vllm_requests_in_flight")
    async with make_client(sleeps, max_in_flight=2) as client:
        tasks = [asyncio.create_task(client.chat_completion("hi", label=f"page={i}")) for i in range(8)]
        for _ in range(50):  # let every task run as far as it can
            await asyncio.sleep(0)
        assert active == 2
        assert sample("mineru_vllm_requests_in_flight") - gauge_before == 2
        gate.set()
        results = await asyncio.gather(*tasks)
    assert len(results) == 8
    assert peak == 2
    assert sample("mineru_vllm_requests_in_flight") == gauge_before


async def test_limiter_slot_not_held_during_backoff(router: respx.MockRouter) -> None:
    # max_in_flight=1: while one call sleeps before its retry, another call must get the slot.
    backoff_started = asyncio.Event()
    backoff_release = asyncio.Event()

    async def blocking_sleep(seconds: float) -> None:
        backoff_started.set()
        await backoff_release.wait()

    router.post("/v1/chat/completions").mock(side_effect=[httpx.Response(503), ok(), ok()])
    async with make_client(blocking_sleep, max_in_flight=1) as client:  # type: ignore[arg-type]
        first = asyncio.create_task(client.chat_completion("first"))
        await backoff_started.wait()
        second = await asyncio.wait_for(client.chat_completion("second"), timeout=5)
        backoff_release.set()
        assert (await first).attempts == 2
    assert second.attempts == 1


def breaker_about_to_probe(cause: str | None) -> CircuitBreaker:
    """A breaker one failure (of ``cause``) opened, its recovery time over: the next acquire is its one probe."""
    clock = FakeClock()
    breaker = CircuitBreaker(
        URL,
        CircuitBreakerConfig(failure_threshold=1, recovery_timeout_s=10, success_threshold=1, half_open_max_calls=1),
        clock=clock,
    )
    breaker.acquire("setup").record_failure(cause)
    clock.now += 10
    return breaker


async def test_cancelled_request_frees_limiter_slot_gauge_and_probe_slot(
    router: respx.MockRouter, sleeps: SleepRecorder
) -> None:
    entered = asyncio.Event()

    async def hanging(request: httpx.Request) -> httpx.Response:
        entered.set()
        await asyncio.Event().wait()
        return ok()  # pragma: no cover

    route = router.post("/v1/chat/completions").mock(side_effect=hanging)
    breaker = breaker_about_to_probe(None)
    gauge_before = sample("mineru_vllm_requests_in_flight")
    async with make_client(sleeps, max_in_flight=1, breaker=breaker) as client:
        task = asyncio.create_task(client.chat_completion("probe"))
        await entered.wait()
        assert breaker.probes_in_flight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert breaker.probes_in_flight == 0
        assert sample("mineru_vllm_requests_in_flight") == gauge_before
        route.mock(side_effect=None, return_value=ok())
        result = await asyncio.wait_for(client.chat_completion("after"), timeout=5)  # the limiter's slot is free
    assert result.attempts == 1
    assert breaker.state is BreakerState.CLOSED


def test_client_built_outside_a_loop_waits_for_slots_in_the_running_loop(sleeps: SleepRecorder) -> None:
    # Resources may build the client before asyncio.run starts the step's loop.
    with respx.mock(base_url=URL) as mock:
        mock.get("/v1/models").mock(return_value=httpx.Response(200, json={"data": [{"id": "a"}, {"id": "b"}]}))
        client = make_client(sleeps, max_in_flight=1)

        async def step() -> list[list[str]]:
            async with client:
                return list(await asyncio.gather(client.list_models(), client.list_models()))

        assert asyncio.run(step()) == [["a", "b"], ["a", "b"]]


# -- other endpoints ---------------------------------------------------------------------------


async def test_list_models(router: respx.MockRouter, sleeps: SleepRecorder) -> None:
    route = router.get("/v1/models").mock(
        side_effect=[httpx.Response(503), httpx.Response(200, json={"object": "list", "data": [{"id": MODEL}]})]
    )
    async with make_client(sleeps) as client:
        assert await client.list_models() == [MODEL]
    assert route.call_count == 2


async def test_list_models_malformed(router: respx.MockRouter, sleeps: SleepRecorder) -> None:
    router.get("/v1/models").mock(return_value=httpx.Response(200, json={"data": "x"}))
    async with make_client(sleeps, max_attempts=1) as client:
        with pytest.raises(VLLMResponseError):
            await client.list_models()


@pytest.mark.parametrize(
    ("effect", "healthy"),
    [
        (httpx.Response(200), True),
        (httpx.Response(503), False),
        (httpx.Response(404), False),
        (httpx.ConnectError("refused"), False),
        (httpx.ReadTimeout("slow"), False),
    ],
    ids=["200", "503", "404", "connect-error", "timeout"],
)
async def test_health_check(router: respx.MockRouter, sleeps: SleepRecorder, effect: Any, healthy: bool) -> None:
    route = router.get("/health").mock(side_effect=[effect])
    async with make_client(sleeps) as client:
        assert await client.health_check() is healthy
    assert route.call_count == 1  # no retries
    assert sleeps.delays == []


async def test_health_check_bypasses_an_open_breaker(router: respx.MockRouter, sleeps: SleepRecorder) -> None:
    route = router.get("/health").mock(return_value=httpx.Response(200))
    breaker = small_breaker(threshold=1)
    breaker.acquire("t").record_failure()
    async with make_client(sleeps, breaker=breaker) as client:
        assert await client.health_check() is True
    assert route.call_count == 1
    assert breaker.state is BreakerState.OPEN


async def test_fetch_server_metrics(router: respx.MockRouter, sleeps: SleepRecorder) -> None:
    text = "# HELP vllm:num_requests_waiting x\nvllm:num_requests_waiting 3.0\n"
    router.get("/metrics").mock(side_effect=[httpx.Response(200, text=text), httpx.Response(500)])
    async with make_client(sleeps) as client:
        assert await client.fetch_server_metrics() == text
        with pytest.raises(VLLMServerError):
            await client.fetch_server_metrics()


# -- construction ------------------------------------------------------------------------------


def test_from_config_sizes_the_pool_from_the_limiters_ceiling() -> None:
    cfg = PipelineConfig(
        vllm=VLLMServerConfig(url=URL + "/", model="m", connection_timeout_s=3, max_in_flight=40, min_in_flight=3),
        http_client=HTTPClientConfig(keepalive=2, timeout_s=120),
    )
    client = VLLMClient.from_config(cfg)
    try:
        assert client.server_url == URL
        assert client.model == "m"
        timeout = client._http.timeout  # the pool itself is httpx's; its settings are ours
        assert (timeout.connect, timeout.read, timeout.write) == (3, 120, 120)
        pool = client._http._transport._pool  # type: ignore[attr-defined]
        # Never fewer connections than the limiter may allow: the limiter is the only limit.
        assert pool._max_connections == 40 + OUT_OF_BAND_CONNECTIONS
        assert pool._max_keepalive_connections == 2
        assert client.limiter is limiter_for(URL)
        assert (client.limiter.min_limit, client.limiter.max_limit, client.limiter.limit) == (3, 40, INITIAL_LIMIT)
        assert client.limiter.deadline_s == 120
    finally:
        asyncio.run(client.aclose())


# -- the first real cause (issue 9 row 8) ------------------------------------------------------


async def test_fail_fast_while_open_names_the_failure_that_opened_the_breaker(
    router: respx.MockRouter, sleeps: SleepRecorder
) -> None:
    router.post("/v1/chat/completions").mock(side_effect=httpx.ConnectError("connection refused"))
    breaker = small_breaker(threshold=2)
    async with make_client(sleeps, max_attempts=1, breaker=breaker) as client:
        for _ in range(2):
            with pytest.raises(VLLMConnectionError):
                await client.chat_completion("hi", label=LABEL)
        with pytest.raises(CircuitOpenError) as info:
            await client.chat_completion("hi", label=LABEL)
    assert info.value.error_type == "circuit_open"
    assert info.value.first_cause == "connect"


async def test_request_ending_in_circuit_open_reports_its_first_real_failure(
    router: respx.MockRouter, sleeps: SleepRecorder
) -> None:
    # Attempt 1 times out and that failure opens the breaker; attempt 2 fails fast.
    router.post("/v1/chat/completions").mock(side_effect=httpx.ReadTimeout("timed out"))
    breaker = small_breaker(threshold=1)
    async with make_client(sleeps, max_attempts=3, breaker=breaker) as client:
        with pytest.raises(CircuitOpenError) as info:
            await client.chat_completion("hi", label=LABEL)
    error = info.value
    assert error.first_cause == "timeout"
    assert error.attempt_errors == ("timeout", "circuit_open")
    assert "timed out" in str(error)  # the first failure's own message, not only "breaker open"
    assert LABEL in str(error)


async def test_first_cause_of_a_plain_failure_is_its_first_attempt(
    router: respx.MockRouter, sleeps: SleepRecorder
) -> None:
    router.post("/v1/chat/completions").mock(
        side_effect=[httpx.ReadTimeout("slow"), httpx.Response(502), httpx.Response(502)]
    )
    async with make_client(sleeps, max_attempts=3) as client:
        with pytest.raises(VLLMServerError) as info:
            await client.chat_completion("hi", label=LABEL)
    assert info.value.error_type == "server_error"
    assert info.value.first_cause == "timeout"
    assert info.value.attempt_errors == ("timeout", "server_error", "server_error")


# -- request bodies: serialized once, images spliced in ------------------------------------------


async def test_sent_body_is_the_built_body_as_compact_json(router: respx.MockRouter, sleeps: SleepRecorder) -> None:
    route = router.post("/v1/chat/completions").mock(return_value=ok())
    png = bytes(range(256)) * 2000  # 512 KB: a full page
    kwargs: dict[str, Any] = {"system_prompt": "sys", "max_tokens": 64, "extra_body": {"top_p": 0.5}}
    async with make_client(sleeps) as client:
        await client.chat_completion('Convert \u00e9 "quoted" \\ text', [png, PNG], label=LABEL, **kwargs)
        expected = client.build_chat_body('Convert \u00e9 "quoted" \\ text', [png, PNG], **kwargs)
    request = route.calls.last.request
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.content) == expected
    assert b", " not in request.content[:40]  # compact separators


async def test_prompt_holding_the_image_placeholder_still_sends_the_right_body(
    router: respx.MockRouter, sleeps: SleepRecorder
) -> None:
    from mkg_pipeline.vllm.client import _IMAGE_PLACEHOLDER

    route = router.post("/v1/chat/completions").mock(return_value=ok())
    prompt = f"a prompt with {_IMAGE_PLACEHOLDER} inside"
    async with make_client(sleeps) as client:
        await client.chat_completion(prompt, [PNG])
        expected = client.build_chat_body(prompt, [PNG])
    assert json.loads(route.calls.last.request.content) == expected


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;base64," + base64.b64encode(bytes(range(256)) * 1000).decode(),
        "data:image/png;base64," + "A" * 5000 + '"},{"injected": "\\u0000' + "\x01\n",  # must be escaped
        "data:image/png;base64," + "\u00e9" * 3000,
    ],
    ids=["base64", "quotes-backslashes-controls", "non-ascii"],
)
async def test_post_chat_completion_sends_data_urls_exactly(
    router: respx.MockRouter, sleeps: SleepRecorder, url: str
) -> None:
    route = router.post("/v1/chat/completions").mock(return_value=ok())
    body = {
        "model": "mineru",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "x"}],
            },
        ],
        "max_completion_tokens": 100,
        "skip_special_tokens": False,
    }
    async with make_client(sleeps) as client:
        await client.post_chat_completion(body, label=LABEL)
    assert json.loads(route.calls.last.request.content) == body


# -- the answer cap (issue 9 row 6) --------------------------------------------------------------


def answer_of(size: int) -> bytes:
    """A valid chat completion body of exactly ``size`` bytes."""
    empty = json.dumps(ok_body(text="")).encode()
    return json.dumps(ok_body(text="a" * (size - len(empty)))).encode()


async def test_answer_within_max_tokens_times_the_bound_is_read(
    router: respx.MockRouter, sleeps: SleepRecorder
) -> None:
    cap = ANSWER_ENVELOPE_BYTES + 100 * ANSWER_BYTES_PER_TOKEN
    router.post("/v1/chat/completions").mock(return_value=httpx.Response(200, content=answer_of(cap)))
    async with make_client(sleeps) as client:
        result = await client.chat_completion("hi", max_tokens=100)
    assert len(result.text) > 60_000


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_answer_over_its_cap_fails_as_response_too_large_without_retry(
    router: respx.MockRouter, sleeps: SleepRecorder, framing: str
) -> None:
    cap = ANSWER_ENVELOPE_BYTES + 100 * ANSWER_BYTES_PER_TOKEN
    produced = 0

    async def endless() -> Any:
        nonlocal produced
        while True:  # a runaway answer: never ends by itself
            produced += 1
            yield b"a" * 1024

    def respond(request: httpx.Request) -> httpx.Response:
        if framing == "chunked":
            return httpx.Response(200, content=endless())
        return httpx.Response(200, content=answer_of(cap + 1))

    route = router.post("/v1/chat/completions").mock(side_effect=respond)
    breaker = small_breaker(threshold=1)
    before = sample("mineru_vllm_client_failures_total", {"error_type": "response_too_large"})
    async with make_client(sleeps, breaker=breaker) as client:
        with pytest.raises(ResponseTooLargeError) as info:
            await client.chat_completion("hi", max_tokens=100, label=LABEL)
    assert info.value.error_type == "response_too_large"
    assert info.value.retryable is False
    assert route.call_count == 1 and sleeps.delays == []
    assert LABEL in str(info.value) and str(cap) in str(info.value)
    assert breaker.state is BreakerState.CLOSED  # the server is up and answering
    assert sample("mineru_vllm_client_failures_total", {"error_type": "response_too_large"}) - before == 1
    if framing == "chunked":
        assert produced <= cap // 1024 + 2  # reading stopped at the cap


@pytest.mark.parametrize("tokens_field", [None, "max_completion_tokens"])
async def test_cap_without_max_tokens_is_max_response_bytes(
    router: respx.MockRouter, sleeps: SleepRecorder, tokens_field: str | None
) -> None:
    router.post("/v1/chat/completions").mock(return_value=httpx.Response(200, content=answer_of(200 * 1024)))
    body: dict[str, Any] = {"model": MODEL, "messages": []}
    if tokens_field:
        body[tokens_field] = 10_000  # MinerU's name for it: 64 KiB + 640 KB allows the answer
    async with make_client(sleeps, max_response_bytes=128 * 1024) as client:
        if tokens_field:
            await client.post_chat_completion(body)
        else:
            with pytest.raises(ResponseTooLargeError):
                await client.post_chat_completion(body)


async def test_huge_error_body_is_not_read_whole(router: respx.MockRouter, sleeps: SleepRecorder) -> None:
    produced = 0

    async def endless() -> Any:
        nonlocal produced
        while True:
            produced += 1
            yield b"<html>overloaded</html>" * 100

    router.post("/v1/chat/completions").mock(side_effect=lambda request: httpx.Response(502, content=endless()))
    async with make_client(sleeps, max_attempts=1) as client:
        with pytest.raises(VLLMServerError) as info:
            await client.chat_completion("hi")
    assert "overloaded" in str(info.value)
    assert produced <= 3


# -- the client feeds the limiter ----------------------------------------------------------------


def adaptive_limiter(start: int = 64) -> AdaptiveLimiter:
    clock = FakeClock()
    limiter = AdaptiveLimiter(URL, min_limit=1, max_limit=256, clock=clock, wall_clock=clock)
    limiter._limit = float(start)
    return limiter


@pytest.mark.parametrize(
    ("answer", "factor"),
    [
        (httpx.Response(429, text="slow down"), 0.5),
        (httpx.Response(503, text="overloaded"), 0.5),
        (httpx.ReadTimeout("slow"), 0.5),
        (httpx.Response(500, text="bug"), 1.0),
        (httpx.Response(400, text="bad"), 1.0),
        (httpx.ConnectError("refused"), 1.0),
    ],
    ids=["429", "503", "timeout", "500", "400", "connect"],
)
async def test_overload_answers_and_timeouts_back_the_limiter_off(
    router: respx.MockRouter, sleeps: SleepRecorder, answer: Any, factor: float
) -> None:
    router.post("/v1/chat/completions").mock(side_effect=[answer])
    router.get("/metrics").mock(return_value=httpx.Response(404))
    limiter = adaptive_limiter(64)
    async with make_client(sleeps, max_attempts=1, limiter=limiter) as client:
        with pytest.raises(VLLMClientError):
            await client.chat_completion("hi")
    assert limiter.limit == int(64 * factor)
    assert limiter.in_flight == 0


async def test_successful_attempts_are_latency_samples(router: respx.MockRouter, sleeps: SleepRecorder) -> None:
    router.post("/v1/chat/completions").mock(return_value=ok())
    router.get("/metrics").mock(return_value=httpx.Response(404))
    limiter = adaptive_limiter(8)
    async with make_client(sleeps, limiter=limiter) as client:
        await client.chat_completion("hi")
    assert limiter._srtt is not None and limiter._srtt >= 0


def gated_chat(router: respx.MockRouter, answer: Callable[[], httpx.Response] = ok) -> asyncio.Event:
    """The chat endpoint gives ``answer`` only once the returned event is set: the test holds requests in flight."""
    gate = asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        await gate.wait()
        return answer()

    router.post("/v1/chat/completions").mock(side_effect=slow)
    return gate


async def until(condition: Callable[[], bool], tries: int = 500) -> None:
    """Yield to the loop (10 ms a try) until ``condition`` holds; the caller's asserts say what if it never does."""
    for _ in range(tries):
        await asyncio.sleep(0.01)
        if condition():
            return


async def test_the_server_queue_is_scraped_off_the_request_path(
    router: respx.MockRouter, sleeps: SleepRecorder
) -> None:
    gate = gated_chat(router)
    text = 'vllm:num_requests_waiting{engine="0"} 3.0\nvllm:num_requests_running{engine="0"} 61.0\n'
    metrics = router.get("/metrics").mock(return_value=httpx.Response(200, text=text))
    limiter = limiter_for(URL, VLLMServerConfig(url=URL, max_in_flight=64))
    async with make_client(sleeps, limiter=limiter) as client:
        request = asyncio.create_task(client.chat_completion("hi"))
        # the scrape runs beside the request, which is still waiting for its answer
        await until(lambda: limiter.server_queue is not None)
        assert not request.done()
        gate.set()
        await request
    assert metrics.call_count == 1
    queue = limiter.server_queue
    assert queue is not None and (queue.waiting, queue.running) == (3.0, 61.0)
    assert limiter.uses_server_metrics


async def test_a_server_without_vllm_metrics_leaves_the_limiter_on_latency(
    router: respx.MockRouter, sleeps: SleepRecorder
) -> None:
    gate = gated_chat(router)
    metrics = router.get("/metrics").mock(return_value=httpx.Response(200, text="up 1\n"))
    limiter = limiter_for(URL, VLLMServerConfig(url=URL))
    async with make_client(sleeps, limiter=limiter) as client:
        request = asyncio.create_task(client.chat_completion("hi"))
        await until(lambda: metrics.call_count > 0)
        gate.set()
        await request
    assert metrics.call_count == 1
    assert not limiter.uses_server_metrics
    assert limiter.next_scrape_at > 20  # tries again later, not on every request


def test_clients_of_one_url_share_the_registered_limiter() -> None:
    cfg = PipelineConfig(vllm=VLLMServerConfig(url=URL))
    first, second = VLLMClient.from_config(cfg), VLLMClient.from_config(cfg)
    assert first.limiter is second.limiter is limiter_for(URL)
    for client in (first, second):
        asyncio.run(client.aclose())


async def test_callers_wait_for_the_half_open_probes_instead_of_failing(
    router: respx.MockRouter, sleeps: SleepRecorder
) -> None:
    """A server that comes back: while its probes are in flight, other pages wait for their verdict.

    Failing them fast would record pages as failed (and leave them for the next run) against a server
    that is answering again.
    """
    release = gated_chat(router)
    breaker = breaker_about_to_probe("connect")
    async with make_client(sleeps, max_attempts=1, max_in_flight=8, breaker=breaker) as client:
        calls = [asyncio.create_task(client.chat_completion("hi", label=f"page={n}")) for n in range(4)]
        for _ in range(100):  # let every caller reach the breaker
            await asyncio.sleep(0)
        assert breaker.state is BreakerState.HALF_OPEN and breaker.probes_in_flight == 1
        assert not any(call.done() for call in calls)  # nobody failed fast
        release.set()
        results = await asyncio.wait_for(asyncio.gather(*calls), timeout=5)
    assert [r.attempts for r in results] == [1, 1, 1, 1]
    assert breaker.state is BreakerState.CLOSED


async def test_callers_waiting_on_probes_fail_with_the_cause_when_a_probe_fails(
    router: respx.MockRouter, sleeps: SleepRecorder
) -> None:
    release = gated_chat(router, lambda: httpx.Response(503))
    breaker = breaker_about_to_probe("connect")
    async with make_client(sleeps, max_attempts=1, max_in_flight=8, breaker=breaker) as client:
        probe = asyncio.create_task(client.chat_completion("probe"))
        for _ in range(50):
            await asyncio.sleep(0)
        waiter = asyncio.create_task(client.chat_completion("waiter"))
        for _ in range(50):
            await asyncio.sleep(0)
        assert not waiter.done()
        release.set()
        with pytest.raises(VLLMServerError):
            await probe
        with pytest.raises(CircuitOpenError) as info:
            await asyncio.wait_for(waiter, timeout=5)
    assert info.value.first_cause == "server_error"


# -- who answered (issue 21 row 3) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("answered", "expected"),
    [
        (MODEL, MODEL),
        ("other/model", "other/model"),
        (f" {MODEL.upper()} ", f" {MODEL.upper()} "),
        (None, None),
        (7, None),
    ],
)
async def test_chat_result_model_is_the_answers_own_never_the_requests(
    router: respx.MockRouter, sleeps: SleepRecorder, answered: object, expected: str | None
) -> None:
    router.post("/v1/chat/completions").mock(return_value=httpx.Response(200, json=ok_body(model=answered)))
    async with make_client(sleeps) as client:
        result = await client.chat_completion("Convert this page to Markdown.", [PNG])
    assert result.model == expected


async def test_chat_result_model_is_none_when_the_answer_names_none(
    router: respx.MockRouter, sleeps: SleepRecorder
) -> None:
    body = ok_body()
    del body["model"]
    router.post("/v1/chat/completions").mock(return_value=httpx.Response(200, json=body))
    async with make_client(sleeps) as client:
        result = await client.chat_completion("Convert this page to Markdown.", [PNG])
    assert result.model is None and result.finish_reason == "stop"


def test_accepted_models_are_the_configured_model_and_its_aliases() -> None:
    assert VLLMClient(VLLMServerConfig(url=URL, model=MODEL)).accepted_models == {MODEL}
    server = VLLMServerConfig(url=URL, model=MODEL, served_model_aliases=["qwen", "qwen-vl"])
    assert VLLMClient(server).accepted_models == {MODEL, "qwen", "qwen-vl"}


def test_aliases_from_the_environment_are_comma_separated_and_exact_names() -> None:
    from pydantic import ValidationError

    from mkg_pipeline.config import load_config

    config = load_config(environ={"MKG_VLLM__SERVED_MODEL_ALIASES": "qwen, qwen-vl,"})
    assert config.vllm.served_model_aliases == ["qwen", "qwen-vl"]
    assert load_config(environ={}).vllm.served_model_aliases == []
    for bad in ([" qwen"], [""], ["qwen\n"]):
        with pytest.raises(ValidationError, match="without surrounding spaces"):
            VLLMServerConfig(url=URL, model=MODEL, served_model_aliases=bad)
