"""A GPU serving a vision-language model with vLLM, as a clock-free model: continuous batching, KV cache, preemption.

``simulated_vllm.py --preset h100`` serves HTTP from this model; ``saturation.py`` replays a case's
requests through it to know what an ideal client would have achieved; the unit tests drive it with
a fake clock. Nothing here sleeps or reads a clock: every call says what time it is.

The engine (what vLLM's scheduler does, reduced to what decides throughput and latency)
------------------------------------------------------------------------------------------
- Requests wait FIFO. At every step boundary the scheduler
  1. preempts the newest running sequence while the running sequences' KV cache (prompt + tokens
     generated so far, one more each for this step) would not fit the budget: its KV is freed and
     it goes back to the FRONT of the waiting queue; when it is admitted again its prompt and the
     tokens it had generated are prefilled again (vLLM's recompute preemption; it keeps its output);
  2. if it preempted nothing, admits from the head of the queue while fewer than ``max_num_seqs``
     run, the KV cache can hold the newcomer's prompt, and the step's token budget
     (``max_num_batched_tokens``, less one token per running sequence) is not spent; the head of
     the queue is never skipped (FCFS).
- A step emits one token for every running sequence, a newly admitted one included (its prefill
  makes its first token). It takes ``a + b * running + c * prefill_tokens`` seconds.
- A sequence finishes when it has generated its output length; its KV is freed at once.

Cheap on CPU: between two events (a sequence finishing, the KV cache filling up, an arrival that
has a free slot, the token budget admitting the next prompts) every step is identical, so the
engine advances in closed form: ``g`` counts the tokens every running sequence has generated,
the KV used is ``kv_base + running * g``, and the next finish is the top of a heap. Work is
O(log running) per event, not per token.

The presets (the arithmetic, in code below)
-------------------------------------------
Published figures for Qwen2.5-VL-7B on one H100 80 GB:

- olmOCR (Poznanski et al., "olmOCR: Unlocking Trillions of Tokens in PDFs with Vision Language
  Models", arXiv:2502.18443, 2025, and its README's benchmark: 10,000 pages in 36 min 47 s on one
  H100 = 10,000 / 2,207 s = 4.53 pages/s), pages rendered to ~1,000-1,300 px on the long side
  (~1,300 image tokens), about 1,000 output tokens per page;
- about 10 s for one page alone (1,000 tokens at ~100 tokens/s: a 7B model's single-stream decode
  on an H100, bound by reading ~16 GB of weights per token from 3.35 TB/s HBM plus overheads).

Three unknowns (a, b, c), three equations:

- c, prefill: a 7B model costs 2 x 7.6e9 FLOP per token, the vision encoder (675 M parameters on
  four 14-px patches per 28-px token) ~5.4 GFLOP more, ~21 GFLOP per prompt token; at ~40 % of the
  H100's 989 dense BF16 TFLOP/s that is ~20,000 prompt tokens/s, so c = 50 us per prompt token;
- single page alone: P*c + N_out*(a + b) = 10 s, so a + b = (10 - P*c) / N_out;
- full batch of S = max_num_seqs sequences: every step emits S tokens; a page costs N_out/S steps
  of (a + b*S) plus its own prefill, so pages/s = 1 / (N_out*(a + b*S)/S + P*c) = 4.5, so
  a + b*S = S * (1/4.5 - P*c) / N_out.

With the reference page (P = 1,500 prompt tokens: 1,280 image tokens + the prompt text, N_out =
1,000) and S = 256: P*c = 0.075 s; a + b = 9.93 ms; a + 256*b = 37.7 ms; so b = 0.109 ms and
a = 9.82 ms. A full batch's step is 37.7 ms: a page in a full batch takes ~57 s (256 / 4.5), in
line with "40-60 s in a full batch".

KV cache: Qwen2.5-VL-7B has 28 layers, 4 KV heads of 128 (GQA): 2 x 28 x 4 x 128 x 2 bytes =
56 KiB per token. vLLM takes ``gpu_memory_utilization`` (0.9) of the 80 GB, less the weights
(8.3 B parameters in BF16 = 16.6 GB) and ~5 GB of activations and CUDA graphs: 50.4 GB, ~880,000
tokens: 256 sequences of ~3,400 tokens, more than a page needs, so the H100 preset is bound by
``max_num_seqs``. ``h100-kv`` is the same GPU at ``gpu_memory_utilization`` 0.5 (sharing the card):
~320,000 tokens, fewer than 256 x ~2,000 tokens of an average running page, so a client that
overfills it sees preemptions. ``h100-fast`` is the H100 with every duration divided by 10 (45
pages/s, 1 s for one page), for quick runs.

``max_pixels``: Qwen2.5-VL's processor resizes an image so that it fits ``max_pixels`` (keeping
its aspect ratio, sides multiples of 28) and makes one token per 28 x 28 patch. The presets use
1280 * 28 * 28 (Qwen's suggested setting, ~1,280 tokens: what olmOCR's pages cost) so that the
calibration holds for the pages the project sends.

``max_num_batched_tokens`` = 8,192: vLLM's default for the OpenAI server on GPUs of 70 GB or more
(``vllm/engine/arg_utils.py``); it paces a cold start to ~6 new pages per step.
"""

from __future__ import annotations

import collections
import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

# --------------------------------------------------------------------------- presets

#: the page the published figures describe (olmOCR: ~1,280 image tokens + prompt text; ~1,000 output tokens)
REFERENCE_PROMPT_TOKENS = 1500
REFERENCE_OUTPUT_TOKENS = 1000

#: Qwen2.5-VL-7B's KV cache per token: K and V x 28 layers x 4 KV heads x 128 dims x 2 bytes (BF16)
KV_BYTES_PER_TOKEN = 2 * 28 * 4 * 128 * 2
H100_BYTES = 80e9
WEIGHTS_BYTES = 8.3e9 * 2  # Qwen2.5-VL-7B: 8.3 B parameters (LLM + vision encoder) in BF16
ACTIVATION_BYTES = 5e9  # vLLM's profiled activation peak and CUDA graphs, about


def kv_cache_tokens(gpu_memory_utilization: float) -> int:
    """Tokens of KV cache vLLM gets on an H100 80 GB serving Qwen2.5-VL-7B."""
    free = H100_BYTES * gpu_memory_utilization - WEIGHTS_BYTES - ACTIVATION_BYTES
    return int(free // KV_BYTES_PER_TOKEN)


@dataclass(frozen=True)
class GpuPreset:
    name: str
    max_num_seqs: int
    kv_cache_tokens: int
    step_base_s: float  # a: a decode step's fixed cost
    step_per_seq_s: float  # b: its cost per running sequence
    prefill_per_token_s: float  # c: per prompt token prefilled in the step (image tokens included)
    max_num_batched_tokens: int = 8192
    max_pixels: int = 1280 * 28 * 28
    min_pixels: int = 4 * 28 * 28
    max_model_len: int = 32768
    description: str = ""

    def step_s(self, running: int, prefill_tokens: int = 0) -> float:
        return self.step_base_s + self.step_per_seq_s * running + self.prefill_per_token_s * prefill_tokens

    def single_request_s(
        self, prompt_tokens: int = REFERENCE_PROMPT_TOKENS, output_tokens: int = REFERENCE_OUTPUT_TOKENS
    ) -> float:
        """Latency of one request alone on an idle server: its prefill, then one step per output token."""
        return self.prefill_per_token_s * prompt_tokens + output_tokens * self.step_s(1)

    def full_batch_requests_per_s(
        self, prompt_tokens: int = REFERENCE_PROMPT_TOKENS, output_tokens: int = REFERENCE_OUTPUT_TOKENS
    ) -> float:
        """Steady throughput with every slot busy: 1 / (N_out * (a + b*S) / S + P * c)."""
        s = self.max_num_seqs
        return 1.0 / (output_tokens * self.step_s(s) / s + prompt_tokens * self.prefill_per_token_s)

    def scaled(self, factor: float, name: str, description: str) -> GpuPreset:
        """The same GPU with every duration multiplied by ``factor`` (a faster clock for quick runs)."""
        return replace(
            self,
            name=name,
            step_base_s=self.step_base_s * factor,
            step_per_seq_s=self.step_per_seq_s * factor,
            prefill_per_token_s=self.prefill_per_token_s * factor,
            description=description,
        )

    def params(self) -> dict[str, float]:
        return {
            "max_num_seqs": self.max_num_seqs,
            "kv_cache_tokens": self.kv_cache_tokens,
            "step_base_s": self.step_base_s,
            "step_per_seq_s": self.step_per_seq_s,
            "prefill_per_token_s": self.prefill_per_token_s,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_pixels": self.max_pixels,
        }


def calibrate(
    *,
    pages_per_s: float,
    single_page_s: float,
    max_num_seqs: int,
    prefill_tokens_per_s: float,
    prompt_tokens: int = REFERENCE_PROMPT_TOKENS,
    output_tokens: int = REFERENCE_OUTPUT_TOKENS,
) -> tuple[float, float, float]:
    """(a, b, c) from a published full-batch throughput and single-page latency (see the module docstring)."""
    c = 1.0 / prefill_tokens_per_s
    one = (single_page_s - prompt_tokens * c) / output_tokens  # a + b
    full = max_num_seqs * (1.0 / pages_per_s - prompt_tokens * c) / output_tokens  # a + b*S
    b = (full - one) / (max_num_seqs - 1)
    a = one - b
    if a <= 0 or b <= 0:
        raise ValueError(f"inconsistent figures: a = {a}, b = {b}")
    return a, b, c


_A, _B, _C = calibrate(pages_per_s=4.5, single_page_s=10.0, max_num_seqs=256, prefill_tokens_per_s=20_000)

H100 = GpuPreset(
    name="h100",
    max_num_seqs=256,
    kv_cache_tokens=kv_cache_tokens(0.9),
    step_base_s=_A,
    step_per_seq_s=_B,
    prefill_per_token_s=_C,
    description="one H100 80 GB, Qwen2.5-VL-7B, 256 seqs (olmOCR: 4.5 pages/s; ~10 s per page alone)",
)
H100_KV = replace(
    H100,
    name="h100-kv",
    kv_cache_tokens=kv_cache_tokens(0.5),
    description="the H100 preset at gpu_memory_utilization 0.5: the KV cache, not the 256 seqs, is the limit",
)
H100_FAST = H100.scaled(0.1, "h100-fast", "the H100 preset with every duration / 10 (45 pages/s; 1 s alone)")

PRESETS: dict[str, GpuPreset] = {p.name: p for p in (H100, H100_KV, H100_FAST)}


# --------------------------------------------------------------------------- what a request costs


def image_tokens(width: int, height: int, preset: GpuPreset) -> int:
    """Qwen2.5-VL's tokens for an image: ``smart_resize`` to multiples of 28 within [min, max]_pixels, one per 28x28."""
    factor = 28
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > preset.max_pixels:
        beta = math.sqrt(height * width / preset.max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < preset.min_pixels:
        beta = math.sqrt(preset.min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return (h // factor) * (w // factor)


MIN_PAGE_OUTPUT = 200
MAX_PAGE_OUTPUT = 2000
#: PNG bytes per pixel at which a page writes the most: dense text and scans compress worst
DENSE_BYTES_PER_PIXEL = 0.2
#: a page's pixels for scaling a crop's output (US letter at 150 DPI, the project's render size)
REFERENCE_PAGE_PIXELS = 1275 * 1650


def page_output_tokens(png_bytes: int, width: int, height: int) -> int:
    """Output tokens for a page, from what the server sees: the PNG's size per pixel.

    Text compresses worse than white paper, so bytes per pixel grows with the ink on the page.
    Rendered corpus pages at 150 DPI: blank ~0.005, sparse text ~0.05, a typical page ~0.09
    (median), dense text or a scan >= 0.2. Linear from 200 tokens (blank) to 2,000 (>= 0.2 bytes
    per pixel); the corpus median page writes ~1,050 tokens. Deterministic: the same page always
    writes the same number of tokens.
    """
    density = min(1.0, png_bytes / max(1, width * height) / DENSE_BYTES_PER_PIXEL)
    return round(MIN_PAGE_OUTPUT + (MAX_PAGE_OUTPUT - MIN_PAGE_OUTPUT) * density)


def crop_output_tokens(png_bytes: int, width: int, height: int) -> int:
    """A block crop (MinerU's recognition step) writes a page's density times its share of a page, at least 8."""
    share = min(1.0, width * height / REFERENCE_PAGE_PIXELS)
    return max(8, round(page_output_tokens(png_bytes, width, height) * share))


# --------------------------------------------------------------------------- the engine

EPS = 1e-6  # seconds: a timer may fire this early (clock resolution), and float sums drift by less


@dataclass(eq=False)
class Sequence:
    """One request in the engine. ``user`` is the caller's handle (the server's future)."""

    prompt_tokens: int
    output_tokens: int
    user: Any = None
    arrived: float = 0.0
    state: str = "new"  # waiting, running, finished, aborted
    generated: int = 0  # tokens generated before the current admission (kept across preemptions)
    start_g: int = 0  # the engine's g at the current admission
    admission: int = 0  # unique per admission: heap entries of an older admission are stale
    first_scheduled: float | None = None
    finished_at: float | None = None
    preemptions: int = 0


@dataclass
class EngineCounters:
    steps: int = 0
    preemptions: int = 0
    generation_tokens: int = 0
    prompt_tokens: int = 0  # prompts of newly scheduled requests (vLLM's prompt_tokens)
    prefill_tokens: int = 0  # every token prefilled, recomputation after preemption included
    finished: int = 0
    peak_running: int = 0
    peak_waiting: int = 0
    busy_s: float = 0.0  # time the GPU spent stepping


@dataclass
class GpuEngine:
    """The scheduler and the GPU's clock. Call ``submit``, ``abort`` and ``advance`` with the current time;
    each returns the sequences that finished up to then. ``next_event_at`` says when to call ``advance``."""

    preset: GpuPreset
    waiting: collections.deque[Sequence] = field(default_factory=collections.deque)
    running: list[Sequence] = field(default_factory=list)  # in admission order: the newest is last
    counters: EngineCounters = field(default_factory=EngineCounters)

    def __post_init__(self) -> None:
        self._heap: list[tuple[int, int, Sequence]] = []  # (g at which it finishes, admission, sequence)
        self.g = 0  # tokens each running sequence generated since the engine started (its virtual clock)
        self._kv_base = 0  # KV used = _kv_base + len(running) * g
        self._admissions = 0
        self.busy = False
        # the segment: identical steps from seg_start; the first may carry prefill
        self.seg_start = 0.0
        self.first_step_s = 0.0
        self.step_s = 0.0
        self.steps_left = 0
        self.seg_n = 0

    # -- state -------------------------------------------------------------------------------

    @property
    def kv_used(self) -> int:
        return self._kv_base + len(self.running) * self.g

    @property
    def kv_usage(self) -> float:
        return self.kv_used / self.preset.kv_cache_tokens

    def next_event_at(self) -> float | None:
        """When the current run of identical steps ends (a finish, a full cache, an admission), or None when idle."""
        if not self.busy:
            return None
        return self.seg_start + self.first_step_s + (self.steps_left - 1) * self.step_s

    def check(self, seq: Sequence) -> str | None:
        """Why vLLM would refuse this request outright (400), or None."""
        p = self.preset
        if seq.prompt_tokens + seq.output_tokens > p.max_model_len:
            return (
                f"This model's maximum context length is {p.max_model_len} tokens. However, you requested "
                f"{seq.prompt_tokens + seq.output_tokens} tokens ({seq.prompt_tokens} in the messages, "
                f"{seq.output_tokens} in the completion)."
            )
        if seq.prompt_tokens + seq.output_tokens + 1 > p.kv_cache_tokens:
            need = seq.prompt_tokens + seq.output_tokens
            return f"the request needs {need} tokens of KV cache; it holds {p.kv_cache_tokens}"
        if seq.output_tokens < 1 or seq.prompt_tokens < 1:
            return "a request needs at least one prompt and one output token"
        return None

    # -- calls -------------------------------------------------------------------------------

    def submit(self, seq: Sequence, now: float) -> list[Sequence]:
        problem = self.check(seq)
        if problem is not None:
            raise ValueError(problem)
        finished = self.advance(now)
        seq.arrived = now
        seq.state = "waiting"
        self.waiting.append(seq)
        self.counters.peak_waiting = max(self.counters.peak_waiting, len(self.waiting))
        if not self.busy:
            self.busy = True
            self.seg_start = now
            self.steps_left = 0
            finished += self.advance(now)  # schedules the first step now
        elif len(self.running) < self.preset.max_num_seqs:
            self.steps_left = min(self.steps_left, 1)  # a free slot: the scheduler looks again after this step
        return finished

    def abort(self, seq: Sequence, now: float) -> list[Sequence]:
        """The client went away: free its place (vLLM aborts a request whose connection closed)."""
        finished = self.advance(now)
        if seq.state == "waiting":
            self.waiting.remove(seq)
        elif seq.state == "running":
            self.running.remove(seq)
            self._kv_base -= seq.prompt_tokens + seq.generated - seq.start_g
            self.steps_left = min(self.steps_left, 1)
        else:
            return finished
        seq.state = "aborted"
        return finished

    def advance(self, now: float) -> list[Sequence]:
        """Run every step that ends by ``now``; returns the sequences that finished."""
        finished: list[Sequence] = []
        while self.busy:
            if self.steps_left == 0 and not self._schedule():
                break
            end_first = self.seg_start + self.first_step_s
            if now < end_first - EPS:
                break
            k = 1 + int((now - end_first + EPS) / self.step_s)
            k = min(k, self.steps_left)
            self.g += k
            self.counters.steps += k
            self.counters.generation_tokens += k * self.seg_n
            seg_end = end_first + (k - 1) * self.step_s
            self.counters.busy_s += seg_end - self.seg_start
            self.seg_start = seg_end
            self.first_step_s = self.step_s
            self.steps_left -= k
            if self.steps_left == 0:
                finished.extend(self._pop_finished(seg_end))
        return finished

    # -- the scheduler -----------------------------------------------------------------------

    def _pop_finished(self, t: float) -> list[Sequence]:
        done = []
        heap = self._heap
        while heap and heap[0][0] <= self.g:
            _, admission, seq = heapq.heappop(heap)
            if seq.state != "running" or seq.admission != admission:
                continue  # preempted or aborted since
            self.running.remove(seq)
            self._kv_base -= seq.prompt_tokens + seq.generated - seq.start_g
            seq.generated = seq.output_tokens
            seq.state = "finished"
            seq.finished_at = t
            self.counters.finished += 1
            done.append(seq)
        return done

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._kv_base -= seq.prompt_tokens + seq.generated - seq.start_g
        seq.generated += self.g - seq.start_g
        seq.state = "waiting"
        seq.preemptions += 1
        self.waiting.appendleft(seq)
        self.counters.preemptions += 1

    def _admit(self, seq: Sequence, t: float) -> int:
        self._admissions += 1
        seq.admission = self._admissions
        seq.start_g = self.g
        seq.state = "running"
        self._kv_base += seq.prompt_tokens + seq.generated - self.g
        heapq.heappush(self._heap, (self.g + seq.output_tokens - seq.generated, seq.admission, seq))
        self.running.append(seq)
        if seq.first_scheduled is None:
            seq.first_scheduled = t
            self.counters.prompt_tokens += seq.prompt_tokens
        need = seq.prompt_tokens + seq.generated  # recompute: its prompt and what it had written
        self.counters.prefill_tokens += need
        return need

    def _schedule(self) -> bool:
        """At a step boundary: preempt, admit, and plan the identical steps up to the next event."""
        p = self.preset
        t = self.seg_start
        preempted = False
        while self.running and self.kv_used + len(self.running) > p.kv_cache_tokens:
            self._preempt(self.running[-1])
            preempted = True
        prefill = 0
        by_budget = False
        if not preempted:
            budget = p.max_num_batched_tokens - len(self.running)
            while self.waiting and len(self.running) < p.max_num_seqs:
                seq = self.waiting[0]
                need = seq.prompt_tokens + seq.generated
                if self.kv_used + len(self.running) + need + 1 > p.kv_cache_tokens:
                    break  # FCFS: the head waits for room, nobody overtakes it
                if prefill and prefill + need > budget:
                    by_budget = True
                    break
                self.waiting.popleft()
                prefill += self._admit(seq, t)
        n = len(self.running)
        c = self.counters
        c.peak_running = max(c.peak_running, n)
        c.peak_waiting = max(c.peak_waiting, len(self.waiting))
        if n == 0:
            self.busy = False
            self.steps_left = 0
            return False
        self.seg_n = n
        self.step_s = p.step_s(n)
        self.first_step_s = p.step_s(n, prefill)
        heap = self._heap
        while heap[0][2].state != "running" or heap[0][2].admission != heap[0][1]:
            heapq.heappop(heap)  # stale entries of preempted or aborted sequences
        to_finish = heap[0][0] - self.g
        to_full = (p.kv_cache_tokens - self.kv_used) // n
        steps = 1 if by_budget or preempted else min(to_finish, to_full)
        self.steps_left = max(1, steps)
        return True


# --------------------------------------------------------------------------- offline runs (fake clock)


def run_offline(
    preset: GpuPreset, requests: Iterable[tuple[float, int, int]], *, until: float | None = None
) -> tuple[GpuEngine, list[Sequence]]:
    """Run (arrival time, prompt tokens, output tokens) requests to completion on a fake clock.

    Returns the engine and the sequences in arrival order (``finished_at`` set). Events only: a
    10,000-page run takes well under a second of CPU.
    """
    engine = GpuEngine(preset)
    pending = sorted(requests, key=lambda r: r[0])
    seqs: list[Sequence] = []
    i = 0
    while True:
        next_step = engine.next_event_at()
        next_arrival = pending[i][0] if i < len(pending) else None
        if next_step is None and next_arrival is None:
            break
        if next_arrival is not None and (next_step is None or next_arrival <= next_step):
            if until is not None and next_arrival > until:
                break
            t, prompt, output = pending[i]
            i += 1
            seq = Sequence(prompt, output)
            seqs.append(seq)
            engine.submit(seq, t)
        else:
            assert next_step is not None
            if until is not None and next_step > until:
                engine.advance(until)
                break
            engine.advance(next_step)
    return engine, seqs


def ideal_makespan(preset: GpuPreset, requests: Iterable[tuple[int, int]]) -> float:
    """Seconds from the first request to the last answer if every (prompt, output) request arrived at t = 0."""
    _, seqs = run_offline(preset, ((0.0, p, o) for p, o in requests))
    return max((s.finished_at or 0.0 for s in seqs), default=0.0)
