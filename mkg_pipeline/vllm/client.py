"""The guarded client of the OpenAI-compatible VLM server (vLLM or the local server).

One :class:`VLLMClient` per process holds one ``httpx.AsyncClient`` (pool and
timeouts from config). Every attempt of every guarded request:

1. asks the server's :class:`~mkg_pipeline.vllm.breaker.CircuitBreaker` for a
   permit (fails fast with :class:`CircuitOpenError` while it is open),
2. waits for a slot of the in-flight semaphore (``max_in_flight``), held only
   for the HTTP exchange, never during a backoff sleep,
3. sends the request and maps the outcome to an exception of
   :mod:`mkg_pipeline.vllm.errors`,
4. reports the outcome to the breaker and to the Prometheus metrics.

Tenacity retries the retryable outcomes (timeouts, connection errors, 429,
5xx, malformed 200 bodies) with full-jitter exponential backoff, or the
server's ``Retry-After`` on 429; 4xx answers are never retried.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_random_exponential

from mkg_pipeline.config import CircuitBreakerConfig, HTTPClientConfig, MinerUConfig, VLLMServerConfig
from mkg_pipeline.vllm.breaker import CircuitBreaker, breaker_for
from mkg_pipeline.vllm.errors import (
    CircuitOpenError,
    VLLMAuthError,
    VLLMClientError,
    VLLMConnectionError,
    VLLMRateLimitedError,
    VLLMRequestError,
    VLLMResponseError,
    VLLMServerError,
    VLLMTimeoutError,
)
from mkg_pipeline.vllm.metrics import CLIENT_FAILURES, CLIENT_RETRIES, IN_FLIGHT, REQUEST_DURATION

log = logging.getLogger(__name__)

SleepFn = Callable[[float], Awaitable[None]]
T = TypeVar("T")

CHAT_COMPLETIONS = "/v1/chat/completions"
MODELS = "/v1/models"
HEALTH = "/health"
METRICS = "/metrics"

# Enough of a server's error body to tell "model not found" from "context too long".
_SNIPPET_CHARS = 300


@dataclass(frozen=True)
class ChatResult:
    """One chat completion. ``latency_s`` is the caller's wall time, retries and backoff included."""

    text: str
    finish_reason: str | None
    model: str
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_s: float
    attempts: int


def _png_data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (delta form), or an HTTP date converted to seconds from now."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _chat_choices(data: Any) -> list[Any]:
    if not isinstance(data, dict):
        raise ValueError(f"body is a JSON {type(data).__name__}, not an object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ValueError("body has no non-empty 'choices' list")
    return choices


def _validate_chat_body(data: Any) -> dict[str, Any]:
    _chat_choices(data)
    return data  # type: ignore[no-any-return]


def _validate_chat_text(data: Any) -> dict[str, Any]:
    choice = _chat_choices(data)[0]
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        raise ValueError("choices[0].message.content is not a string")
    return data  # type: ignore[no-any-return]


def _validate_models(data: Any) -> list[str]:
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("id"), str) for i in items):
        raise ValueError("body has no 'data' list of objects with an 'id'")
    return [item["id"] for item in items]


class VLLMClient:
    """Breaker-guarded, retrying, bounded client of one OpenAI-compatible VLM server."""

    def __init__(
        self,
        server: VLLMServerConfig,
        http: HTTPClientConfig | None = None,
        breaker_config: CircuitBreakerConfig | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        breaker: CircuitBreaker | None = None,
        sleep: SleepFn = asyncio.sleep,
    ) -> None:
        self._server = server
        self._http_config = http or HTTPClientConfig()
        self._breaker = breaker or breaker_for(server.url, breaker_config)
        self._sleep = sleep
        self._api_key = server.api_key.get_secret_value() if server.api_key is not None else None
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        cfg = self._http_config
        # A custom ``transport`` (tests, proxies) replaces httpx's pooled transport, so ``limits`` then do not apply.
        # The pool is bound to the event loop that first uses it: one client per loop (per Dagster step).
        self._http = httpx.AsyncClient(
            base_url=server.url,
            headers=headers,
            transport=transport,
            limits=httpx.Limits(max_connections=cfg.pool_size, max_keepalive_connections=cfg.keepalive),
            # pool=None: waiting for a pooled connection is bounded by our semaphore and the
            # read timeouts of the requests holding the connections, not by a separate timer.
            timeout=httpx.Timeout(
                connect=server.connection_timeout_s, read=cfg.timeout_s, write=cfg.timeout_s, pool=None
            ),
        )
        # Created on first use inside the running loop: the client may be built outside any loop,
        # and an asyncio.Semaphore must not be shared between loops.
        self._semaphore: asyncio.Semaphore | None = None
        self._semaphore_loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_config(cls, cfg: MinerUConfig, **kw: Any) -> VLLMClient:
        return cls(cfg.vllm, cfg.http_client, cfg.circuit_breaker, **kw)

    # -- properties, lifecycle -----------------------------------------------------------------

    @property
    def server_url(self) -> str:
        return self._server.url

    @property
    def model(self) -> str:
        return self._server.model

    @property
    def breaker(self) -> CircuitBreaker:
        return self._breaker

    def __repr__(self) -> str:
        # Never the API key: only whether one is configured.
        return (
            f"VLLMClient(server_url={self.server_url!r}, model={self.model!r}, "
            f"api_key={'set' if self._api_key else 'none'}, breaker={self._breaker.state.value})"
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- unguarded helpers -------------------------------------------------------------------

    async def health_check(self) -> bool:
        """GET /health: True on 200, False on anything else. No retries, no breaker, never raises on network errors."""
        try:
            response = await self._http.get(HEALTH, timeout=self._server.connection_timeout_s)
        except httpx.HTTPError as exc:
            log.debug("health check of %s failed: %s", self.server_url, type(exc).__name__)
            return False
        if response.status_code != 200:
            log.debug("health check of %s answered HTTP %d", self.server_url, response.status_code)
        return response.status_code == 200

    async def fetch_server_metrics(self) -> str:
        """GET /metrics (Prometheus text). One attempt, no breaker; errors mapped to VLLMClientError."""
        try:
            response = await self._http.get(METRICS)
        except httpx.TransportError as exc:
            raise self._transport_error(exc, "GET", METRICS, "metrics", 1) from exc
        if response.status_code != 200:
            raise self._status_error(response, "GET", METRICS, "metrics", 1)
        return response.text

    # -- guarded requests ----------------------------------------------------------------------

    async def list_models(self) -> list[str]:
        """GET /v1/models → the served model ids."""
        models, _ = await self._guarded("GET", MODELS, None, label="list_models", parse=_validate_models)
        return models

    async def post_chat_completion(self, body: dict[str, Any], *, label: str = "") -> dict[str, Any]:
        """POST a caller-built OpenAI chat body; returns the JSON object (with a non-empty ``choices`` list)."""
        data, _ = await self._guarded("POST", CHAT_COMPLETIONS, body, label=label, parse=_validate_chat_body)
        return data

    async def chat_completion(
        self,
        prompt: str,
        images: Sequence[bytes] = (),
        *,
        system_prompt: str | None = None,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        extra_body: dict[str, Any] | None = None,
        label: str = "",
    ) -> ChatResult:
        """One user turn: PNG images (as data URLs, before the text) and a text prompt."""
        body = self.build_chat_body(
            prompt,
            images,
            system_prompt=system_prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            extra_body=extra_body,
        )
        started = time.perf_counter()
        data, attempts = await self._guarded("POST", CHAT_COMPLETIONS, body, label=label, parse=_validate_chat_text)
        choice = data["choices"][0]
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        return ChatResult(
            text=choice["message"]["content"],
            finish_reason=choice.get("finish_reason"),
            model=str(data.get("model") or self.model),
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            latency_s=time.perf_counter() - started,
            attempts=attempts,
        )

    def build_chat_body(
        self,
        prompt: str,
        images: Sequence[bytes] = (),
        *,
        system_prompt: str | None = None,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        extra_body: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The OpenAI chat body :meth:`chat_completion` sends (exposed for tests and cache keys)."""
        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": _png_data_url(png)}} for png in images
        ]
        content.append({"type": "text", "text": prompt})
        messages: list[dict[str, Any]] = []
        if system_prompt:
            messages.append({"role": "system", "content": system_prompt})
        messages.append({"role": "user", "content": content})
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": temperature}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if extra_body:
            body.update(extra_body)
        return body

    # -- the retry loop ----------------------------------------------------------------------

    async def _guarded(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        *,
        label: str,
        parse: Callable[[Any], T],
    ) -> tuple[T, int]:
        """Run attempts under tenacity; returns the parsed body and the number of attempts made."""
        attempts = 0
        max_attempts = self._http_config.max_attempts

        async def attempt() -> T:
            nonlocal attempts
            attempts += 1
            return await self._attempt(method, path, body, label=label, parse=parse, number=attempts)

        # A fresh AsyncRetrying per call: its iteration state must not be shared between concurrent calls.
        retrying = AsyncRetrying(
            stop=stop_after_attempt(max_attempts),
            wait=self._wait,
            retry=retry_if_exception(lambda exc: isinstance(exc, VLLMClientError) and exc.retryable),
            sleep=self._sleep,
            before_sleep=self._before_retry,
            reraise=True,
        )
        result = await retrying(attempt)
        return result, attempts

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if self._breaker.is_rejecting():
            # The breaker opened on the way: the next attempt fails fast, waiting first would only delay that.
            return 0.0
        if isinstance(exc, VLLMRateLimitedError) and exc.retry_after is not None:
            return min(exc.retry_after, self._http_config.retry_after_max_s)
        cfg = self._http_config
        # Full jitter: uniform in [0, min(backoff_max_s, initial * multiplier**(n-1))].
        backoff = wait_random_exponential(
            multiplier=cfg.backoff_initial_s, exp_base=cfg.backoff_multiplier, max=cfg.backoff_max_s
        )
        return float(backoff(state))

    def _before_retry(self, state: RetryCallState) -> None:
        CLIENT_RETRIES.inc()
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        # The exception's message already names the endpoint, the attempt, the server and the request.
        log.warning("retrying in %.2fs: %s", delay, exc)

    def _get_semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._semaphore is None or self._semaphore_loop is not loop:
            self._semaphore = asyncio.Semaphore(self._server.max_in_flight)
            self._semaphore_loop = loop
        return self._semaphore

    async def _attempt(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        *,
        label: str,
        parse: Callable[[Any], T],
        number: int,
    ) -> T:
        max_attempts = self._http_config.max_attempts
        try:
            permit = self._breaker.acquire(label)
        except CircuitOpenError:
            CLIENT_FAILURES.labels(error_type=CircuitOpenError.error_type).inc()
            raise
        with permit:  # releases the probe slot on any exit, cancellation included
            async with self._get_semaphore():
                IN_FLIGHT.inc()
                log.debug(
                    "%s %s%s attempt %d/%d [request=%s]", method, self.server_url, path, number, max_attempts, label
                )
                started = time.perf_counter()
                try:
                    result = await self._exchange(method, path, body, label=label, parse=parse, number=number)
                except VLLMClientError as exc:
                    REQUEST_DURATION.labels(endpoint=path, outcome=exc.error_type).observe(
                        time.perf_counter() - started
                    )
                    CLIENT_FAILURES.labels(error_type=exc.error_type).inc()
                    # A 4xx means the server is up and answering: not a breaker failure.
                    if isinstance(exc, VLLMRequestError):
                        permit.record_success()
                    else:
                        permit.record_failure()
                    raise
                finally:
                    IN_FLIGHT.dec()
            REQUEST_DURATION.labels(endpoint=path, outcome="success").observe(time.perf_counter() - started)
            permit.record_success()
            return result

    async def _exchange(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        *,
        label: str,
        parse: Callable[[Any], T],
        number: int,
    ) -> T:
        """One HTTP exchange, mapped to a parsed result or a VLLMClientError."""
        try:
            response = await self._http.request(method, path, json=body)
        except httpx.TransportError as exc:
            raise self._transport_error(exc, method, path, label, number) from exc
        if not response.is_success:
            raise self._status_error(response, method, path, label, number)
        try:
            return parse(response.json())
        except ValueError as exc:  # JSONDecodeError and our validators
            raise VLLMResponseError(
                f"malformed {response.status_code} answer to {method} {path} ({exc}; body: {self._snippet(response)!r})"
                f"{self._attempt_note(number)}",
                server=self.server_url,
                label=label,
                status_code=response.status_code,
            ) from None

    # -- error mapping -------------------------------------------------------------------------

    def _attempt_note(self, number: int) -> str:
        return f" (attempt {number}/{self._http_config.max_attempts})"

    def _snippet(self, response: httpx.Response) -> str:
        try:
            text = " ".join(response.text.split())
        except Exception:  # undecodable body: say so rather than fail while building an error
            text = f"<{len(response.content)} undecodable bytes>"
        if self._api_key:
            text = text.replace(self._api_key, "***")  # a server echoing our headers must not leak the key
        return text if len(text) <= _SNIPPET_CHARS else text[:_SNIPPET_CHARS] + "…"

    def _transport_error(
        self, exc: httpx.TransportError, method: str, path: str, label: str, number: int
    ) -> VLLMClientError:
        what = f"{method} {path}"
        note = self._attempt_note(number)
        detail = str(exc) or type(exc).__name__
        if isinstance(exc, httpx.ConnectTimeout):
            # No connection within connection_timeout_s: the server is unreachable, not slow.
            return VLLMConnectionError(
                f"could not connect for {what}: connect timeout after {self._server.connection_timeout_s}s{note}",
                server=self.server_url,
                label=label,
            )
        if isinstance(exc, httpx.TimeoutException):
            return VLLMTimeoutError(
                f"{what} timed out ({type(exc).__name__}, read/write timeout {self._http_config.timeout_s}s){note}",
                server=self.server_url,
                label=label,
            )
        return VLLMConnectionError(
            f"{what} failed: {type(exc).__name__}: {detail}{note}", server=self.server_url, label=label
        )

    def _status_error(
        self, response: httpx.Response, method: str, path: str, label: str, number: int
    ) -> VLLMClientError:
        status = response.status_code
        message = f"HTTP {status} from {method} {path}: {self._snippet(response)!r}{self._attempt_note(number)}"
        kwargs: dict[str, Any] = {"server": self.server_url, "label": label, "status_code": status}
        if status == 429:
            return VLLMRateLimitedError(
                message, retry_after=_parse_retry_after(response.headers.get("Retry-After")), **kwargs
            )
        if status >= 500:
            return VLLMServerError(message, **kwargs)
        if status in (401, 403):
            return VLLMAuthError(message, **kwargs)
        # Other 4xx, and an unexpected 1xx/3xx (a redirect means a wrong URL): retrying cannot help.
        return VLLMRequestError(message, **kwargs)
