"""The sensor's tick planning: batching, the bounded cursor, replaced objects, failed-run watermark."""

from __future__ import annotations

import json

from mkg_pipeline.stages.batches import new_batch_id
from mkg_pipeline.stages.sensor_plan import (
    Cursor,
    EndedRun,
    ListedObject,
    mark_runs_handled,
    plan_tick,
    retry_run_key,
    unseen_ended_runs,
)

T0 = 1_700_000_000.0


def _objects(n: int, etag: str = "e1", at: float = T0, step: float = 0.0) -> list[ListedObject]:
    return [ListedObject(f"incoming/doc-{i:05d}.pdf", etag, 100, at + i * step) for i in range(n)]


def _keys(plan) -> list[str]:  # type: ignore[no-untyped-def]
    return [o.key for batch in plan.batches for o in batch]


def _tick(listing: list[ListedObject], cursor: Cursor | str | None = None, **kwargs):  # type: ignore[no-untyped-def]
    if not isinstance(cursor, Cursor):
        cursor = Cursor.load(cursor)
    kwargs.setdefault("batch_size", 10)
    return plan_tick(listing, cursor, **kwargs)


def test_new_objects_are_batched_by_size_oldest_first() -> None:
    listing = _objects(7, step=1.0)[::-1]  # listed in key order, which is not age order
    plan = _tick(listing, batch_size=3)
    assert [len(b) for b in plan.batches] == [3, 3, 1]
    assert _keys(plan) == [o.key for o in _objects(7)]
    assert plan.already_requested == 0


def test_seen_objects_are_not_requested_again() -> None:
    first = _tick(_objects(5))
    second = _tick(_objects(5), first.cursor)
    assert second.batches == []
    assert second.already_requested == 5


def test_cursor_survives_its_text_form() -> None:
    first = _tick(_objects(5, step=1.0))
    second = _tick(_objects(5, step=1.0), first.cursor.dump())
    assert second.batches == []
    assert Cursor.load(first.cursor.dump()) == first.cursor


def test_replaced_object_is_new_work() -> None:
    first = _tick(_objects(3))
    listing = _objects(3)
    listing[1] = ListedObject(listing[1].key, "e2", 120, T0 + 5)
    second = _tick(listing, first.cursor)
    assert _keys(second) == [listing[1].key]


def test_same_bytes_dropped_again_under_the_same_name_is_new_work() -> None:
    first = _tick(_objects(1))
    again = [ListedObject("incoming/doc-00000.pdf", "e1", 100, T0 + 60)]  # same ETag, later LastModified
    assert _keys(_tick(again, first.cursor)) == ["incoming/doc-00000.pdf"]


def test_drained_objects_leave_the_cursor() -> None:
    first = _tick(_objects(4))
    second = _tick(_objects(1), first.cursor)
    assert list(second.cursor.recent) == ["incoming/doc-00000.pdf"]


def test_cursor_size_does_not_grow_with_the_backlog() -> None:
    backlog = _objects(10_000, step=0.01)
    first = _tick(backlog, batch_size=50, max_batches=1000, recent_limit=50)
    assert len(_keys(first)) == 10_000
    assert len(first.cursor.recent) <= 50
    assert len(first.cursor.dump()) < 50 * 120
    again = _tick(backlog, first.cursor, batch_size=50, recent_limit=50)
    assert again.batches == [] and again.already_requested == 10_000


def test_ties_on_last_modified_are_ordered_by_key() -> None:
    """S3 LastModified has one-second resolution: a bulk drop shares one timestamp."""
    backlog = _objects(100)  # all at T0
    requested: list[str] = []
    cursor = Cursor()
    for _ in range(4):
        plan = _tick(backlog, cursor, batch_size=10, max_batches=2, recent_limit=5)
        requested += _keys(plan)
        cursor = plan.cursor
        assert len(cursor.recent) <= 5
    assert requested == [o.key for o in backlog[:80]]  # oldest first, key order within one second


def test_a_large_backlog_is_spread_over_ticks_and_each_object_requested_once() -> None:
    backlog = _objects(95, step=1.0)
    cursor = Cursor()
    requested: list[str] = []
    deferred = []
    for _ in range(6):
        plan = _tick(backlog, cursor, batch_size=10, max_batches=2, recent_limit=5)
        requested += _keys(plan)
        deferred.append(plan.deferred)
        cursor = plan.cursor
    assert deferred[:5] == [75, 55, 35, 15, 0]
    assert sorted(requested) == [o.key for o in backlog]


def test_an_object_listed_late_within_the_settle_window_is_still_seen() -> None:
    """An upload's LastModified can precede the moment it is listed (S3 multipart: the upload's start)."""
    first = _tick(_objects(3, at=T0 + 100, step=1.0), settle_s=600)
    late = ListedObject("incoming/big.pdf", "e9", 10**8, T0 + 50)  # older than everything requested
    second = _tick([*_objects(3, at=T0 + 100, step=1.0), late], first.cursor, settle_s=600)
    assert _keys(second) == ["incoming/big.pdf"]


def test_version_1_cursor_is_carried_over_without_requesting_again() -> None:
    legacy = json.dumps({"v": 1, "pending": {o.key: [o.etag, T0] for o in _objects(3)}})
    plan = _tick(_objects(3, step=1.0), legacy)
    assert plan.batches == []
    assert all(modified is not None for _, modified in plan.cursor.recent.values())


def test_garbage_cursor_is_treated_as_empty() -> None:
    assert sum(len(b) for b in _tick(_objects(2), "not json").batches) == 2
    assert sum(len(b) for b in _tick(_objects(2), "[1]").batches) == 2


def test_ended_runs_are_handled_once() -> None:
    cursor = Cursor()
    runs = [EndedRun("r1", "b1", T0), EndedRun("r2", "b2", T0 + 1)]
    assert unseen_ended_runs(runs, cursor) == runs
    cursor = mark_runs_handled(cursor, runs)
    assert cursor.runs_after == T0 + 1
    assert unseen_ended_runs(runs, cursor) == []
    later = EndedRun("r3", "b1", T0 + 1)  # same timestamp as the watermark, committed after the last query
    assert unseen_ended_runs([*runs, later], cursor) == [later]
    # Ids far behind the watermark are forgotten, so the cursor stays small.
    cursor = mark_runs_handled(cursor, [EndedRun("r4", "b3", T0 + 10_000)])
    assert set(cursor.runs_seen) == {"r4"}


def test_retry_run_keys_differ_per_attempt() -> None:
    assert retry_run_key("b1", 1) != retry_run_key("b1", 2) != "b1"


def test_batch_id_is_stable_for_the_same_objects_and_differs_for_others() -> None:
    from datetime import UTC, datetime

    at = datetime(2026, 1, 1, tzinfo=UTC)
    objects = [o.to_incoming() for o in _objects(3)]
    other = [o.to_incoming() for o in _objects(3, etag="other")]
    a = new_batch_id(objects, at)
    assert a == new_batch_id(list(reversed(objects)), at)
    assert a != new_batch_id(other, at)
    assert a.startswith("b20260101T000000-")
