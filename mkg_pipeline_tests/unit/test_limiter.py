"""The adaptive concurrency limiter, driven by a fake clock and scripted readings (no sleeping, no timing).

The last tests run the deterministic discrete-event simulation of ``limiter_sim``: several
processes' limiters against one simulated batching server.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from mkg_pipeline.config import VLLMServerConfig
from mkg_pipeline.vllm.limiter import (
    BACKOFF,
    HARD_BACKOFF,
    INITIAL_LIMIT,
    LATENCY_TOLERANCE,
    METRICS_RETRY_S,
    AdaptiveLimiter,
    ServerMetrics,
    Signal,
    Slot,
    limiter_for,
    parse_queue_metrics,
    reset_limiters,
)
from mkg_pipeline.vllm.metrics import REGISTRY
from mkg_pipeline_tests.unit.limiter_sim import FakeClock, SimClient, Simulation, run_fixed

SERVER = "http://gpu-box:8000"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


def make(
    clock: FakeClock, *, min_limit: int = 2, max_limit: int = 256, cold: bool = False, **kw: object
) -> AdaptiveLimiter:
    """A limiter past slow start at its floor (the steady state the decisions below are about), or ``cold``."""
    limiter = AdaptiveLimiter(SERVER, min_limit=min_limit, max_limit=max_limit, clock=clock, wall_clock=clock, **kw)  # type: ignore[arg-type]
    if not cold:
        limiter._end_slow_start("test")
        limiter._limit = float(min_limit if limiter.adaptive else max_limit)
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


def reading(limiter: AdaptiveLimiter, clock: FakeClock, waiting: float, running: float = 32) -> None:
    """One scrape of /metrics at its due time, and the decision applied at its common instant."""
    clock.now = max(clock.now, limiter.next_scrape_at)
    assert limiter.claim_scrape()
    clock.now += 0.01  # the GET /metrics
    limiter.observe_queue(waiting, running)
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


# -- growth --------------------------------------------------------------------------------


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


def test_slow_start_from_the_initial_window_doubles_every_other_round_trip(clock: FakeClock) -> None:
    limiter = make(clock, cold=True)
    assert limiter.limit == INITIAL_LIMIT == 32
    # The first round trip is held (it measures the rate at the initial window); then +1 per answer
    # within a growing round trip (at most doubling), and a round trip held to see what the doubling
    # did, as TCP Vegas does.
    assert round_trips(limiter, clock, [0.5] * 6) == [32, 63, 63, 125, 125, 249]


def burst_round_trips(limiter: AdaptiveLimiter, clock: FakeClock, latencies: list[float]) -> list[int]:
    """Like :func:`round_trips`, but as a real process sees a server that finishes a batch at once: the
    round trip's answers all arrive before the process gets to send the next requests."""
    limits = []
    slots = fill(limiter)
    for latency in latencies:
        clock.now += latency
        release_all(slots, latency=latency)
        slots = fill(limiter)
        limits.append(limiter.limit)
    release_all(slots, signal=Signal.NONE)
    return limits


def test_slow_start_grows_when_a_round_trip_answers_in_one_burst(clock: FakeClock) -> None:
    """In use means the process used its limit during the round trip, not that every slot is taken at the
    instant an answer arrives: answers that arrive together would otherwise stop the growth after the
    first one (seen in the saturation benchmark: 16 -> 19 in two seconds against a 32 x 0.5 s server)."""
    limiter = make(clock, cold=True)
    assert burst_round_trips(limiter, clock, [0.5] * 4) == [32, 63, 63, 125]


def test_slow_start_ends_on_the_first_sign_of_congestion(clock: FakeClock) -> None:
    limiter = make(clock, cold=True)
    (_, grown) = round_trips(limiter, clock, [0.5, 0.5])  # held, then doubled: 63
    # Without queue readings an answer slower than LATENCY_TOLERANCE x the fastest ends it; the
    # decisions on the latency of whole round trips go on from there, in small steps.
    (ended,) = round_trips(limiter, clock, [0.5 * LATENCY_TOLERANCE * 1.1])
    assert ended <= grown + 1  # no more doubling: at most the +1 of a decision
    assert round_trips(limiter, clock, [0.5] * 4)[-1] < 1.5 * ended  # no more doubling

    queued = make(clock, cold=True)
    busy_readings(queued, clock, [3], running=16)  # a queue at the server: over at once
    assert round_trips(queued, clock, [0.5] * 4)[-1] <= INITIAL_LIMIT + 1

    overloaded = make(clock, cold=True)
    slots = fill(overloaded)
    slots.pop().release(Signal.OVERLOAD)
    assert overloaded.limit == INITIAL_LIMIT // 2
    release_all(slots, latency=0.5)
    assert overloaded.limit == INITIAL_LIMIT // 2


def test_with_queue_readings_slow_start_tolerates_a_batch_growing_latency(clock: FakeClock) -> None:
    """A GPU's latency grows with its batch, and its throughput with it: with an empty queue in the readings
    that is no congestion. Slow start goes on while each doubling raises the rate of answers, and ends at
    the first that does not: the server was full, and the queue it built is at most its batch."""
    slots = 64

    def gpu_latency(in_flight: int) -> float:  # 0.1 s + 5 ms per running sequence; the rest queue
        return (0.1 + 0.005 * min(in_flight, slots)) * max(1.0, in_flight / slots)

    limiter = make(clock, cold=True)
    limits = []
    for _ in range(10):
        if clock.now >= limiter.next_scrape_at:
            reading(limiter, clock, waiting=0, running=min(limiter.limit, slots))  # the queue stays empty...
        limits += burst_round_trips(limiter, clock, [gpu_latency(limiter.limit)])
    final = limits[-1]
    # ... past the 1.7 x the first answers' latency that ended it before (at 41 in flight) ...
    assert final > 41
    # ... and ended by the rate test with the server all but full, its queue at most its batch.
    assert not limiter._slow_start and max(limits[-4:]) - min(limits[-4:]) <= 2  # readings' +1 steps from here
    best = slots / gpu_latency(slots)
    assert min(final, slots) / gpu_latency(final) >= 0.95 * best
    assert final - slots <= slots


def test_probing_after_slow_start_grows_faster_while_the_queue_stays_empty(clock: FakeClock) -> None:
    limiter = make(clock, min_limit=2)
    assert limiter.limit == 2
    limits = busy_readings(limiter, clock, [0] * 8)
    # +1, then +50 % at most per decision: a large server is found in a dozen readings.
    assert limits == [3, 4, 6, 10, 15, 22, 34, 51]
    assert gauge() == 51


def test_a_short_queue_still_grows_by_one(clock: FakeClock) -> None:
    limiter = make(clock, min_limit=10)
    # 5 waiting of 32 running is within the tolerance (0.2 x running): keep the batch fed, grow slowly.
    assert busy_readings(limiter, clock, [5, 5, 5]) == [11, 12, 13]


def test_no_growth_while_the_limit_is_not_used(clock: FakeClock) -> None:
    limiter = make(clock, min_limit=10)
    slot = limiter.try_acquire()  # 1 of 10 in use
    for _ in range(5):
        reading(limiter, clock, 0)
    assert limiter.limit == 10
    assert slot is not None
    slot.release()


# -- back-off on each congestion signal ----------------------------------------------------


def test_a_long_queue_backs_off_multiplicatively_once_per_round_trip(clock: FakeClock) -> None:
    limiter = make(clock, min_limit=2)
    limiter._limit = 100.0
    slots = fill(limiter)
    release_all(slots[:10], latency=3.0)  # a round trip of 3 s
    reading(limiter, clock, waiting=20, running=64)  # 20 > 0.2 x 64
    assert limiter.limit == int(100 * BACKOFF) == 90
    assert limiter.last_decision == "queue"
    reading(limiter, clock, waiting=20, running=64)  # 2 s later: within the round trip, no second cut
    assert limiter.limit == 90
    reading(limiter, clock, waiting=20, running=64)  # past it: the queue is still long
    assert limiter.limit == 81
    release_all(slots)


def test_the_hold_off_after_a_decrease_is_the_servers_latency_the_same_for_every_process(clock: FakeClock) -> None:
    """Two processes, one of which sees its answers late (a busy event loop), decide alike."""
    limiters = [make(clock), make(clock)]
    for limiter, own_latency in zip(limiters, (0.5, 9.0), strict=True):
        limiter._limit = 40.0
        release_all(fill(limiter), latency=own_latency)
    limits: list[list[int]] = [[], []]
    total, count = 0.0, 0
    for _ in range(6):  # the queue stays long; the server's requests take 3 s on average
        total, count = total + 30 * 3.0, count + 30
        for limiter, seen in zip(limiters, limits, strict=True):
            slots = fill(limiter)
            clock.now = max(clock.now, limiter.next_scrape_at)
            assert limiter.claim_scrape()
            limiter.observe_queue(20, 32, total, count)
            slots.pop().release()
            seen.append(limiter.limit)
            release_all(slots, signal=Signal.NONE)
        clock.now = max(lim.next_wakeup_at for lim in limiters)
        for limiter in limiters:
            limiter.tick()
    assert limits[0] == limits[1]
    # a cut, then one reading (2 s < 3 s) held off, then the next cut
    assert [lim.limit for lim in limiters] == [int(40 * BACKOFF**3)] * 2


def test_a_momentary_empty_queue_grows_by_one_a_lasting_one_probes_again(clock: FakeClock) -> None:
    limiter = make(clock)
    limiter._limit = 20.0
    busy_readings(limiter, clock, [20])  # congestion: probing is over
    assert limiter.limit == 18
    limits = busy_readings(limiter, clock, [0, 0, 0, 0, 0, 3])
    # +1, +1 (could be a blip), then the queue stays empty: +1, +2, +4; a queue again: +1
    assert limits == [19, 20, 21, 23, 27, 28]


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
    assert limiter.limit == int(64 * BACKOFF)
    assert limiter.last_decision == "latency"
    release_all(slots)


def test_with_queue_readings_a_latency_growing_with_the_batch_is_not_congestion(clock: FakeClock) -> None:
    """A GPU's latency grows with its batch while its throughput does too: only the queue says "too much"."""
    limiter = make(clock, deadline_s=300)
    limiter._limit = 8.0
    slots = fill(limiter)
    release_all(slots, latency=1.0)  # no-load level
    limits = []
    for latency in (2.0, 3.0, 4.0):  # four times the no-load latency, and still no queue
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


# -- without /metrics: latency alone -------------------------------------------------------


def latency_windows(limiter: AdaptiveLimiter, clock: FakeClock, latencies: list[float]) -> list[int]:
    """One busy round trip per latency: every slot answers after that long. The limit after each."""
    limits = []
    for latency in latencies:
        slots = fill(limiter)
        clock.now += latency
        release_all(slots, latency=latency)
        limits.append(limiter.limit)
    return limits


def test_without_metrics_latency_near_its_no_load_level_grows(clock: FakeClock) -> None:
    limiter = make(clock, min_limit=4)
    assert limiter.claim_scrape()
    limiter.metrics_unavailable()  # 404 on /metrics, or not a vLLM server
    assert not limiter.uses_server_metrics
    limits = latency_windows(limiter, clock, [1.0] * 12)
    assert limits[-1] > 4 * limits[0]
    assert limiter.no_load_latency_s == 1.0


def test_without_metrics_rising_latency_backs_off(clock: FakeClock) -> None:
    limiter = make(clock, min_limit=4)
    limiter.metrics_unavailable()
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


def test_slots_are_shared_by_event_loops_in_threads(clock: FakeClock) -> None:
    """Dagster runs steps under their own asyncio.run, possibly in threads: one limiter serves them all."""
    limiter = make(clock, min_limit=1, max_limit=1, adaptive=False)
    held = limiter.try_acquire()
    assert held is not None
    got = threading.Event()

    def other_loop() -> None:
        async def main() -> None:
            slot = await limiter.acquire()
            got.set()
            slot.release()

        asyncio.run(main())

    thread = threading.Thread(target=other_loop)
    thread.start()
    assert not got.wait(0.2)
    held.release()  # wakes the other loop's waiter through call_soon_threadsafe
    thread.join(10)
    assert got.is_set()
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
    assert parse_queue_metrics(text) == ServerMetrics(5.0, 124.0)
    assert parse_queue_metrics("vllm:num_requests_waiting 0\n") == ServerMetrics(0.0, 0.0)
    assert parse_queue_metrics("# nothing from vLLM here\nup 1\n") is None
    latency = (
        'vllm:e2e_request_latency_seconds_sum{engine="0"} 12.5\nvllm:e2e_request_latency_seconds_count{engine="0"} 5\n'
    )
    assert parse_queue_metrics(text + latency) == ServerMetrics(5.0, 124.0, 12.5, 5.0)


# -- simulation: several processes, one server ----------------------------------------------


def three_processes(sim: Simulation, stagger_s: float) -> list[SimClient]:
    return [
        sim.add_client(SimClient(sim, f"p{i}", limiter=sim.limiter(min_limit=2, max_limit=256), start_at=i * stagger_s))
        for i in range(3)
    ]


@pytest.mark.parametrize("metrics", [True, False], ids=["queue-readings", "latency-only"])
def test_three_processes_share_a_server_fairly_and_fill_it(metrics: bool) -> None:
    """S slots x L seconds; the processes start 20 s apart, each wanting all it can get."""
    slots, latency = 32, 0.5
    sim = Simulation(slots=slots, latency=latency, warmup_s=200)
    sim.metrics = metrics
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


def test_a_cold_process_fills_the_server_within_a_benchmark_run() -> None:
    """From its first request: 20 waves of a 32 x 0.5 s server (10 s) at >= 95 % of capacity, queue <= S.

    A run pod is a fresh process: its limiter starts cold every run, so the first seconds count.
    """
    sim = Simulation(slots=32, latency=0.5)
    sim.add_client(SimClient(sim, "cold", limiter=sim.limiter(min_limit=2, max_limit=256)))
    sim.run(until=10)
    assert sim.throughput() >= 0.95 * sim.capacity()
    assert sim.server.max_waiting <= 32


def test_a_cold_process_on_a_growing_latency_gpu_nears_the_best_fixed_concurrency() -> None:
    slots, l0, k = 64, 0.1, 0.005
    best = max(run_fixed(c, slots=slots, latency=l0, per_running=k, until=60, warmup_s=10) for c in (32, 64, 96, 128))
    sim = Simulation(slots=slots, latency=l0, per_running=k)
    sim.add_client(SimClient(sim, "cold", limiter=sim.limiter(min_limit=2, max_limit=256)))
    sim.run(until=20)
    assert sim.throughput() >= 0.9 * best
    assert sim.server.max_waiting <= slots
