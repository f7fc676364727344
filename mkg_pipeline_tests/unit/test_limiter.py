"""The adaptive concurrency limiter, driven by a fake clock and scripted readings (no sleeping, no timing).

The last tests run the deterministic discrete-event simulation of ``limiter_sim``: several
processes' limiters against one simulated server, a fast batching one or a GPU with continuous
batching, a KV-cache budget and 50-s pages.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

import pytest

from mkg_pipeline.config import VLLMServerConfig
from mkg_pipeline.metrics.client import REGISTRY
from mkg_pipeline.vllm.limiter import (
    FAIR_STEP,
    FAST_SCRAPE_INTERVAL_S,
    GROWTH,
    HARD_BACKOFF,
    INITIAL_LIMIT,
    LATENCY_TOLERANCE,
    METRICS_RETRY_S,
    PREEMPT_BACKOFF,
    QUEUE_TOLERANCE,
    AdaptiveLimiter,
    ServerMetrics,
    Signal,
    Slot,
    limiter_for,
    parse_queue_metrics,
    reset_limiters,
)
from mkg_pipeline_tests.unit.limiter_sim import FakeClock, GpuServer, SimClient, Simulation, run_fixed

SERVER = "http://gpu-box:8000"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


def make(
    clock: FakeClock, *, min_limit: int = 2, max_limit: int = 256, cold: bool = False, **kw: object
) -> AdaptiveLimiter:
    """A limiter at its floor (the steady state the decisions below start from), or ``cold`` (its initial window)."""
    limiter = AdaptiveLimiter(SERVER, min_limit=min_limit, max_limit=max_limit, clock=clock, wall_clock=clock, **kw)  # type: ignore[arg-type]
    if not cold and limiter.adaptive:
        limiter._limit = float(min_limit)
        limiter._law._burst = 0.0  # readings before these: nothing is on its way into the batch
    return limiter


def fill(limiter: AdaptiveLimiter) -> list[Slot]:
    """Take every free slot: the process wants more than the limit allows (the limit is in use)."""
    slots = []
    while (slot := limiter.try_acquire()) is not None:
        slots.append(slot)
    return slots


def release_all(slots: list[Slot], latency: float = 1.0, signal: Signal = Signal.OK) -> None:
    for slot in slots:
        slot.release(signal, latency)
    slots.clear()


def reading(limiter: AdaptiveLimiter, clock: FakeClock, waiting: float, running: float = 32, **metrics: float) -> None:
    """One scrape of /metrics at its due time, and the decision applied at its common instant."""
    clock.now = max(clock.now, limiter.next_scrape_at)
    assert limiter.claim_scrape()
    clock.now += 0.01  # the GET /metrics
    limiter.observe_metrics(ServerMetrics(waiting, running, **metrics))
    clock.now = max(clock.now, limiter.next_wakeup_at)
    limiter.tick()


def busy_readings(limiter: AdaptiveLimiter, clock: FakeClock, waitings: list[float], running: float = 32) -> list[int]:
    """Readings while the process keeps every slot busy; the limit after each."""
    limits = []
    slots: list[Slot] = []
    for waiting in waitings:
        slots += fill(limiter)
        reading(limiter, clock, waiting, running)
        limits.append(limiter.limit)
    release_all(slots)
    return limits


def gauge() -> float | None:
    return REGISTRY.get_sample_value("mineru_vllm_concurrency_limit", {"server": SERVER})


# -- with /metrics: one decision per reading -------------------------------------------------


def test_while_the_server_has_room_each_reading_grows_the_limit_by_half_and_reads_sooner(clock: FakeClock) -> None:
    """Nothing waits, so every request sent is running: x GROWTH per reading (plus the equal step), read every
    half second while it grows. A cold process fills an idle 256-slot server in five readings."""
    limiter = make(clock, cold=True)
    limits = []
    for _ in range(6):
        slots = fill(limiter)
        reading(limiter, clock, waiting=0, running=len(slots))
        limits.append(limiter.limit)
        assert limiter.last_decision == "grow"
        assert limiter.next_scrape_at - clock.now <= FAST_SCRAPE_INTERVAL_S
        release_all(slots, signal=Signal.NONE)
    assert limits[0] == int(INITIAL_LIMIT * GROWTH + FAIR_STEP) == 50
    assert limits == [50, 77, 117, 178, 256, 256]  # the ceiling (fractions are kept)
    assert gauge() == 256


def test_a_queue_aims_at_the_running_batch_plus_a_tenth(clock: FakeClock) -> None:
    limiter = make(clock)
    limiter._limit = 100.0
    slots = fill(limiter)
    reading(limiter, clock, waiting=50, running=100)  # all 150 at the server: 100 of them ours
    target = 100 * (1 + QUEUE_TOLERANCE)
    assert limiter.limit == int(100 * target / 150 + FAIR_STEP) == 75
    assert limiter.last_decision == "queue"
    assert limiter.next_scrape_at - clock.now > FAST_SCRAPE_INTERVAL_S  # steady state: the normal interval
    # Requests are never cancelled: the cut shows only as they finish. A reading before then sees the
    # same queue, and the limit stays where it was set (scaled from what is in flight, not from itself).
    reading(limiter, clock, waiting=50, running=100)
    assert limiter.limit == 75
    release_all(slots)


def test_a_short_queue_within_the_tolerance_still_grows_by_the_equal_step(clock: FakeClock) -> None:
    limiter = make(clock, min_limit=10)
    limiter._limit = 30.0
    # 2 waiting of 32 running: within a tenth of the batch, so the total may grow to 35.2 of which this
    # process (30 of the 34) takes its share, plus the equal step.
    assert busy_readings(limiter, clock, [2])[0] == int(30 * 35.2 / 34 + FAIR_STEP) == 33


def test_a_queue_no_longer_than_the_burst_just_sent_is_not_taken_for_a_full_server(clock: FakeClock) -> None:
    """vLLM takes in so many prompt tokens per step: a burst waits a few steps although slots are free."""
    limiter = make(clock, cold=True)
    slots = fill(limiter)
    reading(limiter, clock, waiting=32, running=0)  # the first reading: the initial window, still waiting
    assert (limiter.limit, limiter.last_decision) == (INITIAL_LIMIT, "admitting")
    assert limiter.next_scrape_at - clock.now <= FAST_SCRAPE_INTERVAL_S
    reading(limiter, clock, waiting=0, running=32)
    assert limiter.limit == 50
    slots += fill(limiter)
    # At most the 18 just sent: no sign of a full server. The 3 the scheduler took in (running rose from
    # 32 to 35) are sent again, so that its queue does not run dry before the next reading.
    reading(limiter, clock, waiting=15, running=35)
    assert (limiter.limit, limiter.last_decision) == (53, "admitting")
    slots += fill(limiter)
    reading(limiter, clock, waiting=10, running=40)  # shrinking: still being taken in (5 more resent)
    assert limiter.last_decision == "admitting"
    slots += fill(limiter)
    # The 5 resent have joined the queue and nothing was taken in: it stopped shrinking, a real queue.
    reading(limiter, clock, waiting=15, running=40)
    assert limiter.last_decision == "queue" and limiter.limit < 50
    release_all(slots)


def test_room_steps_straight_to_the_capacity_seen_and_no_further(clock: FakeClock) -> None:
    limiter = make(clock)
    limiter._limit = 150.0
    slots = fill(limiter)
    reading(limiter, clock, waiting=20, running=160)  # a queue: the server holds 160
    assert limiter.limit == int(150 * 176 / 180 + FAIR_STEP) == 148
    release_all(slots)
    slots = fill(limiter)
    # The other processes left: 148 run, nothing waits. Back to what the server held (plus a tenth), at once.
    reading(limiter, clock, waiting=0, running=148)
    assert limiter.last_decision == "grow"
    assert limiter.limit == int(limiter._limit) and 176 < limiter.limit <= 176 + FAIR_STEP + 1
    release_all(slots)
    slots = fill(limiter)
    reading(limiter, clock, waiting=0, running=len(slots))  # it holds more than it did: find it again
    assert limiter.limit > 1.4 * len(slots)
    release_all(slots)


def test_preemptions_cut_the_target_and_memory_then_allows_no_standing_queue(clock: FakeClock) -> None:
    limiter = make(clock)
    limiter._limit = 160.0
    slots = fill(limiter)
    reading(limiter, clock, waiting=0, running=160, kv_usage=0.8, preemptions=12)  # a counter's first value: history
    assert limiter.last_decision == "grow"
    slots += fill(limiter)
    in_flight = limiter.in_flight
    reading(limiter, clock, waiting=10, running=in_flight - 10, kv_usage=1.0, preemptions=16)  # 4 preempted
    assert limiter.last_decision == "preemption"
    assert limiter.limit == int(in_flight * (in_flight - 10) * PREEMPT_BACKOFF / in_flight)
    release_all(slots[limiter.limit :])
    slots = slots[: limiter.limit]
    # Memory is the limit now: a short queue is no longer tolerated, the cache is filled to 90 % only.
    reading(limiter, clock, waiting=3, running=limiter.limit - 3, kv_usage=0.95, preemptions=16)
    assert limiter.last_decision == "kv-full"
    assert limiter.limit < len(slots) - 3
    release_all(slots)


def test_kv_cache_near_full_allows_only_a_short_queue_and_its_room_bounds_growth(clock: FakeClock) -> None:
    limiter = make(clock)
    limiter._limit = 32.0
    slots = fill(limiter)
    # Full, nothing waiting, no preemption: what runs fits; a short queue (admitted only as blocks free)
    # replaces what finishes without a client round trip. No equal step on top.
    reading(limiter, clock, waiting=0, running=32, kv_usage=0.97)
    assert (limiter.limit, limiter.last_decision) == (int(32 * (1 + QUEUE_TOLERANCE)), "kv-full")
    slots += fill(limiter)
    reading(limiter, clock, waiting=0, running=35, kv_usage=0.8)  # room for 35 x 0.9 / 0.8 = 39
    assert limiter.limit == int(35 * 0.9 / 0.8 + FAIR_STEP)
    release_all(slots)
    # Once preemptions showed that memory is the limit, a full cache stops growth: no queue.
    limiter = make(clock)
    limiter._limit = 32.0
    limiter._law.memory_bound = True
    slots = fill(limiter)
    reading(limiter, clock, waiting=0, running=32, kv_usage=0.97)
    assert limiter.last_decision == "kv-full" and limiter.limit <= 32
    release_all(slots)


def test_no_growth_while_the_limit_is_not_used(clock: FakeClock) -> None:
    limiter = make(clock, min_limit=10)
    slot = limiter.try_acquire()  # 1 of 10 in use
    for _ in range(5):
        reading(limiter, clock, 0)
    assert limiter.limit == 10
    limiter._limit = 40.0  # a limit that is not used is kept (the process may be starting up) ...
    reading(limiter, clock, 0, running=1)
    assert limiter.limit == 40
    reading(limiter, clock, 20, running=64)  # ... until the server is over its target: then its share
    assert limiter.limit == 10
    assert slot is not None
    slot.release()


def test_shares_converge_whatever_the_start(clock: FakeClock) -> None:
    """Two processes read the same server: both scale by the same factor and add the same step."""
    a, b = make(clock), make(clock)
    a._limit, b._limit = 200.0, 10.0
    slots = {a: fill(a), b: fill(b)}
    gaps = []
    for _ in range(250):
        gaps.append(abs(a.limit - b.limit))
        total = a.in_flight + b.in_flight
        running, waiting = min(total, 160), max(0, total - 160)
        clock.now = max(a.next_scrape_at, b.next_scrape_at)
        for limiter in (a, b):
            assert limiter.claim_scrape()
        clock.now += 0.01
        for limiter in (a, b):
            limiter.observe_queue(waiting, running)
        clock.now = max(a.next_wakeup_at, b.next_wakeup_at)
        for limiter in (a, b):
            limiter.tick()
            # answers come and the process sends what its new limit allows
            held = slots[limiter]
            release_all(held[limiter.limit :])
            del held[limiter.limit :]
            held += fill(limiter)
    # The gap shrinks by T / (T + 2 x FAIR_STEP) per reading: geometrically, slowly with only two processes.
    assert gaps[50] < gaps[0] / 2 and gaps[150] < gaps[50] / 4
    assert abs(a.limit - b.limit) <= 3
    assert 160 <= a.limit + b.limit <= 160 * (1 + QUEUE_TOLERANCE) + 2 * FAIR_STEP + 2
    for held in slots.values():
        release_all(held)


@pytest.mark.parametrize("signal", [Signal.OVERLOAD, Signal.TIMEOUT], ids=["429-503", "timeout"])
def test_overload_answers_and_timeouts_halve_the_limit(clock: FakeClock, signal: Signal) -> None:
    limiter = make(clock)
    limiter._limit = 64.0
    slots = fill(limiter)
    slots.pop().release(signal)
    assert limiter.limit == int(64 * HARD_BACKOFF) == 32
    assert limiter.last_decision == signal.value
    slots.pop().release(signal)  # the same burst: at most one cut per round trip
    assert limiter.limit == 32
    release_all(slots)


def test_other_failures_say_nothing_about_load(clock: FakeClock) -> None:
    limiter = make(clock)
    limiter._limit = 64.0
    slots = fill(limiter)
    release_all(slots, signal=Signal.NONE)  # connection refused, 4xx, cancelled
    assert limiter.limit == 64
    assert limiter.in_flight == 0


def test_latency_near_the_deadline_backs_off_even_with_an_empty_queue(clock: FakeClock) -> None:
    limiter = make(clock, deadline_s=300)
    limiter._limit = 64.0
    slots = fill(limiter)
    release_all(slots, latency=200.0)  # > half of the 300 s deadline: pages are about to time out
    slots = fill(limiter)
    reading(limiter, clock, waiting=0, running=64)
    assert limiter.limit < 64
    assert limiter.last_decision == "latency"
    release_all(slots)


def test_a_latency_growing_with_the_batch_is_not_congestion(clock: FakeClock) -> None:
    """A GPU's latency grows with its batch while its throughput does too: only the queue says "too much"."""
    limiter = make(clock, deadline_s=300)
    limiter._limit = 8.0
    slots = fill(limiter)
    release_all(slots, latency=1.0)
    limits = []
    for latency in (2.0, 3.0, 4.0):  # four times the first answers' latency, and still no queue
        slots = fill(limiter)
        reading(limiter, clock, waiting=0, running=limiter.limit)
        release_all(slots, latency=latency)
        limits.append(limiter.limit)
    assert limits == sorted(limits) and limits[-1] > 8


# -- floor, ceiling, fixed -----------------------------------------------------------------


def test_floor_and_ceiling(clock: FakeClock) -> None:
    limiter = make(clock, min_limit=4, max_limit=12)
    assert max(busy_readings(limiter, clock, [0] * 10)) == 12
    slots = fill(limiter)
    for _ in range(10):
        slots.pop().release(Signal.TIMEOUT)
        clock.now += 100  # past every hold-off
        slots += fill(limiter)
    assert limiter.limit == 4
    release_all(slots)


def test_adaptive_false_is_a_fixed_limit_at_the_ceiling(clock: FakeClock) -> None:
    limiter = make(clock, min_limit=2, max_limit=24, adaptive=False)
    assert limiter.limit == 24
    assert limiter.claim_scrape() is False  # never scrapes
    slots = fill(limiter)
    assert len(slots) == 24
    release_all(slots, signal=Signal.OVERLOAD)
    limiter.observe_queue(1000, 24)
    clock.now += 10
    limiter.tick()
    assert limiter.limit == 24


def test_from_config_bounds() -> None:
    limiter = AdaptiveLimiter.from_config(SERVER, VLLMServerConfig(url=SERVER, min_in_flight=3, max_in_flight=40))
    assert (limiter.min_limit, limiter.max_limit, limiter.limit, limiter.adaptive) == (3, 40, INITIAL_LIMIT, True)
    small = AdaptiveLimiter.from_config(SERVER, VLLMServerConfig(url=SERVER, min_in_flight=1, max_in_flight=8))
    assert small.limit == 8  # the initial window within the bounds
    large_floor = AdaptiveLimiter.from_config(SERVER, VLLMServerConfig(url=SERVER, min_in_flight=48))
    assert large_floor.limit == 48
    fixed = AdaptiveLimiter.from_config(SERVER, VLLMServerConfig(url=SERVER, max_in_flight=40, adaptive=False))
    assert fixed.limit == 40


# -- without /metrics: answers steer ------------------------------------------------------


def latency_windows(limiter: AdaptiveLimiter, clock: FakeClock, latencies: list[float]) -> list[int]:
    """One busy round trip per latency: every slot answers after that long. The limit after each."""
    limits = []
    for latency in latencies:
        slots = fill(limiter)
        clock.now += latency
        release_all(slots, latency=latency)
        limits.append(limiter.limit)
    return limits


def latency_mode(limiter: AdaptiveLimiter, *, slow_start: bool = False) -> AdaptiveLimiter:
    """The first scrape finds no /metrics (404, or not vLLM): answers steer; past slow start unless asked."""
    assert limiter.claim_scrape()
    limiter.metrics_unavailable()
    assert not limiter.uses_server_metrics
    if not slow_start and limiter._start is not None:
        limiter._start.active = False
    return limiter


def round_trips(limiter: AdaptiveLimiter, clock: FakeClock, latencies: list[float]) -> list[int]:
    """Busy round trips of a process that always wants more: every request answers after ``latency`` and
    each answer is replaced at once (by as many requests as the limit then allows). The limit after each."""
    limits = []
    slots = fill(limiter)
    for latency in latencies:
        clock.now += latency
        answered, slots = slots, []
        for slot in answered:
            slot.release(Signal.OK, latency)
            slots += fill(limiter)
        limits.append(limiter.limit)
    release_all(slots, signal=Signal.NONE)
    return limits


def test_without_metrics_slow_start_quadruples_every_round_trip_while_the_rate_of_answers_rises(
    clock: FakeClock,
) -> None:
    limiter = latency_mode(make(clock, cold=True, max_limit=1024), slow_start=True)
    assert limiter.in_slow_start
    # A server with room for all: each round trip answers four times as many in the same time.
    assert round_trips(limiter, clock, [0.5] * 2) == [128, 512]
    # Full at 128: 512 in flight take four times as long, the rate of answers stopped rising. Slow
    # start ends, back at the level that paid, and its latency is the reference from here on.
    round_trips(limiter, clock, [2.0])
    assert not limiter.in_slow_start
    assert limiter.limit == 128
    assert limiter.no_load_latency_s == 0.5


def test_without_metrics_slow_start_ends_on_overload(clock: FakeClock) -> None:
    limiter = latency_mode(make(clock, cold=True), slow_start=True)
    slots = fill(limiter)
    slots.pop().release(Signal.OVERLOAD)
    assert limiter.limit == INITIAL_LIMIT // 2 and not limiter.in_slow_start
    release_all(slots, latency=0.5)
    assert limiter.limit <= INITIAL_LIMIT // 2 + 1


def test_without_metrics_latency_near_its_reference_grows(clock: FakeClock) -> None:
    limiter = latency_mode(make(clock, min_limit=4))
    limits = latency_windows(limiter, clock, [1.0] * 12)
    assert limits[-1] > 4 * limits[0]
    assert limiter.no_load_latency_s == 1.0


def test_without_metrics_rising_latency_backs_off(clock: FakeClock) -> None:
    limiter = latency_mode(make(clock, min_limit=4))
    latency_windows(limiter, clock, [1.0] * 6)
    # Decisions come every other round trip (answers sent under the old limit are not judged).
    limits = latency_windows(limiter, clock, [LATENCY_TOLERANCE * 1.5] * 16)
    assert limiter.last_decision == "latency"
    peak = max(limits)
    assert limits[limits.index(peak) :] == sorted(limits[limits.index(peak) :], reverse=True)
    assert limits[-1] <= 0.7 * peak


def test_scrapes_again_after_metrics_were_unavailable(clock: FakeClock) -> None:
    limiter = make(clock)
    assert limiter.claim_scrape()
    assert limiter.claim_scrape() is False  # one scrape at a time
    limiter.metrics_unavailable()
    assert limiter.next_scrape_at >= clock.now + METRICS_RETRY_S
    clock.now = limiter.next_scrape_at
    assert limiter.claim_scrape()
    limiter.observe_queue(0, 4)
    assert limiter.uses_server_metrics
    clock.now += 60  # readings stopped coming: stale, latency steers
    assert not limiter.uses_server_metrics


def test_readings_fall_on_a_shared_grid_and_act_half_an_interval_later() -> None:
    """Two processes with different monotonic clocks read at the same wall-clock instants and act together."""
    wall = FakeClock(5000.3)
    clocks = {"a": lambda: wall.now - 4990.0, "b": lambda: wall.now - 1234.5}
    limiters = {name: AdaptiveLimiter(SERVER, clock=c, wall_clock=wall) for name, c in clocks.items()}
    for limiter in limiters.values():
        assert limiter.claim_scrape()  # the first scrape comes at once
    wall.now += 0.05
    for limiter in limiters.values():
        limiter.observe_queue(0, 1)
    for name, limiter in limiters.items():
        offset = wall.now - clocks[name]()
        assert limiter.next_scrape_at + offset == pytest.approx(5002.0)  # the next even second of the wall clock
        # The reading belongs to the grid point 5000.0: its decision is applied at 5001.0.
        assert limiter.next_wakeup_at + offset == pytest.approx(5001.0)


# -- slots ---------------------------------------------------------------------------------


async def test_acquire_waits_in_order_and_wait_for_capacity_tracks_the_limit(clock: FakeClock) -> None:
    limiter = make(clock, min_limit=2, max_limit=2, adaptive=False)
    first, second = await limiter.acquire(), await limiter.acquire()
    order: list[str] = []

    async def take(name: str) -> Slot:
        slot = await limiter.acquire()
        order.append(name)
        return slot

    third, fourth = asyncio.create_task(take("third")), asyncio.create_task(take("fourth"))
    capacity = asyncio.create_task(limiter.wait_for_capacity())
    for _ in range(5):
        await asyncio.sleep(0)
    assert (limiter.in_flight, limiter.waiting) == (2, 2)
    assert not capacity.done()
    first.release()
    second.release()
    slots = [await third, await fourth]
    assert order == ["third", "fourth"]
    assert not capacity.done()  # in_flight + waiting == limit
    slots[0].release()
    await asyncio.wait_for(capacity, 5)
    slots[1].release()
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


async def test_a_cancelled_waiter_gives_its_place_back(clock: FakeClock) -> None:
    limiter = make(clock, min_limit=1, max_limit=1, adaptive=False)
    held = await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    assert limiter.waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert limiter.waiting == 0
    held.release()
    assert limiter.in_flight == 0
    (await asyncio.wait_for(limiter.acquire(), 5)).release()


def woken_in_another_thread(wait: Callable[[], Awaitable[object]], release: Callable[[], None]) -> bool:
    """Await ``wait`` under its own asyncio.run in a thread (as a Dagster step does), check it is blocked,
    call ``release`` here, and tell whether the other loop's wait then ended."""
    woken = threading.Event()

    def other_loop() -> None:
        async def main() -> None:
            await wait()
            woken.set()

        asyncio.run(main())

    thread = threading.Thread(target=other_loop)
    thread.start()
    assert not woken.wait(0.2)
    release()
    thread.join(10)
    return woken.is_set()


def test_slots_are_shared_by_event_loops_in_threads(clock: FakeClock) -> None:
    """Dagster runs steps under their own asyncio.run, possibly in threads: one limiter serves them all."""
    limiter = make(clock, min_limit=1, max_limit=1, adaptive=False)
    held = limiter.try_acquire()
    assert held is not None

    async def take_and_give_back() -> None:
        (await limiter.acquire()).release()

    # the release wakes the other loop's waiter through call_soon_threadsafe
    assert woken_in_another_thread(take_and_give_back, held.release)
    assert limiter.in_flight == 0


def test_registry_gives_one_limiter_per_server_url() -> None:
    config = VLLMServerConfig(url=SERVER, max_in_flight=64)
    first = limiter_for(SERVER, config)
    assert limiter_for(SERVER + "/", config) is first
    assert limiter_for("http://other:8000", config) is not first
    reset_limiters()
    assert limiter_for(SERVER, config) is not first


def test_parse_queue_metrics_sums_engines_and_ignores_the_rest() -> None:
    text = """# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="qwen"} 3.0
vllm:num_requests_waiting{engine="1",model_name="qwen"} 2.0
vllm:num_requests_running{engine="0",model_name="qwen"} 64.0
vllm:num_requests_running{engine="1",model_name="qwen"} 60.0
vllm:num_requests_waiting_by_reason{reason="capacity"} 99.0
vllm:num_preemptions_total{engine="0"} 7.0
"""
    assert parse_queue_metrics(text) == ServerMetrics(5.0, 124.0, preemptions=7.0)
    assert parse_queue_metrics("vllm:num_requests_waiting 0\n") == ServerMetrics(0.0, 0.0)
    assert parse_queue_metrics("# nothing from vLLM here\nup 1\n") is None
    latency = (
        'vllm:e2e_request_latency_seconds_sum{engine="0"} 12.5\nvllm:e2e_request_latency_seconds_count{engine="0"} 5\n'
    )
    assert parse_queue_metrics(text + latency) == ServerMetrics(5.0, 124.0, 12.5, 5.0, preemptions=7.0)
    kv = 'vllm:kv_cache_usage_perc{engine="0"} 0.5\nvllm:kv_cache_usage_perc{engine="1"} 0.75\n'
    assert parse_queue_metrics(text + kv) == ServerMetrics(5.0, 124.0, kv_usage=0.75, preemptions=7.0)  # the fullest
    old_name = "vllm:gpu_cache_usage_perc 0.25\n"  # vLLM before V1
    assert parse_queue_metrics(text + old_name) == ServerMetrics(5.0, 124.0, kv_usage=0.25, preemptions=7.0)


async def test_wait_for_capacity_resolves_when_a_reading_raises_the_limit(clock: FakeClock) -> None:
    limiter = make(clock, min_limit=2)
    held = fill(limiter)
    waiters = [asyncio.create_task(limiter.wait_for_capacity()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    reading(limiter, clock, waiting=0, running=2)  # room: 2 x 1.5 + 2 = 5, three more may start
    await asyncio.wait_for(asyncio.gather(*waiters), 5)
    release_all(held)


def test_wait_for_capacity_in_another_threads_loop_is_woken_by_a_release(clock: FakeClock) -> None:
    """The primitive a stage awaits: resolved through call_soon_threadsafe, whichever loop releases."""
    limiter = make(clock, min_limit=1, max_limit=1, adaptive=False)
    held = limiter.try_acquire()
    assert held is not None
    assert woken_in_another_thread(limiter.wait_for_capacity, held.release)


async def test_a_woken_capacity_waiter_that_is_cancelled_passes_its_turn_on(clock: FakeClock) -> None:
    limiter = make(clock, min_limit=1, max_limit=1, adaptive=False)
    held = await limiter.acquire()
    first = asyncio.create_task(limiter.wait_for_capacity())
    second = asyncio.create_task(limiter.wait_for_capacity())
    await asyncio.sleep(0)
    held.release()  # room for one: the first is woken ...
    first.cancel()  # ... but gives up before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 5)
    assert limiter.has_room()


@pytest.mark.parametrize("wait", ["acquire", "wait_for_capacity"])
async def test_a_waiter_dropped_by_a_dispatch_after_its_cancel_ends_cleanly(clock: FakeClock, wait: str) -> None:
    """The stage cancels its capacity wait whenever a page event wins the race: a slot released between
    the cancel and the waiter's own clean-up drops it from the queue first, and the clean-up must not fail."""
    limiter = make(clock, min_limit=1, max_limit=1, adaptive=False)
    held = await limiter.acquire()
    waiter = asyncio.create_task(getattr(limiter, wait)())
    await asyncio.sleep(0)
    waiter.cancel()  # its future is cancelled at once ...
    held.release()  # ... and this dispatch drops it before the task runs its clean-up
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert limiter.in_flight == 0 and limiter.has_room()


# -- simulation: several processes, one server ----------------------------------------------


def three_processes(sim: Simulation, stagger_s: float) -> list[SimClient]:
    return [
        sim.add_client(SimClient(sim, f"p{i}", limiter=sim.limiter(min_limit=2, max_limit=256), start_at=i * stagger_s))
        for i in range(3)
    ]


@pytest.mark.parametrize("kv_as_slots", [False, True], ids=["no-kv", "kv-as-slots"])
def test_three_processes_share_a_fast_server_fairly_and_fill_it(kv_as_slots: bool) -> None:
    """S slots x L seconds; the processes start 20 s apart, each wanting all it can get."""
    slots = 32
    sim = Simulation(slots=slots, latency=0.5, warmup_s=200)
    sim.kv_as_slots = kv_as_slots
    clients = three_processes(sim, stagger_s=20)
    sim.run(until=500)
    total = sim.throughput()
    assert total >= 0.97 * sim.capacity()
    limits = [sim.mean_limit(c) for c in clients]
    assert slots * 0.9 <= sum(limits) <= slots * 1.35, limits  # capacity plus a short queue
    fair_share = total / 3
    for client in clients:
        assert client.completed_after_warmup / sim.measured_s >= 0.8 * fair_share, (client.name, limits)
    assert sim.server.max_waiting_after_warmup <= slots
    # A process that joins cold sends its initial window before its first reading: on this small server
    # that is a transient queue on top of the standing one, never a doubling of it.
    assert sim.server.max_waiting <= slots + INITIAL_LIMIT


def test_without_metrics_three_processes_fill_a_fast_server() -> None:
    """Latency alone cannot tell another process's queue from a GPU's larger batch (both raise the latency
    as this process grows): shares are not guaranteed without /metrics, the throughput and the ceiling are."""
    sim = Simulation(slots=32, latency=0.5, warmup_s=200)
    sim.metrics = False
    clients = three_processes(sim, stagger_s=20)
    sim.run(until=500)
    assert sim.throughput() >= 0.97 * sim.capacity()
    assert all(not c.limiter.uses_server_metrics for c in clients if c.limiter is not None)
    assert sim.server.max_waiting <= 3 * 256


def test_growing_latency_gpu_within_ten_percent_of_the_best_fixed_concurrency() -> None:
    """Latency L0 + k x running: throughput rises with the batch up to S, then only the queue grows."""
    slots, l0, k = 64, 0.25, 0.01
    run = {"slots": slots, "latency": l0, "per_running": k}
    best = max(run_fixed(c, **run, until=200, warmup_s=50) for c in (8, 16, 32, 48, 64, 80, 96, 128))
    sim = Simulation(**run, warmup_s=100)
    (client,) = [sim.add_client(SimClient(sim, "adaptive", limiter=sim.limiter(min_limit=2, max_limit=256)))]
    sim.run(until=300)
    assert sim.throughput() >= 0.9 * best
    assert sim.server.max_waiting <= slots
    assert client.limiter is not None and client.limiter.uses_server_metrics


@pytest.mark.parametrize("kv_as_slots", [False, True], ids=["no-kv", "kv-as-slots"])
def test_a_cold_process_fills_the_server_within_a_benchmark_run(kv_as_slots: bool) -> None:
    """From its first request: 20 waves of a 32 x 0.5 s server (10 s) at >= 95 % of capacity, queue <= S.

    A run pod is a fresh process: its limiter starts cold every run, so the first seconds count. The
    local server reports full slots as a full KV cache: that must not keep the limiter below them.
    """
    sim = Simulation(slots=32, latency=0.5)
    sim.kv_as_slots = kv_as_slots
    sim.add_client(SimClient(sim, "cold", limiter=sim.limiter(min_limit=2, max_limit=256)))
    sim.run(until=10)
    assert sim.throughput() >= 0.95 * sim.capacity()
    assert sim.server.max_waiting <= 32


def test_a_server_reporting_full_slots_as_a_full_cache_still_gets_a_standing_queue() -> None:
    """The local server and the benchmarks' fixed modes once read KV 1.0 at 32 of 32 slots, and the law
    held the limit at exactly 32: each freed slot then idled for the client's own round trip (encoding and
    sending the next page, a tenth of the latency here). A full cache with nothing waiting and no preemption
    is not memory as the limit: vLLM admits a waiting request only when blocks free, so a short queue there
    costs nothing until running sequences outgrow the cache, which preemptions then show."""
    sim = Simulation(slots=32, latency=0.5, warmup_s=2)
    sim.kv_as_slots = True
    sim.add_client(SimClient(sim, "p", limiter=sim.limiter(min_limit=2, max_limit=256), send_delay_s=0.05))
    sim.run(until=10)
    assert sim.throughput() >= 0.97 * sim.capacity()  # (held at 32: 0.94)
    # (Held at 32, a reading that fell between two synchronised waves saw an empty server and let it grow
    # a burst: 50 waiting.)
    assert sim.server.max_waiting <= 32


def test_a_cold_process_on_a_growing_latency_gpu_nears_the_best_fixed_concurrency() -> None:
    slots, l0, k = 64, 0.1, 0.005
    best = max(run_fixed(c, slots=slots, latency=l0, per_running=k, until=60, warmup_s=10) for c in (32, 64, 96, 128))
    sim = Simulation(slots=slots, latency=l0, per_running=k)
    sim.add_client(SimClient(sim, "cold", limiter=sim.limiter(min_limit=2, max_limit=256)))
    sim.run(until=20)
    assert sim.throughput() >= 0.9 * best
    assert sim.server.max_waiting <= slots


# -- simulation: a GPU (continuous batching, 50-s pages, a KV cache) -------------------------


def gpu_pods(sim: Simulation, count: int, stagger_s: float) -> list[SimClient]:
    return [
        sim.add_client(
            SimClient(sim, f"pod{i}", limiter=sim.limiter(min_limit=2, max_limit=256), start_at=i * stagger_s)
        )
        for i in range(count)
    ]


def test_a_cold_pod_fills_an_idle_gpu_within_seconds_whatever_the_latency() -> None:
    """256 slots, ~10 s for a page alone and ~57 s in a full batch: the running batch reaches 0.9 of its
    maximum within 10 s of the first request (readings, not answers, clock the growth)."""
    sim = Simulation.gpu()
    (pod,) = gpu_pods(sim, 1, 0)
    sim.run(until=300)
    server = sim.server
    assert isinstance(server, GpuServer) and server.first_request_at is not None
    assert server.nine_tenths_at is not None and server.nine_tenths_at - server.first_request_at <= 10
    assert server.max_waiting <= server.slots
    assert server.preemptions == 0 and pod.timeouts == 0
    assert sim.throughput() >= 0.9 * sim.capacity()  # the first 57 s included


def test_a_cold_pod_fills_a_gpu_that_takes_in_a_burst_a_few_prompts_per_step() -> None:
    """vLLM's scheduler takes in max_num_batched_tokens of prompts per step (8,192 here, ~5 pages): every
    growth shows as a queue for a few steps, which must not read as a full server."""
    sim = Simulation.gpu(batched_tokens=8192)
    gpu_pods(sim, 1, 0)
    sim.run(until=60)
    server = sim.server
    assert isinstance(server, GpuServer) and server.first_request_at is not None
    assert server.nine_tenths_at is not None and server.nine_tenths_at - server.first_request_at <= 10


def test_without_metrics_a_cold_pod_fills_an_idle_gpu_within_three_round_trips() -> None:
    """Answers clock it: the limit quadruples per round trip (+3 per answer) while the rate of answers
    rises, 32 -> 128 -> 256; the round trips lengthen as the batch grows (about 17 s at 32, 34 s at 128).
    Doubling took three of them (76 s, 7 round trips of a page alone); now within two (36 s)."""
    sim = Simulation.gpu()
    sim.metrics = False
    (pod,) = gpu_pods(sim, 1, 0)
    sim.run(until=600)
    server = sim.server
    assert isinstance(server, GpuServer)

    def round_trip(batch: int) -> float:  # mean page latency at this batch
        return sum(server.output_tokens) / 2 * (server.step_base_s + server.step_per_seq_s * batch)

    assert server.nine_tenths_at is not None
    assert server.nine_tenths_at <= round_trip(32) + round_trip(128)
    assert server.nine_tenths_at <= 4 * round_trip(1)  # about 3.3 round trips of one page alone
    assert pod.limiter is not None and not pod.limiter.in_slow_start and pod.limiter.limit >= 0.9 * server.slots
    assert sim.throughput() >= 0.85 * sim.capacity()  # the round trips of growth included
    assert server.max_waiting <= server.slots and server.preemptions == 0


def test_without_metrics_a_cold_pod_fills_a_50_s_server_within_two_round_trips() -> None:
    """256 slots of 50 s each, no /metrics: 32 -> 128 at the first answers, 256 at the second."""
    sim = Simulation(slots=256, latency=50)
    sim.metrics = False
    (pod,) = [sim.add_client(SimClient(sim, "cold", limiter=sim.limiter(min_limit=2, max_limit=256)))]
    server = sim.server
    running: list[int] = []
    sim.at(101, lambda: running.append(server.running))  # just after the second round trip
    sim.run(until=300)
    assert running[0] >= 0.9 * server.slots  # (doubling: 128)
    assert server.max_waiting == 0 and pod.timeouts == 0


def test_without_metrics_a_cold_pod_does_not_overrun_a_small_slow_server() -> None:
    """8 slots of 10 s: the initial window already queues 24; the first round's answers come no faster
    than its slots allow, and the first answers to what the second round sent under more load come back
    at no higher load / latency: slow start ends there, back at the first level, without waiting for the
    round's end (growing four-fold until then sent 256 and 103 requests timed out draining).
    What it sent meanwhile drains without a timeout."""
    sim = Simulation(slots=8, latency=10, warmup_s=400)
    sim.metrics = False
    (pod,) = [sim.add_client(SimClient(sim, "cold", limiter=sim.limiter(min_limit=2, max_limit=256)))]
    sim.run(until=1000)
    assert pod.limiter is not None and not pod.limiter.in_slow_start
    assert pod.limiter.limit <= 5 * sim.server.slots
    assert pod.timeouts == 0
    assert sim.server.max_waiting <= 160  # (doubling: 119)
    assert sim.throughput() >= 0.95 * sim.capacity()


def test_eight_pods_joining_20s_apart_share_a_gpu_fairly_and_keep_it_full() -> None:
    sim = Simulation.gpu(warmup_s=140)  # the last pod starts at 140 s
    pods = gpu_pods(sim, 8, 20)
    sim.run(until=800)
    server = sim.server
    total = sim.throughput()
    assert total >= 0.95 * sim.capacity()
    for pod in pods:
        assert pod.completed_after_warmup / sim.measured_s >= 0.8 * total / 8, pod.name
        assert pod.timeouts == 0
    assert server.max_waiting <= server.slots
    assert server.preemptions == 0


def test_eight_pods_on_a_kv_bound_gpu_keep_preemptions_near_zero() -> None:
    """A cache for ~130 sequences of 256 slots: memory, not slots, is the limit. Overfilling it preempts
    (and recomputes) the newest sequences; the limiters aim at a cache 90 % full with no standing queue."""
    kv = {"kv_budget_tokens": 300_000}
    best = 0.0
    for concurrency in (112, 120, 128, 136, 144):
        fixed = Simulation.gpu(warmup_s=140, **kv)
        fixed.add_client(SimClient(fixed, "fixed", fixed=concurrency))
        fixed.run(until=800)
        best = max(best, fixed.throughput())
    sim = Simulation.gpu(warmup_s=140, **kv)
    pods = gpu_pods(sim, 8, 20)
    server = sim.server
    assert isinstance(server, GpuServer)
    before: list[int] = []
    sim.at(140, lambda: before.append(server.preemptions))
    sim.run(until=800)
    total = sim.throughput()
    assert total >= 0.95 * best
    done = sum(pod.completed_after_warmup for pod in pods)
    assert server.preemptions - before[0] <= 0.01 * done  # once all run
    for pod in pods:
        assert pod.completed_after_warmup / sim.measured_s >= 0.8 * total / 8, pod.name
    assert server.max_waiting <= server.slots


def test_eight_pods_on_a_kv_bound_gpu_converge_to_equal_shares() -> None:
    """Once memory is the limit each limit is set from the KV target; without an equal step there, the
    shares the pods had when memory became the limit stayed (late pods, joining with their initial window,
    kept about 1.6 x the early ones' limits). A small equal step per decision (its total a small overshoot
    of the cache's 90 % target) makes them converge, as in AIMD, and a late pod joining a server that
    preempted with a full cache steers as the others do."""
    sim = Simulation.gpu(warmup_s=140, kv_budget_tokens=300_000)
    pods = gpu_pods(sim, 8, 20)
    server = sim.server
    assert isinstance(server, GpuServer)
    before: list[int] = []
    sim.at(140, lambda: before.append(server.preemptions))
    sim.run(until=400)
    total = sim.throughput()
    limits = [sim.mean_limit(pod) for pod in pods]
    assert max(limits) <= 1.3 * min(limits), limits  # (before: 12.7 .. 20.8)
    for pod in pods:
        assert pod.completed_after_warmup / sim.measured_s >= 0.85 * total / 8, (pod.name, limits)  # (before: 0.79)
    assert server.preemptions - before[0] <= 0.01 * sum(pod.completed_after_warmup for pod in pods)


def test_a_floor_above_the_ceiling_is_a_configuration_error() -> None:
    from mkg_pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config(environ={"MKG_VLLM__MIN_IN_FLIGHT": "64", "MKG_VLLM__MAX_IN_FLIGHT": "32"})
    message = str(info.value)
    assert "vllm.min_in_flight = '64' (from env MKG_VLLM__MIN_IN_FLIGHT)" in message
    assert "must be <= vllm.max_in_flight (32)" in message


def test_the_floor_is_published_for_the_at_floor_alert_only_when_adaptive() -> None:
    AdaptiveLimiter("http://floor-test:1", min_limit=3, max_limit=9)
    AdaptiveLimiter("http://fixed-test:1", min_limit=3, max_limit=9, adaptive=False)
    assert REGISTRY.get_sample_value("mineru_vllm_concurrency_floor", {"server": "http://floor-test:1"}) == 3
    assert REGISTRY.get_sample_value("mineru_vllm_concurrency_floor", {"server": "http://fixed-test:1"}) is None
    assert REGISTRY.get_sample_value("mineru_vllm_concurrency_limit", {"server": "http://fixed-test:1"}) == 9
