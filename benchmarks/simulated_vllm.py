"""A simulated GPU server: the OpenAI chat API of ``vllm serve``, and no model.

    python benchmarks/simulated_vllm.py --host 127.0.0.1 --port P --slots S --latency L
        [--latency-per-running K] [--layout-blocks N] [--api-key-env VAR] [--model NAME]
    python benchmarks/simulated_vllm.py --host 127.0.0.1 --port P --preset h100|h100-kv|h100-fast [...]

Two modes. ``--preset``: a GPU-faithful server (``gpu_model.py``): continuous batching token by
token, ``max_num_seqs``, a KV-cache budget with recompute preemption, steps of
a + b*running + c*prefill tokens calibrated to one H100 serving Qwen2.5-VL-7B. A request's prompt
is its text (~4 characters a token) plus each image's tokens after Qwen2.5-VL's resizing (read from
the PNG header, never decoded); a page's output is 200-2,000 tokens by its PNG's bytes per pixel
(``gpu_model.page_output_tokens``), a MinerU recognition crop writes its share of a page, a layout
answer its own length. The gauges (running, waiting, ``vllm:kv_cache_usage_perc``) and counters
(``vllm:num_preemptions_total``, tokens) come from the model; ``GET /simulated/requests`` lists
the (prompt, output) tokens of the requests since the last ``POST /simulated/reset-peaks``.

``--slots/--latency`` (the fixed and growing modes, below):

What it simulates (and only that): a GPU that runs at most S requests at once (vLLM's
``--max-num-seqs``); further requests wait in arrival order, as in vLLM's FCFS scheduler.
A request needs one unit of work; while n requests run, each progresses at the rate
1 / (L + K*n), like a continuously batched decoder whose step time grows with the batch.
So with K = 0 every request takes exactly L seconds once it has a slot (capacity S/L requests
per second), and with K > 0 the throughput at concurrency n is n / (L + K*n): it rises almost
linearly up to the knee n = L/K and then flattens towards 1/K while latency keeps growing.
All running requests progress at the same rate, so they finish in admission order: one
timer (the oldest running request's) is all the scheduling there is.

Answers, chosen by the prompt text (the last text part of the last user message):

- MinerU's ``Layout Detection:`` → N text blocks in MinerU's exact layout format
  (``<|box_start|>x1 y1 x2 y2<|box_end|><|ref_start|>text<|ref_end|><|rotate_up|>``, 0..1000),
  which ``mineru_vl_utils`` parses into N blocks that it then asks to recognise;
- MinerU's ``Text/Table/Formula Recognition:`` and ``Image Analysis:`` → a short text;
- anything else (the page-to-Markdown prompt) → about 3 KB of page Markdown.

Every answer has ``finish_reason`` ``stop`` (``length`` if ``max_tokens`` cuts it) and usage
tokens (image tokens from the PNG header: one per 28x28 patch, as Qwen2.5-VL counts them).

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``, ``GET /metrics``
(vLLM's names with the ``model_name`` label: ``vllm:num_requests_running``,
``vllm:num_requests_waiting``, ``vllm:request_success_total``,
``vllm:e2e_request_latency_seconds``, ``vllm:request_queue_time_seconds``, token counters;
plus ``simulated_vllm_peak_requests_{running,waiting}`` since the last
``POST /simulated/reset-peaks``, and ``process_cpu_seconds_total``).

It is lean on CPU because it shares the machine with the client it measures: no image is
decoded (the base64 payloads are skipped with two ``bytes.find`` calls each and only the
small rest of the body is parsed as JSON), no access log, and uvloop when installed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import functools
import json
import math
import os
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repo root: mkg_devstack, installed or not
import gpu_model  # a sibling script, not a package

from mkg_devstack.slots import SlotScheduler  # the slot model the local VLM server uses too

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"  # the project's default vllm.model, so no override is needed

LAYOUT_MARKER = b"Layout Detection:"
RECOGNITION_MARKERS = {
    b"Table Recognition:": "table",
    b"Formula Recognition:": "formula",
    b"Image Analysis:": "image",
    b"Text Recognition:": "text",
}
_BASE64_MARK = b";base64,"

# vLLM's e2e buckets, with finer ones below 0.3 s: simulated requests take 0.1 to a few seconds.
E2E_BUCKETS = (
    0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
    50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


# --------------------------------------------------------------------------- answers


def layout_answer(blocks: int) -> str:
    """``blocks`` text blocks stacked down the page, in MinerU 2.5's layout answer format (0..1000)."""
    top, bottom = 60, 940
    height = (bottom - top) / blocks
    lines = []
    for i in range(blocks):
        y1 = round(top + i * height + 4)
        y2 = round(top + (i + 1) * height - 4)
        lines.append(f"<|box_start|>{80:03d} {y1:03d} {920:03d} {y2:03d}<|box_end|><|ref_start|>text<|ref_end|>"
                     "<|rotate_up|>")  # fmt: skip
    return "\n".join(lines)


RECOGNITION_ANSWERS = {
    "text": (
        "The split architecture keeps one GPU server busy with many cheap CPU workers: every page image "
        "is sent as one request, and the server batches whatever is in flight."
    ),
    "table": "<fcel>Setting<fcel>Slots<fcel>Latency<nl><fcel>A<fcel>32<fcel>0.5 s<nl><fcel>B<fcel>64<fcel>0.25 s<nl>",
    "formula": r"C = \frac{S}{L} \quad \text{requests per second}",
    "image": "A line chart of throughput against concurrency, flattening beyond the knee.",
}


def page_markdown_answer(target_bytes: int = 3200) -> str:
    """Realistic page Markdown (headings, paragraphs, a list, a table, a formula) of about ``target_bytes``."""
    parts = [
        "# Throughput of a Continuously Batched Vision-Language Server",
        "## 1 Introduction",
        "Document conversion at scale is limited by the accelerator, not by the workers that feed it. "
        "A server that batches requests continuously reaches its best throughput only when enough requests "
        "are in flight; too few leave it idle, too many only lengthen its queue.",
        "- rendering pages to images on inexpensive CPU workers;\n- sending each page to the server as one "
        "request;\n- storing every finished page so that a rerun never repeats it.",
        "## 2 Model",
        "With $n$ requests running and a per-step cost that grows with the batch, the throughput is",
        "$$\nX(n) = \\frac{n}{L_0 + k\\,n}\n$$",
        "| Setting | Slots | Latency (s) | Capacity (req/s) |\n|---|---|---|---|\n| A | 32 | 0.50 | 64 |\n"
        "| B | 64 | 0.25 | 256 |\n| C | 64 | 0.10 + 0.005 n | 152 |",
    ]
    filler = (
        "The measurements in this section were taken on the same machine, one case after another, and each "
        "figure is the median of three runs. Variation between runs stayed below a few percent, except when "
        "other work shared the processor, which the report states next to the numbers."
    )
    text = "\n\n".join(parts)
    n = 0
    while len(text.encode()) < target_bytes:
        n += 1
        text += f"\n\n{filler} (paragraph {n})"
    return text + "\n\n## 3 Results"


@functools.lru_cache(maxsize=4096)
def sized_page_markdown(tokens: int) -> str:
    """Page Markdown of about ``tokens`` tokens (4 bytes each), for the GPU preset's page-dependent lengths."""
    return page_markdown_answer(target_bytes=max(200, 4 * tokens - 20))


# --------------------------------------------------------------------------- the batch clock


@dataclass(eq=False)
class _Request:
    done: asyncio.Future[None]
    v_finish: float = 0.0


class BatchClock:
    """S slots, FIFO queue, and per-request progress at rate 1 / (L + K * running).

    The slots and the queue are the dev stack's one slot model (``mkg_devstack.slots``, which the local
    VLM server uses too); this class adds only the service time of a request that holds a slot.
    Virtual time ``v`` advances at dv/dt = 1 / (L + K * running); a request admitted at ``v0``
    finishes when ``v`` reaches ``v0 + 1``. Completion order is admission order, so only the
    oldest running request needs a timer. Must be used from one event loop.
    """

    def __init__(self, slots: int, latency: float, per_running: float = 0.0) -> None:
        if slots < 1 or latency <= 0 or per_running < 0:
            raise ValueError("slots >= 1, latency > 0 and latency-per-running >= 0 are required")
        self.queue = SlotScheduler(slots)
        self.latency = latency
        self.per_running = per_running
        self._serving: collections.deque[_Request] = collections.deque()  # admitted, in admission order
        self._v = 0.0
        self._t = 0.0
        self._timer: asyncio.TimerHandle | None = None

    @property
    def slots(self) -> int:
        return self.queue.slots

    @property
    def running(self) -> int:
        return self.queue.running

    @property
    def waiting(self) -> int:
        return self.queue.waiting

    @property
    def peak_running(self) -> int:
        return self.queue.peak_running

    @property
    def peak_waiting(self) -> int:
        return self.queue.peak_waiting

    def reset_peaks(self) -> None:
        self.queue.reset_peaks()

    def _period(self) -> float:
        return self.latency + self.per_running * len(self._serving)

    async def run(self) -> float:
        """Wait for a slot, hold it for one unit of work; returns the seconds spent waiting for the slot."""
        async with self.queue.slot() as queued:
            loop = asyncio.get_running_loop()
            request = _Request(done=loop.create_future())
            self._advance(loop.time())
            request.v_finish = self._v + 1.0
            self._serving.append(request)
            self._pump(loop)
            try:
                await request.done
            except asyncio.CancelledError:  # the client went away: free its slot (the queue's part is the slot's)
                if request in self._serving:
                    self._advance(loop.time())
                    self._serving.remove(request)
                    self._pump(loop)
                raise
        return queued

    def _advance(self, now: float) -> None:
        if self._serving:
            self._v += (now - self._t) / self._period()
        self._t = now

    def _pump(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        self._advance(now)
        while self._serving and self._serving[0].v_finish <= self._v + 1e-9:
            finished = self._serving.popleft()
            if not finished.done.done():
                finished.done.set_result(None)  # its task leaves the slot, which goes to the oldest waiter
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._serving:
            delay = max(0.0, (self._serving[0].v_finish - self._v) * self._period())
            self._timer = loop.call_at(now + delay, self._on_timer, loop)

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        self._advance(loop.time())
        if self._serving and self._serving[0].v_finish - self._v < 1e-6:
            self._v = max(self._v, self._serving[0].v_finish)  # float rounding must not spin tiny timers
        self._pump(loop)


class GpuClock:
    """``gpu_model.GpuEngine`` on the event loop's clock: one timer, at the end of the current run of identical steps.

    Real time stays faithful however late a timer fires: the engine counts the steps that ended by
    ``loop.time()``, so a busy loop delays answers (as a busy server would), never the GPU's clock.
    """

    def __init__(self, preset: gpu_model.GpuPreset) -> None:
        self.preset = preset
        self.engine = gpu_model.GpuEngine(preset)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.log: list[tuple[int, int]] = []  # (prompt, output) tokens of every request since the last reset

    @property
    def slots(self) -> int:
        return self.preset.max_num_seqs

    @property
    def running(self) -> int:
        return len(self.engine.running)

    @property
    def waiting(self) -> int:
        return len(self.engine.waiting)

    @property
    def peak_running(self) -> int:
        return self.engine.counters.peak_running

    @property
    def peak_waiting(self) -> int:
        return self.engine.counters.peak_waiting

    def reset_peaks(self) -> None:
        c = self.engine.counters
        c.peak_running, c.peak_waiting = self.running, self.waiting
        self.log = []

    def sync(self) -> None:
        """Bring the engine to now (before reading its gauges)."""
        loop = asyncio.get_running_loop()
        self._settle(self.engine.advance(loop.time()))
        self._arm(loop)

    async def run(self, prompt_tokens: int, output_tokens: int) -> gpu_model.Sequence:
        """Queue, prefill and decode one request; returns its sequence once finished. ValueError: vLLM's 400."""
        loop = asyncio.get_running_loop()
        seq = gpu_model.Sequence(prompt_tokens, output_tokens, user=loop.create_future())
        self._settle(self.engine.submit(seq, loop.time()))
        self.log.append((prompt_tokens, output_tokens))
        self._arm(loop)
        try:
            await seq.user
        except asyncio.CancelledError:  # the client went away: vLLM aborts the request
            self._settle(self.engine.abort(seq, loop.time()))
            self._arm(loop)
            raise
        return seq

    @staticmethod
    def _settle(finished: list[gpu_model.Sequence]) -> None:
        for seq in finished:
            if not seq.user.done():
                seq.user.set_result(None)

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        at = self.engine.next_event_at()
        if self._timer is not None:
            if at == self._timer_at:
                return  # many arrivals in one step: keep the timer (uvloop's handles do not say when)
            self._timer.cancel()
            self._timer = None
        if at is not None:
            self._timer = loop.call_at(at, self._on_timer, loop)
            self._timer_at = at

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        self._settle(self.engine.advance(loop.time()))
        self._arm(loop)


def gpu_request_cost(parsed: Parsed, kind: str, answer: str, preset: gpu_model.GpuPreset) -> tuple[int, int]:
    """(prompt tokens, output tokens) of a request on the GPU preset, from its text and its images' headers.

    Prompt: the text at ~4 characters a token, plus Qwen2.5-VL's tokens for each image after resizing.
    Output: a page writes 200-2,000 tokens by its PNG's bytes per pixel (``gpu_model.page_output_tokens``),
    a MinerU recognition crop its share of a page, a layout answer its own length.
    """
    prompt = math.ceil(parsed.text_chars / 4)
    sizes = []
    for head, b64_len in parsed.images:
        size = png_size(head)
        if size is None:  # not a PNG: count it as a page-sized image of typical density
            size = (1275, 1650)
            png_bytes = int(0.09 * 1275 * 1650)
        else:
            png_bytes = b64_len * 3 // 4
        sizes.append((size, png_bytes))
        prompt += gpu_model.image_tokens(size[0], size[1], preset)
    if kind == "layout" or not sizes:
        output = max(1, math.ceil(len(answer) / 4))
    elif kind == "page_markdown":
        (width, height), png_bytes = sizes[-1]
        output = gpu_model.page_output_tokens(png_bytes, width, height)
    else:
        (width, height), png_bytes = sizes[-1]
        output = gpu_model.crop_output_tokens(png_bytes, width, height)
    return max(1, prompt), output


# --------------------------------------------------------------------------- metrics


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.total += value
        self.n += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break

    def lines(self, name: str, labels: str) -> list[str]:
        out = []
        cumulative = 0
        for bound, count in zip(self.buckets, self.counts, strict=True):
            cumulative += count
            out.append(f'{name}_bucket{{{labels},le="{bound}"}} {cumulative}')
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.n}')
        out.append(f"{name}_count{{{labels}}} {self.n}")
        out.append(f"{name}_sum{{{labels}}} {self.total}")
        return out


@dataclass
class Counters:
    success: collections.Counter[str] = field(default_factory=collections.Counter)  # by finished_reason
    errors: collections.Counter[int] = field(default_factory=collections.Counter)  # by HTTP status
    routes: collections.Counter[str] = field(default_factory=collections.Counter)
    prompt_tokens: int = 0
    generation_tokens: int = 0
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))
    queue: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))


# --------------------------------------------------------------------------- request parsing


class BadRequest(Exception):
    pass


def split_images(body: bytes) -> tuple[bytes, list[bytes]]:
    """The body without its base64 image payloads (for a cheap ``json.loads``), and each payload's first 32 chars."""
    stripped, images = split_image_payloads(body)
    return stripped, [head for head, _ in images]


def split_image_payloads(body: bytes) -> tuple[bytes, list[tuple[bytes, int]]]:
    """The body without its base64 image payloads, and each payload's first 32 chars and length.

    Base64 never contains ``"``, so a payload ends at the next quote; nothing is decoded or copied.
    """
    parts: list[bytes] = []
    heads: list[tuple[bytes, int]] = []
    pos = 0
    while True:
        mark = body.find(_BASE64_MARK, pos)
        if mark < 0:
            break
        start = mark + len(_BASE64_MARK)
        end = body.find(b'"', start)
        if end < 0:
            raise BadRequest("unterminated image data URL")
        parts.append(body[pos:start])
        heads.append((body[start : start + 32], end - start))
        pos = end
    if not parts:
        return body, heads
    parts.append(body[pos:])
    return b"".join(parts), heads


def png_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from a base64 PNG's first 32 characters (its IHDR chunk), or None for other formats."""
    try:
        raw = base64.b64decode(head[:32])
    except (binascii.Error, ValueError):
        return None
    if raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR" and len(raw) >= 24:
        width, height = struct.unpack(">II", raw[16:24])
        return width, height
    return None


def image_tokens(head: bytes) -> int:
    """Qwen2.5-VL's image tokens (one per 28x28 patch) from the PNG header; a rough guess for other formats."""
    size = png_size(head)
    if size is None:
        return 1000
    width, height = size
    return max(1, math.ceil(width / 28) * math.ceil(height / 28))


@dataclass(frozen=True)
class Parsed:
    model: str | None
    prompt: str
    text_chars: int
    images: list[tuple[bytes, int]]  # (first 32 base64 chars, base64 length) of each image
    max_tokens: int | None
    stream: bool

    @property
    def image_heads(self) -> list[bytes]:
        return [head for head, _ in self.images]


def parse_body(body: bytes) -> Parsed:
    stripped, images = split_image_payloads(body)
    try:
        data = json.loads(stripped)
    except ValueError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    prompt = ""
    text_chars = 0
    for message in messages:
        if not isinstance(message, dict):
            raise BadRequest("every message must be an object")
        content = message.get("content")
        texts: list[str] = []
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(
                part["text"]
                for part in content
                if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            )
        text_chars += sum(len(t) for t in texts)
        if message.get("role") == "user" and texts:
            prompt = texts[-1]
    max_tokens = data.get("max_completion_tokens") or data.get("max_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise BadRequest(f"max_tokens must be a positive integer, got {max_tokens!r}")
    model = data.get("model")
    return Parsed(
        model=model if isinstance(model, str) else None,
        prompt=prompt,
        text_chars=text_chars,
        images=images,
        max_tokens=max_tokens,
        stream=bool(data.get("stream")),
    )


def route(prompt: str) -> str:
    encoded = prompt.encode()
    if LAYOUT_MARKER in encoded:
        return "layout"
    for marker, kind in RECOGNITION_MARKERS.items():
        if marker in encoded:
            return kind
    return "page_markdown"


# --------------------------------------------------------------------------- the app


class SimulatedServer:
    def __init__(
        self,
        *,
        slots: int = 1,
        latency: float = 1.0,
        per_running: float = 0.0,
        preset: gpu_model.GpuPreset | None = None,
        layout_blocks: int = 4,
        model: str = DEFAULT_MODEL,
        api_key: str | None = None,
    ) -> None:
        self.preset = preset
        self.clock: BatchClock | GpuClock = GpuClock(preset) if preset else BatchClock(slots, latency, per_running)
        self.model = model
        self.api_key = api_key
        self.counters = Counters()
        self.labels = f'model_name="{model}"'
        self.answers = {
            "layout": layout_answer(layout_blocks),
            "page_markdown": page_markdown_answer(),
            **RECOGNITION_ANSWERS,
        }
        self._serial = 0
        self.started = time.time()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/simulated/reset-peaks", self.reset_peaks)
        app.router.add_get("/simulated/requests", self.requests_log)
        return app

    def _error(self, status: int, message: str, kind: str) -> web.Response:
        self.counters.errors[status] += 1
        body = {"object": "error", "message": message, "type": kind, "param": None, "code": status}
        return web.json_response(body, status=status)

    def _authorized(self, request: web.Request) -> bool:
        return self.api_key is None or request.headers.get("Authorization") == f"Bearer {self.api_key}"

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, "Unauthorized", "Unauthorized")
        model = {
            "id": self.model,
            "object": "model",
            "created": int(self.started),
            "owned_by": "vllm",
            "root": self.model,
            "parent": None,
            "max_model_len": 32768,
        }
        return web.json_response({"object": "list", "data": [model]})

    async def chat(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, "Unauthorized", "Unauthorized")
        body = await request.read()
        arrived = time.monotonic()
        try:
            parsed = parse_body(body)
        except BadRequest as exc:
            return self._error(400, str(exc), "BadRequestError")
        if parsed.model is not None and parsed.model != self.model:
            return self._error(404, f"The model `{parsed.model}` does not exist.", "NotFoundError")
        if parsed.stream:
            return self._error(400, "the simulated server does not stream; send stream=false", "BadRequestError")
        kind = route(parsed.prompt)
        content = self.answers[kind]
        finish_reason = "stop"
        if isinstance(self.clock, GpuClock):
            prompt_tokens, completion_tokens = gpu_request_cost(parsed, kind, content, self.clock.preset)
            if kind == "page_markdown":
                content = sized_page_markdown(completion_tokens)
        else:
            completion_tokens = math.ceil(len(content) / 4)
            prompt_tokens = math.ceil(parsed.text_chars / 4) + sum(image_tokens(h) for h in parsed.image_heads)
        if parsed.max_tokens is not None and completion_tokens > parsed.max_tokens:
            content = content[: parsed.max_tokens * 4]
            completion_tokens = parsed.max_tokens
            finish_reason = "length"

        if isinstance(self.clock, GpuClock):
            try:
                seq = await self.clock.run(prompt_tokens, completion_tokens)
            except ValueError as exc:
                return self._error(400, str(exc), "BadRequestError")
            queued = (seq.first_scheduled or seq.arrived) - seq.arrived
        else:
            queued = await self.clock.run()

        counters = self.counters
        counters.success[finish_reason] += 1
        counters.routes[kind] += 1
        counters.prompt_tokens += prompt_tokens
        counters.generation_tokens += completion_tokens  # the GPU preset counts them per step instead
        counters.e2e.observe(time.monotonic() - arrived)
        counters.queue.observe(queued)
        self._serial += 1
        answer = {
            "id": f"chatcmpl-sim-{self._serial}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "tool_calls": []},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                    "stop_reason": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "completion_tokens": completion_tokens,
            },
        }
        return web.Response(body=json.dumps(answer).encode(), content_type="application/json")

    async def metrics(self, request: web.Request) -> web.Response:
        c, clock, labels = self.counters, self.clock, self.labels
        cpu = os.times()
        if isinstance(clock, GpuClock):
            clock.sync()
            engine = clock.engine
            kv_usage: float | None = engine.kv_usage
            preemptions = engine.counters.preemptions
            generation_tokens = engine.counters.generation_tokens
            prompt_tokens = engine.counters.prompt_tokens
            config = {f"{k}": v for k, v in clock.preset.params().items()}
        else:
            # Slots are this server's only limit; it models no KV cache, so it reports no KV use (it once
            # reported running / slots, which made a full batch read as a full cache to the limiter).
            kv_usage = None
            preemptions = 0
            generation_tokens = c.generation_tokens
            prompt_tokens = c.prompt_tokens
            config = {"slots": clock.slots, "latency_s": clock.latency, "latency_per_running_s": clock.per_running}
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{labels}}} {clock.running}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{labels}}} {clock.waiting}",
            *(
                [
                    "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
                    "# TYPE vllm:kv_cache_usage_perc gauge",
                    f"vllm:kv_cache_usage_perc{{{labels}}} {kv_usage}",
                ]
                if kv_usage is not None
                else []
            ),
            "# HELP vllm:num_preemptions_total Cumulative number of preemptions from the engine.",
            "# TYPE vllm:num_preemptions_total counter",
            f"vllm:num_preemptions_total{{{labels}}} {preemptions}",
            "# TYPE vllm:request_success_total counter",
        ]
        for reason in ("stop", "length"):
            lines.append(f'vllm:request_success_total{{{labels},finished_reason="{reason}"}} {c.success[reason]}')
        lines += [
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{{{labels}}} {prompt_tokens}",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{{{labels}}} {generation_tokens}",
            "# TYPE vllm:e2e_request_latency_seconds histogram",
            *c.e2e.lines("vllm:e2e_request_latency_seconds", labels),
            "# TYPE vllm:request_queue_time_seconds histogram",
            *c.queue.lines("vllm:request_queue_time_seconds", labels),
            "# HELP simulated_vllm_peak_requests_running Most requests running at once since the last reset.",
            "# TYPE simulated_vllm_peak_requests_running gauge",
            f"simulated_vllm_peak_requests_running {clock.peak_running}",
            "# HELP simulated_vllm_peak_requests_waiting Most requests waiting at once since the last reset.",
            "# TYPE simulated_vllm_peak_requests_waiting gauge",
            f"simulated_vllm_peak_requests_waiting {clock.peak_waiting}",
            "# TYPE simulated_vllm_config gauge",
            *(f'simulated_vllm_config{{param="{k}"}} {v}' for k, v in config.items()),
            "# TYPE simulated_vllm_requests_total counter",
            *(f'simulated_vllm_requests_total{{route="{k}"}} {v}' for k, v in sorted(c.routes.items())),
            "# TYPE simulated_vllm_request_errors_total counter",
            *(f'simulated_vllm_request_errors_total{{code="{k}"}} {v}' for k, v in sorted(c.errors.items())),
            "# TYPE process_cpu_seconds_total counter",
            f"process_cpu_seconds_total {cpu.user + cpu.system}",
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def reset_peaks(self, request: web.Request) -> web.Response:
        clock = self.clock
        before = {"peak_running": clock.peak_running, "peak_waiting": clock.peak_waiting}
        if isinstance(clock, GpuClock):
            clock.sync()
        clock.reset_peaks()
        return web.json_response(before)

    async def requests_log(self, request: web.Request) -> web.Response:
        """GPU presets: [prompt, output] tokens of every request since the last reset-peaks, in arrival order
        (``saturation.py`` replays them through ``gpu_model`` to know what an ideal client would achieve)."""
        log = self.clock.log if isinstance(self.clock, GpuClock) else []
        return web.json_response({"preset": self.preset.name if self.preset else None, "requests": log})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--preset",
        choices=sorted(gpu_model.PRESETS),
        default=None,
        help="a GPU-faithful server (continuous batching by token, KV cache, preemption; see gpu_model.py) "
        "instead of --slots/--latency",
    )
    parser.add_argument("--slots", type=int, default=None, help="requests run at once (vLLM's --max-num-seqs)")
    parser.add_argument("--latency", type=float, default=None, help="L: seconds per request on an idle server")
    parser.add_argument(
        "--latency-per-running",
        type=float,
        default=0.0,
        help="K: seconds added to the per-request latency per running request (latency L + K*running); default 0",
    )
    parser.add_argument("--layout-blocks", type=int, default=4, help="N: text blocks in a layout answer (default 4)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"served model name (default {DEFAULT_MODEL})")
    parser.add_argument(
        "--api-key-env", default=None, help="name of an environment variable holding the API key required on /v1/*"
    )
    args = parser.parse_args(argv)
    preset = gpu_model.PRESETS[args.preset] if args.preset else None
    if preset is None and (args.slots is None or args.latency is None):
        parser.error("give --preset, or --slots and --latency")
    if preset is not None and (args.slots is not None or args.latency is not None):
        parser.error("--preset sets the slots and the timing: leave out --slots and --latency")
    if preset is None and (args.slots < 1 or args.latency <= 0 or args.latency_per_running < 0):
        parser.error("--slots must be >= 1, --latency > 0, --latency-per-running >= 0")
    if args.layout_blocks < 1:
        parser.error("--layout-blocks must be >= 1")
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env) or None
        if api_key is None:
            parser.error(f"--api-key-env {args.api_key_env}: that variable is not set or empty")
    server = SimulatedServer(
        slots=args.slots or 1,
        latency=args.latency or 1.0,
        per_running=args.latency_per_running,
        preset=preset,
        layout_blocks=args.layout_blocks,
        model=args.model,
        api_key=api_key,
    )
    loop_name = "asyncio"
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        loop_name = "uvloop"
    except ImportError:
        pass
    if preset is not None:
        shape = (
            f"preset {preset.name} ({preset.description}): {preset.max_num_seqs} seqs, KV cache "
            f"{preset.kv_cache_tokens} tokens, step {preset.step_base_s * 1000:.2f} ms + "
            f"{preset.step_per_seq_s * 1000:.4f} ms x running + "
            f"{preset.prefill_per_token_s * 1e6:.1f} us x prefill token"
        )
    else:
        shape = f"{args.slots} slots, latency {args.latency} s + {args.latency_per_running} s x running"
    print(
        f"simulated vLLM on http://{args.host}:{args.port}: {shape}, {args.layout_blocks} layout blocks, "
        f"model {args.model}, api key {'required' if api_key else 'none'}, {loop_name}",
        flush=True,
    )
    web.run_app(
        server.app(),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        backlog=4096,
        shutdown_timeout=1.0,
        handler_cancellation=True,  # a client that goes away frees its slot, as vLLM aborts the request
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
