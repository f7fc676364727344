"""One writer per batch: a run claims its batch with a lease object in S3 before it touches it.

``leases/<batch_id>.json`` holds ``{run_id, owner, acquired_at, expires_at}`` (plus ``renewed_at`` and,
once given back, ``released_at``). It is

- **acquired** with a conditional PUT (``If-None-Match: *``): of two runs starting together exactly
  one creates it;
- **renewed** in the background every ``ttl_s / 3`` while held, each time replacing exactly the
  version this holder wrote (``If-Match`` on its ETag);
- **taken over** only when it has expired (its holder died or lost S3 for longer than ``ttl_s``), was
  released, or belongs to the same run (a retried step), again with ``If-Match`` on the version read,
  so two runs taking over an expired lease cannot both win;
- **released** at the end by writing it back as expired (``If-Match``), never by deleting it: a
  delete cannot be made conditional, and would remove a lease another run took over meanwhile. The
  last holder stays readable for the person on call.

A second run of the same batch waits up to ``wait_s`` for the lease, then raises :class:`LeaseHeld`,
whose message names the holding run, where it runs and when its lease expires. It never sends a
request for the batch. A holder that cannot renew (someone took over after it stalled for longer
than the TTL) is told by :meth:`BatchLease.check`, which raises :class:`LeaseLost`; call it between
units of work (documents, pages) so that a holder that lost its claim stops.

Expiry compares the holder's clock (written in the record) with the reader's: hosts must agree on
the time to well within ``ttl_s`` (NTP does).

No Dagster here: the assets wrap their work in :func:`batch_lease`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mkg_pipeline.storage import PreconditionFailed, Storage

log = logging.getLogger(__name__)

#: how often a waiting run looks at the lease again, at most
MAX_POLL_S = 5.0


class LeaseError(RuntimeError):
    """The lease could not be read or written consistently."""


class LeaseHeld(LeaseError):
    """Another live run holds the batch; this run must not touch it."""

    def __init__(self, batch_id: str, holder: LeaseRecord, waited_s: float) -> None:
        self.batch_id = batch_id
        self.holder = holder
        waited = f" after waiting {waited_s:.0f}s" if waited_s >= 1 else ""
        super().__init__(
            f"batch {batch_id} is being processed by run {holder.run_id} (on {holder.owner}, since "
            f"{holder.acquired_at}); its lease is valid until {holder.expires_at} and is renewed while that run "
            f"lives. This run stops{waited} without touching the batch. If run {holder.run_id} is dead, its "
            f"lease expires by itself (workers.lease_ttl_s): materialize the batch again after {holder.expires_at}."
        )


class LeaseLost(LeaseError):
    """This run's lease was taken over (it could not renew it in time): stop working on the batch."""


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


@dataclass(frozen=True)
class LeaseRecord:
    run_id: str
    owner: str
    acquired_at: str
    expires_at: str
    renewed_at: str | None = None
    released_at: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = {
            "run_id": self.run_id,
            "owner": self.owner,
            "acquired_at": self.acquired_at,
            "expires_at": self.expires_at,
        }
        if self.renewed_at:
            data["renewed_at"] = self.renewed_at
        if self.released_at:
            data["released_at"] = self.released_at
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LeaseRecord:
        return cls(
            run_id=str(data["run_id"]),
            owner=str(data.get("owner", "?")),
            acquired_at=str(data["acquired_at"]),
            expires_at=str(data["expires_at"]),
            renewed_at=data.get("renewed_at"),
            released_at=data.get("released_at"),
        )

    def expired(self, now: float) -> bool:
        return self.released_at is not None or _ts(self.expires_at) <= now


def default_owner() -> str:
    return f"{socket.gethostname()}/pid {os.getpid()}"


class BatchLease:
    """A run's claim on one batch; use as a context manager (see :func:`batch_lease`)."""

    def __init__(
        self,
        storage: Storage,
        batch_id: str,
        run_id: str,
        *,
        ttl_s: float,
        wait_s: float = 0.0,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        renew: bool = True,
        progress: Callable[[str], None] = log.info,
        renew_wait: Callable[[threading.Event, float], bool] | None = None,
    ) -> None:
        """``renew_wait(stop, seconds)``: how the renewal thread waits between renewals, True once ``stop`` is
        set (default ``stop.wait(seconds)``; tests pass one driven by the fake ``clock``)."""
        if ttl_s <= 0:
            raise ValueError(f"lease TTL must be positive, got {ttl_s}")
        self.storage = storage
        self.batch_id = batch_id
        self.key = storage.lease_key(batch_id)
        self.run_id = run_id
        self.ttl_s = ttl_s
        self.wait_s = wait_s
        self.owner = owner or default_owner()
        self.clock = clock
        self.sleep = sleep
        self.progress = progress
        self._renew_in_background = renew
        self._renew_wait = renew_wait or threading.Event.wait
        self._etag: str | None = None
        self._record: LeaseRecord | None = None
        self._lost: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- state ------------------------------------------------------------------------------------------

    @property
    def held(self) -> bool:
        return self._etag is not None and self._lost is None

    @property
    def lost(self) -> str | None:
        """Why the lease was lost (None while held or before acquiring)."""
        return self._lost

    @property
    def record(self) -> LeaseRecord | None:
        return self._record

    def check(self) -> None:
        """Raise :class:`LeaseLost` if another run took the batch over; call it between units of work.

        Free while the lease is valid by this holder's clock. Once it has expired (this process was frozen,
        or could not renew for longer than the TTL), another run may have taken the batch over without this
        one knowing yet: it renews first, which replaces exactly the version it wrote and so fails if someone
        took over (or if S3 cannot confirm it). The background renewal may only notice that later.
        """
        record = self._record
        expired = record is not None and self.clock() >= _ts(record.expires_at)
        if self._lost is None and self._etag is not None and expired:
            self.renew()
        if self._lost is not None:
            raise LeaseLost(f"batch {self.batch_id}: run {self.run_id} no longer holds the lease: {self._lost}")

    # ---- S3 ---------------------------------------------------------------------------------------------

    def _read(self) -> tuple[LeaseRecord, str] | None:
        """The current record and the ETag of exactly that version (HEAD, GET, HEAD until they agree)."""
        for _ in range(5):
            before = self.storage.head(self.key)
            if before is None:
                return None
            try:
                body = self.storage.get_bytes(self.key)
            except FileNotFoundError:
                continue
            after = self.storage.head(self.key)
            if after is not None and after.etag == before.etag:
                try:
                    return LeaseRecord.from_json(json.loads(body)), after.etag
                except (ValueError, KeyError, TypeError) as exc:
                    raise LeaseError(f"{self.storage.uri(self.key)} is not a lease record: {exc}") from exc
        raise LeaseError(f"{self.storage.uri(self.key)} kept changing while it was read")

    def _new_record(self, now: float, acquired_at: str | None = None) -> LeaseRecord:
        return LeaseRecord(
            run_id=self.run_id,
            owner=self.owner,
            acquired_at=acquired_at or _iso(now),
            expires_at=_iso(now + self.ttl_s),
            renewed_at=_iso(now) if acquired_at else None,
        )

    def _try_acquire(self) -> LeaseRecord | None:
        """One attempt: None when acquired, else the live holder's record."""
        for _ in range(10):  # each round loses only to a write another run made meanwhile
            now = self.clock()
            record = self._new_record(now)
            try:
                self._etag = self.storage.put_json(self.key, record.to_json(), if_none_match=True)
                self._record = record
                return None
            except PreconditionFailed:
                pass
            current = self._read()
            if current is None:
                continue  # released and deleted by hand in between: create it again
            holder, etag = current
            if holder.run_id != self.run_id and not holder.expired(now):
                return holder
            try:
                self._etag = self.storage.put_json(self.key, record.to_json(), if_match=etag)
            except PreconditionFailed:
                continue  # another run took over the same version first: look again
            self._record = record
            if holder.run_id != self.run_id and holder.released_at is None:
                log.warning(
                    "batch %s: took over the expired lease of run %s (%s, expired %s)",
                    self.batch_id,
                    holder.run_id,
                    holder.owner,
                    holder.expires_at,
                )
            return None
        raise LeaseError(f"{self.storage.uri(self.key)} kept changing while run {self.run_id} tried to acquire it")

    def acquire(self) -> None:
        """Claim the batch, waiting up to ``wait_s`` for a live holder; raises :class:`LeaseHeld`."""
        started = self.clock()
        announced = False
        while True:
            holder = self._try_acquire()
            if holder is None:
                self.progress(
                    f"batch {self.batch_id}: lease acquired by run {self.run_id} ({self.owner}) until "
                    f"{self._record.expires_at if self._record else '?'}"
                )
                break
            waited = self.clock() - started
            remaining = self.wait_s - waited
            if remaining <= 0:
                raise LeaseHeld(self.batch_id, holder, waited)
            if not announced:
                self.progress(
                    f"batch {self.batch_id} is held by run {holder.run_id} ({holder.owner}); waiting up to "
                    f"{self.wait_s:.0f}s for it"
                )
                announced = True
            self.sleep(min(MAX_POLL_S, self.ttl_s / 10, remaining))
        if self._renew_in_background:
            self._stop.clear()
            self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.batch_id}", daemon=True)
            self._thread.start()

    def renew(self) -> bool:
        """Extend the lease by ``ttl_s`` from now; False (and :attr:`lost` set) if it is no longer ours."""
        with self._lock:
            if self._etag is None or self._lost is not None or self._record is None:
                return False
            now = self.clock()
            record = self._new_record(now, acquired_at=self._record.acquired_at)
            try:
                self._etag = self.storage.put_json(self.key, record.to_json(), if_match=self._etag)
            except PreconditionFailed:
                self._lost = "another run took it over after it expired"
                log.error("batch %s: run %s lost its lease: %s", self.batch_id, self.run_id, self._lost)
                return False
            except Exception as exc:  # S3 unreachable: try again at the next interval, while it is still valid
                if now >= _ts(self._record.expires_at):
                    self._lost = f"it expired at {self._record.expires_at} while S3 could not be reached ({exc})"
                    log.error("batch %s: run %s lost its lease: %s", self.batch_id, self.run_id, self._lost)
                    return False
                log.warning("batch %s: renewing the lease failed, will retry: %s", self.batch_id, exc)
                return True
            self._record = record
            return True

    def _renew_loop(self) -> None:
        interval = self.ttl_s / 3
        while not self._renew_wait(self._stop, interval):
            if not self.renew():
                return

    def release(self) -> None:
        """Give the batch back (the record stays, marked released); a lost lease is left alone."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        with self._lock:
            if self._etag is None or self._lost is not None or self._record is None:
                return
            now = self.clock()
            released = LeaseRecord(
                run_id=self.run_id,
                owner=self.owner,
                acquired_at=self._record.acquired_at,
                expires_at=_iso(now),
                renewed_at=self._record.renewed_at,
                released_at=_iso(now),
            )
            try:
                self.storage.put_json(self.key, released.to_json(), if_match=self._etag)
            except PreconditionFailed:
                log.warning("batch %s: the lease was taken over before run %s released it", self.batch_id, self.run_id)
            except Exception as exc:  # it expires by itself after ttl_s
                log.warning("batch %s: could not release the lease (it expires by itself): %s", self.batch_id, exc)
            self._etag = None

    def __enter__(self) -> BatchLease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def batch_lease(
    storage: Storage,
    batch_id: str,
    run_id: str,
    *,
    ttl_s: float,
    wait_s: float | None = None,
    progress: Callable[[str], None] = log.info,
) -> BatchLease:
    """The lease of ``batch_id`` for run ``run_id``, to be used as ``with batch_lease(...) as lease:``.

    ``wait_s`` (default: ``ttl_s``, long enough for the lease of a run that just died to expire) bounds
    how long a second run waits before it raises :class:`LeaseHeld`.
    """
    return BatchLease(
        storage, batch_id, run_id, ttl_s=ttl_s, wait_s=ttl_s if wait_s is None else wait_s, progress=progress
    )
