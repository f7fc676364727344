"""What one sensor tick turns into: new batches of incoming objects, re-requests of failed batches, the next cursor.

A tick lists ``incoming/``, which ``raw_pdfs`` drains, so the listing holds only pending work however
many documents the bucket already stores. Deciding which listed objects are new must not need a
memory of every pending object (issue 9, row 16: that cursor reached megabytes). The cursor is:

``floor``
    a high-water mark ``(LastModified, key)``. Every object ordered below it was requested already.
    Objects are requested oldest first in that order, so the floor is never moved past an object that
    was not requested.
``recent``
    ``key -> [etag, LastModified]`` of the requested objects at or above the floor: at most
    ``RECENT_LIMIT`` entries, however large the backlog. They are what lets the floor trail the newest
    object by ``SETTLE_S``: an object's LastModified can precede the moment it becomes listable (S3
    stamps a multipart upload with its start), and an object that appears late below the floor would
    never be seen. When more than ``RECENT_LIMIT`` objects were requested within ``SETTLE_S``, the floor
    rises faster and that margin shrinks; the audit (``python -m mkg_pipeline.audit``) reports objects
    that sit in ``incoming/`` in no batch.
``runs``
    a watermark over the instance's failed and canceled ``ingest_job`` runs (see ``sensors.py``): the
    objects of a batch are requested again only when its run is known to have failed or been canceled,
    never because they waited long (a run may queue for hours).

An object replaced under the same name has a new LastModified (and usually a new ETag): it sorts above
the floor, and ``recent`` does not match it, so it is new work. A tick requests at most
``MAX_BATCHES_PER_TICK`` batches (oldest objects first) so that a tick stays short with a large
backlog; the rest follow on the next ticks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mkg_pipeline.stages.batches import IncomingObject, read_batch_manifest

if TYPE_CHECKING:
    from mkg_pipeline.storage import Storage

CURSOR_VERSION = 2
#: batches (runs) one tick may request; a 100,000-object drop is spread over ticks, oldest first
MAX_BATCHES_PER_TICK = 20
#: requested objects remembered above the floor (bounds the cursor: about 75 bytes each, so < 40 KB)
RECENT_LIMIT = 500
#: how far the floor trails the newest LastModified seen, so that slow uploads listed late are not missed
SETTLE_S = 600.0
#: failed runs updated this long before the watermark are queried again (commit order vs timestamps)
RUNS_OVERLAP_S = 120.0

Mark = tuple[float, str]


@dataclass(frozen=True)
class ListedObject:
    """One object of the ``incoming/`` listing; ``modified`` is its LastModified as a POSIX timestamp."""

    key: str
    etag: str
    size: int
    modified: float

    @property
    def mark(self) -> Mark:
        return (self.modified, self.key)

    def to_incoming(self) -> IncomingObject:
        return IncomingObject(self.key, self.etag, self.size)


@dataclass
class Cursor:
    floor: Mark = (float("-inf"), "")
    newest: float = float("-inf")
    #: key -> (etag, modified); modified None: carried over from a version-1 cursor (match on ETag only)
    recent: dict[str, tuple[str, float | None]] = field(default_factory=dict)
    runs_after: float = 0.0
    #: failed/canceled run ids already handled, with their update time (only those within RUNS_OVERLAP_S)
    runs_seen: dict[str, float] = field(default_factory=dict)

    @classmethod
    def load(cls, text: str | None) -> Cursor:
        if not text:
            return cls()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return cls()
        if not isinstance(data, dict):
            return cls()
        if data.get("v") == 1:  # the pending-set cursor: what it lists was requested, match by ETag
            return cls(recent={k: (str(v[0]), None) for k, v in data.get("pending", {}).items()})
        if data.get("v") != CURSOR_VERSION:
            return cls()
        floor = data.get("floor")
        return cls(
            floor=(float(floor[0]), str(floor[1])) if floor else (float("-inf"), ""),
            newest=float(data["newest"]) if data.get("newest") is not None else float("-inf"),
            recent={k: (str(v[0]), float(v[1])) for k, v in data.get("recent", {}).items()},
            runs_after=float(data.get("runs", {}).get("after", 0.0)),
            runs_seen={k: float(v) for k, v in data.get("runs", {}).get("seen", {}).items()},
        )

    def dump(self) -> str:
        data: dict[str, Any] = {
            "v": CURSOR_VERSION,
            "floor": list(self.floor) if self.floor[0] != float("-inf") else None,
            "newest": self.newest if self.newest != float("-inf") else None,
            "recent": {k: [etag, modified] for k, (etag, modified) in self.recent.items()},
            "runs": {"after": self.runs_after, "seen": self.runs_seen},
        }
        return json.dumps(data, separators=(",", ":"))


@dataclass(frozen=True)
class TickPlan:
    batches: list[list[IncomingObject]]
    cursor: Cursor
    already_requested: int
    #: new objects left for later ticks (MAX_BATCHES_PER_TICK)
    deferred: int


def plan_tick(
    listing: Iterable[ListedObject],
    cursor: Cursor,
    *,
    batch_size: int,
    max_batches: int | None = None,
    settle_s: float | None = None,
    recent_limit: int | None = None,
) -> TickPlan:
    """Which listed objects are new, how they are batched, and the next cursor (``cursor`` is not changed)."""
    max_batches = MAX_BATCHES_PER_TICK if max_batches is None else max_batches
    settle_s = SETTLE_S if settle_s is None else settle_s
    recent_limit = RECENT_LIMIT if recent_limit is None else recent_limit

    recent: dict[str, tuple[str, float | None]] = {}
    new: list[ListedObject] = []
    already = 0
    newest = cursor.newest
    for obj in listing:
        newest = max(newest, obj.modified)
        if obj.mark < cursor.floor:
            already += 1
            continue
        seen = cursor.recent.get(obj.key)
        if seen is not None and seen[0] == obj.etag and seen[1] in (None, obj.modified):
            recent[obj.key] = (obj.etag, obj.modified)  # still pending; a legacy entry learns its time
            already += 1
            continue
        new.append(obj)
    # Entries of cursor.recent that were not listed left incoming/ (drained): forgotten. A later copy
    # under the same name has a later LastModified, so forgetting them never hides new work.

    new.sort(key=lambda o: o.mark)
    taken = new[: batch_size * max_batches]
    deferred = new[len(taken) :]
    for obj in taken:
        recent[obj.key] = (obj.etag, obj.modified)

    # The floor trails the newest object by settle_s, never passes an object left for a later tick, and
    # rises further when more than recent_limit requested objects sit above it.
    ceiling: Mark = deferred[0].mark if deferred else (float("inf"), "")
    floor = max(cursor.floor, min((newest - settle_s, ""), ceiling))
    above = sorted(
        ((modified, key) for key, (_, modified) in recent.items() if modified is not None and (modified, key) >= floor)
    )
    if len(above) > recent_limit:
        floor = max(floor, min(above[len(above) - recent_limit], ceiling))
    recent = {k: v for k, v in recent.items() if v[1] is None or (v[1], k) >= floor}

    batches = [[o.to_incoming() for o in taken[i : i + batch_size]] for i in range(0, len(taken), batch_size)]
    next_cursor = Cursor(
        floor=floor, newest=newest, recent=recent, runs_after=cursor.runs_after, runs_seen=dict(cursor.runs_seen)
    )
    return TickPlan(batches=batches, cursor=next_cursor, already_requested=already, deferred=len(deferred))


@dataclass(frozen=True)
class EndedRun:
    """A failed or canceled run of the ingest job, as the instance reports it."""

    run_id: str
    partition: str | None
    updated: float


def unseen_ended_runs(runs: Iterable[EndedRun], cursor: Cursor) -> list[EndedRun]:
    """The ended runs not handled by an earlier tick (``runs`` come from a query since ``query_after``)."""
    return [r for r in runs if r.run_id not in cursor.runs_seen and r.updated >= cursor.runs_after - RUNS_OVERLAP_S]


def query_after(cursor: Cursor) -> float:
    """Ask the instance for runs updated after this time: the watermark minus an overlap."""
    return max(0.0, cursor.runs_after - RUNS_OVERLAP_S)


def mark_runs_handled(cursor: Cursor, handled: Iterable[EndedRun]) -> Cursor:
    """The cursor after handling ``handled``; run ids older than the overlap window are forgotten."""
    seen = dict(cursor.runs_seen)
    after = cursor.runs_after
    for run in handled:
        seen[run.run_id] = run.updated
        after = max(after, run.updated)
    seen = {k: v for k, v in seen.items() if v >= after - RUNS_OVERLAP_S}
    return Cursor(floor=cursor.floor, newest=cursor.newest, recent=cursor.recent, runs_after=after, runs_seen=seen)


def retry_run_key(batch_id: str, attempt: int) -> str:
    """Run key of the ``attempt``-th re-request of a batch (the first request's run key is the batch id)."""
    return f"{batch_id}:retry-{attempt}"


def pending_objects(storage: Storage, batch_id: str) -> list[IncomingObject]:
    """The objects of a batch still in ``incoming/`` as batched (same ETag) and without a final outcome: one
    HEAD per such object of one batch. Settled objects can stay in incoming/ (a bucket that cannot drain
    them safely keeps them, storage.py): they are done, never a reason to run the batch again."""
    manifest = read_batch_manifest(storage, batch_id)
    results = manifest.get("results") or {}
    pending = []
    for obj in manifest.get("objects", []):
        if (results.get(obj["key"]) or {}).get("status") in {"accepted", "rejected"}:
            continue
        current = storage.head(obj["key"])
        if current is not None and current.etag == obj.get("etag"):
            pending.append(IncomingObject(obj["key"], obj["etag"], int(obj.get("size", current.size))))
    return pending
