"""The shipped local dagster.yaml under a real daemon: killed runs give their pool slot back (issue 9 row 3),
and a second run of one partition waits in the queue (row 2, the Dagster-side guard).

A real instance in a temp DAGSTER_HOME with the repository's dagster.yaml, a gRPC code server
(``dagster api grpc``; the DefaultRunLauncher starts each run as its subprocess, as ``dagster dev`` and
the compose stack do) and ``dagster-daemon run``. Runs are submitted with ``dagster job launch``. The
code location is ``daemon_location.py``: assets (one in pool ``vllm``) that hold their run until the
test releases them. Only what makes the test quick is changed in the copied dagster.yaml: the pool limit is
1 (one held slot blocks everything), and the intervals the file sets (run monitoring, dequeueing) are
shortened to 1 s; every setting the file does not have stays absent.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
import yaml

from mkg_devstack.local_stack import LOOPBACK, free_port
from mkg_pipeline_tests.fixtures.corpus import REPO_ROOT

pytestmark = pytest.mark.e2e

LOCATION = Path(__file__).with_name("daemon_location.py")
BIN = Path(sys.executable).parent
WAIT_S = 180  # bounded waits; generous because the CI box is shared


def _test_instance_yaml() -> str:
    config = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())
    config["concurrency"]["pools"]["default_limit"] = 1
    config.setdefault("run_coordinator", {}).setdefault("config", {})["dequeue_interval_seconds"] = 1
    monitoring = config.get("run_monitoring") or {}
    for key in ("poll_interval_seconds", "free_slots_after_run_end_seconds"):
        if key in monitoring:
            monitoring[key] = 1
    return yaml.safe_dump(config)


@dataclass
class DaemonStack:
    home: Path
    guard: Path
    workspace: Path
    env: dict[str, str]
    instance: dg.DagsterInstance
    log_dir: Path

    def launch(self, partition: str, job: str = "slot_job") -> str:
        run_id = str(uuid.uuid4())
        process = subprocess.run(
            [
                str(BIN / "dagster"),
                "job",
                "launch",
                "-w",
                str(self.workspace),
                "-j",
                job,
                "--run-id",
                run_id,
                "--tags",
                json.dumps({"dagster/partition": partition}),
            ],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-2000:]
        return run_id

    def status(self, run_id: str) -> dg.DagsterRunStatus:
        run = self.instance.get_run_by_id(run_id)
        assert run is not None
        return run.status

    def release(self, partition: str) -> None:
        (self.guard / f"release-{partition}").touch()

    def started_pid(self, partition: str, run_id: str) -> int | None:
        marker = self.guard / f"started-{partition}-{run_id}"
        return int(marker.read_text()) if marker.exists() and marker.read_text() else None

    def wait_for(self, condition: Callable[[], bool], what: str, runs: dict[str, str]) -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.5)
        states = {name: self.status(run_id).value for name, run_id in runs.items()}
        daemon_log = (self.log_dir / "daemon.log").read_text()[-3000:]
        raise AssertionError(f"not within {WAIT_S}s: {what}; runs: {states}\n--- daemon log ---\n{daemon_log}")


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a process we started and its process group (the runs a code server started)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # what is left of the group (run subprocesses)
    process.wait(timeout=20)


@pytest.fixture(scope="module")
def daemon_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonStack]:
    root = tmp_path_factory.mktemp("daemon")
    home = root / "home"
    home.mkdir()
    with _daemon_stack(root, home, _test_instance_yaml()) as stack:
        yield stack


@contextlib.contextmanager
def _daemon_stack(root: Path, home: Path, instance_yaml: str) -> Iterator[DaemonStack]:
    """A code server and a daemon on the instance in ``home`` (an existing directory), set up by ``instance_yaml``."""
    guard, logs = root / "guard", root / "logs"
    for d in (guard, logs):
        d.mkdir()
    (home / "dagster.yaml").write_text(instance_yaml)
    port = free_port()
    workspace = root / "workspace.yaml"
    workspace.write_text(
        yaml.safe_dump({"load_from": [{"grpc_server": {"host": LOOPBACK, "port": port, "location_name": "guards"}}]})
    )
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "MKG_TEST_GUARD_DIR": str(guard),
        "PYTHONPATH": str(REPO_ROOT),
    }
    server = _start(
        [str(BIN / "dagster"), "api", "grpc", "-f", str(LOCATION), "-h", LOOPBACK, "-p", str(port)],
        env,
        logs / "code-server.log",
    )
    daemon = None
    try:
        deadline = time.monotonic() + WAIT_S
        while True:  # the code server answers its health check once the location is loaded
            check = subprocess.run(
                [str(BIN / "dagster"), "api", "grpc-health-check", "-p", str(port), "--host", LOOPBACK],
                env=env,
                capture_output=True,
                timeout=60,
            )
            if check.returncode == 0:
                break
            assert server.poll() is None, (logs / "code-server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "code server did not come up"
            time.sleep(1)
        daemon = _start([str(BIN / "dagster-daemon"), "run", "-w", str(workspace)], env, logs / "daemon.log")
        with dg.DagsterInstance.from_config(str(home)) as instance:
            yield DaemonStack(home, guard, workspace, env, instance, logs)
    finally:
        if daemon is not None:
            _stop(daemon)
        _stop(server)


def test_a_killed_run_gives_its_pool_slot_back(daemon_stack: DaemonStack) -> None:
    """Row 3: kill -9 of a run holding the only `vllm` slot; the next run still gets the slot and finishes."""
    stack = daemon_stack
    victim = stack.launch("p1")  # never released: it holds the slot until killed
    runs = {"victim": victim}
    stack.wait_for(lambda: stack.started_pid("p1", victim) is not None, "the victim holds the vllm slot", runs)
    pid = stack.started_pid("p1", victim)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)

    stack.release("p2")
    successor = stack.launch("p2")
    runs["successor"] = successor
    stack.wait_for(
        lambda: stack.status(successor) == dg.DagsterRunStatus.SUCCESS,
        "the next run got the vllm slot and finished",
        runs,
    )
    assert stack.status(victim) == dg.DagsterRunStatus.FAILURE


def test_a_second_run_of_a_partition_waits_in_the_queue(daemon_stack: DaemonStack) -> None:
    """Row 2 (Dagster side): runs tagged with the same partition never run at once; others are not held up."""
    stack = daemon_stack
    first = stack.launch("p3", job="partition_job")  # no pool: only the partition can hold a run back
    runs = {"first": first}
    stack.wait_for(lambda: stack.started_pid("p3", first) is not None, "the first run of p3 is working", runs)
    second = stack.launch("p3", job="partition_job")  # same partition, submitted first ...
    runs["second"] = second
    other = stack.launch("p4", job="partition_job")  # ... another partition, submitted after it
    runs["other"] = other
    stack.wait_for(
        lambda: stack.status(other) in {dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.SUCCESS},
        "the run of another partition was launched",
        runs,
    )
    assert stack.status(second) == dg.DagsterRunStatus.QUEUED, "two runs of partition p3 were running at once"

    stack.release("p3")
    stack.release("p4")
    stack.wait_for(
        lambda: all(stack.status(r) == dg.DagsterRunStatus.SUCCESS for r in (first, second, other)),
        "all three runs finished",
        runs,
    )
    first_record, second_record = (stack.instance.get_run_record_by_id(r) for r in (first, second))
    assert first_record and second_record and first_record.end_time and second_record.start_time
    assert second_record.start_time >= first_record.end_time


# ---- DAGSTER_HOME's disk fills up during a run (issue 21 row 9) ---------------------------------------------


def _mount(*args: str) -> bool:
    try:
        return subprocess.run(["mount", *args], capture_output=True).returncode == 0
    except FileNotFoundError:  # no mount(8)
        return False


def _fill(directory: Path) -> Path:
    """A file that takes every free byte of ``directory``'s file system (the disk is full)."""
    filler = directory / "filler"
    with filler.open("wb") as out:
        chunk = b"\0" * (1 << 20)
        with contextlib.suppress(OSError):  # ENOSPC: full
            while True:
                out.write(chunk)
                out.flush()
    for size in (65536, 4096, 512, 1):  # the last partial blocks too
        with contextlib.suppress(OSError), filler.open("ab") as out:
            while True:
                out.write(b"\0" * size)
                out.flush()
    return filler


@contextlib.contextmanager
def _stack_on_tmpfs(tmp_path: Path, max_runtime_s: int | None = None) -> Iterator[DaemonStack]:
    """A daemon stack whose DAGSTER_HOME is a 48 MiB tmpfs: a file system a test can fill (needs root)."""
    config = yaml.safe_load(_test_instance_yaml())
    if max_runtime_s is not None:
        assert config["run_monitoring"].get("max_runtime_seconds"), "dagster.yaml sets no max_runtime_seconds"
        config["run_monitoring"]["max_runtime_seconds"] = max_runtime_s
    home = tmp_path / "home"
    home.mkdir()
    if os.geteuid() != 0 or not _mount("-t", "tmpfs", "-o", "size=48m", "tmpfs", str(home)):
        pytest.skip("a file system that can be filled needs a tmpfs mount (root, CAP_SYS_ADMIN)")
    try:
        with _daemon_stack(tmp_path, home, yaml.safe_dump(config)) as stack:
            yield stack
    finally:
        subprocess.run(["umount", "-l", str(home)], check=False)


def _run_until_the_disk_is_full(stack: DaemonStack, partition: str) -> tuple[str, int, Path]:
    """Launch a run, fill DAGSTER_HOME's disk while it works, let it go on; returns its id, pid and the filler."""
    run_id = stack.launch(partition, job="partition_job")
    runs = {"victim": run_id}
    stack.wait_for(lambda: stack.started_pid(partition, run_id) is not None, "the run is working", runs)
    pid = stack.started_pid(partition, run_id)
    assert pid is not None
    filler = _fill(stack.home)
    stack.release(partition)  # its next events (output, success) no longer fit
    stack.wait_for(lambda: not _alive(pid), "the run worker stopped on its full disk", runs)
    return run_id, pid, filler


def test_a_run_whose_home_fills_up_is_recorded_as_failed(tmp_path: Path) -> None:
    """Row 9: with DAGSTER_HOME's disk full, the run's worker died with nothing recorded (its failure could not be
    written, and the code server that would mark it failed gives up after one failed write): the run stayed
    STARTED for ever, so the sensor never saw it fail. Now the first event that does not fit fails the run, in
    the space of the reserve the instance keeps, with a message naming the full home."""
    with _stack_on_tmpfs(tmp_path) as stack:
        assert (stack.home / ".mkg-storage-reserve").stat().st_size > 0
        run_id, _, filler = _run_until_the_disk_is_full(stack, "p5")
        filler.unlink()  # only so that the test can read the instance (SQLite cannot even read a full disk)
        assert stack.status(run_id) == dg.DagsterRunStatus.FAILURE
        failures = stack.instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
        assert f"DAGSTER_HOME {stack.home} is full" in (failures[0].dagster_event.message or "")


def test_a_run_left_started_on_a_full_home_is_failed_by_run_monitoring(tmp_path: Path) -> None:
    """Row 9's backstop: when not even the failure fits (no reserve left), run monitoring's max_runtime_seconds
    fails the run once the daemon can write again; before, it stayed STARTED for ever."""
    with _stack_on_tmpfs(tmp_path, max_runtime_s=20) as stack:  # the run holds far less than that
        (stack.home / ".mkg-storage-reserve").unlink()  # spent by an earlier fault
        run_id, _, filler = _run_until_the_disk_is_full(stack, "p6")
        filler.unlink()  # the operator frees space
        stack.wait_for(
            lambda: stack.status(run_id) == dg.DagsterRunStatus.FAILURE,
            "run monitoring failed the run",
            {"victim": run_id},
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by the code server) counts as gone
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    return False
