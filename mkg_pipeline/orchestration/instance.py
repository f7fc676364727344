"""DAGSTER_HOME checked before Dagster opens its SQLite records there (issue 21 row 9).

A read-only ``DAGSTER_HOME`` made every Dagster process fail with SQLite's ``unable to open database file``
(or ``Read-only file system`` on a fresh home), which names neither the cause nor the directory.
:func:`check_dagster_home` says "read-only" and names it. It runs

* in every Dagster process that opens the instance from ``$DAGSTER_HOME`` with the local ``dagster.yaml``
  (``dagster dev``, the daemon, ``dagster asset materialize``, ...): that file names :class:`CheckedInstance`
  as its ``instance_class``, and Dagster asks that class for its defaults, with the instance's directory,
  while it loads the file and before it builds the storage (which is where SQLite fails);
* in ``batch_cli`` before it opens the instance, whatever ``dagster.yaml`` the home has (``make demo`` copies
  the local one into its home).

Free space is reported, not refused: an operator must still be able to open the UI of a full home to see what
happened. A disk that fills up during a run used to leave the run STARTED: its worker died on the first event
that did not fit, nothing could record its end, and the code server that marks dead runs failed stops checking
after one failed write. :class:`CheckedInstance` keeps a few MiB set aside beside the records
(:data:`RESERVE_NAME`); on the first event of a run that does not fit it releases them, records the run as
failed with a message that names the full home, and refuses the run's later events, which stops its worker.
When even that cannot be written (the reserve already used), run monitoring's ``max_runtime_seconds`` in
``dagster.yaml`` fails the run once the daemon can write again.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from dagster import DagsterInstance

log = logging.getLogger(__name__)

#: below this much free space a warning names the home: a run writes its events there as it goes
LOW_SPACE_BYTES: Final = 64 * 1024 * 1024
#: space set aside beside the records (thousands of events) so that a run's failure can be written on a full disk
RESERVE_BYTES: Final = 4 * 1024 * 1024
RESERVE_NAME: Final = ".mkg-storage-reserve"
#: the SQLite files Dagster writes under DAGSTER_HOME, relative to it
_DATABASES: Final = ("history/runs.db", "history/runs/index.db", "schedules/schedules.db")


class DagsterHomeUnusable(RuntimeError):
    """DAGSTER_HOME cannot hold Dagster's records: read-only, or not a directory."""


def check_dagster_home(path: str | os.PathLike[str]) -> None:
    """Raise :class:`DagsterHomeUnusable` naming ``path`` when Dagster could not write its records there."""
    home = Path(path)
    if not home.is_dir():
        raise DagsterHomeUnusable(f"DAGSTER_HOME {home} is not a directory; create it or set DAGSTER_HOME to one")
    fix = "Mount it read-write, or set DAGSTER_HOME to a writable directory."
    stats = os.statvfs(home)
    if stats.f_flag & os.ST_RDONLY:
        raise DagsterHomeUnusable(
            f"DAGSTER_HOME {home} is read-only: its file system is mounted read-only, and Dagster records every "
            f"run and event there (SQLite), so no run can start or be recorded. {fix}"
        )
    # access(2) as the real user: root passes permission bits, which is right (root can write there).
    unwritable = [p for p in (home, *(home / d for d in _DATABASES)) if p.exists() and not os.access(p, os.W_OK)]
    if unwritable:
        raise DagsterHomeUnusable(
            f"DAGSTER_HOME {home} is read-only for this user (uid {os.getuid()}): cannot write "
            f"{', '.join(str(p) for p in unwritable)}; Dagster records every run and event there (SQLite). {fix}"
        )
    free = stats.f_bavail * stats.f_frsize
    if free < LOW_SPACE_BYTES:
        log.warning(
            "DAGSTER_HOME %s has only %d KiB free: a run whose events no longer fit there is failed; free space",
            home,
            free // 1024,
        )


def _free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def keep_reserve(home: Path, size: int = RESERVE_BYTES) -> None:
    """Set ``size`` bytes of ``home``'s file system aside in :data:`RESERVE_NAME`, while there is room to spare.

    When the disk fills up, releasing them is what lets the run's failure be written (:class:`CheckedInstance`).
    """
    reserve = home / RESERVE_NAME
    with contextlib.suppress(FileNotFoundError):
        if reserve.stat().st_size >= size:
            return
    if _free_bytes(home) < 4 * size:
        return  # no room to spare: a reserve is made again once there is
    with reserve.open("wb") as out:
        try:
            os.posix_fallocate(out.fileno(), 0, size)  # blocks taken, none written
        except OSError:  # a file system without fallocate: blocks are taken by writing them
            out.write(bytes(size))


def release_reserve(home: Path) -> bool:
    """Give the reserve's space back to the file system; False when it was already released."""
    try:
        (home / RESERVE_NAME).unlink()
    except FileNotFoundError:
        return False
    return True


def _is_storage_full(exc: BaseException, home: Path) -> bool:
    """SQLite could not write because ``home``'s file system is full ("disk I/O error" when it is the journal)."""
    text = " ".join(str(e) for e in (exc, exc.__cause__) if e is not None)
    if "database or disk is full" in text:
        return True
    try:
        return "disk I/O error" in text and _free_bytes(home) < RESERVE_BYTES
    except OSError:
        return False


class DagsterHomeFull(RuntimeError):
    """A run's records no longer fit in DAGSTER_HOME: the run is failed (recorded in the reserve's space)."""


class CheckedInstance(DagsterInstance):
    """Dagster's instance with two guards on its home (``instance_class`` of the local ``dagster.yaml``):

    * it is opened only after its directory passed :func:`check_dagster_home`;
    * when an event no longer fits (the disk is full), the run it belongs to is failed, using the space of a
      reserve kept beside the records (:func:`keep_reserve`), and its later events are refused, which stops
      its worker. Without this the worker died with nothing recorded and the run stayed STARTED.

    Otherwise exactly :class:`dagster.DagsterInstance`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._runs_out_of_space: set[str] = set()
        self._failing_run = False
        with contextlib.suppress(OSError):  # a reserve is a best effort, never a reason not to open
            keep_reserve(Path(self.root_directory))

    @classmethod
    def config_schema(cls) -> dict[str, Any]:
        return {}  # no settings of its own

    @staticmethod
    def config_defaults(base_dir: str) -> Mapping[str, Any]:
        # Called by Dagster with the instance's directory while it reads dagster.yaml, before any storage is
        # opened: the one hook early enough to replace SQLite's "unable to open database file" with the cause.
        from dagster._core.instance.ref import InstanceRef

        if os.path.isdir(base_dir):
            check_dagster_home(base_dir)
        return InstanceRef.config_defaults(base_dir)

    def handle_new_event(self, event: Any, *, batch_metadata: Any = None) -> None:
        run_id = getattr(event, "run_id", None)
        if run_id and run_id in self._runs_out_of_space and not self._failing_run:
            # While the disk is still full (what is left is the reserve's), the failed run's own events are
            # refused: its worker stops instead of spending the space. Once space is freed they pass again, so
            # that whatever still has to be recorded about the run (run monitoring, slots) is.
            if self._still_full():
                raise DagsterHomeFull(f"run {run_id}: DAGSTER_HOME {self.root_directory} is full; the run was failed")
            self._runs_out_of_space.discard(run_id)
        try:
            super().handle_new_event(event, batch_metadata=batch_metadata)
        except Exception as exc:
            home = Path(self.root_directory)
            if self._failing_run or not run_id or not _is_storage_full(exc, home):
                raise
            self._runs_out_of_space.add(run_id)
            message = self._fail_run_out_of_space(run_id, home, exc)
            raise DagsterHomeFull(message) from exc

    def _still_full(self) -> bool:
        try:
            return _free_bytes(Path(self.root_directory)) < 2 * RESERVE_BYTES  # the reserve is not "freed space"
        except OSError:
            return True

    def _fail_run_out_of_space(self, run_id: str, home: Path, exc: BaseException) -> str:
        released = release_reserve(home)
        message = (
            f"DAGSTER_HOME {home} is full (SQLite: {str(exc).splitlines()[0]}): run {run_id} is failed because "
            "its events can no longer be recorded. Free space there, then materialize its batch again (the "
            "sensor requests a failed ingest run again by itself)."
        )
        log.error("%s%s", message, "" if released else " (no reserve left: the failure may not be recorded)")
        self._failing_run = True  # the failure's own event must not come back here
        try:
            run = self.get_run_by_id(run_id)
            if run is not None and not run.is_finished:
                self.report_run_failed(run, message)
        except Exception as again:  # still no room: run monitoring's max_runtime_seconds fails it later
            log.error("run %s: its failure could not be recorded either: %s", run_id, again)
        finally:
            self._failing_run = False
        return message
