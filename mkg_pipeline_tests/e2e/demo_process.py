"""The demo (``python -m mkg_devstack.demo --serve-ui``) as a background process for e2e tests.

Started as CI, ``timeout`` and systemd start it: SIGINT ignored, in a session of its own (so that whatever a
test leaves behind can be killed as a group). Its output goes to ``log``; ``wait_for`` polls it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from mkg_devstack.local_stack import LOOPBACK, free_port
from mkg_pipeline_tests.fixtures.corpus import REPO_ROOT, corpus_root

#: bounded waits, generous: the machine is shared, dagster dev loads the code location, runs OCR on CPU
START_S = 600


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # what a shell's `&`, `timeout` or a CI runner leave behind


@dataclass
class DemoProcess:
    process: subprocess.Popen[bytes]
    log: Path
    ui_port: int
    workdir: Path

    @property
    def ui_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ui_port}"

    @classmethod
    @contextmanager
    def start(cls, tmp_path: Path, files: list[str], *extra: str) -> Iterator[DemoProcess]:
        log, port, workdir = tmp_path / "demo.out", free_port(), tmp_path / "demo"
        argv = [sys.executable, "-m", "mkg_devstack.demo", "--serve-ui", "--ui-port", str(port), "--files", *files]
        argv += ["--corpus", str(corpus_root()), "--workdir", str(workdir), *extra]
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_ignore_sigint,
                start_new_session=True,
            )
        try:
            yield cls(process, log, port, workdir)
        finally:
            if process.poll() is None:
                process.terminate()  # the demo's own cleanup stops its servers
                try:
                    process.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=30)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, *needles: str, timeout_s: float = START_S) -> str:
        """The first of ``needles`` to appear in the output; fails if the demo exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.output()
            for needle in needles:
                if needle in text:
                    return needle
            if self.process.poll() is not None:
                pytest.fail(f"the demo exited with {self.process.returncode} before {needles}:\n{text[-3000:]}")
            time.sleep(0.5)
        pytest.fail(f"no {needles} in the demo's output within {timeout_s:.0f}s:\n{self.output()[-3000:]}")
