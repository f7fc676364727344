"""pdf.pool: how many processes a pod gets, and the in-process pool's contract."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mkg_pipeline.pdf import pool
from mkg_pipeline.pdf.pool import InlinePool, TaskFailed, available_cpus, pool_size


def _cgroup(tmp_path: Path, cpu_max: str) -> Path:
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    return tmp_path


def test_available_cpus_is_the_affinity_capped_by_the_cgroup_quota(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(_cgroup(tmp_path, "max 100000")) == affinity  # no quota
    assert available_cpus(_cgroup(tmp_path, "100000 100000")) == 1
    assert available_cpus(_cgroup(tmp_path, "150000 100000")) == min(affinity, 2)  # 1.5 CPUs: round up
    assert available_cpus(_cgroup(tmp_path, "6400000 100000")) == affinity  # quota above the cores: cores
    assert available_cpus(_cgroup(tmp_path, "garbage")) == affinity


def test_available_cpus_follows_the_affinity_mask(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    assert available_cpus(_cgroup(tmp_path, "max 100000")) == 8
    assert available_cpus(_cgroup(tmp_path, "400000 100000")) == 4  # a pod limited to 4 CPUs on a big node


def test_pool_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool, "available_cpus", lambda: 4)
    assert pool_size(0, 100) == 4  # 0: one process per available CPU
    assert pool_size(0, 2) == 2  # never more processes than documents
    assert pool_size(6, 100) == 6  # workers.render_processes overrides
    assert pool_size(0, 0) == 1


class _Boom(BaseException):
    pass


def _work(x: int) -> int:
    if x == 2:
        raise ValueError("two is broken")
    if x == 3:
        raise _Boom("the process dies")
    return x * 10


def test_inline_pool_turns_exceptions_into_failures_but_not_kills() -> None:
    with InlinePool() as inline:
        results = inline.run(_work, [(str(x), (x,)) for x in (1, 2, 3)])
        assert next(results) == ("1", 10)
        assert next(results) == ("2", TaskFailed("error", "ValueError: two is broken"))
        with pytest.raises(_Boom):
            next(results)


_KILLED_RUN = """
import os, sys, time
from mkg_pipeline.pdf.pool import WorkerPool

def main():
    with WorkerPool(1, timeout_s=None) as pool:
        for _ in pool.run(_stuck, [("doc", (sys.argv[1],))]):
            pass

if __name__ == "__main__":
    from killed_run import _stuck
    main()
"""

_STUCK = """
import os, time

def _stuck(pid_file):
    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie waiting for its (dead) parent to reap it is gone for our purpose.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_a_killed_run_leaves_no_worker_behind(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "killed_run.py").write_text(_STUCK)
    (tmp_path / "run.py").write_text(_KILLED_RUN)
    pid_file = tmp_path / "worker.pid"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    run = subprocess.Popen([sys.executable, str(tmp_path / "run.py"), str(pid_file)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and run.poll() is None, "the worker never started its task"
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        assert _alive(worker)
        run.send_signal(signal.SIGKILL)  # kill -9 of the run: no cleanup code runs in it
        run.wait()
        deadline = time.monotonic() + 60
        while _alive(worker):
            assert time.monotonic() < deadline, f"worker {worker} outlived its killed run"
            time.sleep(0.1)
    finally:
        run.kill()


_MAIN_SCRIPT = """
import os, sys
with open(sys.argv[1], "a") as log:  # every process that runs this script, workers re-running it included
    log.write(f"{os.getpid()}\\n")
from mkg_pipeline.pdf.pool import WorkerPool
from tasks import pid_and_main

if __name__ == "__main__":
    for import_parent_main in (True, False):
        with WorkerPool(1, timeout_s=None, preload=("tasks",), import_parent_main=import_parent_main) as pool:
            ((_, (pid, main)),) = pool.run(pid_and_main, [("doc", ())])
            print(import_parent_main, pid, main)
"""

_TASKS = """
import os, sys

def pid_and_main():
    return os.getpid(), getattr(sys.modules.get("__mp_main__"), "__file__", None)
"""


def test_stage_workers_do_not_re_run_the_parent_s_main_script(tmp_path: Path) -> None:
    """In a run pod the main script is Dagster's console script: a worker re-running it imports all of Dagster."""
    import subprocess
    import sys

    (tmp_path / "tasks.py").write_text(_TASKS)
    (tmp_path / "main_script.py").write_text(_MAIN_SCRIPT)
    log = tmp_path / "ran-main.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    done = subprocess.run(
        [sys.executable, str(tmp_path / "main_script.py"), str(log)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (with_main, with_pid, with_file), (without_main, without_pid, without_file) = (
        line.split() for line in done.stdout.splitlines()
    )
    assert (with_main, without_main) == ("True", "False")
    ran_main = set(log.read_text().split())
    assert with_pid in ran_main and with_file.endswith("main_script.py")  # multiprocessing's default
    assert without_pid not in ran_main and without_file == "None"  # the stages' pools
    assert len(ran_main) == 2  # the script itself and the one worker that was allowed to


def _burn_cpu() -> str:
    """What MuPDF does on a pathological page: compute, without end."""
    while True:
        sum(range(10_000))


def _wait_without_cpu(seconds: float) -> str:
    """What a worker starved of a core (or blocked on I/O) looks like from its process: no CPU used."""
    import time

    time.sleep(seconds)
    return "done"


def _cpu_limit_in_call() -> tuple[int, int]:
    import resource

    return resource.getrlimit(resource.RLIMIT_CPU)


@pytest.mark.skipif(os.name != "posix" or not Path("/proc").exists(), reason="RLIMIT_CPU is Linux's")
def test_a_call_that_uses_its_cpu_budget_is_a_timeout_and_one_that_only_waits_is_stalled() -> None:
    """The budget is CPU: a good file that waits for a core is not rejected as pathological (it is
    ``stalled``, retried next time); one that computes past its budget is killed as ``timeout``."""
    with pool.WorkerPool(2, timeout_s=1, import_parent_main=False) as workers:
        results = dict(
            workers.run(
                _dispatch,
                [("burns", ("burn",)), ("waits", ("wait",)), ("quick", ("quick",))],
            )
        )
    assert isinstance(results["burns"], TaskFailed) and results["burns"].kind == "timeout", results["burns"]
    assert "s of CPU" in results["burns"].message
    assert isinstance(results["waits"], TaskFailed) and results["waits"].kind == "stalled", results["waits"]
    assert "tried again" in results["waits"].message
    # during a call the worker's soft CPU limit is what it had used plus the budget (ceiled to the second)
    import resource

    soft, _hard = results["quick"]
    assert soft != resource.RLIM_INFINITY and soft >= 1, results["quick"]


def _dispatch(what: str) -> object:
    if what == "burn":
        return _burn_cpu()
    if what == "wait":
        # sleeps past the wall backstop (3 x 1 s) without using CPU
        return _wait_without_cpu(pool.WALL_BACKSTOP_FACTOR * 1 + 30)
    return _cpu_limit_in_call()


def test_a_stalled_validation_is_retried_not_rejected() -> None:
    """ingest records a stalled worker as an error (next materialization retries), never as a rejection."""
    from mkg_pipeline.stages.ingest import _outcome_of

    obj = {"key": "incoming/good.pdf", "size": 10}
    outcome = _outcome_of(None, obj, TaskFailed("stalled", "waited for a core"), 10)  # type: ignore[arg-type]
    assert outcome["status"] == "error" and "waited for a core" in outcome["message"]
