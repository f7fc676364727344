"""The fault campaign of issue 9: what its cases (``test_fault_campaign_*.py``) share.

Every case runs the real components: moto S3 reached by the pipeline through a TCP proxy that the case
can cut or slow down (the test itself reads moto directly), a local VLM server with fault injection
(one per test module, faults reset before each case), and a Dagster instance in a temp DAGSTER_HOME.
Runs that a case kills are ``dagster asset materialize`` processes in a session of their own, killed
with ``os.killpg(pgid, SIGKILL)``, workers and all.

After each case the bucket passes the audit, and a re-run requests exactly the pages that have no
stored result: counted in the re-run's own ``vlm_outputs`` metadata (``pages_processed``,
``requests``, ``pages_cached``) and in the server's ``vllm:request_success_total``, with no page
lost (each page of each manifest has a result after the re-run) and none duplicated (no page with a
result is requested again).

Set ``MKG_CAMPAIGN_REPORT=<file>`` to have each case append its row of the campaign table (fault,
pages requested on the re-run, lost, duplicated, what the run showed) to that file as JSON lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import dagster as dg
import pytest

from mkg_pipeline_tests.e2e.conftest import ALL_ASSETS, PipelineEnv
from mkg_pipeline_tests.fixtures.corpus import REPO_ROOT, corpus_pdf
from mkg_pipeline_tests.fixtures.local_server import LocalVLMServer
from mkg_pipeline_tests.fixtures.proxy import TcpProxy

T = TypeVar("T")

#: bounded waits (a shared 2-core box); never an assertion on time
WAIT_S = 240.0
POLL_S = 0.05
#: the lease TTL of the campaign: a killed run's claim expires this soon, and the re-run waits for it
LEASE_TTL_S = 5
DAGSTER = Path(sys.executable).parent / "dagster"
_PAGE_RESULT = re.compile(r"^vlm/([0-9a-f]{16})/pages/(\d+)\.([^./]+)\.json$")


def tiny_pdf(tag: str, pages: int = 1) -> bytes:
    """A small document (300 x 150 pt pages, one line of text each): cheap to render and to read on a
    CPU, a text layer on every page, and its own doc_id per ``tag``."""
    import pymupdf

    with pymupdf.open() as document:
        for n in range(1, pages + 1):
            page = document.new_page(width=300, height=150)
            page.insert_text((20, 50), f"Campaign {tag}, page {n} of {pages}.", fontsize=13)
            page.insert_text((20, 80), "Nothing is ever lost.", fontsize=13)
        return bytes(document.tobytes())


def doc_id_of(data: bytes) -> str:
    from mkg_pipeline.ids import doc_id_from_sha256, sha256_hex

    return doc_id_from_sha256(sha256_hex(data))


def variant(name: str, n: int) -> bytes:
    """The corpus file ``name`` with a comment appended after ``%%EOF``: other bytes (another document,
    another doc_id), the same pages. A tiny way to have many distinct documents."""
    return corpus_pdf(name).read_bytes() + f"\n% campaign variant {n}\n".encode()


def wait_until(condition: Callable[[], T], what: str, *, timeout_s: float = WAIT_S, run: CliRun | None = None) -> T:
    """Poll ``condition`` until it returns something true; fail if ``run`` ends first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if run is not None and run.finished:
            raise AssertionError(f"the run ended (exit {run.process.returncode}) before {what}:\n{run.tail()}")
        time.sleep(POLL_S)
    raise AssertionError(f"not within {timeout_s:.0f}s: {what}" + (f"\n{run.tail()}" if run else ""))


@dataclass
class CliRun:
    """A ``dagster asset materialize`` process in a session (process group) of its own."""

    process: subprocess.Popen[bytes]
    log: Path

    @property
    def finished(self) -> bool:
        return self.process.poll() is not None

    def tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout_s: float = WAIT_S) -> int:
        return self.process.wait(timeout=timeout_s)

    def kill(self) -> None:
        """SIGKILL to the run's whole process group: the CLI, its step processes, its worker processes."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=60)


@dataclass
class RunView:
    """What the Dagster UI shows of one run: status, failed steps and their messages, failed checks."""

    run_id: str
    status: str
    step_failures: dict[str, str]
    failed_checks: list[str]
    vlm: dict[str, Any] | None

    def describe(self) -> str:
        parts = [self.status]
        parts += [f"step {step} failed: {message}" for step, message in self.step_failures.items()]
        parts += [f"check {check} failed" for check in self.failed_checks]
        return "; ".join(parts)


@dataclass
class Campaign:
    """One case's environment (fixture ``campaign``, e2e/conftest.py)."""

    pipeline: PipelineEnv
    server: LocalVLMServer
    proxy: TcpProxy
    monkeypatch: pytest.MonkeyPatch
    cli_runs: list[CliRun] = field(default_factory=list)

    @property
    def storage(self) -> Any:
        return self.pipeline.storage  # moto directly, not through the proxy: the test sees S3 even while it is "down"

    @property
    def instance(self) -> dg.DagsterInstance:
        return self.pipeline.instance

    def set_env(self, **values: str) -> None:
        """Settings for the runs started from now on (in this process and in CLI runs)."""
        from mkg_pipeline.config import get_settings

        for key, value in values.items():
            self.monkeypatch.setenv(key, value)
            self.pipeline.env[key] = value
        get_settings.cache_clear()

    def identity(self) -> str:
        from mkg_pipeline.config import get_settings
        from mkg_pipeline.engines.base import engine_identity

        settings = get_settings()
        return engine_identity(settings.engine, settings.vllm.model, settings.prompt_version)

    def requests(self) -> int:
        """Chat completions the server answered so far (``vllm:request_success_total``)."""
        return int(self.server.read_metric("vllm:request_success_total"))

    def settle(self) -> None:
        """Wait until the server has nothing running or queued: requests a killed run left in flight are
        answered (and counted) before a re-run's count starts."""
        quiet = 0

        def idle() -> bool:
            nonlocal quiet
            busy = self.server.read_metric("vllm:num_requests_running") + self.server.read_metric(
                "vllm:num_requests_waiting"
            )
            quiet = 0 if busy else quiet + 1
            return quiet >= 5

        wait_until(idle, "the server has no request running or waiting")

    # ---- batches and runs ---------------------------------------------------------------------------

    def new_batch(self, files: dict[str, bytes]) -> str:
        """Drop ``files`` (name -> bytes) into incoming/ and let the real sensor make one batch of them."""
        for name, data in files.items():
            self.pipeline.upload(name, data=data)
        requests = self.pipeline.tick().run_requests or []
        assert len(requests) == 1, requests
        return str(requests[0].partition_key)

    def materialize_in_thread(
        self, batch: str, select: str = ALL_ASSETS, run_config: dict[str, Any] | None = None
    ) -> Callable[[], dg.ExecuteInProcessResult]:
        """Start :meth:`materialize` in a thread; the returned function joins it and gives its result."""
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["result"] = self.materialize(batch, select, run_config)
            except BaseException as exc:  # reported by join()
                outcome["error"] = exc

        thread = threading.Thread(target=target, name=f"run-{batch}")
        thread.start()

        def join() -> dg.ExecuteInProcessResult:
            thread.join(timeout=WAIT_S)
            assert not thread.is_alive(), f"the run of {batch} did not end within {WAIT_S:.0f}s"
            if "error" in outcome:
                raise outcome["error"]
            return outcome["result"]  # type: ignore[no-any-return]

        join.thread = thread  # type: ignore[attr-defined]
        return join

    def materialize(
        self, batch: str, select: str = ALL_ASSETS, run_config: dict[str, Any] | None = None
    ) -> dg.ExecuteInProcessResult:
        """A run in this process (the re-runs: they need no process of their own)."""
        from mkg_pipeline.orchestration.assets import pipeline_assets
        from mkg_pipeline.orchestration.resources import pipeline_resources

        return dg.materialize(
            pipeline_assets,
            selection=select.split(","),
            partition_key=batch,
            instance=self.instance,
            resources=pipeline_resources(),
            run_config=run_config,
            raise_on_error=False,
        )

    def start_cli(self, batch: str, select: str = ALL_ASSETS, extra_env: dict[str, str] | None = None) -> CliRun:
        """``dagster asset materialize`` as users and CI run it, in a session of its own: a kill of the
        process group takes the run down with its worker pools."""
        log = self.pipeline.home.parent / f"cli-run-{len(self.cli_runs)}.log"
        argv = [str(DAGSTER), "asset", "materialize", "-m", "mkg_pipeline", "--select", select, "--partition", batch]
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                env={**os.environ, **self.pipeline.env, **(extra_env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        run = CliRun(process, log)
        self.cli_runs.append(run)
        return run

    def stop_cli_runs(self) -> None:
        for run in self.cli_runs:
            if not run.finished:
                run.kill()

    def run_ids(self, batch: str) -> list[str]:
        """Runs of partition ``batch``, oldest first."""
        runs = self.instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": batch}))
        return [run.run_id for run in reversed(runs)]

    def view(self, run_id: str) -> RunView:
        run = self.instance.get_run_by_id(run_id)
        assert run is not None
        failures: dict[str, str] = {}
        failed_checks: list[str] = []
        vlm = None
        for entry in self.instance.all_logs(run_id):
            event = entry.dagster_event
            if event is None:
                continue
            if event.event_type == dg.DagsterEventType.STEP_FAILURE:
                error = event.step_failure_data.error
                user = event.step_failure_data.user_failure_data
                message = (user.description if user and user.description else None) or (error.message if error else "?")
                failures[str(event.step_key)] = " ".join(str(message).split())
            elif event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
                evaluation = event.event_specific_data
                if not evaluation.passed:
                    failed_checks.append(evaluation.check_name)
            elif event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION:
                materialization = event.event_specific_data.materialization
                if materialization.asset_key == dg.AssetKey("vlm_outputs"):
                    vlm = {key: value.value for key, value in materialization.metadata.items()}
        return RunView(run_id, run.status.value, failures, failed_checks, vlm)

    # ---- the bucket -----------------------------------------------------------------------------------

    def keys(self, prefix: str) -> list[str]:
        return [o.key for o in self.storage.list_objects(prefix)]

    def accepted(self, batch: str) -> list[str]:
        manifest = self.storage.get_json(self.storage.batch_key(batch))
        return list(
            dict.fromkeys(r["doc_id"] for r in manifest.get("results", {}).values() if r.get("status") == "accepted")
        )

    def page_results(self) -> dict[tuple[str, int], list[str]]:
        """(doc_id, page) -> cache keys of the stored page results (one LIST of vlm/)."""
        found: dict[tuple[str, int], list[str]] = {}
        for key in self.keys("vlm/"):
            match = _PAGE_RESULT.match(key)
            if match:
                found.setdefault((match.group(1), int(match.group(2))), []).append(match.group(3))
        return found

    def pages_without_result(self, doc_pages: dict[str, int]) -> int:
        """Pages of these documents (doc_id -> page count) with no stored result for the current identity.

        A document without a page manifest yet has all its pages missing; with one, the result must be
        the one of its current page image (cache key of PNG hash + engine identity)."""
        from mkg_pipeline.engines.base import page_cache_key

        identity, results, missing = self.identity(), self.page_results(), 0
        for doc_id, count in doc_pages.items():
            try:
                manifest = self.storage.get_json(self.storage.page_manifest_key(doc_id))
            except FileNotFoundError:
                missing += count
                continue
            assert len(manifest["pages"]) == count, manifest
            for page in manifest["pages"]:
                wanted = page_cache_key(page["png_sha256"], identity)
                missing += wanted not in results.get((doc_id, int(page["page"])), [])
        return missing

    def audit(self, *, pending: bool = False) -> Any:
        """``audit_bucket`` over the whole bucket: no error; no pending work unless ``pending``."""
        from mkg_pipeline.audit import audit_bucket

        report = audit_bucket(self.storage, self.identity())
        assert report.ok, report.to_text()
        if not pending:
            assert not report.pending, report.to_text()
        return report

    def assert_records_whole(self) -> None:
        """Every JSON record the pipeline keeps parses: nothing half-written looks finished."""
        for prefix in ("batches/", "raw/", "rejected/", "pages/", "vlm/", "leases/"):
            for key in self.keys(prefix):
                if key.endswith(".json"):
                    assert isinstance(self.storage.get_json(key), dict | list), key

    def audit_cli(self) -> subprocess.CompletedProcess[str]:
        """``python -m mkg_pipeline.audit``, as the person on call runs it."""
        return subprocess.run(
            [sys.executable, "-m", "mkg_pipeline.audit"],
            cwd=REPO_ROOT,
            env={**os.environ, **self.pipeline.env},
            capture_output=True,
            text=True,
            timeout=300,
        )

    # ---- the re-run ---------------------------------------------------------------------------------

    def rerun_and_account(
        self,
        batch: str,
        doc_pages: dict[str, int],
        select: str = ALL_ASSETS,
        run_config: dict[str, Any] | None = None,
        *,
        pending: bool = False,
    ) -> Rerun:
        """Re-materialize ``batch`` (``doc_pages``: doc_id -> pages of the documents the re-run covers); it
        must succeed and request exactly the pages that had no result.

        Asserts: the re-run's metadata (``pages_processed``, ``requests``,
        ``pages_cached``) and the server's request count agree with the pages missing before it, every
        page of ``doc_pages`` has its result afterwards (0 lost), no result was requested again (0
        duplicated), every document's status is complete, and the audit is clean (with pending work only
        if ``pending``: other documents of the batch that a case leaves for later).
        """
        missing = self.pages_without_result(doc_pages)
        total = sum(doc_pages.values())
        self.settle()
        before = self.requests()
        result = self.materialize(batch, select, run_config)
        view = self.view(result.run_id)
        assert result.success, view.describe()
        requested = self.requests() - before
        assert view.vlm is not None, view.describe()
        assert view.vlm["pages_processed"] == missing, (view.vlm, missing)
        assert view.vlm["requests"] == missing, (view.vlm, missing)
        assert view.vlm["pages_cached"] == total - missing, (view.vlm, total, missing)
        assert view.vlm["pages_failed"] == 0, view.vlm
        assert requested == missing, f"the server answered {requested} requests for {missing} missing page(s)"
        assert self.pages_without_result(doc_pages) == 0  # 0 lost
        for doc_id in doc_pages:
            status = self.storage.get_json(self.storage.vlm_status_key(doc_id))
            assert status["state"] == "complete", status
            assert status["pages_done"] == doc_pages[doc_id], status
        self.audit(pending=pending)
        return Rerun(view=view, missing=missing, requested=requested, total=total)


@dataclass(frozen=True)
class Rerun:
    view: RunView
    missing: int  # pages without a result before the re-run
    requested: int  # requests the server answered during the re-run
    total: int  # pages of the documents


def report_row(fault: str, rerun: Rerun | None, shown: str, note: str = "") -> None:
    """Append this case's row of the campaign table to ``$MKG_CAMPAIGN_REPORT`` (if set)."""
    path = os.environ.get("MKG_CAMPAIGN_REPORT")
    if not path:
        return
    row = {
        "fault": fault,
        "rerun_requested": rerun.requested if rerun else None,
        "missing_before_rerun": rerun.missing if rerun else None,
        "pages": rerun.total if rerun else None,
        "lost": 0,  # asserted by rerun_and_account
        "duplicated": (rerun.requested - rerun.missing) if rerun else 0,
        "shown": shown,
        "note": note,
    }
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(row) + "\n")
