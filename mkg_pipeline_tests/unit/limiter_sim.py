"""A deterministic discrete-event simulation: limiters (one per simulated process) against a server.

Two servers:

* :class:`SimServer`, a batching server: ``slots`` sequences run at once; requests beyond that
  wait in a FIFO queue, as vLLM's do. A request's latency is fixed when it starts running:
  ``latency + per_running x running`` (per_running = 0: the S x L server; > 0: a GPU whose step
  time grows with its batch).
* :class:`GpuServer`, continuous batching token by token, as vLLM runs a GPU: every engine step
  emits one token for each running sequence and takes ``step_base_s + step_per_seq_s x running``
  (plus a prefill cost per prompt token admitted); ``max_num_seqs`` sequences at most; a KV-cache
  budget in tokens (prompt + tokens generated so far). A waiting request is admitted while a slot
  is free and its prompt fits in the cache; when the running sequences outgrow the cache the newest
  is preempted and recomputed later, as vLLM does. Output lengths vary (200-2,000 tokens). With
  ``batched_tokens`` (vLLM's ``max_num_batched_tokens``) a step takes in only so many prompt
  tokens, so a burst of requests shows as waiting for a few steps although slots are free.

Each process has unlimited demand: it starts a request whenever its limiter gives a slot, and
scrapes the server's /metrics whenever its limiter asks for it (the reading arrives
``scrape_delay_s`` later, as a GET /metrics would). A process may also run at a fixed concurrency
instead (the sweep the adaptive limiter is compared with). Time is a fake clock: a run of minutes
takes milliseconds.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from mkg_pipeline.vllm.limiter import AdaptiveLimiter, ServerMetrics, Signal, Slot


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class _Request:
    client: SimClient
    slot: Slot | None
    sent_at: float


class SimServer:
    def __init__(self, sim: Simulation, slots: int, latency: float, per_running: float = 0.0) -> None:
        self.sim = sim
        self.slots = slots
        self.latency = latency
        self.per_running = per_running
        self.running = 0
        self.queue: deque[_Request] = deque()
        self.max_waiting = 0
        self.max_waiting_after_warmup = 0
        self.completed = 0
        self.latency_sum = 0.0  # vllm:e2e_request_latency_seconds_sum / _count

    @property
    def waiting(self) -> int:
        return len(self.queue)

    def metrics(self) -> ServerMetrics:
        # The local server and the benchmarks' fixed modes report KV use as running / slots: full slots
        # read as a full cache.
        kv = self.running / self.slots if self.sim.kv_as_slots else None
        return ServerMetrics(self.waiting, self.running, self.latency_sum, self.completed, kv_usage=kv)

    def capacity(self) -> float:
        return self.slots / (self.latency + self.per_running * self.slots)

    def _note_waiting(self) -> None:
        self.max_waiting = max(self.max_waiting, self.waiting)
        if self.sim.clock.now >= self.sim.warmup_s:
            self.max_waiting_after_warmup = max(self.max_waiting_after_warmup, self.waiting)

    def submit(self, request: _Request) -> None:
        if self.running < self.slots:
            self._start(request)
        else:
            self.queue.append(request)
            self._note_waiting()

    def _start(self, request: _Request) -> None:
        self.running += 1
        latency = self.latency + self.per_running * self.running
        self.sim.at(self.sim.clock.now + latency, lambda: self._finish(request))

    def _finish(self, request: _Request) -> None:
        self.running -= 1
        self.completed += 1
        self.latency_sum += self.sim.clock.now - request.sent_at
        if self.queue:
            self._start(self.queue.popleft())
        request.client.on_done(request)


@dataclass
class _Sequence:
    request: _Request
    output_tokens: int
    generated: int = 0


class GpuServer:
    """Continuous batching with a batch limit and a KV-cache budget (see the module docstring).

    The defaults are one H100 serving Qwen2.5-VL-7B as the olmOCR figures put it: about 10 s for
    one page alone (10 ms per token x ~1,000 tokens), about 4.5 pages/s at a full batch of 256
    (52 ms per step, so a page takes ~57 s there), prompts of 1,500 tokens (the page image).
    ``tokens_per_step`` lumps several engine steps into one event (the same arithmetic, fewer events).
    """

    def __init__(
        self,
        sim: Simulation,
        *,
        max_num_seqs: int = 256,
        kv_budget_tokens: int = 1_000_000,
        step_base_s: float = 0.0098,
        step_per_seq_s: float = 0.000164,
        prompt_tokens: int = 1500,
        prefill_per_token_s: float = 0.00001,
        output_tokens: tuple[int, int] = (200, 2000),
        tokens_per_step: int = 10,
        batched_tokens: int | None = None,
        seed: int = 7,
    ) -> None:
        self.sim = sim
        self.slots = max_num_seqs
        self.kv_budget = kv_budget_tokens
        self.step_base_s = step_base_s
        self.step_per_seq_s = step_per_seq_s
        self.prompt_tokens = prompt_tokens
        self.prefill_per_token_s = prefill_per_token_s
        self.output_tokens = output_tokens
        self.chunk = tokens_per_step
        #: vLLM's max_num_batched_tokens: prompt tokens taken in per engine step (None: no limit), so a
        #: burst of requests waits a few steps before it runs
        self.batched_tokens = batched_tokens
        self._random = random.Random(seed)
        self.running_seqs: list[_Sequence] = []
        self.queue: deque[_Sequence] = deque()
        self.kv_used = 0
        self.preemptions = 0
        self.completed = 0
        self.latency_sum = 0.0
        self.max_waiting = 0
        self.max_waiting_after_warmup = 0
        self.max_running = 0
        #: when the running batch first reached 0.9 of max_num_seqs
        self.nine_tenths_at: float | None = None
        self.first_request_at: float | None = None
        self.busy_area = 0.0  # integral of running over time (after warmup)
        self._stepping = False
        self._last_t = 0.0

    @property
    def running(self) -> int:
        return len(self.running_seqs)

    @property
    def waiting(self) -> int:
        return len(self.queue)

    def metrics(self) -> ServerMetrics:
        return ServerMetrics(
            self.waiting,
            self.running,
            self.latency_sum,
            self.completed,
            kv_usage=self.kv_used / self.kv_budget,
            preemptions=float(self.preemptions),
        )

    def capacity(self) -> float:
        """Pages per second at a full batch of mean-length pages, the cache permitting."""
        mean = sum(self.output_tokens) / 2
        return self.slots / (mean * (self.step_base_s + self.step_per_seq_s * self.slots))

    def _account(self) -> None:
        self.busy_area += self.running * self.sim.measured_since(self._last_t)
        self._last_t = self.sim.clock.now

    def submit(self, request: _Request) -> None:
        if self.first_request_at is None:
            self.first_request_at = self.sim.clock.now
        low, high = self.output_tokens
        self.queue.append(_Sequence(request, self._random.randint(low, high)))
        if self.batched_tokens is None:  # else it waits for the next step
            self._admit()
        if not self._stepping:
            self._stepping = True
            self.sim.at(self.sim.clock.now, self._step)

    def _admit(self) -> float:
        """Waiting sequences into free slots while their prompt fits; returns the prefill time."""
        self._account()
        prefill = 0.0
        budget = math.inf if self.batched_tokens is None else self.batched_tokens * self.chunk
        while (
            self.queue
            and self.running < self.slots
            and self.kv_used + self.prompt_tokens <= self.kv_budget
            and budget >= self.prompt_tokens
        ):
            budget -= self.prompt_tokens
            seq = self.queue.popleft()
            self.running_seqs.append(seq)
            self.kv_used += self.prompt_tokens + seq.generated
            prefill += (self.prompt_tokens + seq.generated) * self.prefill_per_token_s
        self.max_running = max(self.max_running, self.running)
        if self.nine_tenths_at is None and self.running >= 0.9 * self.slots:
            self.nine_tenths_at = self.sim.clock.now
        self.max_waiting = max(self.max_waiting, self.waiting)
        if self.sim.clock.now >= self.sim.warmup_s:
            self.max_waiting_after_warmup = max(self.max_waiting_after_warmup, self.waiting)
        return prefill

    def _step(self) -> None:
        prefill = self._admit()
        if not self.running_seqs:
            self._stepping = False
            return
        duration = (self.step_base_s + self.step_per_seq_s * self.running) * self.chunk + prefill
        self.sim.at(self.sim.clock.now + duration, self._end_step)

    def _end_step(self) -> None:
        self._account()
        done: list[_Sequence] = []
        for seq in self.running_seqs:
            grown = min(self.chunk, seq.output_tokens - seq.generated)
            seq.generated += grown
            self.kv_used += grown
            if seq.generated >= seq.output_tokens:
                done.append(seq)
        for seq in done:
            self.running_seqs.remove(seq)
            self.kv_used -= self.prompt_tokens + seq.generated
        # Out of cache: preempt the newest and recompute it later (vLLM's default), first in line.
        while self.kv_used > self.kv_budget and self.running_seqs:
            victim = self.running_seqs.pop()
            self.kv_used -= self.prompt_tokens + victim.generated
            victim.generated = 0
            self.queue.appendleft(victim)
            self.preemptions += 1
        now = self.sim.clock.now
        for seq in done:
            self.completed += 1
            self.latency_sum += now - seq.request.sent_at
            seq.request.client.on_done(seq.request)
        self._step()


@dataclass
class SimClient:
    sim: Simulation
    name: str
    limiter: AdaptiveLimiter | None = None
    fixed: int = 0  # > 0: a fixed concurrency instead of a limiter
    start_at: float = 0.0
    stop_at: float = float("inf")
    deadline_s: float = 300.0  # an answer later than this would have timed out
    #: seconds from an answer to the next request reaching the server (reading the answer, encoding and
    #: sending the next page): the client round trip a freed slot idles for unless a request already
    #: waits at the server (the first requests were ready before the process began)
    send_delay_s: float = 0.0
    completed_after_warmup: int = 0
    timeouts: int = 0
    in_flight: int = 0
    limit_area: float = 0.0  # integral of the limit over the measured time
    _last_t: float = 0.0
    limits: list[tuple[float, int]] = field(default_factory=list)

    def begin(self) -> None:
        self._last_t = self.sim.clock.now
        self.pump()
        self._scrape()

    def _scrape(self) -> None:
        """The client's timer: apply due decisions; when a scrape is due, GET /metrics (answered a bit later)."""
        limiter, server, sim = self.limiter, self.sim.server, self.sim
        if limiter is None or sim.clock.now >= self.stop_at:
            return
        limiter.tick()
        if limiter.claim_scrape():
            # The server answers with its state of now; the client acts on it when the answer is in.
            state = server.metrics()

            def reading() -> None:
                if sim.metrics:
                    limiter.observe_metrics(state)
                else:
                    limiter.metrics_unavailable()
                self.pump()

            sim.at(sim.clock.now + sim.scrape_delay_s, reading)
        self.pump()
        sim.at(max(limiter.next_wakeup_at, sim.clock.now + sim.scrape_delay_s), self._scrape)

    @property
    def current_limit(self) -> int:
        return self.limiter.limit if self.limiter is not None else self.fixed

    def _account(self) -> None:
        self.limit_area += self.current_limit * self.sim.measured_since(self._last_t)
        self._last_t = self.sim.clock.now

    def pump(self) -> None:
        now = self.sim.clock.now
        if now < self.start_at or now >= self.stop_at:
            return
        self._account()
        while True:
            if self.limiter is not None:
                slot = self.limiter.try_acquire()
                if slot is None:
                    break
            else:
                if self.in_flight >= self.fixed:
                    break
                slot = None
            self.in_flight += 1
            request = _Request(self, slot, now)
            if self.send_delay_s > 0 and now > self.start_at:
                self.sim.at(now + self.send_delay_s, lambda r=request: self.sim.server.submit(r))
            else:
                self.sim.server.submit(request)

    def on_done(self, request: _Request) -> None:
        now = self.sim.clock.now
        self._account()
        self.in_flight -= 1
        if now >= self.sim.warmup_s:
            self.completed_after_warmup += 1
        if now - request.sent_at > self.deadline_s:
            self.timeouts += 1
        if request.slot is not None:
            request.slot.release(Signal.OK, now - request.sent_at)
        if self.limiter is not None:
            self.limits.append((now, self.limiter.limit))
        self.pump()


class Simulation:
    def __init__(
        self, *, slots: int = 32, latency: float = 0.5, per_running: float = 0.0, warmup_s: float = 0.0
    ) -> None:
        self.clock = FakeClock()
        self.server: SimServer | GpuServer = SimServer(self, slots, latency, per_running)
        self.clients: list[SimClient] = []
        self.warmup_s = warmup_s
        self.scrape_delay_s = 0.005
        self.metrics = True  # False: the server has no /metrics, the limiters steer by latency alone
        self.kv_as_slots = False  # SimServer: report KV use as running / slots, as the local server does
        self._events: list[tuple[float, int, Callable[[], object]]] = []
        self._seq = itertools.count()

    @classmethod
    def gpu(cls, *, warmup_s: float = 0.0, **server: object) -> Simulation:
        """A simulation against a :class:`GpuServer` (its keyword arguments)."""
        sim = cls(warmup_s=warmup_s)
        sim.server = GpuServer(sim, **server)  # type: ignore[arg-type]
        return sim

    def at(self, when: float, action: Callable[[], object]) -> None:
        heapq.heappush(self._events, (when, next(self._seq), action))

    def limiter(self, **kwargs: object) -> AdaptiveLimiter:
        return AdaptiveLimiter("http://sim", clock=self.clock, wall_clock=self.clock, **kwargs)  # type: ignore[arg-type]

    def add_client(self, client: SimClient) -> SimClient:
        self.clients.append(client)
        self.at(client.start_at, client.begin)
        if client.stop_at != float("inf"):
            self.at(client.stop_at, client._account)
        return client

    def run(self, until: float) -> None:
        while self._events and self._events[0][0] <= until:
            when, _, action = heapq.heappop(self._events)
            self.clock.now = when
            action()
        self.clock.now = until
        for client in self.clients:
            client._account()
        if isinstance(self.server, GpuServer):
            self.server._account()

    # -- results -----------------------------------------------------------------------------

    @property
    def measured_s(self) -> float:
        return self.clock.now - self.warmup_s

    def measured_since(self, t: float) -> float:
        """Measured seconds (those after the warm-up) from ``t`` to now: what a time integral adds."""
        return max(0.0, self.clock.now - max(t, self.warmup_s))

    def throughput(self) -> float:
        return sum(c.completed_after_warmup for c in self.clients) / self.measured_s

    def mean_limit(self, client: SimClient) -> float:
        return client.limit_area / self.measured_s

    def capacity(self) -> float:
        return self.server.capacity()


def run_fixed(
    concurrency: int, *, slots: int, latency: float, per_running: float, until: float, warmup_s: float
) -> float:
    """Throughput of one client at a fixed concurrency."""
    sim = Simulation(slots=slots, latency=latency, per_running=per_running, warmup_s=warmup_s)
    sim.add_client(SimClient(sim, "fixed", fixed=concurrency))
    sim.run(until)
    return sim.throughput()
