"""Start and stop the local stand-ins (local VLM server, moto S3) as child processes.

Used by the demo command and by the test fixtures, so that both start the
real components the same way: on 127.0.0.1, on a free port, waiting for a
health URL, and always stopped by whoever started them.

Each child leads a session of its own (a Ctrl-C in the terminal reaches the
parent first, which stops children in order; ``stop`` signals the whole process
group, so what a server started goes with it). A child must not outlive its
parent even when the parent cannot clean up (SIGKILL, OOM): it is started
through a tiny launcher that asks Linux for a parent-death signal
(``prctl(PR_SET_PDEATHSIG, SIGTERM)``) and resets SIGINT/SIGTERM to their
defaults before it execs the server. A background job starts with SIGINT
ignored, and an ignored signal survives exec: Dagster maps SIGTERM onto the
SIGINT handler, so a ``dagster dev`` inheriting the ignored SIGINT would
ignore SIGTERM too.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"

#: Runs in the child between fork and the server's exec (``python -I -S -c``: stdlib only, ~20 ms). The
#: parent-death signal is sent when the *thread* that forked the child ends, so start servers from the
#: thread that lives as long as they should (the main thread, in the demo and in pytest fixtures). It
#: survives exec; if the parent died before prctl took effect, the child is already orphaned: it exits.
_LAUNCHER = """
import ctypes, os, signal, sys
parent, argv = int(sys.argv[1]), sys.argv[2:]
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, signal.SIG_DFL)
if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:
        sys.exit(f"parent {parent} exited before {argv[0]} started")
os.execvp(argv[0], argv)
"""


def launcher_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` wrapped so that the process dies with this one (see ``_LAUNCHER``); same pid as the server."""
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(os.getpid()), *argv]


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_http(url: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``url`` until it answers 2xx; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout_s
    last_error = "no attempt made"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with code {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if 200 <= response.status < 300:
                    return
                last_error = f"HTTP {response.status}"
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            last_error = str(exc)
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not become healthy within {timeout_s:.0f}s (last error: {last_error})")


@dataclass
class ManagedProcess:
    """A child process serving HTTP on ``host:port``, with its log file."""

    name: str
    argv: list[str]
    host: str
    port: int
    health_path: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict, repr=False)  # may hold a secret (VLLM_API_KEY)
    startup_timeout_s: float = 60.0
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ManagedProcess:
        if self.process is not None and self.process.poll() is None:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = self.log_path.open("ab")
        env = {**os.environ, **self.env}
        log.info("starting %s: %s", self.name, " ".join(self.argv))
        # start_new_session: a Ctrl-C in the terminal reaches us first, and we stop children in order.
        self.process = subprocess.Popen(
            launcher_argv(self.argv), stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log_file.close()
        try:
            wait_for_http(self.url + self.health_path, self.startup_timeout_s, self.process)
        except BaseException:
            self.stop()
            raise RuntimeError(f"{self.name} failed to start; last log lines:\n{self.tail_log()}") from None
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout_s)

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), as a crashed server would."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tail_log(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> ManagedProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def local_vlm_server(
    log_dir: Path,
    *,
    port: int | None = None,
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_num_seqs: int | None = None,
    extra_args: Sequence[str] = (),
) -> ManagedProcess:
    """The project's OpenAI-compatible local VLM server (not started yet).

    The API key travels in the child's environment (``VLLM_API_KEY``, which the
    server reads as vLLM does), never on its command line: ``ps`` would show it,
    and a key starting with ``-`` would be taken for a flag. Without a key, an
    inherited ``VLLM_API_KEY`` is blanked so that the server really is open.
    """
    port = port or free_port()
    argv = [sys.executable, "-m", "mkg_devstack.local_server", "--host", LOOPBACK, "--port", str(port)]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    if max_num_seqs:
        argv += ["--max-num-seqs", str(max_num_seqs)]
    argv += list(extra_args)
    return ManagedProcess(
        name="local-vlm-server",
        argv=argv,
        host=LOOPBACK,
        port=port,
        health_path="/health",
        log_path=log_dir / f"local-vlm-server-{port}.log",
        env={"VLLM_API_KEY": api_key or ""},
        startup_timeout_s=120.0,
    )


def moto_s3_server(log_dir: Path, *, port: int | None = None) -> ManagedProcess:
    """moto in server mode: a real S3 HTTP endpoint on loopback (the MinIO stand-in)."""
    port = port or free_port()
    argv = [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)]
    return ManagedProcess(
        name="moto-s3",
        argv=argv,
        host=LOOPBACK,
        port=port,
        health_path="/moto-api/",
        log_path=log_dir / f"moto-s3-{port}.log",
        env={"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
        startup_timeout_s=60.0,
    )
