"""Stopping the demo (issue 20): SIGTERM stops it and every server it started, also when it runs in the
background with SIGINT ignored (as CI, ``timeout``, systemd and ``docker stop`` start it); SIGKILL takes its
servers down with it (the parent-death signal set by ``local_stack``).

The demo runs its real ``--serve-ui`` path on the smallest file set (one one-page PDF): moto, the local VLM
server and ``dagster dev`` (webserver, daemon, code server, and the run the daemon launches). A process "of
the demo" is any descendant of it, and anything else in the sessions its servers lead (each server is a
session leader; Dagster's processes stay in their parent's session), looked up in /proc.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mkg_pipeline_tests.e2e.demo_process import DemoProcess

pytestmark = pytest.mark.e2e

GONE_S = 60  # bounded wait, generous: the machine is shared


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, session id, start time) of a live process, None if it is gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[3]), int(fields[19])


def _processes() -> dict[int, tuple[int, int, int]]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            found[int(entry.name)] = stat
    return found


def _family(root: int) -> dict[int, int]:
    """The descendants of ``root`` and every process in their sessions: pid -> start time."""
    table = _processes()
    family: set[int] = set()
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _, _) in table.items() if ppid == parent and pid not in family]
        family.update(children)
        frontier.extend(children)
    sessions = {table[pid][1] for pid in family if pid in table} - {os.getsid(0)}
    family |= {pid for pid, (_, sid, _) in table.items() if sid in sessions}
    family.discard(root)
    return {pid: table[pid][2] for pid in family if pid in table}


def _alive(family: dict[int, int]) -> list[str]:
    """The members still running (same pid and start time), with their command lines."""
    left = []
    for pid, started in family.items():
        stat = _stat(pid)
        if stat is not None and stat[2] == started:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
            except OSError:
                continue
            left.append(f"{pid}: {cmdline}")
    return left


@pytest.fixture
def background_demo(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    with DemoProcess.start(tmp_path, ["minimal-document.pdf"]) as demo:
        # Servers up, the file dropped; a run launched by the daemon if it gets that far in time.
        demo.wait_for("waiting for the sensor")
        demo.wait_for(": STARTED", "serving the Dagster UI")
        family = _family(demo.process.pid)
        try:
            yield demo.process, demo.log
        finally:
            # Whatever the test left: never leave servers behind on the shared machine.
            for entry in _alive(_family(demo.process.pid)) + _alive(family):
                os.kill(int(entry.split(":", 1)[0]), signal.SIGKILL)


def _wait_gone(family: dict[int, int], timeout_s: float) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while (left := _alive(family)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_sigterm_stops_the_background_demo_and_everything_it_started(
    background_demo: tuple[subprocess.Popen[bytes], Path],
) -> None:
    process, log = background_demo
    family = _family(process.pid)
    names = " ".join(_alive(family))
    for server in ("moto.server", "mkg_devstack.local_server", "dagster dev", "dagster_webserver", "dagster._daemon"):
        assert server in names, f"{server} not running before the signal: {names}"

    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)

    assert _wait_gone(family, GONE_S) == []
    assert "SIGTERM: stopping" in log.read_text()


def test_sigkill_takes_the_demos_servers_down_with_it(background_demo: tuple[subprocess.Popen[bytes], Path]) -> None:
    process, _ = background_demo
    family = _family(process.pid)
    assert len(family) >= 5, family  # moto, VLM server, dagster dev and its webserver and daemon at least

    process.kill()  # no cleanup code of the demo runs
    process.wait(timeout=30)

    assert _wait_gone(family, GONE_S) == []
