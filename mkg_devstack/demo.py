"""`make demo`: the whole pipeline end to end on one machine, with the local stand-ins.

It starts a moto S3 server (the MinIO stand-in) and the local OpenAI-compatible
VLM server, uploads corpus PDFs (one bad file included) to ``incoming/`` of a real
Dagster instance in ``.demo/dagster_home``, runs each batch the real
``incoming_pdfs_sensor`` requests as a run of ``ingest_job`` (so that the history is
re-executable from the UI), shows pages done across the batch (pages/s, ETA), prints
per-document results, exports the outputs to ``.demo/outputs/`` as MinerU lays them out (one
folder per source file: ``<name>.md``, ``<name>_content_list.json``, ``images/``; an
``index.md``), checks them (content list against the schema, every image link resolves, every
crop opens) and stops what it started.

Without ``--serve-ui`` the sensor is evaluated once and the runs execute in this process.
With ``--serve-ui`` the demo runs the deployed path: it starts ``dagster dev`` (webserver,
daemon, one code server) on the demo's instance *first*, then drops the files into
``incoming/``; the daemon's sensor tick requests the runs and the daemon launches them, so
they can be watched live in the UI; the UI stays up afterwards until Ctrl-C or SIGTERM.

SIGINT and SIGTERM stop the demo and every server it started, also when it was started in the
background with SIGINT ignored (CI, ``timeout``, systemd, ``docker stop``); if the demo is
killed outright, its servers get SIGTERM from the kernel (see ``local_stack.py``).

    python -m mkg_devstack.demo                 # small default set (about a minute)
    python -m mkg_devstack.demo --all           # the whole shared corpus (long: CPU OCR)
    python -m mkg_devstack.demo --serve-ui      # runs launched by the daemon, watched live in the Dagster UI
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mkg_pipeline.engines import ENGINE_NAMES

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO_ROOT.parent / "shared" / "corpus"
DEFAULT_FILES = [
    "minimal-document.pdf",
    "pdflatex-4-pages.pdf",
    "edgar-scanned.pdf",
    "blank-page.pdf",
    "bad-encrypted-password.pdf",
]
BUCKET = "mkg-demo"
#: how often the daemon evaluates the sensor in the demo (the deployed default is 30 s)
SENSOR_INTERVAL_S = 5
JOB = "ingest_job"

log = logging.getLogger("mkg_devstack.demo")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mkg-demo", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--all", action="store_true", help="run every PDF of the shared corpus")
    parser.add_argument(
        "--files", nargs="+", metavar="NAME", help="corpus file names to run instead of the default set"
    )
    parser.add_argument("--corpus", type=Path, default=Path(os.environ.get("MKG_CORPUS_DIR", DEFAULT_CORPUS)))
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / ".demo", help="instance, logs and outputs")
    parser.add_argument("--engine", choices=ENGINE_NAMES, default="page_markdown")
    parser.add_argument("--dpi", type=int, default=150, help="page render resolution")
    parser.add_argument(
        "--serve-ui",
        action="store_true",
        help="start the Dagster UI and daemon first, let them run the batches live, keep serving until Ctrl-C",
    )
    parser.add_argument("--ui-port", type=int, default=3000)
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="give up waiting for the runs after this many seconds"
    )
    return parser.parse_args(argv)


def _select_files(args: argparse.Namespace) -> list[Path]:
    pdf_dir = args.corpus / "pdfs"
    if not pdf_dir.is_dir():
        raise SystemExit(f"corpus not found at {pdf_dir}; pass --corpus or set MKG_CORPUS_DIR")
    names = sorted(p.name for p in pdf_dir.glob("*.pdf")) if args.all else (args.files or DEFAULT_FILES)
    missing = [n for n in names if not (pdf_dir / n).exists()]
    if missing:
        raise SystemExit(f"not in {pdf_dir}: {', '.join(missing)}")
    return [pdf_dir / n for n in names]


def _fresh_instance_dir(workdir: Path) -> Path:
    home = workdir / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    return home


#: the pipeline's own records, copied beside the documents (under _pipeline/)
PIPELINE_RECORDS = ("rejected/", "quality/", "batches/")


def _export_outputs(storage: Any, target: Path, documents: list[tuple[str, str]]) -> list[Any]:
    """Copy the outputs out of the S3 stand-in before it stops: one MinerU-shaped folder per document
    (``<name>/<name>.md``, ``<name>_content_list.json``, ``images/``; see mkg_pipeline/export.py), an
    index, and the pipeline's records (rejections, quality reports, batch manifests) under ``_pipeline/``."""
    from mkg_pipeline.export import export_documents

    if target.exists():
        shutil.rmtree(target)
    exported = export_documents(storage, target, documents)
    for prefix in PIPELINE_RECORDS:
        for obj in storage.list_objects(prefix):
            path = target / "_pipeline" / obj.key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(storage.get_bytes(obj.key))
    return exported


def _print_exported(exported: list[Any], target: Path) -> bool:
    """One line per exported document; True when every document passed its checks."""
    print(f"\n=== exported to {target} (index: {target / 'index.md'}) ===")
    columns = f"{'pages':>7s} {'figures':>7s} {'tables':>6s} {'html':>4s} {'images':>6s}"
    print(f"  {'folder':40s} {columns}  content list / links")
    for doc in exported:
        check = doc.check
        content = "valid" if check.content_list_error is None else f"INVALID ({check.content_list_error})"
        problems = ", ".join(
            f"{len(names)} {what}"
            for names, what in (
                (check.missing_images, "missing"),
                (check.unreferenced_images, "unreferenced"),
                (check.unreadable_images, "unreadable"),
            )
            if names
        )
        print(
            f"  {doc.folder + '/':40s} {doc.pages_done:>3d}/{doc.pages_total:<3d} {check.figures:>7d} "
            f"{check.tables:>6d} {check.html_tables:>4d} {check.images:>6d}  {content}; links {problems or 'ok'}"
        )
    return all(doc.check.ok for doc in exported)


def _server_requests(url: str) -> float:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "vllm:request_success":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the demo: unwind, and let the ``finally`` clauses stop the servers."""


def _install_stop_handlers() -> None:
    """SIGINT and SIGTERM raise :class:`Stopped` in the main thread.

    Explicitly, because a background job starts with SIGINT ignored (Python then installs no
    KeyboardInterrupt handler), and Dagster's interrupt handling copies the SIGINT handler onto SIGTERM
    when it restores them, so an ignored SIGINT would end up ignoring SIGTERM too. Dagster's in-process
    execution swaps these handlers only in the main thread; the demo runs it in a worker thread.
    """

    def stop(signum: int, _frame: object) -> None:
        raise Stopped(signal.Signals(signum).name, signum)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def run(args: argparse.Namespace) -> int:
    from mkg_devstack.local_stack import local_vlm_server, moto_s3_server

    _install_stop_handlers()
    files = _select_files(args)
    workdir: Path = args.workdir.resolve()
    logs = workdir / "logs"
    api_key = secrets.token_urlsafe(16)
    mode = "live through the Dagster daemon" if args.serve_ui else "in this process"
    print(f"mkg-pipeline demo: {len(files)} PDF(s), engine {args.engine}, runs {mode}, work dir {workdir}")

    s3_server = moto_s3_server(logs)
    vlm_server = local_vlm_server(logs, api_key=api_key)
    started: list[Any] = []
    try:
        print(f"starting moto S3 (MinIO stand-in) on {s3_server.url} ...", flush=True)
        started.append(s3_server.start())
        print(f"starting the local VLM server on {vlm_server.url} (logs: {vlm_server.log_path}) ...", flush=True)
        started.append(vlm_server.start())

        os.environ.update(
            {
                "MKG_STORAGE__ENDPOINT_URL": s3_server.url,
                "MKG_STORAGE__BUCKET": BUCKET,
                "MKG_STORAGE__ACCESS_KEY_ID": "testing",
                "MKG_STORAGE__SECRET_ACCESS_KEY": "testing",
                "MKG_VLLM__URL": vlm_server.url,
                "MKG_VLLM__API_KEY": api_key,
                "MKG_ENGINE": args.engine,
                "MKG_PDF__DPI": str(args.dpi),
                "MKG_SENSOR_INTERVAL_S": str(SENSOR_INTERVAL_S),
                # where the demo exports each document (below): vlm_outputs' table links it beside the S3 URI
                "MKG_EXPORT_DIR": str(workdir / "outputs"),
                "DAGSTER_HOME": str(_fresh_instance_dir(workdir)),
            }
        )
        from mkg_pipeline.orchestration.resources import pipeline_resources

        storage = pipeline_resources()["s3"].storage()
        storage.ensure_bucket()  # before the daemon's first sensor tick, which lists the bucket
        if args.serve_ui:
            ui = _dagster_dev(logs, args.ui_port)
            print(f"starting the Dagster UI and daemon (dagster dev) on {ui.url} (logs: {ui.log_path}) ...", flush=True)
            started.append(ui.start())
            print(f"Dagster UI: {ui.url}  (runs of {JOB} appear under {ui.url}/runs as the daemon launches them)")
        keys = []
        for path in files:
            keys.append(f"{storage.incoming_prefix}{path.name}")
            storage.put_bytes(keys[-1], path.read_bytes(), "application/pdf")
        print(f"uploaded {len(files)} file(s) to {storage.uri(storage.incoming_prefix)}", flush=True)

        requests_before = _server_requests(vlm_server.url)
        started_at = time.monotonic()
        if args.serve_ui:
            ok, batch_ids = _run_through_daemon(storage, keys, args.timeout)
        else:
            ok, batch_ids = _run_in_process(storage)
        wall = time.monotonic() - started_at
        requests_made = _server_requests(vlm_server.url) - requests_before

        pages_done, documents, routes = _print_report(storage, batch_ids)
        exported = _export_outputs(storage, workdir / "outputs", documents)
        ok = _print_exported(exported, workdir / "outputs") and ok
        print(
            f"\n{pages_done} page(s) in {wall:.1f}s ({pages_done / wall if wall else 0:.2f} pages/s end to end), "
            f"{requests_made:.0f} chat-completion request(s) to the VLM server"
        )
        routed = sum(routes.values())
        print(
            f"page routes: {routes['text']} of {routed} page(s) never reached the VLM (text route, "
            f"{routes['text'] / routed if routed else 0:.0%}), {routes['vlm']} went to it; "
            f"{requests_made / pages_done if pages_done else 0:.2f} chat request(s) per page done"
        )
        print(
            f"outputs copied to {workdir / 'outputs'}: per document <name>/<name>.md, <name>_content_list.json, "
            "images/; index.md; _pipeline/ (rejected/, quality/, batches/)"
        )
        home = os.environ["DAGSTER_HOME"]
        if args.serve_ui:
            print(f"serving the Dagster UI on {started[-1].url} — Ctrl-C (or SIGTERM) stops everything", flush=True)
            while started[-1].running:
                time.sleep(1)
            print("the Dagster UI exited")
        else:
            print(
                "Dagster UI on these runs (history, metadata, previews, checks):\n"
                f"  DAGSTER_HOME={home} {_dagster_bin('dagster-webserver')} -w {REPO_ROOT / 'workspace.yaml'}"
                " -p 3000   then open http://127.0.0.1:3000\n"
                "  (or rerun with --serve-ui to watch the daemon run them live, S3 and the VLM server up behind it)"
            )
        return 0 if ok else 1
    except Stopped as exc:
        name, signum = exc.args
        print(f"\n{name}: stopping", flush=True)
        return 128 + signum  # as a shell reports a process ended by that signal
    finally:
        # Ignore a second Ctrl-C/SIGTERM while stopping: an interrupted cleanup would leave servers behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for process in reversed(started):
            process.stop()
        print("stopped " + ", ".join(p.name for p in reversed(started)) if started else "nothing was started")


def _dagster_dev(logs: Path, port: int) -> Any:
    """``dagster dev`` on the demo's instance ($DAGSTER_HOME): webserver, daemon and one shared code server."""
    from mkg_devstack.local_stack import LOOPBACK, ManagedProcess

    argv = [_dagster_bin("dagster"), "dev", "-w", str(REPO_ROOT / "workspace.yaml"), "-h", LOOPBACK, "-p", str(port)]
    return ManagedProcess(
        name="dagster-dev",
        argv=argv,
        host=LOOPBACK,
        port=port,
        health_path="/server_info",
        log_path=logs / "dagster-dev.log",
        startup_timeout_s=300.0,
    )


# ---- running the batches -------------------------------------------------------------------------------------


def _run_in_process(storage: Any) -> tuple[bool, list[str]]:
    """One evaluation of the real sensor, then each batch as a run of ``ingest_job`` in a worker thread."""
    import dagster as dg

    from mkg_pipeline.orchestration.batch_cli import run_sensor_tick

    instance = dg.DagsterInstance.get()
    result = run_sensor_tick(instance)
    requests = result.run_requests or []
    batch_ids = [r.partition_key for r in requests if r.partition_key]
    print(f"sensor tick: {len(requests)} batch(es) requested: {', '.join(batch_ids)}")
    outcome: dict[str, bool] = {}

    def execute() -> None:
        for request in requests:
            tags = {**request.tags, "mkg/launched_by": "mkg_devstack.demo"}
            outcome[str(request.partition_key)] = _execute_job_run(instance, str(request.partition_key), tags)

    # A worker thread: Dagster swaps the SIGINT/SIGTERM handlers while it executes in the main thread, and the
    # main thread draws the progress bar. The thread is a daemon: a stopped demo does not wait for its run.
    worker = threading.Thread(target=execute, name="demo-runs", daemon=True)
    worker.start()
    try:
        _watch(storage, lambda: (batch_ids, not worker.is_alive()), done_label="runs finished")
    except BaseException:
        _cancel_unfinished_runs(instance)
        raise
    worker.join()
    return all(outcome.get(b, False) for b in batch_ids), batch_ids


def _execute_job_run(instance: Any, partition_key: str, tags: dict[str, str]) -> bool:
    """One run of ``ingest_job`` executed in this process, recorded as the webserver would launch it.

    ``execute_in_process`` records a run without the code location it came from, and the UI (GraphQL
    ``launchPipelineReexecution``) cannot re-execute such a run. Here the run is created with the origin
    the workspace (workspace.yaml: location ``mkg_pipeline``) gives it, then executed by ``execute_run``,
    as a run worker does, so the demo's history can be re-executed from the UI.
    """
    from dagster._core.definitions.reconstruct import ReconstructableRepository
    from dagster._core.execution.api import create_execution_plan, execute_run
    from dagster._core.remote_origin import ManagedGrpcPythonEnvCodeLocationOrigin, RemoteRepositoryOrigin
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    module = "mkg_pipeline.orchestration.definitions"
    target = LoadableTargetOrigin(executable_path=sys.executable, module_name=module, working_directory=str(REPO_ROOT))
    location = ManagedGrpcPythonEnvCodeLocationOrigin(target, location_name="mkg_pipeline")
    job = ReconstructableRepository.for_module(module, "defs", str(REPO_ROOT)).get_reconstructable_job(JOB)
    job_def = job.get_definition()
    # progress per document and page is INFO; Dagster's step bookkeeping is DEBUG
    run_config = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
    tags = {**job_def.run_tags, **tags, "dagster/partition": partition_key}
    plan = create_execution_plan(job, run_config=run_config, instance_ref=instance.get_ref(), tags=tags)
    run = instance.create_run_for_job(
        job_def=job_def,
        execution_plan=plan,
        run_config=run_config,
        tags=tags,
        remote_job_origin=RemoteRepositoryOrigin(location, "__repository__").get_job_origin(JOB),
        job_code_origin=job.get_python_origin(),
    )
    return execute_run(job, run, instance).success


def _run_through_daemon(storage: Any, keys: list[str], timeout_s: float) -> tuple[bool, list[str]]:
    """Wait while the daemon's sensor requests runs of ``ingest_job`` and the daemon launches them."""
    import dagster as dg

    instance = dg.DagsterInstance.get()
    deadline = time.monotonic() + timeout_s
    seen: dict[str, str] = {}

    def state() -> tuple[list[str], bool]:
        runs = instance.get_runs(dg.RunsFilter(job_name=JOB))
        for run in runs:
            status = run.status.value
            if seen.get(run.run_id) != status:
                seen[run.run_id] = status
                batch = run.tags.get("dagster/partition", "?")
                _status_line(f"run {run.run_id[:8]} of {JOB} for batch {batch}: {status}")
        batch_ids = sorted({r.tags["dagster/partition"] for r in runs if "dagster/partition" in r.tags})
        waiting = {k for k in keys if storage.exists(k)}  # raw_pdfs drains incoming/ as it records outcomes
        finished = bool(runs) and not waiting and all(r.is_finished for r in runs)
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"after {timeout_s:.0f}s: {len(waiting)} file(s) still in incoming/, runs: {sorted(seen.values())}"
            )
        return batch_ids, finished

    print(f"waiting for the sensor (every {SENSOR_INTERVAL_S}s) to request runs and the daemon to launch them ...")
    _watch(storage, state, done_label="every file ingested and every run finished")
    runs = instance.get_runs(dg.RunsFilter(job_name=JOB))
    return all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), sorted(
        {r.tags["dagster/partition"] for r in runs if "dagster/partition" in r.tags}
    )


def _cancel_unfinished_runs(instance: Any) -> None:
    """Runs of this process that the stop cut short are recorded as canceled, not left "started" for ever."""
    import dagster as dg

    for run in instance.get_runs(dg.RunsFilter(job_name=JOB)):
        if not run.is_finished:
            instance.report_run_canceled(run, message="the demo was stopped (SIGINT/SIGTERM) during the run")


# ---- progress --------------------------------------------------------------------------------------------------

_progress_console: Any = None


def _status_line(text: str) -> None:
    """A line above the progress bar (or a plain line when there is no bar)."""
    if _progress_console is not None:
        _progress_console.print(text)
    else:
        print(text, flush=True)


def page_counts(storage: Any, batch_ids: list[str]) -> tuple[int, int]:
    """(pages with a stored result, pages) over the batches' accepted documents, read from the bucket.

    The same records the run log counts: the batch manifest gives each accepted document's page count,
    and each finished page is one ``vlm/<doc_id>/pages/<n>.<cache_key>.json``.
    """
    done = total = 0
    for batch_id in batch_ids:
        try:
            manifest = storage.get_json(storage.batch_key(batch_id))
        except FileNotFoundError:
            continue
        for result in manifest.get("results", {}).values():
            if result.get("status") != "accepted":
                continue
            pages = int(result.get("pages", 0))
            numbers = {
                o.key.rsplit("/", 1)[-1].split(".", 1)[0]
                for o in storage.list_objects(storage.vlm_page_prefix(result["doc_id"]))
            }
            total += pages
            done += min(len(numbers), pages)
    return done, total


def _watch(storage: Any, poll: Callable[[], tuple[list[str], bool]], done_label: str) -> None:
    """A progress bar of pages done across the batches until ``poll`` says finished.

    On a terminal a live bar (rich); elsewhere (CI logs, a test's pipe) a plain line every 10 s.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mkg_pipeline.progress import rate_and_eta

    global _progress_console
    console = Console(file=sys.stdout)  # bound now: inside the bar, sys.stdout is rich's proxy, not a terminal
    live = console.is_terminal
    all_done_at: float | None = None
    started = time.monotonic()
    last_plain = 0.0
    columns = (
        TextColumn("pages"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, redirect_stderr=True, redirect_stdout=True) as bar:
        _progress_console = bar.console if live else None
        task = bar.add_task("pages", total=None, rate="waiting for the first batch")
        try:
            while True:
                batch_ids, finished = poll()
                done, total = page_counts(storage, batch_ids)
                # the rate stops at the last page (the run still checks quality after it)
                all_done_at = (all_done_at or time.monotonic()) if total and done >= total else None
                rate = rate_and_eta(done, total, (all_done_at or time.monotonic()) - started)
                bar.update(task, completed=done, total=total or None, rate=rate)
                now = time.monotonic()
                if not live and (now - last_plain >= 10 or finished):
                    last_plain = now
                    print(f"pages {done}/{total}: {rate} ({now - started:.0f}s)", flush=True)
                if finished:
                    break
                time.sleep(1.0)
        finally:
            _progress_console = None
    print(f"{done_label} after {time.monotonic() - started:.0f}s", flush=True)


def _print_report(storage: Any, batch_ids: list[str]) -> tuple[int, list[tuple[str, str]], dict[str, int]]:
    """Per input file its outcome; returns (pages done, [(file name, doc_id)] of accepted files, pages by route)."""
    pages_done = 0
    routes = {"text": 0, "vlm": 0}
    documents: list[tuple[str, str]] = []
    print("\n=== results ===")
    for batch_id in batch_ids:
        manifest = storage.get_json(storage.batch_key(batch_id))
        for key, result in manifest.get("results", {}).items():
            name = key.rsplit("/", 1)[-1]
            if result["status"] == "accepted":
                documents.append((name, result["doc_id"]))
                try:
                    status = storage.get_json(storage.vlm_status_key(result["doc_id"]))
                except FileNotFoundError:
                    print(f"  OK       {name:40s} {result['doc_id']}  not assembled (see the run's log)")
                    continue
                pages_done += status["pages_done"]
                for route, count in (status.get("pages_by_route") or {}).items():
                    routes[route] = routes.get(route, 0) + int(count)
                failed = f", {len(status['failed_pages'])} failed" if status["failed_pages"] else ""
                print(
                    f"  OK       {name:40s} {result['doc_id']}  {status['state']:8s} "
                    f"{status['pages_done']}/{status['pages_total']} pages{failed}  "
                    f"-> {storage.uri(storage.document_md_key(result['doc_id']))}"
                )
            elif result["status"] == "rejected":
                print(f"  REJECTED {name:40s} {result['reason']}: {result['message']}")
                print(f"           -> {storage.uri(storage.rejected_key(name))}")
            else:
                print(f"  ERROR    {name:40s} {result.get('message')} (retried next run)")
    return pages_done, documents, routes


def _dagster_bin(name: str) -> str:
    """A Dagster command beside this Python (the venv the demo runs in), else from PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(_parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
