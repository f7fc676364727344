"""What one sensor tick turns into: new batches of incoming objects, and the next cursor.

The cost of a tick is one listing of ``incoming/``, which ``raw_pdfs`` drains
(accepted and rejected objects are removed), so it holds only pending work
however many documents the bucket already stores. The cursor remembers the
objects already requested (key + ETag) until they leave ``incoming/``; an
object replaced under the same name has a new ETag and is new work. A request
whose object is still there after ``requeue_after_s`` (its run failed or was
deleted) is requested again.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from mkg_pipeline.stages.batches import IncomingObject

CURSOR_VERSION = 1


@dataclass(frozen=True)
class TickPlan:
    batches: list[list[IncomingObject]]
    cursor: str
    already_requested: int


def _load_cursor(cursor: str | None) -> dict[str, list]:
    if not cursor:
        return {}
    try:
        data = json.loads(cursor)
    except json.JSONDecodeError:
        return {}
    return data.get("pending", {}) if data.get("v") == CURSOR_VERSION else {}


def plan_tick(
    listing: Iterable[IncomingObject],
    cursor: str | None,
    *,
    batch_size: int,
    now: float,
    requeue_after_s: float,
) -> TickPlan:
    pending = _load_cursor(cursor)
    next_pending: dict[str, list] = {}
    new: list[IncomingObject] = []
    already = 0
    for obj in listing:
        seen = pending.get(obj.key)
        if seen and seen[0] == obj.etag and now - float(seen[1]) < requeue_after_s:
            next_pending[obj.key] = seen
            already += 1
            continue
        new.append(obj)
        next_pending[obj.key] = [obj.etag, now]
    batches = [new[i : i + batch_size] for i in range(0, len(new), batch_size)]
    # Keys no longer listed were drained by raw_pdfs: they leave the cursor, which stays as small as the backlog.
    return TickPlan(
        batches=batches,
        cursor=json.dumps({"v": CURSOR_VERSION, "pending": next_pending}, separators=(",", ":")),
        already_requested=already,
    )
