"""An adaptive concurrency limiter per VLM server: find the server's capacity instead of configuring it.

One :class:`AdaptiveLimiter` per server URL per process (:func:`limiter_for`, like
``breaker_for``), shared by every page, engine and event loop of the process. Every HTTP attempt
holds one of its slots (:mod:`mkg_pipeline.vllm.slots`), so the limit is the one concurrency
knob there is. A producer does not poll it: the vlm stage's scheduler starts pages while the
limit has room (plus a short image prefetch), and while the limit binds it awaits
:meth:`~mkg_pipeline.vllm.slots.SlotPool.wait_for_capacity` or one of its own pages' events.

Real pages take 10-60 s on a GPU, so the limit is clocked by the server's readings, not by
answers. The client's background task scrapes ``/metrics`` (never on a request's path) on a
wall-clock grid shared by every process: every :data:`SCRAPE_INTERVAL_S`, and every
:data:`FAST_SCRAPE_INTERVAL_S` while the server has room and the limit grows into it. Each
reading (:mod:`mkg_pipeline.vllm.server_metrics`) gives one decision of the growth law
(:mod:`mkg_pipeline.vllm.growth`): grow by a large step while nothing waits and the KV cache has
room, aim at the running batch plus a short queue once something waits, back off on preemptions
and on latency near the client's deadline. Without ``/metrics`` the answers clock it: a slow
start that doubles per round trip until the rate of answers stops rising, then decisions on
each round trip's latency. 429, 503 and timeouts halve the limit, at most once per round trip
of the server.

Several processes against one server
    They read the server at the same instants of the shared grid and apply what they decided at
    the same later instant (half an interval on), so none reads a queue another has just grown;
    they all see the same numbers and scale their share of the server by the same factor, plus
    an equal step, which converges to equal shares (see :mod:`mkg_pipeline.vllm.growth`)
    whatever order they started in.

Bounds: ``vllm.min_in_flight`` (floor), ``vllm.max_in_flight`` (hard ceiling);
``vllm.adaptive: false`` pins the limit at the ceiling and never scrapes.

This module is the public face: the names callers import (``AdaptiveLimiter``, ``Signal``,
``Slot``, ``limiter_for``, ``parse_queue_metrics``, the constants) are all here.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

from mkg_pipeline.config import VLLMServerConfig
from mkg_pipeline.metrics.client import CONCURRENCY_FLOOR, CONCURRENCY_LIMIT
from mkg_pipeline.vllm.growth import (
    BACKOFF,
    DEADLINE_SHARE,
    FAIR_STEP,
    FAST_SCRAPE_INTERVAL_S,
    GROWTH,
    HARD_BACKOFF,
    INITIAL_LIMIT,
    KV_FULL,
    KV_ROOM,
    LATENCY_CLEAR,
    LATENCY_TOLERANCE,
    METRICS_RETRY_S,
    MIN_WINDOW_S,
    PREEMPT_BACKOFF,
    QUEUE_MIN,
    QUEUE_TOLERANCE,
    SCRAPE_INTERVAL_S,
    SLOW_START_GAIN,
    SRTT_GAIN,
    STALE_AFTER_INTERVALS,
    UTILIZATION,
    AnswerClockedStart,
    Decision,
    LatencyLaw,
    QueueReading,
    ReadingLaw,
    grid_after,
)
from mkg_pipeline.vllm.server_metrics import ServerMetrics, parse_queue_metrics
from mkg_pipeline.vllm.slots import Signal, Slot, SlotPool

__all__ = [
    "BACKOFF",
    "DEADLINE_SHARE",
    "FAIR_STEP",
    "FAST_SCRAPE_INTERVAL_S",
    "GROWTH",
    "HARD_BACKOFF",
    "INITIAL_LIMIT",
    "KV_FULL",
    "KV_ROOM",
    "LATENCY_CLEAR",
    "LATENCY_TOLERANCE",
    "METRICS_RETRY_S",
    "PREEMPT_BACKOFF",
    "QUEUE_MIN",
    "QUEUE_TOLERANCE",
    "SCRAPE_INTERVAL_S",
    "SLOW_START_GAIN",
    "STALE_AFTER_INTERVALS",
    "AdaptiveLimiter",
    "QueueReading",
    "ServerMetrics",
    "Signal",
    "Slot",
    "limiter_for",
    "parse_queue_metrics",
    "reset_limiters",
]

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class AdaptiveLimiter(SlotPool):
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
        fast_scrape_interval_s: float = FAST_SCRAPE_INTERVAL_S,
    ) -> None:
        if not 1 <= min_limit <= max_limit:
            raise ValueError(f"need 1 <= min_limit ({min_limit}) <= max_limit ({max_limit})")
        super().__init__()
        self.server = server
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.adaptive = adaptive
        self.deadline_s = deadline_s
        self.scrape_interval_s = scrape_interval_s
        self.fast_scrape_interval_s = min(fast_scrape_interval_s, scrape_interval_s)
        self._clock = clock
        # Scrapes fall on a grid of the wall clock, the same in every process (NTP): all processes
        # read the server at the same moment, see the same numbers and move together.
        self._wall_offset = wall_clock() - clock()
        self._limit = float(min(max(INITIAL_LIMIT, min_limit), max_limit) if adaptive else max_limit)
        now = clock()
        # answers: the smoothed round trip, and this decision window's latencies
        self._srtt: float | None = None
        self._window_start = now
        self._window_sum = 0.0
        self._window_count = 0
        self._peak_demand = 0  # the most this process wanted in flight since the last decision
        self._last_decrease = -math.inf
        # readings
        self._law = ReadingLaw()
        self._queue: QueueReading | None = None
        self._metrics: bool | None = None  # None until the first scrape tells
        self._e2e: tuple[float, float] | None = None  # the server's latency sum and count at the last reading
        self._preemptions: float | None = None  # the server's preemption counter at the last reading
        self._scraping = False
        self._interval = scrape_interval_s  # of the next scrape: fast while growing into room
        self._next_scrape = now
        self._scrape_grid = now  # the grid instant the current scrape belongs to
        self._scrape_in_flight = 0  # this process's in flight at that instant
        #: a reading's decision, applied at a common instant: (when, decision, reading time)
        self._pending: tuple[float, Decision, float] | None = None
        # without readings
        self._start: AnswerClockedStart | None = None
        self._latency_law = LatencyLaw()
        self._round_peak = (0, 0)  # slow start: the most wanted in this round and the one before
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
    def server_queue(self) -> QueueReading | None:
        """The last reading of the server's /metrics, if any."""
        return self._queue

    @property
    def uses_server_metrics(self) -> bool:
        """True while a recent reading steers the limit; False: answers (latency) do."""
        return self._fresh_queue(self._clock()) is not None

    @property
    def no_load_latency_s(self) -> float | None:
        """Without /metrics: the latency the limit is steered against (None before it is known)."""
        return self._latency_law.reference

    @property
    def in_slow_start(self) -> bool:
        """Without /metrics: still doubling per round trip."""
        return self._start is not None and self._start.active

    def __repr__(self) -> str:
        return (
            f"AdaptiveLimiter(server={self.server!r}, limit={self.limit}, in_flight={self._in_flight}, "
            f"waiting={self.waiting}, bounds=[{self.min_limit}, {self.max_limit}], adaptive={self.adaptive})"
        )

    # -- the scrape timer (the client's background task) -----------------------------------------

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

    def tick(self) -> None:
        """Apply a decision whose time has come (the client's scrape timer calls this; so does every slot)."""
        with self._lock:
            if self._due_locked():
                self._dispatch_locked()

    def claim_scrape(self) -> bool:
        """True if a /metrics scrape is due and nobody is doing one; the caller then scrapes and reports
        with :meth:`observe_metrics` (or :meth:`observe_queue`), :meth:`metrics_unavailable` or
        :meth:`scrape_abandoned`."""
        if not self.adaptive:
            return False
        with self._lock:
            now = self._clock()
            if self._scraping or now < self._next_scrape:
                return False
            self._scraping = True
            self._scrape_grid = grid_after(now, self._interval, self._wall_offset) - self._interval
            self._scrape_in_flight = self._in_flight
            return True

    def observe_metrics(self, metrics: ServerMetrics) -> None:
        """A fresh reading of the server's /metrics (see :meth:`observe_queue`)."""
        self.observe_queue(
            metrics.waiting,
            metrics.running,
            metrics.latency_sum,
            metrics.latency_count,
            kv_usage=metrics.kv_usage,
            preemptions=metrics.preemptions,
        )

    def observe_queue(
        self,
        waiting: float,
        running: float,
        latency_sum: float | None = None,
        latency_count: float | None = None,
        *,
        kv_usage: float | None = None,
        preemptions: float | None = None,
    ) -> None:
        """A fresh reading: one decision, applied half an interval after the reading's grid instant.

        Every process reads at the same instant of the shared grid and acts at the same later
        instant, so none of them reads a queue another one has just grown: they all see the same
        numbers and move together.
        """
        with self._lock:
            now = self._clock()
            self._scraping = False
            if not self.adaptive:
                self._next_scrape = grid_after(now, self._interval, self._wall_offset)
                return
            self._due_locked()  # the previous reading's decision, if still pending, comes first
            if self._metrics is not True:
                log.info("concurrency limiter for %s: steering by the server's /metrics", self.server)
            self._metrics = True
            if self._start is not None and self._start.active:
                self._start.active = False  # readings are back: they steer, not answers
            server_latency = self._queue.latency_s if self._queue is not None else None
            if latency_sum is not None and latency_count is not None:
                previous, self._e2e = self._e2e, (latency_sum, latency_count)
                if previous is not None and latency_count > previous[1]:
                    server_latency = (latency_sum - previous[0]) / (latency_count - previous[1])
            preempted = None
            if preemptions is not None:
                # The first reading of a counter says nothing about now; a reset server starts again at 0.
                before, self._preemptions = self._preemptions, preemptions
                preempted = max(0.0, preemptions - before) if before is not None and preemptions >= before else 0.0
            reading = QueueReading(
                float(waiting), float(running), now, server_latency, kv_usage, preempted, preemptions_total=preemptions
            )
            self._queue = reading
            mean = self._window_mean()
            latency_high = mean is not None and self.deadline_s is not None and mean > DEADLINE_SHARE * self.deadline_s
            in_use = self._peak_demand >= max(1.0, UTILIZATION * self._limit)
            decision = self._law.decide(reading, self._scrape_in_flight, self._limit, in_use, latency_high)
            interval = self._interval
            apply_at = self._scrape_grid + interval / 2
            self._interval = self.fast_scrape_interval_s if decision.fast else self.scrape_interval_s
            # The next reading comes after this decision is applied: it should see what the decision did.
            self._next_scrape = grid_after(max(now, apply_at), self._interval, self._wall_offset)
            log.debug(
                "concurrency limiter for %s: %g waiting / %g running, KV %s, preempted %s; limit %d, in flight %d"
                " -> %.1f (%s)",
                self.server,
                waiting,
                running,
                kv_usage,
                preempted,
                self.limit,
                self._scrape_in_flight,
                decision.limit,
                decision.reason.value,
            )
            # Applied at the reading's grid instant + half its interval, in every process alike.
            self._pending = (apply_at, decision, now)
            if self._due_locked():
                self._dispatch_locked()

    def metrics_unavailable(self) -> None:
        """The scrape failed (no /metrics, no vLLM metrics in it, unreachable): answers steer."""
        with self._lock:
            now = self._clock()
            self._scraping = False
            self._interval = self.scrape_interval_s
            self._next_scrape = grid_after(now + METRICS_RETRY_S, self._interval, self._wall_offset)
            if self._metrics is None and self._start is None:  # cold: slow start on answers
                self._start = AnswerClockedStart(self._limit, now)
                self._round_peak = (self._in_flight + len(self._slot_waiters), 0)
            if self._metrics is not False or not self._told_latency_mode:
                log.info("concurrency limiter for %s: /metrics unavailable, steering by answers", self.server)
                self._told_latency_mode = True
            self._metrics = False
            self._queue = None
            self._pending = None

    def scrape_abandoned(self) -> None:
        """The scrape was cancelled before it could tell anything."""
        with self._lock:
            self._scraping = False
            self._next_scrape = grid_after(self._clock(), self._interval, self._wall_offset)

    # -- hooks of the slot pool (called with the lock held) -----------------------------------

    def _due_locked(self) -> bool:
        pending = self._pending
        if pending is None or self._clock() < pending[0]:
            return False
        self._pending = None
        when, decision, read_at = pending
        if self._last_decrease > read_at:
            return False  # a 429/503 or timeout since the reading: that cut stands
        self._set_limit_locked(decision.limit, decision.reason.value)
        self._new_window_locked(when)
        return True

    def _on_demand_locked(self, demand: int) -> None:
        self._peak_demand = max(self._peak_demand, demand)
        if demand > self._round_peak[0]:
            self._round_peak = (demand, self._round_peak[1])

    def _on_release_locked(self, signal: Signal, latency_s: float | None, load: int) -> None:
        if not self.adaptive:
            return
        now = self._clock()
        self._due_locked()
        if signal is Signal.OK and latency_s is not None:
            self._on_answer_locked(now, latency_s, load)
        elif signal in (Signal.OVERLOAD, Signal.TIMEOUT):
            self._decrease_locked(now, HARD_BACKOFF, signal.value)

    # -- the law's glue (all *_locked: called with self._lock held) ------------------------------

    def _fresh_queue(self, now: float) -> QueueReading | None:
        queue = self._queue
        if queue is None or now - queue.at > STALE_AFTER_INTERVALS * self.scrape_interval_s:
            return None
        return queue

    def _window_mean(self) -> float | None:
        return self._window_sum / self._window_count if self._window_count else None

    def _new_window_locked(self, now: float) -> None:
        # Steering by latency, the window opens one round trip later: answers arriving before then
        # were sent under the old limit.
        latency_mode = self._metrics is False and self._srtt is not None
        self._window_start = now + self._srtt if latency_mode and self._srtt is not None else now
        self._window_sum = 0.0
        self._window_count = 0
        self._peak_demand = self._in_flight + len(self._slot_waiters)

    def _on_answer_locked(self, now: float, latency: float, load: int) -> None:
        self._srtt = latency if self._srtt is None else self._srtt + SRTT_GAIN * (latency - self._srtt)
        if now >= self._window_start:
            self._window_sum += latency
            self._window_count += 1
        if self._metrics is not False or self._fresh_queue(now) is not None:
            return  # readings decide (or the first scrape has not told yet)
        start = self._start
        if start is not None and start.active:
            level = start.level
            demand = max(self._round_peak, default=0)
            in_use = max(demand, self._in_flight + 1) >= UTILIZATION * level
            new = start.on_answer(now, latency, self._limit, in_use, float(self.max_limit), load)
            if start.level != level:  # a new round: its demand starts from now
                self._round_peak = (self._in_flight + len(self._slot_waiters), self._round_peak[0])
            if not start.active and start.result is not None:
                self._latency_law.seed(start.result[1])
                self._set_limit_locked(new, "slow start ends")
                self._new_window_locked(now)
                log.debug("concurrency limiter for %s: slow start ends at %d", self.server, self.limit)
            else:
                self._set_limit_locked(new, "slow start")
            return
        if now - self._window_start < max(self._srtt, MIN_WINDOW_S):
            return
        mean = self._window_mean()
        assert mean is not None
        in_use = self._peak_demand >= max(1.0, UTILIZATION * self._limit)
        verdict = self._latency_law.decide(mean, self._limit, self._limit <= self.min_limit, in_use)
        if verdict is not None:
            limit, reason = verdict
            if limit < self._limit:
                self._decrease_locked(now, limit / self._limit, reason)
            else:
                self._set_limit_locked(limit, reason)
        self._new_window_locked(now)

    def _decrease_locked(self, now: float, factor: float, reason: str) -> None:
        # Once per round trip of the server: a decrease shows only as the excess requests finish.
        # Its own mean latency (from /metrics) is the same for every process; an attempt's latency
        # as one process sees it is not (a busy process sees its answers late).
        queue = self._fresh_queue(now)
        holdoff = queue.latency_s if queue is not None and queue.latency_s is not None else self._srtt
        if now - self._last_decrease < (holdoff if holdoff is not None else self.scrape_interval_s) - 1e-9:
            return
        self._last_decrease = now
        self._latency_law.congested()
        if self._start is not None and self._start.active:
            self._start.active = False  # an overloaded server is full: no more doubling
            if self._latency_law.reference is None and self._srtt is not None:
                self._latency_law.seed(self._srtt)
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
