"""The circuit breaker's state machine, driven by a fake clock (no sleeping)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

import pytest

from mkg_pipeline.config import CircuitBreakerConfig
from mkg_pipeline.metrics.client import BREAKER_STATE_VALUES, REGISTRY
from mkg_pipeline.vllm.breaker import BreakerState, CircuitBreaker, breaker_for, reset_breakers
from mkg_pipeline.vllm.errors import CircuitOpenError

SERVER = "http://gpu-box:8000"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_breaker(
    clock: FakeClock,
    *,
    failure_threshold: int = 3,
    recovery_timeout_s: float = 30.0,
    success_threshold: int = 2,
    half_open_max_calls: int = 2,
    server: str = SERVER,
) -> CircuitBreaker:
    config = CircuitBreakerConfig(
        failure_threshold=failure_threshold,
        recovery_timeout_s=recovery_timeout_s,
        success_threshold=success_threshold,
        half_open_max_calls=half_open_max_calls,
    )
    return CircuitBreaker(server, config, clock=clock)


def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.acquire("t").record_failure()


def succeed(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.acquire("t").record_success()


def gauge(server: str = SERVER) -> float | None:
    return REGISTRY.get_sample_value("mineru_vllm_circuit_breaker_state", {"server": server})


def open_breaker(breaker: CircuitBreaker) -> None:
    fail(breaker, breaker.config.failure_threshold)
    assert breaker.state is BreakerState.OPEN


# -- CLOSED -> OPEN ------------------------------------------------------------------------


def test_starts_closed_with_gauge_zero(clock: FakeClock) -> None:
    breaker = make_breaker(clock)
    assert breaker.state is BreakerState.CLOSED
    assert gauge() == BREAKER_STATE_VALUES["closed"] == 0


def test_opens_after_exactly_threshold_consecutive_failures(clock: FakeClock) -> None:
    breaker = make_breaker(clock, failure_threshold=3)
    fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.consecutive_failures == 2
    fail(breaker)
    assert breaker.state is BreakerState.OPEN
    assert gauge() == 2


def test_a_success_in_between_resets_the_count(clock: FakeClock) -> None:
    breaker = make_breaker(clock, failure_threshold=3)
    fail(breaker, 2)
    succeed(breaker)
    assert breaker.consecutive_failures == 0
    fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker)
    assert breaker.state is BreakerState.OPEN


def test_released_permit_without_outcome_counts_neither_way(clock: FakeClock) -> None:
    breaker = make_breaker(clock, failure_threshold=2)
    fail(breaker)
    breaker.acquire("t").release()
    with breaker.acquire("t"):
        pass
    assert breaker.consecutive_failures == 1
    assert breaker.state is BreakerState.CLOSED


def test_only_the_first_outcome_of_a_permit_counts(clock: FakeClock) -> None:
    breaker = make_breaker(clock, failure_threshold=2)
    permit = breaker.acquire("t")
    permit.record_failure()
    permit.record_failure()
    permit.release()
    assert breaker.consecutive_failures == 1


# -- OPEN: fail fast ---------------------------------------------------------------------


def test_open_breaker_fails_fast_with_a_useful_message(clock: FakeClock) -> None:
    breaker = make_breaker(clock, recovery_timeout_s=30)
    open_breaker(breaker)
    clock.advance(10)
    with pytest.raises(CircuitOpenError) as info:
        breaker.acquire("doc=abc page=3")
    message = str(info.value)
    assert SERVER in message
    assert "doc=abc page=3" in message
    assert "state=open" in message
    assert "next probe in 20.0s" in message
    assert info.value.server == SERVER
    assert info.value.label == "doc=abc page=3"
    assert info.value.retryable is False
    assert breaker.seconds_until_probe() == pytest.approx(20.0)
    assert breaker.is_rejecting()


def test_open_breaker_acquire_takes_under_a_millisecond(clock: FakeClock) -> None:
    # The one timing assertion: failing fast must cost no I/O and no waiting.
    breaker = make_breaker(clock)
    open_breaker(breaker)
    calls = 1000
    started = time.perf_counter()
    for _ in range(calls):
        with contextlib.suppress(CircuitOpenError):
            breaker.acquire("doc=x page=1")
    per_call = (time.perf_counter() - started) / calls
    assert per_call < 0.001


def test_failures_reported_late_by_requests_sent_while_closed_do_not_extend_open(clock: FakeClock) -> None:
    breaker = make_breaker(clock, failure_threshold=2, recovery_timeout_s=30)
    in_flight = [breaker.acquire("t") for _ in range(4)]
    in_flight[0].record_failure()
    in_flight[1].record_failure()
    assert breaker.state is BreakerState.OPEN
    clock.advance(29)
    in_flight[2].record_failure()  # stale: taken before the breaker opened
    in_flight[3].record_success()  # stale too: must not close it
    assert breaker.state is BreakerState.OPEN
    clock.advance(1)
    breaker.acquire("probe")  # the recovery timer was not restarted by the stale failure
    assert breaker.state is BreakerState.HALF_OPEN


# -- OPEN -> HALF_OPEN -> CLOSED / OPEN -----------------------------------------------------


def test_half_open_after_recovery_timeout_checked_lazily(clock: FakeClock) -> None:
    breaker = make_breaker(clock, recovery_timeout_s=30)
    open_breaker(breaker)
    clock.advance(29.9)
    with pytest.raises(CircuitOpenError):
        breaker.acquire("t")
    clock.advance(0.1)
    assert breaker.state is BreakerState.OPEN  # nothing happens until someone asks
    permit = breaker.acquire("probe")
    assert permit.is_probe
    assert breaker.state is BreakerState.HALF_OPEN
    assert gauge() == 1


def test_half_open_admits_only_max_calls_probes(clock: FakeClock) -> None:
    breaker = make_breaker(clock, half_open_max_calls=2, success_threshold=3)
    open_breaker(breaker)
    clock.advance(30)
    first, second = breaker.acquire("p1"), breaker.acquire("p2")
    with pytest.raises(CircuitOpenError) as info:
        breaker.acquire("p3")
    assert "state=half_open" in str(info.value)
    assert "p3" in str(info.value)
    first.record_success()  # frees a slot
    third = breaker.acquire("p3")
    assert breaker.probes_in_flight == 2
    second.release()
    third.release()
    assert breaker.probes_in_flight == 0


def test_closes_after_success_threshold_successes(clock: FakeClock) -> None:
    breaker = make_breaker(clock, success_threshold=2, half_open_max_calls=1)
    open_breaker(breaker)
    clock.advance(30)
    succeed(breaker)
    assert breaker.state is BreakerState.HALF_OPEN
    succeed(breaker)
    assert breaker.state is BreakerState.CLOSED
    assert gauge() == 0
    assert breaker.consecutive_failures == 0
    # Closed again means the full threshold is needed to reopen.
    fail(breaker, breaker.config.failure_threshold - 1)
    assert breaker.state is BreakerState.CLOSED


def test_half_open_failure_reopens_and_restarts_the_timer(clock: FakeClock) -> None:
    breaker = make_breaker(clock, recovery_timeout_s=30, success_threshold=2)
    open_breaker(breaker)
    clock.advance(30)
    succeed(breaker)  # one good probe is not enough
    fail(breaker)
    assert breaker.state is BreakerState.OPEN
    assert gauge() == 2
    assert breaker.seconds_until_probe() == pytest.approx(30.0)
    clock.advance(29)
    with pytest.raises(CircuitOpenError):
        breaker.acquire("t")
    clock.advance(1)
    succeed(breaker, 2)
    assert breaker.state is BreakerState.CLOSED


def test_gauge_follows_every_transition(clock: FakeClock) -> None:
    breaker = make_breaker(clock, failure_threshold=1, success_threshold=1, server="http://gauge-test:1")
    seen = [gauge("http://gauge-test:1")]
    fail(breaker)
    seen.append(gauge("http://gauge-test:1"))
    clock.advance(30)
    permit = breaker.acquire("probe")
    seen.append(gauge("http://gauge-test:1"))
    permit.record_success()
    seen.append(gauge("http://gauge-test:1"))
    assert seen == [0, 2, 1, 0]


def test_transitions_are_logged(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    breaker = make_breaker(clock, failure_threshold=1, success_threshold=1)
    with caplog.at_level(logging.INFO, logger="mkg_pipeline.vllm.breaker"):
        fail(breaker)
        clock.advance(30)
        succeed(breaker)
    levels = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert levels[0][0] == logging.WARNING and "-> open" in levels[0][1] and SERVER in levels[0][1]
    assert any(level == logging.INFO and "-> half_open" in msg for level, msg in levels)
    assert any(level == logging.INFO and "-> closed" in msg for level, msg in levels)


# -- concurrency -----------------------------------------------------------------------------


async def test_concurrent_tasks_in_half_open_only_max_calls_get_through(clock: FakeClock) -> None:
    breaker = make_breaker(clock, half_open_max_calls=2, success_threshold=5)
    open_breaker(breaker)
    clock.advance(30)
    release = asyncio.Event()
    admitted: list[str] = []

    async def call(i: int) -> str:
        permit = breaker.acquire(f"task-{i}")
        try:
            admitted.append(f"task-{i}")
            await release.wait()
            permit.record_success()
            return "ok"
        finally:
            permit.release()

    tasks = [asyncio.create_task(call(i)) for i in range(20)]
    await asyncio.sleep(0)  # let every task reach acquire (or fail)
    await asyncio.sleep(0)
    assert len(admitted) == 2
    assert breaker.probes_in_flight == 2
    release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results.count("ok") == 2
    assert sum(isinstance(r, CircuitOpenError) for r in results) == 18
    assert breaker.probes_in_flight == 0


async def test_cancelled_probe_frees_its_slot(clock: FakeClock) -> None:
    breaker = make_breaker(clock, half_open_max_calls=1)
    open_breaker(breaker)
    clock.advance(30)
    started = asyncio.Event()

    async def probe() -> None:
        with breaker.acquire("slow probe"):
            started.set()
            await asyncio.Event().wait()  # never finishes on its own

    task = asyncio.create_task(probe())
    await started.wait()
    with pytest.raises(CircuitOpenError):
        breaker.acquire("other")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.probes_in_flight == 0
    assert breaker.state is BreakerState.HALF_OPEN  # cancellation is no verdict on the server
    breaker.acquire("next probe").record_success()


def test_shared_across_threads_and_event_loops(clock: FakeClock) -> None:
    # Dagster runs steps under separate asyncio.run calls, possibly in threads: one breaker sees them all.
    breaker = make_breaker(clock, failure_threshold=40)

    async def failures(n: int) -> None:
        for _ in range(n):
            breaker.acquire("t").record_failure()
            await asyncio.sleep(0)

    threads = [threading.Thread(target=asyncio.run, args=(failures(10),)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpenError):
        asyncio.run(failures(1))


# -- registry --------------------------------------------------------------------------------


def test_breaker_for_returns_one_breaker_per_server_url() -> None:
    reset_breakers()
    try:
        config = CircuitBreakerConfig(failure_threshold=7)
        first = breaker_for("http://a:8000", config)
        assert breaker_for("http://a:8000/") is first
        assert breaker_for("http://b:8000") is not first
        assert first.config.failure_threshold == 7
        reset_breakers()
        assert breaker_for("http://a:8000") is not first
    finally:
        reset_breakers()


# -- the cause that opened it (issue 9 row 8) ----------------------------------------------------


def test_open_breaker_remembers_the_error_type_that_opened_it(clock: FakeClock) -> None:
    breaker = make_breaker(clock, failure_threshold=2, recovery_timeout_s=30)
    breaker.acquire("t").record_failure("timeout")
    breaker.acquire("t").record_failure("timeout")
    assert breaker.open_cause == "timeout"
    with pytest.raises(CircuitOpenError) as info:
        breaker.acquire("page=1")
    assert info.value.first_cause == "timeout"
    # A failed probe re-opens it with the probe's cause; closing forgets the cause.
    clock.advance(30)
    breaker.acquire("probe").record_failure("connect")
    assert breaker.open_cause == "connect"
    with pytest.raises(CircuitOpenError) as info:
        breaker.acquire("page=2")
    assert info.value.first_cause == "connect"
    clock.advance(30)
    succeed(breaker, 2)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.open_cause is None
