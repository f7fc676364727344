"""An adaptive concurrency limiter per VLM server: find the server's capacity instead of configuring it.

One :class:`AdaptiveLimiter` per server URL per process (:func:`limiter_for`, like
``breaker_for``), shared by every page, engine and event loop of the process. Every
HTTP attempt holds one of its slots; the vlm stage starts the next page only when
:meth:`AdaptiveLimiter.wait_for_capacity` says a request could start at once, so the
limit is the one concurrency knob there is.

What it watches
    * the server's queue, ``vllm:num_requests_waiting`` (and ``..._running``), and its mean
      latency (``vllm:e2e_request_latency_seconds`` sum / count), scraped from ``/metrics``
      every :data:`SCRAPE_INTERVAL_S` by a background task of the client (never on the
      request path);
    * the latency of every successful attempt (its no-load level: the lowest window mean seen);
    * 429 / 503 answers and timeouts.

How it moves (AIMD, like TCP; one decision per queue reading, or per round trip without them)
    * **slow start** (a fresh process, with queue readings): from :data:`INITIAL_LIMIT`, a round trip
      held to measure the rate there, then +1 per answer, doubling every other round trip (the one
      between shows what the last doubling did),
      until the first queue in a reading, a doubling that raised the rate of answers by less than
      :data:`SLOW_START_GAIN` (the server was full: the queue it built is at most its batch), a 429/503
      or a timeout. A round trip ends with the first answer to a request sent within it, so a GPU
      whose latency grows with its batch gets longer rounds, not a false alarm. (Without readings
      slow start is skipped; before the first one arrives, an answer slower than
      :data:`LATENCY_TOLERANCE` x the fastest ends it.) A run pod's limiter starts cold every run,
      and readings come only every few seconds: without this, filling a large server would take a
      minute;
    * **probing** (after slow start, and again after :data:`RESTART_AFTER` readings with an empty
      queue): +1, +2, +4, ... per decision while the queue is empty, at most +50 % of the limit,
      until the first sign of congestion. A large server is found within a dozen readings, and a
      momentary empty queue in steady state does not make a large limit jump;
    * **otherwise** +1 per decision while the queue stays short (up to :data:`QUEUE_TOLERANCE` x
      the running batch). A short standing queue is what keeps a batching server full: a finished
      sequence is replaced at once, without a round trip to the client;
    * **a longer queue** -> x :data:`BACKOFF` (0.9), once per server round trip. As
      ``BACKOFF x (1 + QUEUE_TOLERANCE) > 1``, the sum of all clients never falls below what the
      server runs at once, so backing off costs no throughput;
    * **429, 503 or a timeout** -> x :data:`HARD_BACKOFF` (0.5), as TCP on a loss;
    * **latency**: with queue readings it counts only near the client's deadline (a GPU's
      latency grows with its batch by design, and its throughput with it: backing off on that
      would leave much of the GPU idle). Without readings (no ``/metrics``) it is the signal: a
      round trip's mean above :data:`LATENCY_TOLERANCE` x the no-load level backs off, one within
      :data:`LATENCY_CLEAR` x counts as an empty queue;
    * it grows only while it is used (demand reached the limit since the last decision), so an
      idle process keeps no headroom it could dump on the server at once.

Several processes against one server
    The queue is one signal every process sees. They read it at the same instants of a shared
    wall-clock grid and apply what they decided at the same later instant (half an interval
    on), so none reads a queue another has just grown; the hold-off after a decrease is the
    server's own mean latency, the same for all. So they all take the same decisions: they grow
    by the same amounts and back off by the same factor together, additive increase with
    multiplicative decrease on a shared signal, which converges to equal shares (Chiu and Jain,
    1989) whatever order they started in. The sum settles near the server's batch plus a short
    queue.

Bounds: ``vllm.min_in_flight`` (floor), ``vllm.max_in_flight`` (hard ceiling);
``vllm.adaptive: false`` pins the limit at the ceiling.

Thread and loop safety: state lives behind a :class:`threading.Lock` held only for short
synchronous updates. A caller waiting for a slot waits on a future of its own event loop,
resolved with ``call_soon_threadsafe``, so steps running under different loops share one
limiter.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from mkg_pipeline.config import VLLMServerConfig
from mkg_pipeline.vllm.metrics import CONCURRENCY_FLOOR, CONCURRENCY_LIMIT

log = logging.getLogger(__name__)

Clock = Callable[[], float]

#: seconds between two /metrics scrapes (per process and server)
SCRAPE_INTERVAL_S = 2.0
#: a queue reading older than this many intervals is ignored (latency alone decides)
STALE_AFTER_INTERVALS = 3
#: after a failed scrape (no /metrics, not vLLM, unreachable), seconds before trying again
METRICS_RETRY_S = 30.0
#: waiting requests tolerated, as a share of the running ones, before backing off
QUEUE_TOLERANCE = 0.2
#: ... and at least this many (a server running a handful of sequences)
QUEUE_MIN = 1.0
#: multiplicative decrease on a long queue or high latency
BACKOFF = 0.9
#: multiplicative decrease on 429/503 and timeouts
HARD_BACKOFF = 0.5
#: latency mode: window mean above this many times the no-load latency backs off ...
LATENCY_TOLERANCE = 1.3
#: ... and within this many times it counts as "no queue" (accelerated growth)
LATENCY_CLEAR = 1.1
#: with queue readings, back off when the mean latency exceeds this share of the client's deadline
DEADLINE_SHARE = 0.5
#: largest growth of one decision, as a share of the limit
MAX_GROWTH = 0.5
#: readings with an empty queue (while the limit is used) before probing again: capacity appeared
RESTART_AFTER = 3
#: demand (in flight + waiting) must have reached this share of the limit for it to grow
UTILIZATION = 0.9
#: weight of a new sample in the smoothed round-trip time
SRTT_GAIN = 0.1
#: shortest decision window in latency mode, seconds
MIN_WINDOW_S = 0.01
#: latency mode: decisions congested while already at the floor before the no-load level is re-learnt
RELEARN_AFTER = 10
#: where the limit starts (within the floor and the ceiling): like TCP's initial window, a guess small
#: enough for a busy server to absorb and large enough that slow start is over in a few round trips. A GPU
#: serving a 7B VLM batches far more than 32 sequences (vLLM's own default is 256); starting at 16 left
#: half of a 32-slot server idle for the first round trip, a whole wave of a 20-wave run (0.91 -> 0.96
#: of capacity on ``benchmarks/limiter_trace.py --setting 32x0.5``).
INITIAL_LIMIT = 32
#: slow start ends when a doubled limit raised the rate of answers by less than this factor: the server
#: was already full (BBR's startup ends on the same test); the queue it built is then at most its batch
SLOW_START_GAIN = 1.25


class Signal(enum.StrEnum):
    """How one attempt ended, as far as the limiter cares."""

    OK = "ok"  # an answer: its latency is a sample
    OVERLOAD = "overload"  # 429 or 503: the server says it is overloaded
    TIMEOUT = "timeout"  # no answer within the deadline
    NONE = "none"  # anything else (4xx, connection refused, cancelled): says nothing about load


class _Verdict(enum.Enum):
    CLEAR = "clear"
    MILD = "mild"
    CONGESTED = "congested"


@dataclass(frozen=True)
class QueueReading:
    """What the server's /metrics said: requests waiting and running, summed over its engines."""

    waiting: float
    running: float
    at: float
    #: the server's mean request latency since the previous reading (e2e sum / count), if it says
    latency_s: float | None = None


class _Waiter:
    __slots__ = ("future", "granted", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.granted = False


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Slot:
    """The right to have one attempt in flight. Release it exactly once, with how it ended."""

    __slots__ = ("_done", "_limiter")

    def __init__(self, limiter: AdaptiveLimiter) -> None:
        self._limiter = limiter
        self._done = False

    def release(self, signal: Signal = Signal.NONE, latency_s: float | None = None) -> None:
        """Give the slot back; ``Signal.OK`` with the attempt's latency is a sample. Idempotent."""
        if self._done:
            return
        self._done = True
        self._limiter._release(signal, latency_s)

    def __enter__(self) -> Slot:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class AdaptiveLimiter:
    """Concurrency limit of one server for this process; see the module docstring."""

    def __init__(
        self,
        server: str,
        *,
        min_limit: int = 2,
        max_limit: int = 256,
        adaptive: bool = True,
        deadline_s: float | None = None,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        scrape_interval_s: float = SCRAPE_INTERVAL_S,
    ) -> None:
        if not 1 <= min_limit <= max_limit:
            raise ValueError(f"need 1 <= min_limit ({min_limit}) <= max_limit ({max_limit})")
        self.server = server
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.adaptive = adaptive
        self.deadline_s = deadline_s
        self.scrape_interval_s = scrape_interval_s
        self._clock = clock
        # Scrapes fall on a grid of the wall clock, the same in every process (NTP): all processes
        # read the server's queue at the same moment, see the same value and move together.
        self._wall_offset = wall_clock() - clock()
        self._lock = threading.Lock()
        self._limit = float(min(max(INITIAL_LIMIT, min_limit), max_limit) if adaptive else max_limit)
        self._in_flight = 0
        self._slot_waiters: deque[_Waiter] = deque()
        self._capacity_waiters: deque[_Waiter] = deque()
        # round trip and no-load latency
        self._srtt: float | None = None
        self._baseline: float | None = None
        self._floor_congested = 0
        # the current decision window
        now = clock()
        self._window_start = now
        self._window_sum = 0.0
        self._window_count = 0
        self._peak_demand = 0
        self._streak = 0  # consecutive decisions with an empty queue
        self._probing = True  # growing multiplicatively until the first sign of congestion
        self._probe_steps = 0
        # Slow start: +1 per answer (the limit doubles every round trip) until the first sign of
        # congestion, as TCP does; then the decisions below take over. Answers come every round trip,
        # queue readings only every few seconds: a cold process would otherwise need a minute to fill
        # a large server.
        self._slow_start = adaptive
        self._min_latency: float | None = None
        # ... growing every other round trip (TCP Vegas): the round trip in between shows whether the
        # last doubling overfilled the server before the next one doubles the excess.
        self._slow_start_epoch: float | None = None
        # The first round trip is held: it measures the rate at the initial window, so that already the
        # first doubling is tested (else a server full at the initial window is found only after two
        # doublings, with three times its batch in flight).
        self._slow_start_hold = True
        self._slow_start_base = self._limit  # the limit when the current growing round trip began
        # The most this process wanted in flight during this round trip and the one before: "in use" for
        # slow start. The instant an answer arrives says little, since a batch's answers come together,
        # before the process has sent the next requests.
        self._round_trip_demand = 0
        self._last_round_trip_demand = 0
        # Answers in the current round trip, and the rate of answers in the last held one: a doubling that
        # does not raise the rate by SLOW_START_GAIN found the server full (BBR's startup does the same).
        self._round_answers = 0
        self._held_rate: float | None = None
        self._last_decrease = -math.inf
        self._e2e: tuple[float, float] | None = None  # the server's latency sum and count at the last reading
        # the server's queue
        self._queue: QueueReading | None = None
        self._scraping = False
        self._next_scrape = now
        self._scrape_grid = now
        #: a decision taken on a queue reading, applied at a common instant: (when, verdict, reason)
        self._pending: tuple[float, _Verdict, str] | None = None
        self._told_latency_mode = False
        #: what the last decision did and why (for logs and tests): "grow", "queue", "latency", ...
        self.last_decision = "start"
        if adaptive:  # the VLLMConcurrencyAtFloor alert compares the limit with it
            CONCURRENCY_FLOOR.labels(server=server).set(min_limit)
        self._publish()

    @classmethod
    def from_config(cls, server: str, config: VLLMServerConfig, *, deadline_s: float | None = None) -> AdaptiveLimiter:
        return cls(
            server,
            min_limit=min(config.min_in_flight, config.max_in_flight),
            max_limit=config.max_in_flight,
            adaptive=config.adaptive,
            deadline_s=deadline_s,
        )

    # -- observation -----------------------------------------------------------------------

    @property
    def limit(self) -> int:
        """Attempts this process may have in flight right now."""
        return int(self._limit)

    @property
    def in_flight(self) -> int:
        """Attempts holding a slot."""
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Attempts of this process waiting for a slot (not the server's queue: see :attr:`server_queue`)."""
        return len(self._slot_waiters)

    @property
    def server_queue(self) -> QueueReading | None:
        """The last reading of the server's /metrics, if any."""
        return self._queue

    @property
    def uses_server_metrics(self) -> bool:
        """True while a recent queue reading steers the limit; False: latency alone does."""
        return self._fresh_queue(self._clock()) is not None

    @property
    def no_load_latency_s(self) -> float | None:
        return self._baseline

    def __repr__(self) -> str:
        return (
            f"AdaptiveLimiter(server={self.server!r}, limit={self.limit}, in_flight={self._in_flight}, "
            f"waiting={self.waiting}, bounds=[{self.min_limit}, {self.max_limit}], adaptive={self.adaptive})"
        )

    # -- slots -----------------------------------------------------------------------------

    def try_acquire(self) -> Slot | None:
        """A slot if one is free now (and nobody is queued before us), else None. No waiting."""
        with self._lock:
            if self._tick_locked(self._clock()):
                self._dispatch_locked()
            if self._slot_waiters or self._in_flight >= self.limit:
                return None
            self._take_locked()
        return Slot(self)

    async def acquire(self) -> Slot:
        """Wait (FIFO) for a free slot of this process."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._tick_locked(self._clock()):
                self._dispatch_locked()
            if not self._slot_waiters and self._in_flight < self.limit:
                self._take_locked()
                return Slot(self)
            waiter = _Waiter(loop)
            self._slot_waiters.append(waiter)
            self._note_demand_locked(self._in_flight + len(self._slot_waiters))
        try:
            await waiter.future
        except asyncio.CancelledError:
            with self._lock:
                if waiter.granted:  # the slot was handed over just as we were cancelled: give it back
                    self._in_flight -= 1
                else:
                    self._slot_waiters.remove(waiter)
                self._dispatch_locked()
            raise
        return Slot(self)

    async def wait_for_capacity(self) -> None:
        """Return once ``in_flight + waiting < limit``: a new request would start at once.

        Advisory (it reserves nothing): the vlm stage calls it before starting the next page.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._tick_locked(self._clock()):
                self._dispatch_locked()
            if self._in_flight + len(self._slot_waiters) < self.limit:
                return
            waiter = _Waiter(loop)
            self._capacity_waiters.append(waiter)
            # Somebody wants more than the limit allows: the limit is in use.
            self._note_demand_locked(self._in_flight + len(self._slot_waiters) + 1)
        try:
            await waiter.future
        except asyncio.CancelledError:
            with self._lock:
                if not waiter.granted:
                    self._capacity_waiters.remove(waiter)
            raise

    def _take_locked(self) -> None:
        self._in_flight += 1
        self._note_demand_locked(self._in_flight + len(self._slot_waiters))

    def _note_demand_locked(self, demand: int) -> None:
        self._peak_demand = max(self._peak_demand, demand)
        self._round_trip_demand = max(self._round_trip_demand, demand)

    def _release(self, signal: Signal, latency_s: float | None) -> None:
        with self._lock:
            self._in_flight -= 1
            if self.adaptive:
                now = self._clock()
                self._tick_locked(now)
                if signal is Signal.OK and latency_s is not None:
                    self._slow_start_locked(now, latency_s)
                    self._on_sample_locked(now, latency_s)
                elif signal in (Signal.OVERLOAD, Signal.TIMEOUT):
                    self._decrease_locked(now, HARD_BACKOFF, signal.value)
            self._dispatch_locked()

    def _dispatch_locked(self) -> None:
        """Hand free slots to queued waiters (FIFO), then wake capacity waiters if there is room."""
        limit = self.limit
        while self._slot_waiters and self._in_flight < limit:
            waiter = self._slot_waiters.popleft()
            if waiter.future.cancelled():
                continue
            waiter.granted = True
            self._in_flight += 1
            waiter.loop.call_soon_threadsafe(_resolve, waiter.future)
        room = limit - self._in_flight - len(self._slot_waiters)
        while self._capacity_waiters and room > 0:
            waiter = self._capacity_waiters.popleft()
            if waiter.future.cancelled():
                continue
            waiter.granted = True
            room -= 1
            waiter.loop.call_soon_threadsafe(_resolve, waiter.future)

    # -- signals ---------------------------------------------------------------------------

    @property
    def next_scrape_at(self) -> float:
        """When the next /metrics scrape is due (on the limiter's clock)."""
        return self._next_scrape

    @property
    def next_wakeup_at(self) -> float:
        """When :meth:`tick` next has something to do: a scrape falls due or a decision is to be applied."""
        pending = self._pending
        return min(self._next_scrape, pending[0]) if pending is not None else self._next_scrape

    def seconds_until_wakeup(self) -> float:
        """Seconds until :attr:`next_wakeup_at` (0 if it is due)."""
        return max(0.0, self.next_wakeup_at - self._clock())

    @property
    def idle(self) -> bool:
        """Nothing in flight and nobody waiting: no reason to watch the server."""
        return self._in_flight == 0 and not self._slot_waiters and not self._capacity_waiters

    def tick(self) -> None:
        """Apply a decision whose time has come (the client's scrape timer calls this; so does every slot)."""
        with self._lock:
            if self._tick_locked(self._clock()):
                self._dispatch_locked()

    def claim_scrape(self) -> bool:
        """True if a /metrics scrape is due and nobody is doing one; the caller then scrapes and reports
        with :meth:`observe_queue`, :meth:`metrics_unavailable` or :meth:`scrape_abandoned`."""
        if not self.adaptive:
            return False
        with self._lock:
            now = self._clock()
            if self._scraping or now < self._next_scrape:
                return False
            self._scraping = True
            self._scrape_grid = self._grid_after(now) - self.scrape_interval_s
            return True

    def observe_queue(
        self, waiting: float, running: float, latency_sum: float | None = None, latency_count: float | None = None
    ) -> None:
        """A fresh reading of the server's queue: one decision, applied half an interval after the reading.

        Every process reads at the same instant of the shared grid and acts at the same later
        instant, so none of them reads a queue another one has just grown: they all see the same
        queue and move together (a process reading just after the others grew would otherwise be
        the one that always backs off).
        """
        with self._lock:
            now = self._clock()
            self._scraping = False
            self._next_scrape = self._grid_after(now)
            if not self.adaptive:
                return
            self._tick_locked(now)  # the previous reading's decision, if still pending, comes first
            first = self._queue is None
            server_latency = self._queue.latency_s if self._queue is not None else None
            if latency_sum is not None and latency_count is not None:
                previous, self._e2e = self._e2e, (latency_sum, latency_count)
                if previous is not None and latency_count > previous[1]:
                    server_latency = (latency_sum - previous[0]) / (latency_count - previous[1])
            self._queue = QueueReading(float(waiting), float(running), now, server_latency)
            if first:
                log.info("concurrency limiter for %s: steering by the server's queue (/metrics)", self.server)
            verdict, reason = self._queue_verdict(self._queue)
            if verdict is not _Verdict.CLEAR:  # a queue at the server: it is full, stop doubling at once
                self._end_slow_start("queue")
            log.debug(
                "concurrency limiter for %s: queue %g waiting / %g running, limit %d, in flight %d: %s",
                self.server,
                waiting,
                running,
                self.limit,
                self._in_flight,
                verdict.value,
            )
            # Applied at the reading's grid instant + half an interval, in every process alike.
            self._pending = (self._scrape_grid + self.scrape_interval_s / 2, verdict, reason)
            if self._tick_locked(now):
                self._dispatch_locked()

    def metrics_unavailable(self) -> None:
        """The scrape failed (no /metrics, no vLLM metrics in it, unreachable): latency alone decides."""
        with self._lock:
            self._scraping = False
            self._next_scrape = self._grid_after(self._clock() + METRICS_RETRY_S)
            # Doubling blind into a server that may already queue other pods' requests would fill its
            # queue: without readings, the decisions on whole round trips' latency grow the limit.
            self._end_slow_start("no /metrics")
            if self._queue is not None or not self._told_latency_mode:
                log.info("concurrency limiter for %s: /metrics unavailable, steering by latency", self.server)
                self._told_latency_mode = True
            self._queue = None
            self._pending = None

    def scrape_abandoned(self) -> None:
        """The scrape was cancelled before it could tell anything."""
        with self._lock:
            self._scraping = False
            self._next_scrape = self._grid_after(self._clock())

    # -- the control law (all *_locked: called with self._lock held) ---------------------------

    def _grid_after(self, t: float) -> float:
        """The first instant of the shared scrape grid after ``t``."""
        interval = self.scrape_interval_s
        return (math.floor((t + self._wall_offset) / interval) + 1) * interval - self._wall_offset

    def _tick_locked(self, now: float) -> bool:
        pending = self._pending
        if pending is None or now < pending[0]:
            return False
        self._pending = None
        # The decision's own instant (not "now", which differs by milliseconds between processes):
        # the hold-off after a decrease is then the same everywhere.
        self._decide_locked(pending[0], pending[1], pending[2])
        return True

    def _fresh_queue(self, now: float) -> QueueReading | None:
        queue = self._queue
        if queue is None or now - queue.at > STALE_AFTER_INTERVALS * self.scrape_interval_s:
            return None
        return queue

    def _slow_start_locked(self, now: float, latency: float) -> None:
        """One answer in slow start: grow by one while the server shows no sign of being full, else stop."""
        if not self._slow_start:
            return
        if self._min_latency is None or latency < self._min_latency:
            self._min_latency = latency
        # Without readings, latency is the only sign. With them, an empty queue says the server is not
        # full, and a GPU's latency growing with its batch is expected (its throughput grows with it): a
        # queue in a reading ends slow start (observe_queue), and so does a doubling that did not pay.
        if self._fresh_queue(now) is None and latency > LATENCY_TOLERANCE * self._min_latency:
            self._end_slow_start("latency")
            return
        self._round_answers += 1
        if self._slow_start_epoch is None:
            self._slow_start_epoch = now
        elif now - latency >= self._slow_start_epoch:  # sent after this round began: the round is over
            rate = self._round_answers / max(now - self._slow_start_epoch, 1e-6)
            if self._slow_start_hold:  # a round held at the last doubled limit: did the doubling pay?
                if self._held_rate is not None and rate < SLOW_START_GAIN * self._held_rate:
                    self._end_slow_start("throughput")
                    return
                self._held_rate = rate
            self._slow_start_epoch = now
            self._round_answers = 0
            self._slow_start_hold = not self._slow_start_hold  # grow a round, then hold one to see
            self._slow_start_base = self._limit
            self._last_round_trip_demand = self._round_trip_demand
            self._round_trip_demand = self._in_flight + len(self._slot_waiters)
        demand = max(self._round_trip_demand, self._last_round_trip_demand, self._in_flight + 1)
        in_use = demand >= UTILIZATION * self._slow_start_base
        # At most double per growing round trip: a limit at the server's capacity then queues less than it.
        if in_use and not self._slow_start_hold and self._limit + 1 < 2 * self._slow_start_base:
            self._set_limit_locked(self._limit + 1, "slow start")

    def _end_slow_start(self, reason: str) -> None:
        if self._slow_start:
            self._slow_start = False
            log.debug("concurrency limiter for %s: slow start ends at %d (%s)", self.server, self.limit, reason)

    def _on_sample_locked(self, now: float, latency: float) -> None:
        self._srtt = latency if self._srtt is None else self._srtt + SRTT_GAIN * (latency - self._srtt)
        if now < self._window_start:
            return  # sent before the last change: says nothing about the new limit
        self._window_sum += latency
        self._window_count += 1
        if self._fresh_queue(now) is not None:
            return  # queue readings drive the decisions
        if now - self._window_start < max(self._srtt, MIN_WINDOW_S):
            return
        self._decide_locked(now, *self._latency_verdict())

    def _window_mean(self) -> float | None:
        return self._window_sum / self._window_count if self._window_count else None

    def _learn_baseline(self, mean: float | None) -> None:
        if mean is not None and (self._baseline is None or mean < self._baseline):
            self._baseline = mean

    def _queue_verdict(self, queue: QueueReading) -> tuple[_Verdict, str]:
        mean = self._window_mean()
        self._learn_baseline(mean)
        if mean is not None and self.deadline_s is not None and mean > DEADLINE_SHARE * self.deadline_s:
            return _Verdict.CONGESTED, "latency"
        if queue.waiting > max(QUEUE_MIN, QUEUE_TOLERANCE * queue.running):
            return _Verdict.CONGESTED, "queue"
        if queue.waiting <= 0:
            return _Verdict.CLEAR, "grow"
        return _Verdict.MILD, "grow"

    def _latency_verdict(self) -> tuple[_Verdict, str]:
        mean = self._window_mean()
        assert mean is not None
        self._learn_baseline(mean)
        assert self._baseline is not None
        ratio = mean / self._baseline
        if ratio > LATENCY_TOLERANCE:
            if self._limit <= self.min_limit:
                # Congested even at the floor, for a while: the no-load level we knew is gone
                # (another model, other tenants, longer pages). Learn the new one.
                self._floor_congested += 1
                if self._floor_congested >= RELEARN_AFTER:
                    log.info(
                        "concurrency limiter for %s: latency %.2fs at the floor; no-load level was %.2fs, re-learnt",
                        self.server,
                        mean,
                        self._baseline,
                    )
                    self._baseline = mean
                    self._floor_congested = 0
            return _Verdict.CONGESTED, "latency"
        self._floor_congested = 0
        return (_Verdict.CLEAR if ratio <= LATENCY_CLEAR else _Verdict.MILD), "grow"

    def _decide_locked(self, now: float, verdict: _Verdict, reason: str) -> None:
        if verdict is not _Verdict.CLEAR:  # a queue forms, or latency rises: the server is full
            self._end_slow_start(reason if verdict is _Verdict.CONGESTED else "queue")
        if verdict is _Verdict.CONGESTED:
            self._streak = 0
            self._probing = False
            self._decrease_locked(now, BACKOFF, reason)
        elif self._slow_start:
            pass  # slow start grows per answer, within its own ceiling
        elif self._peak_demand >= max(1.0, UTILIZATION * self.limit):
            self._streak = self._streak + 1 if verdict is _Verdict.CLEAR else 0
            if self._streak >= RESTART_AFTER and not self._probing:
                self._probing, self._probe_steps = True, 0  # the queue stays empty: capacity appeared
            if self._probing and verdict is _Verdict.CLEAR:
                step = max(1.0, min(2.0**self._probe_steps, MAX_GROWTH * self._limit))
                self._probe_steps += 1
            else:  # a short queue already: the server is full, fill the rest of it slowly
                step = 1.0
            self._set_limit_locked(self._limit + step, "grow")
        # A new window: its demand starts from what is in flight now. Steering by latency, it opens
        # one round trip later: answers arriving before then were sent under the old limit.
        latency_mode = self._fresh_queue(now) is None and self._srtt is not None
        self._window_start = now + self._srtt if latency_mode and self._srtt is not None else now
        self._window_sum = 0.0
        self._window_count = 0
        self._peak_demand = self._in_flight + len(self._slot_waiters)

    def _decrease_locked(self, now: float, factor: float, reason: str) -> None:
        # Once per round trip of the server: a decrease shows only as the excess requests finish.
        # Its own mean latency (from /metrics) is the same for every process; an attempt's latency
        # as one process sees it is not (a busy process sees its answers late).
        queue = self._fresh_queue(now)
        holdoff = queue.latency_s if queue is not None and queue.latency_s is not None else self._srtt
        if now - self._last_decrease < (holdoff if holdoff is not None else self.scrape_interval_s) - 1e-9:
            return
        self._last_decrease = now
        self._streak = 0
        self._probing = False
        self._end_slow_start(reason)
        self._set_limit_locked(self._limit * factor, reason)

    def _set_limit_locked(self, value: float, reason: str) -> None:
        old = self.limit
        self._limit = min(float(self.max_limit), max(float(self.min_limit), value))
        self.last_decision = reason
        if self.limit != old:
            self._publish()
            log.debug("concurrency limiter for %s: %d -> %d (%s)", self.server, old, self.limit, reason)

    def _publish(self) -> None:
        CONCURRENCY_LIMIT.labels(server=self.server).set(self.limit)


# -- one limiter per server URL per process ------------------------------------------------

_LIMITERS: dict[str, AdaptiveLimiter] = {}
_LIMITERS_LOCK = threading.Lock()


def limiter_for(
    server_url: str, config: VLLMServerConfig | None = None, *, deadline_s: float | None = None
) -> AdaptiveLimiter:
    """The process-wide limiter of ``server_url``, created on first use from ``config``.

    Later calls return the same limiter whatever they pass: every client of one server in the
    process shares its limit. A differing configuration is logged.
    """
    key = server_url.rstrip("/")
    config = config or VLLMServerConfig(url=key)
    with _LIMITERS_LOCK:
        limiter = _LIMITERS.get(key)
        if limiter is None:
            limiter = _LIMITERS[key] = AdaptiveLimiter.from_config(key, config, deadline_s=deadline_s)
        elif (limiter.min_limit, limiter.max_limit, limiter.adaptive) != (
            config.min_in_flight,
            config.max_in_flight,
            config.adaptive,
        ):
            log.warning("concurrency limiter for %s already exists; keeping its first configuration", key)
        return limiter


def reset_limiters() -> None:
    """Forget every registered limiter (tests)."""
    with _LIMITERS_LOCK:
        _LIMITERS.clear()


_QUEUE_METRICS = {
    "vllm:num_requests_waiting": 0,
    "vllm:num_requests_running": 1,
    "vllm:e2e_request_latency_seconds_sum": 2,
    "vllm:e2e_request_latency_seconds_count": 3,
}


@dataclass(frozen=True)
class ServerMetrics:
    """What the limiter reads from vLLM's /metrics, summed over engines and models."""

    waiting: float
    running: float
    latency_sum: float | None = None
    latency_count: float | None = None


def parse_queue_metrics(text: str) -> ServerMetrics | None:
    """The queue (and latency totals, if present) from vLLM's Prometheus text; None without a queue gauge."""
    totals = [0.0, 0.0, 0.0, 0.0]
    found = [False, False, False, False]
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        brace = line.find("{")
        if brace >= 0:
            name, rest = line[:brace], line[line.rfind("}") + 1 :]
        else:
            name, _, rest = line.partition(" ")
        index = _QUEUE_METRICS.get(name.strip())
        if index is None:
            continue
        try:
            totals[index] += float(rest.split()[0])
        except (ValueError, IndexError):
            continue
        found[index] = True
    if not found[0]:
        return None
    has_latency = found[2] and found[3]
    return ServerMetrics(totals[0], totals[1], totals[2] if has_latency else None, totals[3] if has_latency else None)
