"""Run per-document work (validation, rendering) in worker processes, each call under a wall-clock limit.

One mechanism gives both things the pipeline needs from its CPU pods:

* **the pod's cores**: documents are worked on in a pool of processes sized to the CPUs this process may
  use (:func:`available_cpus`: its CPU affinity and the cgroup's ``cpu.max`` quota, whichever is lower);
* **bounded cost per document**: a call that uses more than ``timeout_s`` (``workers.timeout_s``) seconds
  of CPU has its worker process killed and replaced, and is reported as :class:`TaskFailed` ``timeout``.
  MuPDF can spend minutes in C code on one pathological page (a self-referencing tiling pattern, millions of
  path operations), where no Python-level timeout or thread can interrupt it: only killing the process can.

  The budget is CPU time, not wall time: the kernel sends ``SIGXCPU`` at the soft ``RLIMIT_CPU`` that each
  call sets to what the worker has used so far plus the budget. On a pod whose cores are shared (or a run
  that validates 25 files on 2 cores), a small file can wait seconds for a core; a wall-clock limit rejected
  such a good file as pathological (seen in the fault campaign: a one-page PDF rejected after 10 s of
  waiting). A worker that exceeds :data:`WALL_BACKSTOP_FACTOR` x the budget in wall time without using it
  (starved, or blocked on I/O) is killed too, as ``stalled``: the file is not to blame, so callers record it
  as an error that the next materialization retries, never as a rejection.

The pool is pebble's ``ProcessPool``. ``concurrent.futures.ProcessPoolExecutor`` cannot stop one running
call: terminating one of its workers breaks the whole executor (``BrokenProcessPool``), so a timeout would
cost every other document in flight. pebble (maintained since 2013, pure Python, no dependencies) does
exactly the missing part: a per-call timeout measured from the moment a worker starts the call (time spent
queued does not count), the overrunning worker killed (SIGTERM, then SIGKILL) and replaced, the other
workers untouched, and a worker that dies (segfault, OOM kill) reported as ``ProcessExpired`` instead of
hanging the pool. Writing that by hand is about as much code as this module, with the hard parts
(races between completion and kill, replacing workers) untested.

Workers are started with ``spawn``: never ``fork`` a process that runs threads (Dagster's, s3fs's event
loop). A worker imports the stage modules once when it starts and then takes document after document; it
asks the kernel to kill it when the process that started it dies (``PR_SET_PDEATHSIG``), so a run that is
itself killed leaves no worker grinding on a pathological page. (A ``forkserver`` would start workers
faster, but its workers are the forkserver's children: they would outlive a killed run.)

A spawned process normally re-runs the parent's main script first (as ``__mp_main__``), in case the task
functions live there. In a run pod the main script is Dagster's console script (``dagster api
execute_run``, ``dagster asset materialize``), so each worker imported all of Dagster (0.7 s of CPU) for
nothing. The stages' pools run functions of their own modules (``preload``), so they pass
``import_parent_main=False`` and their workers skip it. Multiprocessing has no switch for this: the
preparation data of processes named :data:`WORKER_NAME` (ours only) is filtered, see
:func:`_preparation_data`.

:class:`InlinePool` has the same interface and runs calls in the calling process, without the limit: for
storage that other processes cannot reach (the in-memory storage of stage tests) and for debugging.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import importlib
import logging
import math
import multiprocessing
import multiprocessing.context
import multiprocessing.spawn
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Generic, Literal, TypeVar

from mkg_pipeline.pdf.validate import error_text

log = logging.getLogger(__name__)

K = TypeVar("K")

#: where cgroup v2 and v1 publish the CPU quota of the container
_CGROUP_V2_CPU_MAX: Final = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1_QUOTA: Final = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
_CGROUP_V1_PERIOD: Final = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
#: prctl(2) option: the signal this process gets when the thread that created it exits
_PR_SET_PDEATHSIG: Final = 1
#: the process name of workers that do not re-run the parent's main script (module docstring)
WORKER_NAME: Final = "mkg-document-worker"
#: a call stopped at this many times its CPU budget in wall clock: it waited for a core or for I/O (docstring)
WALL_BACKSTOP_FACTOR: Final = 3.0
#: what a spawned child is told to import as its main module (``multiprocessing.spawn``)
_MAIN_KEYS: Final = ("init_main_from_path", "init_main_from_name")


@dataclass(frozen=True)
class TaskFailed:
    """A call that did not return a value: it ran out of time, its process died, or it raised."""

    #: timeout: it used its CPU budget (the document is to blame); stalled: it ran out of wall clock without
    #: using it (the machine or I/O is; retry); crashed: its process died; error: it raised
    kind: Literal["timeout", "stalled", "crashed", "error"]
    message: str


def _cgroup_cpu_quota(root: Path | None = None) -> float | None:
    """CPUs the cgroup allows (``quota / period``), or ``None`` when unlimited or unknown."""
    v2 = (root / "cpu.max") if root else _CGROUP_V2_CPU_MAX
    try:
        quota, period = v2.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    if root is not None:
        return None
    try:
        quota_us = int(_CGROUP_V1_QUOTA.read_text())
        period_us = int(_CGROUP_V1_PERIOD.read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us


def available_cpus(cgroup_root: Path | None = None) -> int:
    """How many CPUs this process can keep busy: its affinity mask, capped by the cgroup quota (rounded up).

    ``os.cpu_count()`` reports the node's CPUs: on a 64-core node a pod limited to 4 CPUs would start 64
    processes and be throttled. A quota of 2.5 CPUs gives 3 (a slightly oversubscribed last process beats an
    idle half core). Always at least 1.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def pool_size(configured: int, tasks: int) -> int:
    """Processes for ``tasks`` documents: ``configured`` (``workers.render_processes``, 0 = CPUs available),
    never more than there are documents, at least 1."""
    wanted = configured if configured > 0 else available_cpus()
    return max(1, min(wanted, tasks))


def _start_worker(parent_pid: int, preload: tuple[str, ...]) -> None:
    """Runs first in each worker process: die with the parent, import what the tasks need."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)
    for module in preload:
        importlib.import_module(module)


def _preparation_data(name: str) -> dict[str, Any]:
    """``multiprocessing.spawn.get_preparation_data``, without the main module for our own workers."""
    data = _spawn_preparation_data(name)
    if name == WORKER_NAME:
        for key in _MAIN_KEYS:
            data.pop(key, None)
    return data


_spawn_preparation_data = multiprocessing.spawn.get_preparation_data
# Installed once per process; any other process name gets multiprocessing's own data unchanged.
multiprocessing.spawn.get_preparation_data = _preparation_data  # type: ignore[assignment]


def _within_cpu_budget(fn: Callable[..., Any], budget_s: float | None, *args: Any) -> Any:
    """Run ``fn(*args)`` in a worker; the kernel kills the worker (SIGXCPU) once the call used ``budget_s`` of CPU."""
    if budget_s is None or sys.platform != "linux":
        return fn(*args)
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = math.ceil(usage.ru_utime + usage.ru_stime + budget_s)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
    try:
        return fn(*args)
    finally:
        resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))


class _WorkerProcess(multiprocessing.context.SpawnProcess):
    """A spawned worker under :data:`WORKER_NAME`, whatever name the pool gives it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.name = WORKER_NAME


class _SpawnWithoutMain(multiprocessing.context.SpawnContext):
    Process = _WorkerProcess


class WorkerPool(Generic[K]):
    """``processes`` worker processes; each call gets at most ``timeout_s`` seconds of CPU (module docstring).

    Use as a context manager; :meth:`run` yields results as calls finish (not in submission order).
    """

    def __init__(
        self,
        processes: int,
        timeout_s: float | None,
        *,
        preload: Iterable[str] = (),
        import_parent_main: bool = True,
    ) -> None:
        import pebble  # only the processes that run a pool need it

        if processes < 1:
            raise ValueError(f"a worker pool needs at least one process, got {processes}")
        self.processes = processes
        self.timeout_s = timeout_s
        self._pool = pebble.ProcessPool(
            max_workers=processes,
            initializer=_start_worker,
            initargs=(os.getpid(), tuple(preload)),
            # without the parent's main script when the tasks do not live there (module docstring)
            context=multiprocessing.get_context("spawn") if import_parent_main else _SpawnWithoutMain(),
        )

    def __enter__(self) -> WorkerPool[K]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close(cancel=exc_info[0] is not None)

    def close(self, *, cancel: bool = False) -> None:
        if cancel:
            self._pool.stop()  # a crashed or interrupted caller: kill the workers, do not wait for them
        else:
            self._pool.close()
        self._pool.join()

    def run(self, fn: Callable[..., Any], calls: Iterable[tuple[K, tuple[Any, ...]]]) -> Iterator[tuple[K, Any]]:
        """Call ``fn(*args)`` for each ``(key, args)``; yield ``(key, value or TaskFailed)`` as each finishes.

        ``fn`` must be a module-level function (it is pickled by reference); its arguments and value are
        pickled across the process boundary, so keep them small (keys and configs, not documents).
        """
        from pebble import ProcessExpired

        budget = self.timeout_s
        wall = None if budget is None else budget * WALL_BACKSTOP_FACTOR
        futures: dict[concurrent.futures.Future[Any], K] = {
            self._pool.schedule(_within_cpu_budget, args=(fn, budget, *args), timeout=wall): key for key, args in calls
        }
        for future in concurrent.futures.as_completed(futures):
            key = futures[future]
            try:
                yield key, future.result()
            except TimeoutError:
                yield (
                    key,
                    TaskFailed(
                        "stalled",
                        f"not finished after {wall:g} s of wall clock without using its {budget:g} s of CPU "
                        "(workers.timeout_s): its worker waited for a core or for I/O; tried again next time",
                    ),
                )
            except ProcessExpired as exc:
                if exc.exitcode == -signal.SIGXCPU:
                    yield key, TaskFailed("timeout", f"used more than {budget:g} s of CPU (workers.timeout_s)")
                else:
                    yield key, TaskFailed("crashed", f"the worker process died (exit code {exc.exitcode})")
            except concurrent.futures.CancelledError:
                yield key, TaskFailed("error", "cancelled")
            except Exception as exc:  # raised by fn in the worker, re-raised here
                yield key, TaskFailed("error", error_text(exc))


class InlinePool(Generic[K]):
    """:class:`WorkerPool`'s interface, in this process: no parallelism, no time limit.

    An exception from ``fn`` becomes :class:`TaskFailed` ``error`` as in the pool; a ``BaseException``
    (``KeyboardInterrupt``, a test's simulated kill) propagates, as the death of the process would.
    """

    processes = 1
    timeout_s = None

    def __enter__(self) -> InlinePool[K]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def run(self, fn: Callable[..., Any], calls: Iterable[tuple[K, tuple[Any, ...]]]) -> Iterator[tuple[K, Any]]:
        for key, args in calls:
            try:
                value = fn(*args)
            except Exception as exc:
                log.warning("%s failed: %s", key, exc, exc_info=True)
                yield key, TaskFailed("error", error_text(exc))
                continue
            yield key, value
