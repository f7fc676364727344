"""A server started through ``local_stack`` dies with the process that started it (issue 20): a killed
test run or demo leaves no moto or VLM server behind. The starter is a plain Python process that starts moto
with ``moto_s3_server`` (as the fixtures and the demo do) and is then SIGKILLed, so none of its cleanup runs.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

STARTER = """
import sys, time
from pathlib import Path
from mkg_devstack.local_stack import moto_s3_server
server = moto_s3_server(Path(sys.argv[1])).start()
print(server.process.pid, flush=True)
time.sleep(600)
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_killed_starter_takes_its_server_down(tmp_path: Path) -> None:
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(tmp_path)],
        stdout=subprocess.PIPE,
        # a background job's SIGINT is ignored, and that must not reach the server either
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        assert starter.stdout is not None
        server_pid = int(starter.stdout.readline())
        assert _running(server_pid)
        assert b"moto.server" in Path(f"/proc/{server_pid}/cmdline").read_bytes()  # the server's own pid
        sig_ignored = int(Path(f"/proc/{server_pid}/status").read_text().split("SigIgn:")[1].split()[0], 16)
        assert not sig_ignored & (1 << (signal.SIGINT - 1)), "the server inherited an ignored SIGINT"

        starter.kill()
        starter.wait(timeout=30)

        deadline = time.monotonic() + 30  # generous: the kernel signals at once, moto exits in well under 1 s
        while _running(server_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(server_pid), f"moto (pid {server_pid}) outlived the process that started it"
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait(timeout=30)
