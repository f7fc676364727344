"""The batch lease (issue 9 row 2) on real S3 conditional writes (moto server) and on MemoryStorage."""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from mkg_pipeline.config import StorageConfig
from mkg_pipeline.stages.lease import BatchLease, LeaseHeld, LeaseLost, LeaseRecord
from mkg_pipeline.storage import MemoryStorage, Storage

pytestmark = pytest.mark.integration


class FakeClock:
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(params=["moto", "memory"])
def any_storage(request: pytest.FixtureRequest) -> Iterator[Storage]:
    if request.param == "memory":
        yield MemoryStorage()
    else:
        yield request.getfixturevalue("storage")


def _lease(storage: Storage, run_id: str, clock: FakeClock, *, batch: str = "b1", **kwargs) -> BatchLease:
    kwargs.setdefault("ttl_s", 10.0)
    return BatchLease(storage, batch, run_id, clock=clock, sleep=clock.sleep, renew=False, owner=run_id, **kwargs)


def _holder(storage: Storage, batch: str = "b1") -> LeaseRecord:
    return LeaseRecord.from_json(storage.get_json(storage.lease_key(batch)))


def _contend(storage: Storage, batch: str, run_id: str, barrier: threading.Barrier, outcomes: dict) -> None:
    lease = BatchLease(storage, batch, run_id, ttl_s=60, wait_s=0, renew=False)
    barrier.wait()
    try:
        lease.acquire()
        outcomes[run_id] = "acquired"
    except LeaseHeld as exc:
        outcomes[run_id] = exc


def test_exactly_one_of_two_concurrent_runs_acquires(any_storage: Storage) -> None:
    for round_ in range(8):
        batch = f"b-{round_}"
        barrier = threading.Barrier(2)
        outcomes: dict[str, object] = {}
        threads = [
            threading.Thread(target=_contend, args=(any_storage, batch, f"run-{i}", barrier, outcomes))
            for i in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        winners = [r for r, o in outcomes.items() if o == "acquired"]
        (loser,) = [o for o in outcomes.values() if isinstance(o, LeaseHeld)]
        assert len(winners) == 1
        assert loser.holder.run_id == winners[0] == _holder(any_storage, batch).run_id
        assert f"run {winners[0]}" in str(loser)


def test_a_second_run_gives_up_with_a_message_naming_the_holder(any_storage: Storage) -> None:
    clock = FakeClock()
    first = _lease(any_storage, "run-A", clock)
    first.acquire()
    second = _lease(any_storage, "run-B", clock, wait_s=3)
    with pytest.raises(LeaseHeld) as caught:
        second.acquire()
    message = str(caught.value)
    assert "batch b1 is being processed by run run-A" in message
    assert "This run stops after waiting 3s without touching the batch" in message
    assert clock.now >= 1_800_000_003.0  # it did wait, bounded
    assert _holder(any_storage).run_id == "run-A"


def test_a_waiting_run_gets_the_batch_once_it_is_released(any_storage: Storage) -> None:
    holder = BatchLease(any_storage, "b1", "run-A", ttl_s=60, renew=False)
    holder.acquire()
    released = threading.Timer(0.5, holder.release)
    released.start()
    waiter = BatchLease(any_storage, "b1", "run-B", ttl_s=60, wait_s=60, renew=False)
    waiter.acquire()  # returns once run-A released, long before its lease would expire
    released.join()
    assert _holder(any_storage).run_id == "run-B"
    waiter.release()
    record = _holder(any_storage)
    assert record.run_id == "run-B" and record.released_at is not None


def test_an_expired_lease_is_taken_over_and_its_old_holder_learns_it(any_storage: Storage) -> None:
    clock = FakeClock()
    stalled = _lease(any_storage, "run-A", clock)
    stalled.acquire()
    clock.now += 5
    with pytest.raises(LeaseHeld):
        _lease(any_storage, "run-B", clock).acquire()

    clock.now += 6  # past run-A's expiry: it stopped renewing (killed, or stalled for longer than the TTL)
    taker = _lease(any_storage, "run-B", clock)
    taker.acquire()
    assert _holder(any_storage).run_id == "run-B"

    assert stalled.renew() is False
    with pytest.raises(LeaseLost, match="no longer holds the lease"):
        stalled.check()
    stalled.release()  # must not clobber run-B's lease
    assert _holder(any_storage).run_id == "run-B"
    assert _holder(any_storage).released_at is None
    taker.check()


def test_check_asks_s3_once_the_holders_own_lease_has_expired(any_storage: Storage) -> None:
    """A holder frozen past its TTL learns of a takeover at its next check, before its renewal thread
    runs; with nobody else around it renews and goes on. While valid, check makes no request."""
    clock = FakeClock()
    frozen = _lease(any_storage, "run-A", clock)
    frozen.acquire()
    clock.now += 5
    frozen.check()  # valid: no request, nothing changes
    assert _holder(any_storage).renewed_at is None

    clock.now += 6  # past its expiry, nobody took over: check renews it
    frozen.check()
    assert _holder(any_storage).run_id == "run-A" and _holder(any_storage).renewed_at is not None

    clock.now += 11  # past the renewed expiry, and this time run-B takes over
    _lease(any_storage, "run-B", clock).acquire()
    with pytest.raises(LeaseLost, match="no longer holds the lease"):
        frozen.check()
    assert _holder(any_storage).run_id == "run-B"


def test_renewal_keeps_the_lease_alive(any_storage: Storage) -> None:
    clock = FakeClock()
    holder = _lease(any_storage, "run-A", clock)
    holder.acquire()
    clock.now += 8
    assert holder.renew()
    clock.now += 3  # past the first expiry, within the renewed one
    with pytest.raises(LeaseHeld):
        _lease(any_storage, "run-B", clock).acquire()
    assert _holder(any_storage).renewed_at is not None
    clock.now += 8
    _lease(any_storage, "run-B", clock).acquire()


def test_a_released_lease_is_free_at_once_and_the_same_run_may_take_its_own_back(any_storage: Storage) -> None:
    clock = FakeClock()
    first = _lease(any_storage, "run-A", clock)
    with first:
        again = _lease(any_storage, "run-A", clock)  # the same run (a retried step) is not locked out
        again.acquire()
    assert _holder(any_storage).released_at is not None
    second = _lease(any_storage, "run-B", clock)
    second.acquire()
    assert _holder(any_storage).run_id == "run-B"


class RenewalTimer:
    """The renewal thread's waits, on the fake clock: a wait ends when the test advances the clock past it."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.waits = 0  # waits begun: one more each time the thread has renewed and waits again
        self._changed = threading.Condition()

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        deadline = self.clock() + seconds
        with self._changed:
            self.waits += 1
            self._changed.notify_all()
            while self.clock() < deadline and not stop.is_set():
                self._changed.wait(0.05)  # woken by advance(); the timeout only notices release()'s stop
        return stop.is_set()

    def advance(self, seconds: float) -> None:
        """Move the clock on and wait until the thread has renewed (if due) and waits again."""
        with self._changed:
            assert self._changed.wait_for(lambda: self.waits >= 1, timeout=30), "the renewal thread never started"
            before = self.waits
            self.clock.now += seconds
            self._changed.notify_all()
            assert self._changed.wait_for(lambda: self.waits > before, timeout=30), "no renewal after the interval"


def test_background_renewal_outlives_the_ttl(any_storage: Storage) -> None:
    clock = FakeClock()
    timer = RenewalTimer(clock)
    lease = BatchLease(any_storage, "b1", "run-A", ttl_s=3, wait_s=0, clock=clock, renew_wait=timer.wait)
    with lease:
        for _ in range(4):  # renewed every second (ttl / 3) in the background
            timer.advance(1.0)
        clock.now += 0.5  # 4.5 s after it was taken: past the first expiry, within the renewed one
        with pytest.raises(LeaseHeld):
            BatchLease(any_storage, "b1", "run-B", ttl_s=3, wait_s=0, clock=clock, renew=False).acquire()
        lease.check()
        assert _holder(any_storage).renewed_at is not None
    assert _holder(any_storage).released_at is not None


def _contend_in_process(config: dict, batch: str, run_id: str, start_at: float, results) -> None:  # type: ignore[no-untyped-def]
    store = Storage.from_config(StorageConfig(**config))
    lease = BatchLease(store, batch, run_id, ttl_s=60, wait_s=0, renew=False)
    time.sleep(max(0.0, start_at - time.time()))
    try:
        lease.acquire()
        results.put((run_id, "acquired"))
    except LeaseHeld as exc:
        results.put((run_id, exc.holder.run_id))


def test_two_processes_competing_for_one_batch(storage: Storage, storage_config: StorageConfig) -> None:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    config = storage_config.model_dump()
    config["secret_access_key"] = "testing"
    batch = f"b-{uuid.uuid4().hex[:8]}"
    start_at = time.time() + 5  # both processes are up and imported by then
    processes = [
        context.Process(target=_contend_in_process, args=(config, batch, f"run-{i}", start_at, results))
        for i in range(2)
    ]
    for p in processes:
        p.start()
    outcomes = dict(results.get(timeout=120) for _ in processes)
    for p in processes:
        p.join(timeout=60)
    (winner,) = [r for r, o in outcomes.items() if o == "acquired"]
    (loser,) = [r for r in outcomes if r != winner]
    assert outcomes[loser] == winner == _holder(storage, batch).run_id
