"""The sensor's tick planning: batching, cursor, replaced objects, re-requests."""

from __future__ import annotations

import json

from mkg_pipeline.stages.batches import IncomingObject, new_batch_id
from mkg_pipeline.stages.sensor_plan import plan_tick


def _objects(n: int, etag: str = "e1") -> list[IncomingObject]:
    return [IncomingObject(f"incoming/doc-{i:05d}.pdf", etag, 100) for i in range(n)]


def test_new_objects_are_batched_by_size() -> None:
    plan = plan_tick(_objects(7), None, batch_size=3, now=0, requeue_after_s=100)
    assert [len(b) for b in plan.batches] == [3, 3, 1]
    assert plan.already_requested == 0


def test_seen_objects_are_not_requested_again() -> None:
    first = plan_tick(_objects(5), None, batch_size=10, now=0, requeue_after_s=100)
    second = plan_tick(_objects(5), first.cursor, batch_size=10, now=10, requeue_after_s=100)
    assert second.batches == []
    assert second.already_requested == 5


def test_replaced_object_is_new_work() -> None:
    first = plan_tick(_objects(3), None, batch_size=10, now=0, requeue_after_s=100)
    listing = _objects(3)
    listing[1] = IncomingObject(listing[1].key, "e2", 120)
    second = plan_tick(listing, first.cursor, batch_size=10, now=1, requeue_after_s=100)
    assert [o.key for b in second.batches for o in b] == [listing[1].key]


def test_drained_objects_leave_the_cursor() -> None:
    first = plan_tick(_objects(4), None, batch_size=10, now=0, requeue_after_s=100)
    second = plan_tick(_objects(1), first.cursor, batch_size=10, now=1, requeue_after_s=100)
    assert list(json.loads(second.cursor)["pending"]) == ["incoming/doc-00000.pdf"]


def test_stale_request_is_requested_again() -> None:
    first = plan_tick(_objects(2), None, batch_size=10, now=0, requeue_after_s=100)
    later = plan_tick(_objects(2), first.cursor, batch_size=10, now=101, requeue_after_s=100)
    assert sum(len(b) for b in later.batches) == 2


def test_garbage_cursor_is_treated_as_empty() -> None:
    plan = plan_tick(_objects(2), "not json", batch_size=10, now=0, requeue_after_s=100)
    assert sum(len(b) for b in plan.batches) == 2


def test_batch_id_is_stable_for_the_same_objects_and_differs_for_others() -> None:
    from datetime import UTC, datetime

    at = datetime(2026, 1, 1, tzinfo=UTC)
    a = new_batch_id(_objects(3), at)
    assert a == new_batch_id(list(reversed(_objects(3))), at)
    assert a != new_batch_id(_objects(3, etag="other"), at)
    assert a.startswith("b20260101T000000-")
