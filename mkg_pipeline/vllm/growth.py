"""The growth law of the adaptive limiter: from what the server says (or, failing that, from answers) to a limit.

Pure decisions, no locks, no clocks of their own: :class:`~mkg_pipeline.vllm.limiter.AdaptiveLimiter`
calls them at the right instants and applies what they return.

With ``/metrics`` (:class:`ReadingLaw`, one decision per reading)
    Every process reads the same numbers at the same instants: the server's running batch ``R``, its
    queue ``W``, its KV-cache use and its preemption counter, and it knows its own requests in flight
    ``x``. ``D = R + W`` is what all processes together have at the server, so ``x / D`` is this
    process's share. Each reading gives a target ``T`` for that total and the process sets

        limit = x * T / D + FAIR_STEP

    that is, its share of the target plus an equal step (none after preemptions; a small one,
    :data:`MEMORY_STEP`, with the KV cache as the limit: there the steps of all processes stand as an
    overshoot of the cache's target, which the next reading takes back in proportion to the shares,
    as AIMD does). All processes scale by the same factor,
    so the total moves to ``T`` in one decision whatever the number of processes; the equal step
    makes the shares converge (a gap between two processes shrinks by ``T / (T + N * FAIR_STEP)``
    per decision, as in additive-increase multiplicative-decrease). The limit is *set* from what is
    in flight, not multiplied into itself, so a decrease that takes a round trip to show (requests
    are never cancelled; they finish) is not repeated on every reading meanwhile. (While the limit
    is in use and nothing drains, ``x`` is the limit itself, its fraction kept.)

    The target:

    * **room** (``W == 0``: every request sent is running): ``T = D x GROWTH`` per reading, so a cold
      process fills an idle server in a few readings, whatever the latency; bounded by what the
      server was seen to hold when it last had a queue (its capacity; a large step straight to it
      when capacity appears, e.g. another process finished) and by the KV cache's room at the
      current use per sequence;
    * **a queue**: the server runs all it can (``R`` is its capacity); ``T = R + QUEUE_TOLERANCE x R``
      (at least :data:`QUEUE_MIN` waiting):
      a short standing queue keeps a batching server full, since a finished sequence is replaced at
      once, without a round trip to the client. When memory is the limit (preemptions were seen),
      no standing queue: vLLM admits what waits as soon as blocks free, and preempts later;
    * **a burst being taken in**: a queue no longer than what the last growth sent (or than the
      previous reading's queue, shrinking; or anything at the first reading) may only be waiting for
      the scheduler, which takes in so many prompt tokens per step: read again soon, and send again
      what the scheduler took in since the last reading (``T = D + rise``, the running batch's rise
      above the highest it has been since the burst began), so its queue never runs dry between
      readings. Only new highs count: a full server's batch cannot rise above its slots, so its
      small dips and recoveries add nothing, and what this resends is bounded by the slots still
      free when the burst began;
    * **preemptions** (``vllm:num_preemptions_total`` rose): ``T = R x PREEMPT_BACKOFF``;
    * **KV cache near full** (``>= KV_FULL``) while nothing waits: no growth beyond a short standing
      queue (``T = R + QUEUE_TOLERANCE x R``, no equal step), and none at all once preemptions showed
      that memory is the limit. vLLM admits a waiting request only when blocks free (a finished
      sequence's), so such a queue costs no memory and saves each freed slot a client round trip; what
      preempts is the running sequences' growth, which the preemption counter then shows. (With a
      queue, the KV cache counts only once memory is the limit: a slot-only server reports full slots
      as a full cache.)
    * **latency near the client's deadline**: ``T = D x BACKOFF``.

    Memory is the limit once this process saw preemptions, or when its first reading finds a server
    that has preempted with its cache at :data:`KV_ROOM` or more (a process joining late steers as
    those already there do, instead of queueing until it preempts). A queue with memory to spare
    makes slots the limit again.

    A process grows only while its limit is in use (demand reached it since the last decision), so
    an idle process gains no headroom it could dump on the server at once; what it keeps is cut to
    its share as soon as the server is over its target.

Without ``/metrics`` (:class:`AnswerClockedStart`, then :class:`LatencyLaw`)
    Answers are the clock. **Slow start**: +3 per answer while the limit is in use, so the limit
    quadruples every round trip (a round is as many answers as the limit at its start; from 32, a
    256-slot GPU is full within the second round trip, whatever the latency); it ends when a
    round's rate of answers rose by less than :data:`SLOW_START_GAIN` over the round before (the
    server was full; BBR's startup ends on the same test). A GPU's latency grows with its batch, so
    latency alone says little; the rate of answers stops rising when the batch is full. The limit
    then goes back to the level whose rate was worth it, and the round's latency becomes the
    reference. Growing four-fold, waiting for the round's end would send 16 x the server's slots
    before stopping (on a small slow server, more than its queue drains before the client's
    timeout), so a round also ends early (Hystart's idea, on rate instead of delay): every request
    carries the limit it was sent under (its load), and once :data:`EARLY_ANSWERS` answers to
    requests sent under more than the last level are in, if their load / latency (Little's law: the
    rate that load got) is below that of the answers sent under the last level, what was added only
    queued: back to the last level. **After it**, each round trip's mean latency against the lowest seen (re-learnt
    after :data:`RELEARN_AFTER` congested decisions at the floor): above :data:`LATENCY_TOLERANCE` x
    backs off by :data:`BACKOFF`, within :data:`LATENCY_CLEAR` x grows (+1, +2, +4, ...).

    Latency alone cannot tell another process's queue from a GPU's larger batch (both raise the
    latency as this process grows), so without /metrics shares between processes are not
    guaranteed: keep /metrics reachable.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

#: seconds between two /metrics scrapes in steady state (per process and server)
SCRAPE_INTERVAL_S = 2.0
#: ... and while the server has room and the limit grows: a cold pod fills a server in a few readings
FAST_SCRAPE_INTERVAL_S = 0.5
#: a queue reading older than this many (normal) intervals is ignored (latency alone decides)
STALE_AFTER_INTERVALS = 3
#: after a failed scrape (no /metrics, not vLLM, unreachable), seconds before trying again
METRICS_RETRY_S = 30.0
#: where the limit starts (within the floor and the ceiling), like TCP's initial window: small enough
#: for a busy server to absorb, large enough that the first reading already has something to scale
INITIAL_LIMIT = 32

#: growth of the total per reading while the server has room (every request sent is running)
GROWTH = 1.5
#: equal step of every process per decision: what makes shares converge
FAIR_STEP = 2.0
#: equal step of every process per decision while memory is the limit (see the module docstring)
MEMORY_STEP = 1.0
#: standing queue aimed at, as a share of the running batch: keeps a batching server full
QUEUE_TOLERANCE = 0.1
#: ... and at least this many waiting
QUEUE_MIN = 1.0
#: target as a share of the running batch after preemptions (memory overfilled)
PREEMPT_BACKOFF = 0.9
#: KV cache use that the room estimate aims at (running sequences grow: leave them space)
KV_ROOM = 0.9
#: KV cache use from which the limit does not grow
KV_FULL = 0.95
#: multiplicative decrease when latency nears the deadline (with readings), or rises (without)
BACKOFF = 0.9
#: multiplicative decrease on 429/503 and timeouts
HARD_BACKOFF = 0.5
#: with readings, back off when the mean latency exceeds this share of the client's deadline
DEADLINE_SHARE = 0.5
#: demand (in flight + waiting) must have reached this share of the limit for it to grow
UTILIZATION = 0.9

#: latency mode: a round trip's mean above this many times the reference latency backs off ...
LATENCY_TOLERANCE = 1.3
#: ... and within this many times it counts as "room" (growth speeds up)
LATENCY_CLEAR = 1.1
#: latency mode: largest growth of one decision, as a share of the limit
MAX_GROWTH = 0.5
#: latency mode: decisions with room before growth speeds up again after a congestion
RESTART_AFTER = 3
#: latency mode: decisions congested while already at the floor before the reference is re-learnt
RELEARN_AFTER = 10
#: shortest decision window in latency mode, seconds
MIN_WINDOW_S = 0.01
#: weight of a new sample in the smoothed round-trip time
SRTT_GAIN = 0.1
#: slow start (no /metrics) ends when a doubling raised the rate of answers by less than this factor
SLOW_START_GAIN = 1.25
#: slow start multiplies the limit by this much per round trip (+3 per answer) while the rate of answers rises
SLOW_START_FACTOR = 4
#: ... and ends early when this many answers of a round (and this share of the last round's level) came
#: back at no higher rate, by Little's law, than the last round's
EARLY_ANSWERS = 8
EARLY_SHARE = 0.25
#: ... and it keeps the doubled level if the rate rose by at least this factor, else the level before
KEEP_GAIN = 1.1


@dataclass(frozen=True)
class QueueReading:
    """What the server's /metrics said, and what this process had in flight when it was read."""

    waiting: float
    running: float
    at: float
    #: the server's mean request latency since the previous reading (e2e sum / count), if it says
    latency_s: float | None = None
    #: share of the KV cache in use (0..1), if it says
    kv_usage: float | None = None
    #: sequences preempted since the previous reading, if it says
    preempted: float | None = None
    #: the server's preemption counter (since it started), if it says
    preemptions_total: float | None = None


class Reason(enum.StrEnum):
    """Why a reading's decision moved the limit (``AdaptiveLimiter.last_decision``)."""

    ROOM = "grow"  # no queue: every request sent runs
    ADMITTING = "admitting"  # what waits is what was just sent: the server may still be taking it in
    QUEUE = "queue"  # the server runs all it can; aim at its batch plus a short queue
    PREEMPTION = "preemption"
    KV_FULL = "kv-full"
    LATENCY = "latency"


@dataclass(frozen=True)
class Decision:
    limit: float
    reason: Reason
    #: scrape at the fast interval next: the server has room and this process is growing into it
    fast: bool


_NO_STEP = (Reason.KV_FULL, Reason.PREEMPTION, Reason.ADMITTING)


class ReadingLaw:
    """One decision per /metrics reading; see the module docstring. Holds what readings taught."""

    def __init__(self) -> None:
        #: the running batch of the last reading with a queue: what the server can hold
        self.capacity: float | None = None
        #: preemptions were seen: memory, not slots, limits the batch; keep no standing queue
        self.memory_bound = False
        #: how many requests (of all processes) may still be on their way into the batch: what the
        #: last growth added, or a queue that is shrinking (None before the first reading: all of them)
        self._burst: float | None = None
        #: the highest running batch since the burst being taken in began (the last reading's batch
        #: outside a burst): while admitting, only a rise above it was taken in from the queue
        self._high: float | None = None
        self._first = True

    def decide(self, reading: QueueReading, in_flight: int, limit: float, in_use: bool, latency_high: bool) -> Decision:
        waiting, running, kv = reading.waiting, reading.running, reading.kv_usage
        # What all processes have at the server; at least what this one has (some may be on the wire).
        total = max(waiting + running, float(in_flight), 1.0)
        burst, self._burst = (total if self._burst is None else self._burst), 0.0
        high, self._high = self._high, running
        first, self._first = self._first, False
        if first and reading.preemptions_total and kv is not None and kv >= KV_ROOM:
            # Joining a server that has preempted and whose cache is full: memory is the limit, as the
            # processes already there learnt. Steer as they do (no standing queue, the memory step),
            # or this process's queue would preempt and its share grow at theirs' expense.
            self.memory_bound = True
        if reading.preempted:
            self.memory_bound = True
            self.capacity = running * PREEMPT_BACKOFF
            target, reason = self.capacity, Reason.PREEMPTION
        elif 0 < waiting <= burst + QUEUE_MIN:  # (one more: requests are whole, limits are not)
            # A burst just sent waits for the scheduler (vLLM takes in so many prompt tokens per step):
            # no sign of a full server yet. Read again soon; a queue that stops shrinking is a real one.
            # What the scheduler took in since the last reading (the batch's rise to a new high) is sent
            # again, so that the queue it takes from does not run dry before the next reading. Not at
            # the first reading: what runs there may be other processes' work, not this burst.
            admitted = max(0.0, running - high) if high is not None else 0.0
            target, reason = total + admitted, Reason.ADMITTING
            self._high = running if high is None else max(high, running)
            # It must shrink to go on counting as a burst (by a tenth, once what is resent has joined it):
            # a queue that stops shrinking is a real one, the server full.
            self._burst = waiting * 0.9 - QUEUE_MIN + admitted
        elif waiting > 0:
            self.capacity = running
            if self.memory_bound and kv is not None and kv < KV_ROOM:
                self.memory_bound = False  # a queue with memory to spare: slots are the limit again
            queue = QUEUE_MIN if self.memory_bound else max(QUEUE_MIN, QUEUE_TOLERANCE * running)
            target, reason = running + queue, Reason.QUEUE
        else:
            target, reason = total * GROWTH, Reason.ROOM
            if self.capacity is not None:
                if running < self.capacity:  # room it was seen to hold: straight to it, no further
                    target = min(target, max(total, self.capacity * (1 + QUEUE_TOLERANCE)))
                else:
                    self.capacity = None  # it holds more than it did: capacity grew, find it again
            if kv is not None and kv > 0:  # as many more as the cache has room for at today's use per sequence
                target = min(target, max(total, running * KV_ROOM / kv))
            if kv is not None and kv >= KV_FULL:
                target, reason = total, Reason.KV_FULL
                if not self.memory_bound:
                    # A full cache, nothing waiting, no preemption seen: the running batch fits, and
                    # vLLM admits a waiting request only when blocks free (a finished sequence's), so
                    # a short queue replaces what finishes without a client round trip and costs no
                    # memory; it is the running sequences' growth that preempts, and preemptions then
                    # make memory the limit. (A server that reports full slots as a full cache, as the
                    # slot-only simulators once did, reads like this too.)
                    target = max(total, running + max(QUEUE_MIN, QUEUE_TOLERANCE * running))
        if kv is not None and kv > 0 and self.memory_bound and reason is not Reason.PREEMPTION:
            # Memory is the limit: as many as fill the cache to KV_ROOM, both ways, and no queue (a
            # waiting request is admitted as blocks free, and preempted later).
            kv_target = running * KV_ROOM / kv
            if kv_target < target:
                target, reason = kv_target, Reason.KV_FULL
        if latency_high:
            target, reason = min(target, total * BACKOFF), Reason.LATENCY
        # Its share: the limit itself while it is in use (its fraction kept: rounding down every
        # decision would stall the equal steps), what is in flight while a decrease is still draining
        # (scaling the limit again would repeat a cut that has not shown yet) or the limit is not in use.
        base = float(in_flight) if in_flight > limit or not in_use else limit
        # The equal step is what makes shares converge; it stands as a queue of FAIR_STEP per process,
        # harmless where slots are the limit, not where memory is (a waiting request is admitted as
        # blocks free, and preempted later).
        if reason is Reason.KV_FULL and self.memory_bound:
            step = MEMORY_STEP
        else:
            step = 0.0 if reason in _NO_STEP else FAIR_STEP
        new = base * target / total + step
        if reason is Reason.ROOM and base > 0:  # all processes together add about this much
            self._burst = max(0.0, (new - base) * total / base)
        if not in_use:
            # Not used: no growth, and no cut either unless the server is over its target (a process
            # still sending its first requests, or near the end of its pages, keeps its limit).
            new = min(new, limit) if target < total else limit
        fast = (reason is Reason.ROOM and in_use) or reason is Reason.ADMITTING
        return Decision(new, reason, fast)


class AnswerClockedStart:
    """Slow start without /metrics: +3 per answer while in use, until the rate of answers stops rising."""

    def __init__(self, limit: float, now: float) -> None:
        self.active = True
        #: the limit when this round began (a round is as many answers)
        self.level = limit
        self._round_start = now
        self._answers = 0
        self._latency_sum = 0.0
        self._prev: tuple[float, float, float] | None = None  # the last round's (level, rate, mean latency)
        #: every answer's (load it was sent under, latency), for Little's law by load
        self._samples: list[tuple[float, float]] = []
        self._old = [0.0, 0.0]  # sums of load and latency of the answers sent under at most the last level
        self._new = [0.0, 0.0, 0.0]  # ... and of this round's answers sent under more (and their count)
        #: after it ended: the level kept and the latency it had (the reference of the latency law)
        self.result: tuple[float, float] | None = None

    def on_answer(
        self, now: float, latency: float, limit: float, in_use: bool, ceiling: float = math.inf, load: float = 0.0
    ) -> float:
        """The limit after one answer; ``load`` is the limit the answered request was sent under."""
        self._answers += 1
        self._latency_sum += latency
        self._samples.append((load, latency))
        prev = self._prev
        if prev is not None:
            if load <= prev[0]:
                self._old[0] += load
                self._old[1] += latency
            else:
                self._new[0] += load
                self._new[1] += latency
                self._new[2] += 1
            if (
                self._new[2] >= max(EARLY_ANSWERS, EARLY_SHARE * prev[0])
                and self._old[1] > 0
                and self._new[0] / self._new[1] < self._old[0] / self._old[1]
            ):
                # Little's law by load: the answers to what was sent under more load came back at no higher
                # rate (load / latency) than those sent under the last level: what was added only queued.
                # End now, not a round trip later with four times as many sent, back at the last level.
                # (Short pages answer first, so an early sample of the new load reads high on a GPU with
                # room: this errs toward growing on.)
                return self._end(prev[0], prev[2])
        if in_use:
            limit = min(limit + SLOW_START_FACTOR - 1, SLOW_START_FACTOR * self.level, ceiling)
        if self._answers >= self.level:  # as many answers as the round's limit: a round trip
            rate = self._answers / max(now - self._round_start, 1e-6)
            mean = self._latency_sum / self._answers
            if prev is not None and rate < SLOW_START_GAIN * prev[1]:
                # Full: keep the level that was worth it (the last growth, if it still paid a little).
                return self._end(*((self.level, mean) if rate >= KEEP_GAIN * prev[1] else (prev[0], prev[2])))
            self._prev = (self.level, rate, mean)
            old = [(n, lat) for n, lat in self._samples if n <= self.level]
            self._old = [sum(n for n, _ in old), sum(lat for _, lat in old)]
            self._new = [0.0, 0.0, 0.0]
            self.level, self._round_start, self._answers, self._latency_sum = limit, now, 0, 0.0
        return limit

    def _end(self, level: float, reference: float) -> float:
        self.active = False
        self.result = (level, reference)
        self._samples = []
        return level


class _Verdict(enum.Enum):
    CLEAR = "clear"
    MILD = "mild"
    CONGESTED = "congested"


class LatencyLaw:
    """After slow start, without /metrics: one decision per round trip on its mean latency."""

    def __init__(self) -> None:
        self.reference: float | None = None  # the lowest round-trip mean seen
        self._floor_congested = 0
        self._streak = 0
        self._probing = True
        self._probe_steps = 0

    def seed(self, mean: float) -> None:
        if self.reference is None or mean < self.reference:
            self.reference = mean

    def decide(self, mean: float, limit: float, at_floor: bool, in_use: bool) -> tuple[float, str] | None:
        """The new limit and why, or None to keep it (a back-off is the caller's: it is held off)."""
        self.seed(mean)
        assert self.reference is not None
        ratio = mean / self.reference
        if ratio > LATENCY_TOLERANCE:
            self._streak, self._probing = 0, False
            if at_floor:
                # Congested even at the floor, for a while: the reference we knew is gone (another
                # model, other tenants, longer pages). Learn the new one.
                self._floor_congested += 1
                if self._floor_congested >= RELEARN_AFTER:
                    self.reference, self._floor_congested = mean, 0
            return limit * BACKOFF, "latency"
        self._floor_congested = 0
        if not in_use:
            return None
        clear = ratio <= LATENCY_CLEAR
        self._streak = self._streak + 1 if clear else 0
        if self._streak >= RESTART_AFTER and not self._probing:
            self._probing, self._probe_steps = True, 0  # room for a while: capacity appeared
        if self._probing and clear:
            step = max(1.0, min(2.0**self._probe_steps, MAX_GROWTH * limit))
            self._probe_steps += 1
        else:
            step = 1.0
        return limit + step, "grow"

    def congested(self) -> None:
        self._streak, self._probing = 0, False


def grid_after(t: float, interval: float, offset: float) -> float:
    """The first instant after ``t`` of the grid of ``interval`` on the wall clock (``offset`` = wall - t's clock)."""
    return (math.floor((t + offset) / interval) + 1) * interval - offset
