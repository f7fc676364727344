"""A deterministic discrete-event simulation: limiters (one per simulated process) against a batching server.

The server has ``slots`` sequences running at once; requests beyond that wait in a FIFO queue, as
vLLM's do. A request's latency is fixed when it starts running: ``latency + per_running x running``
(per_running = 0: the S x L server; > 0: a GPU whose step time grows with its batch).

Each process has unlimited demand: it starts a request whenever its limiter gives a slot, and
scrapes the server's queue whenever its limiter asks for it (the reading arrives ``scrape_delay_s``
later, as a GET /metrics would). A process may also run at a fixed concurrency instead (the sweep
the adaptive limiter is compared with). Time is a fake clock: a run of minutes takes milliseconds.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from mkg_pipeline.vllm.limiter import AdaptiveLimiter, Signal, Slot


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

    def submit(self, request: _Request) -> None:
        if self.running < self.slots:
            self._start(request)
        else:
            self.queue.append(request)
            self.max_waiting = max(self.max_waiting, len(self.queue))
            if self.sim.clock.now >= self.sim.warmup_s:
                self.max_waiting_after_warmup = max(self.max_waiting_after_warmup, len(self.queue))

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
class SimClient:
    sim: Simulation
    name: str
    limiter: AdaptiveLimiter | None = None
    fixed: int = 0  # > 0: a fixed concurrency instead of a limiter
    start_at: float = 0.0
    stop_at: float = float("inf")
    completed_after_warmup: int = 0
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
            state = (server.waiting, server.running, server.latency_sum, server.completed)

            def reading() -> None:
                if sim.metrics:
                    limiter.observe_queue(*state)
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
        now = self.sim.clock.now
        start = max(self._last_t, self.sim.warmup_s)
        if now > start:
            self.limit_area += self.current_limit * (now - start)
        self._last_t = now

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
            self.sim.server.submit(_Request(self, slot, now))

    def on_done(self, request: _Request) -> None:
        now = self.sim.clock.now
        self._account()
        self.in_flight -= 1
        if now >= self.sim.warmup_s:
            self.completed_after_warmup += 1
        if request.slot is not None:
            request.slot.release(Signal.OK, now - request.sent_at)
        if self.limiter is not None:
            self.limits.append((now, self.limiter.limit))
        self.pump()


class Simulation:
    def __init__(self, *, slots: int, latency: float, per_running: float = 0.0, warmup_s: float = 0.0) -> None:
        self.clock = FakeClock()
        self.server = SimServer(self, slots, latency, per_running)
        self.clients: list[SimClient] = []
        self.warmup_s = warmup_s
        self.scrape_delay_s = 0.005
        self.metrics = True  # False: the server has no /metrics, the limiters steer by latency alone
        self._events: list[tuple[float, int, Callable[[], object]]] = []
        self._seq = itertools.count()

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

    # -- results -----------------------------------------------------------------------------

    @property
    def measured_s(self) -> float:
        return self.clock.now - self.warmup_s

    def throughput(self) -> float:
        return sum(c.completed_after_warmup for c in self.clients) / self.measured_s

    def mean_limit(self, client: SimClient) -> float:
        return client.limit_area / self.measured_s

    def capacity(self) -> float:
        s = self.server
        return s.slots / (s.latency + s.per_running * s.slots)


def run_fixed(
    concurrency: int, *, slots: int, latency: float, per_running: float, until: float, warmup_s: float
) -> float:
    """Throughput of one client at a fixed concurrency."""
    sim = Simulation(slots=slots, latency=latency, per_running=per_running, warmup_s=warmup_s)
    sim.add_client(SimClient(sim, "fixed", fixed=concurrency))
    sim.run(until)
    return sim.throughput()
