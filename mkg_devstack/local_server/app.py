"""The ASGI application: vLLM's OpenAI-compatible endpoints over the OCR model.

Request path of ``POST /v1/chat/completions``: gate (down? authorised?) →
parse and validate the body (400/404) → injected transport faults, if enabled
→ decode the images off the event loop (400 if corrupt) → wait for one of
``--max-num-seqs`` slots (FIFO; counted in ``vllm:num_requests_waiting``) →
OCR in a worker thread (500 for this request only if it fails) → answer (or
an injected hostile answer made from it).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from mkg_devstack.local_server import protocol, responses
from mkg_devstack.local_server.faults import (
    CONTENT_FAULTS,
    FORCED_FINISH_FAULTS,
    WRONG_MODEL_NAME,
    FaultDecision,
    FaultInjector,
    hostile_content,
)
from mkg_devstack.local_server.metrics import ServerMetrics
from mkg_devstack.local_server.ocr import EnginePool, ImageDecodeError, decode_image
from mkg_devstack.local_server.protocol import RequestError, Route
from mkg_devstack.local_server.responses import Completion
from mkg_devstack.local_server.settings import ServerSettings
from mkg_devstack.slots import SlotScheduler

log = logging.getLogger("mkg_devstack.local_server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

FAULT_PATH = "/fault-injection"
_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    408: "RequestTimeoutError",
    429: "TooManyRequestsError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}
# What a broken proxy or a crashed worker sends: a 200 whose body is cut off mid-JSON.
MALFORMED_BODY = b'{"id": "chatcmpl-malformed", "object": "chat.completion", "choices": [{"index": 0, "mess'


def error_response(status: int, message: str) -> JSONResponse:
    """vLLM's error object (OpenAI-style) with the HTTP status as code."""
    return JSONResponse(
        {
            "object": "error",
            "message": message,
            "type": _ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError"),
            "param": None,
            "code": status,
        },
        status_code=status,
    )


class ServerState:
    """Everything one server process shares between requests."""

    def __init__(self, settings: ServerSettings, pool: EnginePool | None = None) -> None:
        self.settings = settings
        self.metrics = ServerMetrics(settings.model_name, settings.max_num_seqs)
        self.faults = FaultInjector(settings.faults, settings.fault_seed) if settings.fault_injection else None
        self.pool = pool if pool is not None else EnginePool(settings.max_num_seqs)
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.on_fatal: Callable[[], None] = lambda: None
        self.executor: ThreadPoolExecutor | None = None
        self.slots: SlotScheduler | None = None
        self.created = int(time.time())

    def load_model(self) -> None:
        started = time.monotonic()
        try:
            self.pool.load()
        except Exception as exc:  # the server is useless without its model: report, then exit
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("failed to load the OCR model")
            self.on_fatal()
            return
        self.ready.set()
        log.info("ready after %.2fs", time.monotonic() - started)

    def run_ocr(self, route: Route, images: list[np.ndarray]) -> str:
        """Runs in a worker thread: the OCR model is CPU-bound and must not block the event loop."""
        from mkg_devstack.local_server.answers import answer

        with self.pool.engine() as engine:
            return "\n\n".join(text for text in (answer(route, engine, image) for image in images) if text)


class GateMiddleware:
    """Down (fault injection), API key on /v1/*, and one log line per request.

    A plain ASGI middleware rather than Starlette's BaseHTTPMiddleware so that
    handlers still see client disconnects (a hung request ends when its client
    gives up).
    """

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    def _authorised(self, scope: Scope) -> bool:
        key = self.state.settings.api_key
        if not key:
            return True
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                return hmac.compare_digest(value, f"Bearer {key}".encode())
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        method: str = scope["method"]
        started = time.monotonic()
        status = 0

        async def send_logged(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        faults = self.state.faults
        try:
            if faults is not None and faults.down and path != FAULT_PATH:
                await error_response(503, "server is down (fault injection)")(scope, receive, send_logged)
            elif path.startswith("/v1") and method != "OPTIONS" and not self._authorised(scope):
                # vLLM's exact answer; the key itself is never logged.
                await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send_logged)
            else:
                await self.app(scope, receive, send_logged)
        finally:
            elapsed_ms = (time.monotonic() - started) * 1000
            # Probes and scrapers poll these every few seconds (and /health every 0.1 s while
            # a launcher waits for readiness): keep them out of the INFO log.
            level = logging.DEBUG if path in ("/health", "/metrics") else logging.INFO
            log.log(level, "%s %s -> %s (%.0f ms)", method, path, status or "no response", elapsed_ms)


async def _sleep_unless_disconnected(request: Request, seconds: float) -> bool:
    """Sleep ``seconds``; True if the client disconnected first (then stop at once)."""
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        if await request.is_disconnected():
            return True
        await asyncio.sleep(min(0.25, remaining))
    return False


def _decode_images(urls: tuple[str, ...]) -> list[np.ndarray]:
    return [decode_image(protocol.decode_data_url(url)) for url in urls]


def create_app(settings: ServerSettings, *, pool: EnginePool | None = None) -> FastAPI:
    """The ASGI app; ``app.state.server`` holds the :class:`ServerState`.

    The model loads in a background thread at startup; ``/health`` answers
    503 until it is ready, then 200, as vLLM's does.
    """
    state = ServerState(settings, pool)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.executor = ThreadPoolExecutor(max_workers=settings.max_num_seqs, thread_name_prefix="ocr")
        state.slots = SlotScheduler(
            settings.max_num_seqs, lambda running, waiting: state.metrics.set_queue(running=running, waiting=waiting)
        )
        threading.Thread(target=state.load_model, name="ocr-model-loader", daemon=True).start()
        try:
            yield
        finally:
            state.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="mkg-pipeline local VLM server (OCR stand-in for vLLM)",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.server = state
    app.add_middleware(GateMiddleware, state=state)

    @app.get("/health")
    async def health() -> Response:
        if state.ready.is_set():
            return Response(status_code=200)
        return error_response(503, state.load_error or "model is loading")

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": name,
                        "object": "model",
                        "created": state.created,
                        "owned_by": "mkg-local",
                        "root": name,
                        "parent": None,
                        "max_model_len": settings.max_model_len,
                        "permission": [],
                    }
                    for name in settings.served_model_names
                ],
            }
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _chat_completions(state, request)

    if state.faults is not None:
        faults = state.faults

        @app.get(FAULT_PATH)
        async def get_faults() -> JSONResponse:
            return JSONResponse(faults.settings.to_dict())

        @app.post(FAULT_PATH)
        async def set_faults(request: Request) -> Response:
            try:
                changes = json.loads(await request.body() or b"{}")
                updated = faults.update(changes)
            except ValueError as exc:  # includes json.JSONDecodeError
                return error_response(400, str(exc))
            log.warning("fault injection settings changed: %s", updated.to_dict())
            return JSONResponse(updated.to_dict())

    return app


async def _apply_faults(state: ServerState, request: Request) -> tuple[Response | None, FaultDecision | None]:
    """(the response a transport fault dictates or None, the decision) — None, None without injection."""
    if state.faults is None:
        return None, None
    decision: FaultDecision = state.faults.decide()
    if decision.hang_s:
        state.metrics.record_fault("hang")
        log.warning("fault injection: hanging for up to %.0fs", decision.hang_s)
        if await _sleep_unless_disconnected(request, decision.hang_s):
            return error_response(503, "client went away during an injected hang"), decision
    if decision.latency_s:
        state.metrics.record_fault("latency")
        if await _sleep_unless_disconnected(request, decision.latency_s):
            return error_response(503, "client went away during injected latency"), decision
    if decision.error_status is not None:
        state.metrics.record_fault("error")
        return error_response(decision.error_status, "injected fault: server error"), decision
    if decision.malformed:
        state.metrics.record_fault("malformed")
        return Response(MALFORMED_BODY, status_code=200, media_type="application/json"), decision
    return None, decision


async def _chat_completions(state: ServerState, request: Request) -> Response:
    settings = state.settings
    arrived = time.monotonic()
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return error_response(400, "request body is not valid JSON")
    try:
        chat = protocol.parse_chat_request(body)
    except RequestError as exc:
        return error_response(400, str(exc))
    if chat.model is not None and chat.model not in settings.served_model_names:
        return error_response(404, f"The model `{chat.model}` does not exist.")
    if not chat.image_urls:
        return error_response(400, "this server reads images: send an image_url part with a data:image/...;base64 URL")
    if not state.ready.is_set():
        return error_response(503, "model is loading")

    fault, decision = await _apply_faults(state, request)
    if fault is not None:
        return fault

    loop = asyncio.get_running_loop()
    try:
        # Off the event loop: a large PNG takes tens of milliseconds to decode.
        images = await loop.run_in_executor(None, _decode_images, chat.image_urls)
    except RequestError as exc:
        return error_response(400, str(exc))
    except ImageDecodeError as exc:
        return error_response(400, f"invalid image: {exc}")

    limit = chat.token_limit
    prompt_tokens = protocol.estimate_text_tokens(chat.text_chars) + sum(
        protocol.estimate_image_tokens(image.shape[1], image.shape[0]) for image in images
    )
    if limit is not None and prompt_tokens + limit > settings.max_model_len:
        return error_response(
            400,
            f"This model's maximum context length is {settings.max_model_len} tokens. However, you requested "
            f"{prompt_tokens + limit} tokens ({prompt_tokens} in the messages, {limit} in "
            "the completion). Please reduce the length of the messages or completion.",
        )

    route = protocol.route_for_prompt(chat.prompt)
    assert state.slots is not None and state.executor is not None
    async with state.slots.slot() as queued_s:
        try:
            content = await loop.run_in_executor(state.executor, state.run_ocr, route, images)
        except Exception as exc:  # one bad request must not take the server down
            log.exception("OCR failed (route %s)", route.value)
            return error_response(500, f"OCR failed: {type(exc).__name__}: {exc}")
    answered = time.monotonic()

    hostile = decision.answer if decision is not None else None
    forced_finish: str | None = None
    if hostile in CONTENT_FAULTS:
        state.metrics.record_fault(hostile)
        log.warning("fault injection: a %s answer", hostile)
        content, forced_finish = hostile_content(hostile, content)
    content, limit_finish = protocol.truncate_to_tokens(content, limit)
    finish_reason: str | None = forced_finish if hostile in FORCED_FINISH_FAULTS else limit_finish
    model = chat.model or settings.model_name
    if hostile == "wrong_model":
        state.metrics.record_fault(hostile)
        log.warning("fault injection: answering as %s", WRONG_MODEL_NAME)
        model = WRONG_MODEL_NAME
    completion_tokens = max(1, protocol.estimate_text_tokens(len(content)))
    if hostile == "huge":
        completion_tokens = protocol.estimate_text_tokens(state.faults.settings.huge_bytes) if state.faults else 1
    state.metrics.record_success(
        finished_reason=finish_reason or "none",
        prompt_tokens=prompt_tokens,
        generation_tokens=completion_tokens,
        e2e_s=answered - arrived,
        queue_s=queued_s,
        first_token_s=answered - arrived,
    )
    log.info(
        "chat completion: route=%s images=%s chars=%d finish=%s queued=%.2fs total=%.2fs",
        route.value,
        ",".join(f"{image.shape[1]}x{image.shape[0]}" for image in images),
        len(content),
        finish_reason,
        queued_s,
        answered - arrived,
    )
    completion = Completion(
        completion_id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        content=content,
        finish_reason=finish_reason,
        usage={
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    )
    if hostile in ("trickle", "huge") and state.faults is not None:
        state.metrics.record_fault(hostile)
        faults = state.faults.settings
        if hostile == "trickle":
            log.warning("fault injection: trickling the answer, one byte every %.1fs", faults.trickle_interval_s)
            return responses.trickle_response(completion, faults.trickle_interval_s, faults.hang_s, bool(chat.stream))
        log.warning("fault injection: a %d-byte answer", faults.huge_bytes)
        return responses.huge_response(completion, faults.huge_bytes, bool(chat.stream))
    if chat.stream:
        return responses.stream_response(completion, chat.include_usage)
    return responses.json_response(completion)
