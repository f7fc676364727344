"""The guarded client of the OpenAI-compatible VLM server (vLLM or the local server).

One :class:`VLLMClient` per event loop holds one ``httpx.AsyncClient``. A guarded call
becomes one :class:`_Request` (method, path, body bytes, label, parser, answer cap), and
tenacity runs its attempts. Every attempt:

1. asks the server's :class:`~mkg_pipeline.vllm.breaker.CircuitBreaker` for a permit
   (fails fast with :class:`CircuitOpenError` while it is open);
2. waits for a slot of the server's :class:`~mkg_pipeline.vllm.limiter.AdaptiveLimiter`,
   the one concurrency limit (held only for the exchange, never during a backoff sleep;
   the httpx pool is sized from its ceiling, so it never queues a request);
3. sends the body and reads the answer within a **total** deadline
   (``http_client.timeout_s``), streaming, and stops at the answer's cap;
4. reports the outcome to the breaker, the limiter and the Prometheus metrics.

Tenacity retries the retryable outcomes (timeouts, connection errors, 429, 5xx,
malformed 200 bodies) with full-jitter exponential backoff, or the server's
``Retry-After`` on 429; 4xx answers and oversized answers are never retried. When a
request gives up, its error carries ``first_cause`` (its first real failure) and
``attempt_errors`` (how every attempt ended).

Request bodies are serialized once, as bytes: the small JSON skeleton goes through
``json.dumps`` and page images are spliced in as base64 (which needs no JSON escaping),
so a 300 KB image is never escaped character by character. Memory per request in flight
is the body alone (4/3 of the PNG): each image's base64 is joined straight into the body
(no data-URL copy in between) and let go of before the request is sent, and a large body
goes to the socket in slices (:class:`_BodySlices`), so the event loop's transport never
buffers a second copy of it while the server reads. That is what lets the vlm stage admit
pages by their bytes (issue 21 row 6).
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import functools
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_random_exponential

from mkg_pipeline.config import CircuitBreakerConfig, HTTPClientConfig, PipelineConfig, VLLMServerConfig
from mkg_pipeline.metrics.client import CLIENT_FAILURES, CLIENT_RETRIES, IN_FLIGHT, REQUEST_DURATION
from mkg_pipeline.vllm.breaker import BreakerState, CircuitBreaker, Permit, breaker_for
from mkg_pipeline.vllm.errors import (
    CircuitOpenError,
    ResponseTooLargeError,
    VLLMAuthError,
    VLLMClientError,
    VLLMConnectionError,
    VLLMRateLimitedError,
    VLLMRequestError,
    VLLMResponseError,
    VLLMServerError,
    VLLMTimeoutError,
)
from mkg_pipeline.vllm.limiter import AdaptiveLimiter, Signal, limiter_for, parse_queue_metrics

log = logging.getLogger(__name__)

SleepFn = Callable[[float], Awaitable[None]]
T = TypeVar("T")

CHAT_COMPLETIONS = "/v1/chat/completions"
MODELS = "/v1/models"
HEALTH = "/health"
METRICS = "/metrics"

#: Bound of one answer per completion token: a token decodes to a few bytes of text (a long one
#: to a few dozen), and JSON escaping at most doubles ordinary text. 64 bytes per token is far
#: above any real answer's average, while a runaway answer stops within 64 x max_tokens.
ANSWER_BYTES_PER_TOKEN = 64
#: ... plus the envelope (ids, model name, usage, finish reason).
ANSWER_ENVELOPE_BYTES = 64 * 1024
#: Largest /metrics page read (vLLM's is a few hundred KB).
METRICS_MAX_BYTES = 16 * 1024 * 1024
#: Connections beyond the limiter's ceiling, for /metrics scrapes and health checks.
OUT_OF_BAND_CONNECTIONS = 2
#: Deadline of one /metrics scrape, seconds (it must not lag behind the limiter's decisions).
SCRAPE_TIMEOUT_S = 5.0
#: how often a caller waiting on half-open probes looks at the breaker again, seconds
PROBE_POLL_S = 0.05

# Enough of a server's error body to tell "model not found" from "context too long".
_SNIPPET_CHARS = 300
_SNIPPET_BYTES = 4096
_JSON_HEADERS = {"Content-Type": "application/json"}
# Stands in for a page image in the JSON skeleton; the image's bytes replace it after serialization.
_IMAGE_PLACEHOLDER = "\x00mkg-image\x00"
_IMAGE_TOKEN = json.dumps(_IMAGE_PLACEHOLDER).encode()
_PNG_URL_PREFIX = b"data:image/png;base64,"
# What a data URL of base64 may hold: none of it needs escaping in JSON.
_DATA_URL_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=:;,.-_"


@dataclass(frozen=True)
class ChatResult:
    """One chat completion. ``latency_s`` is the caller's wall time, retries and backoff included."""

    text: str
    finish_reason: str | None
    #: the answer's ``model`` field as sent (None if absent or not a string): who answered, never assumed
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_s: float
    attempts: int


@dataclass(frozen=True, slots=True)
class _Request(Generic[T]):
    """One guarded call: what every attempt sends, and how its answer is read."""

    method: str
    path: str
    body: bytes | None
    label: str
    parse: Callable[[bytes], T]
    max_answer_bytes: int


# -- bodies --------------------------------------------------------------------------------


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _splice(skeleton: dict[str, Any], urls: Sequence[bytes | Sequence[bytes]]) -> bytes | None:
    """Serialize ``skeleton`` and put ``urls`` (JSON-safe bytes, or the pieces of one) where its placeholders
    are, in order. The body is allocated once: no piece is copied before the final join."""
    parts = _dumps(skeleton).split(_IMAGE_TOKEN)
    if len(parts) != len(urls) + 1:
        return None  # the placeholder also occurs elsewhere (in a prompt?): let json.dumps do it all
    out = [parts[0]]
    for url, part in zip(urls, parts[1:], strict=True):
        out += (b'"', *((url,) if isinstance(url, bytes) else url), b'"', part)
    return b"".join(out)


#: bodies larger than this go to the socket in slices of this size (see _BodySlices)
BODY_SLICE_BYTES = 256 * 1024


class _BodySlices:
    """A request body sent in slices, with its Content-Length declared.

    Given one bytes object, the event loop's transport (Python 3.11) copies whatever the socket does
    not take at once into its own buffer: a second copy of a 40 MB body for as long as the server takes
    to read it, for every request being sent. In slices, the transport holds one slice at a time (httpx
    waits for it to drain before the next). Iterable again for every attempt."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def __len__(self) -> int:
        return len(self.body)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        view = memoryview(self.body)
        for start in range(0, len(view), BODY_SLICE_BYTES):
            yield bytes(view[start : start + BODY_SLICE_BYTES])


def _json_safe_bytes(text: str) -> bytes | None:
    """``text`` as bytes if it serializes to itself in JSON (a base64 data URL does), else None."""
    if not text.isascii():
        return None
    raw = text.encode("ascii")
    return raw if not raw.translate(None, _DATA_URL_CHARS) else None


def _encode_body(body: dict[str, Any]) -> bytes:
    """A caller-built chat body as JSON bytes, with long data URLs spliced in rather than escaped."""
    messages = body.get("messages")
    urls: list[bytes] = []
    if isinstance(messages, list):
        new_messages = []
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                new_content = []
                for part in content:
                    image = part.get("image_url") if isinstance(part, dict) else None
                    url = image.get("url") if isinstance(image, dict) else None
                    raw = _json_safe_bytes(url) if isinstance(url, str) and len(url) > 1024 else None
                    if raw is not None:
                        urls.append(raw)
                        part = {**part, "image_url": {**image, "url": _IMAGE_PLACEHOLDER}}
                    new_content.append(part)
                message = {**message, "content": new_content}
            new_messages.append(message)
        if urls:
            spliced = _splice({**body, "messages": new_messages}, urls)
            if spliced is not None:
                return spliced
    return _dumps(body)


def _answer_cap(body: dict[str, Any] | None, default: int) -> int:
    """How many bytes an answer to ``body`` may have: max_tokens x a bound, else ``default``."""
    if not body:
        return default
    tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0:
        return default
    choices = body.get("n")
    choices = choices if isinstance(choices, int) and not isinstance(choices, bool) and choices > 0 else 1
    return ANSWER_ENVELOPE_BYTES + tokens * ANSWER_BYTES_PER_TOKEN * choices


# -- answers -------------------------------------------------------------------------------


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


def _parse_chat_body(raw: bytes) -> dict[str, Any]:
    data = json.loads(raw)
    _chat_choices(data)
    return data  # type: ignore[no-any-return]


def _parse_chat_text(raw: bytes) -> dict[str, Any]:
    data = json.loads(raw)
    choice = _chat_choices(data)[0]
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        raise ValueError("choices[0].message.content is not a string")
    return data  # type: ignore[no-any-return]


def answer_model(data: dict[str, Any]) -> str | None:
    """The ``model`` an answer names, exactly as sent; None if it names none (absent, null, not a string)."""
    model = data.get("model")
    return model if isinstance(model, str) else None


def _parse_models(raw: bytes) -> list[str]:
    data = json.loads(raw)
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("id"), str) for i in items):
        raise ValueError("body has no 'data' list of objects with an 'id'")
    return [item["id"] for item in items]


def _limiter_signal(exc: VLLMClientError) -> Signal:
    if isinstance(exc, VLLMRateLimitedError) or (isinstance(exc, VLLMServerError) and exc.status_code == 503):
        return Signal.OVERLOAD
    if isinstance(exc, VLLMTimeoutError):
        return Signal.TIMEOUT
    return Signal.NONE


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """httpx's default TLS context (certifi's bundle, SSL_CERT_FILE/SSL_CERT_DIR), built once per process:
    httpx builds one per client, even for http:// URLs, and loading the bundle takes 15-30 ms of CPU."""
    return httpx.create_ssl_context()


class VLLMClient:
    """Breaker-guarded, retrying, adaptively limited client of one OpenAI-compatible VLM server."""

    def __init__(
        self,
        server: VLLMServerConfig,
        http: HTTPClientConfig | None = None,
        breaker_config: CircuitBreakerConfig | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        breaker: CircuitBreaker | None = None,
        limiter: AdaptiveLimiter | None = None,
        sleep: SleepFn = asyncio.sleep,
    ) -> None:
        self._server = server
        self._http_config = cfg = http or HTTPClientConfig()
        self._breaker = breaker or breaker_for(server.url, breaker_config)
        self._limiter = limiter or limiter_for(server.url, server, deadline_s=cfg.timeout_s)
        self._sleep = sleep
        self._api_key = server.api_key.get_secret_value() if server.api_key is not None else None
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        # The pool holds as many connections as the limiter may ever allow (plus scrapes), so the
        # limiter is the only limit. A custom ``transport`` (tests, proxies) replaces the pool.
        # The pool is bound to the event loop that first uses it: one client per loop (per Dagster step).
        self._http = httpx.AsyncClient(
            base_url=server.url,
            headers=headers,
            transport=transport,
            verify=_tls_context(),
            limits=httpx.Limits(
                max_connections=server.max_in_flight + OUT_OF_BAND_CONNECTIONS,
                max_keepalive_connections=cfg.keepalive,
            ),
            # The total deadline of an attempt is ours (asyncio.timeout); these are backstops.
            timeout=httpx.Timeout(
                connect=server.connection_timeout_s, read=cfg.timeout_s, write=cfg.timeout_s, pool=None
            ),
        )
        self._scraper: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, cfg: PipelineConfig, **kw: Any) -> VLLMClient:
        return cls(cfg.vllm, cfg.http_client, cfg.circuit_breaker, **kw)

    # -- properties, lifecycle -----------------------------------------------------------------

    @property
    def server_url(self) -> str:
        return self._server.url

    @property
    def model(self) -> str:
        return self._server.model

    @property
    def accepted_models(self) -> frozenset[str]:
        """The model names an answer may carry: the configured model and ``vllm.served_model_aliases``."""
        return frozenset((self._server.model, *self._server.served_model_aliases))

    @property
    def breaker(self) -> CircuitBreaker:
        return self._breaker

    @property
    def limiter(self) -> AdaptiveLimiter:
        """The server's concurrency limiter (one per server URL per process); every attempt holds one of its
        slots. A producer that must not run ahead of it awaits ``client.limiter.wait_for_capacity()`` while
        the limit binds (the vlm stage's scheduler does), never polls it."""
        return self._limiter

    def __repr__(self) -> str:
        # Never the API key: only whether one is configured.
        return (
            f"VLLMClient(server_url={self.server_url!r}, model={self.model!r}, "
            f"api_key={'set' if self._api_key else 'none'}, breaker={self._breaker.state.value}, "
            f"limit={self._limiter.limit})"
        )

    async def aclose(self) -> None:
        scraper, self._scraper = self._scraper, None
        if scraper is not None:
            scraper.cancel()
            await asyncio.gather(scraper, return_exceptions=True)
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

    async def fetch_server_metrics(self, timeout_s: float | None = None) -> str:
        """GET /metrics (Prometheus text). One attempt, no breaker, no limiter; errors mapped to VLLMClientError."""
        request = _Request(
            "GET", METRICS, None, "metrics", lambda raw: raw.decode("utf-8", "replace"), METRICS_MAX_BYTES
        )
        return await self._exchange(request, 1, timeout_s or self._http_config.timeout_s)

    # -- guarded requests ----------------------------------------------------------------------

    async def list_models(self) -> list[str]:
        """GET /v1/models → the served model ids."""
        request = _Request("GET", MODELS, None, "list_models", _parse_models, self._http_config.max_response_bytes)
        models, _ = await self._send(request)
        return models

    async def post_chat_completion(self, body: dict[str, Any], *, label: str = "") -> dict[str, Any]:
        """POST a caller-built OpenAI chat body; returns the JSON object (with a non-empty ``choices`` list)."""
        cap = _answer_cap(body, self._http_config.max_response_bytes)
        data, _ = await self._send(_Request("POST", CHAT_COMPLETIONS, _encode_body(body), label, _parse_chat_body, cap))
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
        options = (system_prompt, max_tokens, temperature, extra_body)
        # The base64 of each image goes straight into the body (no data URL built first), and is let go of
        # before the request is sent: while it is in flight, the request holds its body only.
        urls = [(_PNG_URL_PREFIX, base64.b64encode(png)) for png in images]
        skeleton = self._chat_dict(prompt, [_IMAGE_PLACEHOLDER] * len(urls), *options)
        body = _splice(skeleton, urls) or _dumps(
            self._chat_dict(prompt, [b"".join(u).decode() for u in urls], *options)
        )
        del urls
        cap = _answer_cap(skeleton, self._http_config.max_response_bytes)
        started = time.perf_counter()
        data, attempts = await self._send(_Request("POST", CHAT_COMPLETIONS, body, label, _parse_chat_text, cap))
        choice = data["choices"][0]
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        return ChatResult(
            text=choice["message"]["content"],
            finish_reason=choice.get("finish_reason"),
            model=answer_model(data),
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
        """The OpenAI chat body :meth:`chat_completion` sends, as a dict (for tests and cache keys)."""
        urls = [(_PNG_URL_PREFIX + base64.b64encode(png)).decode() for png in images]
        return self._chat_dict(prompt, urls, system_prompt, max_tokens, temperature, extra_body)

    def _chat_dict(
        self,
        prompt: str,
        urls: Sequence[str],
        system_prompt: str | None,
        max_tokens: int | None,
        temperature: float,
        extra_body: dict[str, Any] | None,
    ) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
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

    # -- the retry loop ------------------------------------------------------------------------

    async def _send(self, request: _Request[T]) -> tuple[T, int]:
        """Run attempts under tenacity; returns the parsed answer and the number of attempts made."""
        failures: list[VLLMClientError] = []

        async def attempt() -> T:
            try:
                return await self._attempt(request, len(failures) + 1)
            except VLLMClientError as exc:
                failures.append(exc)
                raise

        # A fresh AsyncRetrying per call: its iteration state must not be shared between concurrent calls.
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._http_config.max_attempts),
            wait=self._wait,
            retry=retry_if_exception(lambda exc: isinstance(exc, VLLMClientError) and exc.retryable),
            sleep=self._sleep,
            before_sleep=self._before_retry,
            reraise=True,
        )
        try:
            return await retrying(attempt), len(failures) + 1
        except VLLMClientError as exc:
            _name_first_cause(exc, failures)
            raise

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

    async def _attempt(self, request: _Request[T], number: int) -> T:
        """One attempt: breaker permit, limiter slot, exchange; outcome to breaker, limiter and metrics."""
        permit = await self._admit(request.label)
        with permit:  # releases a probe slot on any exit, cancellation included
            with await self._limiter.acquire() as slot:  # released without a signal on cancellation
                self._watch_server()
                IN_FLIGHT.inc()
                log.debug(
                    "%s %s%s attempt %d/%d [request=%s]",
                    request.method,
                    self.server_url,
                    request.path,
                    number,
                    self._http_config.max_attempts,
                    request.label,
                )
                started = time.perf_counter()
                try:
                    result = await self._exchange(request, number, self._http_config.timeout_s)
                except VLLMClientError as exc:
                    REQUEST_DURATION.labels(endpoint=request.path, outcome=exc.error_type).observe(
                        time.perf_counter() - started
                    )
                    CLIENT_FAILURES.labels(error_type=exc.error_type).inc()
                    slot.release(_limiter_signal(exc))
                    # A 4xx or an oversized answer means the server is up and answering: not a breaker failure.
                    if isinstance(exc, VLLMRequestError | ResponseTooLargeError):
                        permit.record_success()
                    else:
                        permit.record_failure(exc.error_type)
                    raise
                finally:
                    IN_FLIGHT.dec()
                elapsed = time.perf_counter() - started
                slot.release(Signal.OK, elapsed)
            REQUEST_DURATION.labels(endpoint=request.path, outcome="success").observe(elapsed)
            permit.record_success()
            return result

    async def _admit(self, label: str) -> Permit:
        """The breaker's permit for one attempt, or CircuitOpenError at once while it is open.

        While it is half-open with every probe slot taken, wait for the probes' verdict (bounded: each
        probe has a total deadline) instead of failing: the server may well be back, and a page failed
        now would wait for the next run.
        """
        while True:
            try:
                return self._breaker.acquire(label)
            except CircuitOpenError:
                if self._breaker.state is not BreakerState.HALF_OPEN:
                    CLIENT_FAILURES.labels(error_type=CircuitOpenError.error_type).inc()
                    raise
            await asyncio.sleep(PROBE_POLL_S)

    async def _exchange(self, request: _Request[T], number: int, deadline_s: float) -> T:
        """One HTTP exchange within a total deadline, mapped to a parsed answer or a VLLMClientError."""
        try:
            async with asyncio.timeout(deadline_s):
                raw = await self._fetch(request, number)
        except TimeoutError:
            raise VLLMTimeoutError(
                f"{request.method} {request.path}: no complete answer within the {deadline_s:g}s deadline"
                f"{self._attempt_note(number)}",
                server=self.server_url,
                label=request.label,
            ) from None
        except httpx.TransportError as exc:
            raise self._transport_error(exc, request, number) from exc
        try:
            return request.parse(raw)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError and our validators
            raise VLLMResponseError(
                f"malformed answer to {request.method} {request.path} "
                f"({exc}; body: {self._snippet(raw[:_SNIPPET_BYTES])!r}){self._attempt_note(number)}",
                server=self.server_url,
                label=request.label,
                status_code=200,
            ) from None

    async def _fetch(self, request: _Request[Any], number: int) -> bytes:
        """Send the request and read the answer, streaming, stopping at its cap."""
        body: bytes | _BodySlices | None = request.body
        headers = _JSON_HEADERS if body else None
        if request.body is not None and len(request.body) > BODY_SLICE_BYTES:
            body = _BodySlices(request.body)
            headers = {**_JSON_HEADERS, "Content-Length": str(len(request.body))}
        http_request = self._http.build_request(request.method, request.path, content=body, headers=headers)
        response = await self._http.send(http_request, stream=True)
        try:
            if not response.is_success:
                snippet = await self._read_head(response)
                raise self._status_error(response, snippet, request, number)
            cap = request.max_answer_bytes
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > cap:
                raise self._too_large(f"announces {int(declared)} bytes", request, number)
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > cap:
                    raise self._too_large(f"passed {size} bytes", request, number)
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            await response.aclose()

    async def _read_head(self, response: httpx.Response) -> bytes:
        """The first few KB of an error answer: enough for a message, never the whole of a huge body."""
        head = b""
        async for chunk in response.aiter_bytes():
            head += chunk
            if len(head) >= _SNIPPET_BYTES:
                break
        return head[:_SNIPPET_BYTES]

    # -- the server's queue, for the limiter ------------------------------------------------------

    def _watch_server(self) -> None:
        """Start this loop's scrape timer for the limiter, if it is adaptive and none is running."""
        if self._limiter.adaptive and (self._scraper is None or self._scraper.done()):
            self._scraper = asyncio.get_running_loop().create_task(self._scrape_loop(), name="vllm-metrics-scraper")

    async def _scrape_loop(self) -> None:
        """Off the request path: feed the limiter the server's queue, on its grid, while it has work."""
        limiter = self._limiter
        while not limiter.idle:
            await asyncio.sleep(limiter.seconds_until_wakeup())
            limiter.tick()
            if not limiter.claim_scrape():
                if limiter.seconds_until_wakeup() == 0:  # due, but another loop's client is scraping
                    await asyncio.sleep(0.05)
                continue
            try:
                text = await self.fetch_server_metrics(timeout_s=SCRAPE_TIMEOUT_S)
            except asyncio.CancelledError:
                limiter.scrape_abandoned()
                raise
            except Exception as exc:  # never let a scrape disturb the requests: latency alone steers then
                log.debug("no queue reading from %s/metrics: %s", self.server_url, exc)
                limiter.metrics_unavailable()
                continue
            reading = parse_queue_metrics(text)
            if reading is None:
                limiter.metrics_unavailable()
            else:
                limiter.observe_metrics(reading)

    # -- error mapping -------------------------------------------------------------------------

    def _attempt_note(self, number: int) -> str:
        return f" (attempt {number}/{self._http_config.max_attempts})"

    def _snippet(self, raw: bytes) -> str:
        text = " ".join(raw.decode("utf-8", "replace").split())
        if self._api_key:
            text = text.replace(self._api_key, "***")  # a server echoing our headers must not leak the key
        return text if len(text) <= _SNIPPET_CHARS else text[:_SNIPPET_CHARS] + "…"

    def _too_large(self, detail: str, request: _Request[Any], number: int) -> ResponseTooLargeError:
        return ResponseTooLargeError(
            f"answer to {request.method} {request.path} {detail}, over its cap of {request.max_answer_bytes} bytes; "
            f"reading stopped{self._attempt_note(number)}",
            server=self.server_url,
            label=request.label,
            status_code=200,
        )

    def _transport_error(self, exc: httpx.TransportError, request: _Request[Any], number: int) -> VLLMClientError:
        what = f"{request.method} {request.path}"
        note = self._attempt_note(number)
        if isinstance(exc, httpx.ConnectTimeout):
            # No connection within connection_timeout_s: the server is unreachable, not slow.
            return VLLMConnectionError(
                f"could not connect for {what}: connect timeout after {self._server.connection_timeout_s}s{note}",
                server=self.server_url,
                label=request.label,
            )
        if isinstance(exc, httpx.TimeoutException):
            return VLLMTimeoutError(
                f"{what} timed out ({type(exc).__name__}, timeout {self._http_config.timeout_s}s){note}",
                server=self.server_url,
                label=request.label,
            )
        detail = str(exc) or type(exc).__name__
        return VLLMConnectionError(
            f"{what} failed: {type(exc).__name__}: {detail}{note}", server=self.server_url, label=request.label
        )

    def _status_error(
        self, response: httpx.Response, snippet: bytes, request: _Request[Any], number: int
    ) -> VLLMClientError:
        status = response.status_code
        where = f"{request.method} {request.path}"
        message = f"HTTP {status} from {where}: {self._snippet(snippet)!r}{self._attempt_note(number)}"
        kwargs: dict[str, Any] = {"server": self.server_url, "label": request.label, "status_code": status}
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


def _name_first_cause(exc: VLLMClientError, failures: list[VLLMClientError]) -> None:
    """Tell the error the request gives up with how every attempt ended and what failed first for real.

    A request whose later attempts failed fast (breaker open) is about its first real failure:
    that is its cause, ``circuit_open`` is only how the later attempts ended.
    """
    exc.attempt_errors = tuple(f.error_type for f in failures)
    real = next((f for f in failures if not isinstance(f, CircuitOpenError)), None)
    if real is None:
        return  # only fail-fast attempts: the breaker's own cause (set when it raised) stands
    exc.first_cause = real.error_type
    if real is not exc and isinstance(exc, CircuitOpenError):
        exc.args = (f"{exc.args[0]}; first failure of this request: {real}",)
        exc.__cause__ = real
