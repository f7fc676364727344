"""DAGSTER_HOME checked before Dagster opens its SQLite records there (issue 21 row 9).

A read-only ``DAGSTER_HOME`` made every Dagster process fail with SQLite's ``unable to open database file``
(or ``Read-only file system`` on a fresh home), which names neither the cause nor the directory.
:func:`check_dagster_home` says "read-only" and names it. It runs

* in every Dagster process that opens the instance from ``$DAGSTER_HOME`` with the local ``dagster.yaml``
  (``dagster dev``, the daemon, ``dagster asset materialize``, ...): that file names :class:`CheckedInstance`
  as its ``instance_class``, and Dagster asks that class for its defaults, with the instance's directory,
  while it loads the file and before it builds the storage (which is where SQLite fails);
* in ``batch_cli`` and ``make demo`` before they open the instance, whatever ``dagster.yaml`` the home has.

Free space is reported, not refused: an operator must still be able to open the UI of a full home to see what
happened. A run that fills the disk is left STARTED by Dagster (its failure cannot be written either, and the
code server that would mark it failed stops checking after one failed write); run monitoring's
``max_runtime_seconds`` in ``dagster.yaml`` fails it once the daemon can write again (docs/runbook.md).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from dagster import DagsterInstance

log = logging.getLogger(__name__)

#: below this much free space a warning names the home: a run writes its events there as it goes
LOW_SPACE_BYTES: Final = 64 * 1024 * 1024
#: the SQLite files Dagster writes under DAGSTER_HOME, relative to it
_DATABASES: Final = ("history/runs.db", "history/runs/index.db", "schedules/schedules.db")


class DagsterHomeUnusable(RuntimeError):
    """DAGSTER_HOME cannot hold Dagster's records: read-only, or not a directory."""


def check_dagster_home(path: str | os.PathLike[str]) -> None:
    """Raise :class:`DagsterHomeUnusable` naming ``path`` when Dagster could not write its records there."""
    home = Path(path)
    if not home.is_dir():
        raise DagsterHomeUnusable(f"DAGSTER_HOME {home} is not a directory; create it or set DAGSTER_HOME to one")
    fix = "Mount it read-write, or set DAGSTER_HOME to a writable directory (docs/runbook.md)."
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
            "DAGSTER_HOME %s has only %d KiB free: a run whose events no longer fit is left STARTED until run "
            "monitoring fails it (dagster.yaml run_monitoring.max_runtime_seconds); free space there",
            home,
            free // 1024,
        )


class CheckedInstance(DagsterInstance):
    """Dagster's instance, opened only after its directory passed :func:`check_dagster_home`
    (``instance_class`` of the local ``dagster.yaml``); otherwise exactly :class:`dagster.DagsterInstance`."""

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
