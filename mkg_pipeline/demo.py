"""`make demo`: the whole pipeline end to end on one machine, with the local stand-ins.

It starts a moto S3 server (the MinIO stand-in) and the local OpenAI-compatible
VLM server, uploads corpus PDFs (one bad file included) to ``incoming/``,
evaluates the real ``incoming_pdfs_sensor`` against a real Dagster instance in
``.demo/dagster_home``, materializes each batch it requests, prints per-document
results, exports the outputs to ``.demo/outputs/`` as MinerU lays them out (one folder per
source file: ``<name>.md``, ``<name>_content_list.json``, ``images/``; an ``index.md``), checks
them (content list against the schema, every image link resolves, every crop opens) and stops
what it started.

    python -m mkg_pipeline.demo                 # small default set (about a minute)
    python -m mkg_pipeline.demo --all           # the whole shared corpus (long: CPU OCR)
    python -m mkg_pipeline.demo --serve-ui      # keep everything up and serve the Dagster UI afterwards
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
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

log = logging.getLogger("mkg_pipeline.demo")


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
    parser.add_argument("--serve-ui", action="store_true", help="afterwards, serve the Dagster UI until Ctrl-C")
    parser.add_argument("--ui-port", type=int, default=3000)
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


def run(args: argparse.Namespace) -> int:
    import dagster as dg

    from mkg_pipeline.local_stack import local_vlm_server, moto_s3_server

    files = _select_files(args)
    workdir: Path = args.workdir.resolve()
    logs = workdir / "logs"
    api_key = secrets.token_urlsafe(16)
    print(f"mkg-pipeline demo: {len(files)} PDF(s), engine {args.engine}, work dir {workdir}")

    s3_server = moto_s3_server(logs)
    vlm_server = local_vlm_server(logs, api_key=api_key)
    started: list[Any] = []
    try:
        print(f"starting moto S3 (MinIO stand-in) on {s3_server.url} ...")
        started.append(s3_server.start())
        print(f"starting the local VLM server on {vlm_server.url} (logs: {vlm_server.log_path}) ...")
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
                "DAGSTER_HOME": str(_fresh_instance_dir(workdir)),
            }
        )
        from mkg_pipeline.assets import pipeline_assets
        from mkg_pipeline.batch_cli import run_sensor_tick
        from mkg_pipeline.resources import pipeline_resources

        resources = pipeline_resources()  # the code location's: secrets as dg.EnvVar
        storage = resources["s3"].storage()
        storage.ensure_bucket()
        for path in files:
            storage.put_bytes(f"{storage.incoming_prefix}{path.name}", path.read_bytes(), "application/pdf")
        print(f"uploaded {len(files)} file(s) to {storage.uri(storage.incoming_prefix)}")

        instance = dg.DagsterInstance.get()
        result = run_sensor_tick(instance)
        print(f"sensor tick: {len(result.run_requests or [])} batch(es) requested")

        requests_before = _server_requests(vlm_server.url)
        started_at = time.monotonic()
        ok = True
        for request in result.run_requests or []:
            print(f"\n=== materializing batch {request.partition_key} ===")
            outcome = dg.materialize(
                pipeline_assets,
                partition_key=request.partition_key,
                instance=instance,
                resources=resources,
                tags={**request.tags, "dagster/sensor_name": "incoming_pdfs_sensor"},
                # progress per document and page is INFO; Dagster's step bookkeeping is DEBUG
                run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
                raise_on_error=False,
            )
            ok = ok and outcome.success
        wall = time.monotonic() - started_at
        requests_made = _server_requests(vlm_server.url) - requests_before

        pages_done, documents = _print_report(storage, [r.partition_key for r in result.run_requests or []])
        exported = _export_outputs(storage, workdir / "outputs", documents)
        ok = _print_exported(exported, workdir / "outputs") and ok
        print(
            f"\n{pages_done} page(s) in {wall:.1f}s ({pages_done / wall if wall else 0:.2f} pages/s end to end), "
            f"{requests_made:.0f} chat-completion request(s) to the VLM server"
        )
        print(
            f"outputs copied to {workdir / 'outputs'}: per document <name>/<name>.md, <name>_content_list.json, "
            "images/; index.md; _pipeline/ (rejected/, quality/, batches/)"
        )
        home = os.environ["DAGSTER_HOME"]
        print(
            "Dagster UI on these runs (history, metadata, previews, checks):\n"
            f"  DAGSTER_HOME={home} {_webserver()} -w {REPO_ROOT / 'workspace.yaml'}"
            " -p 3000   then open http://127.0.0.1:3000\n"
            "  (or rerun with --serve-ui to keep S3 and the VLM server up behind the UI)"
        )
        if args.serve_ui:
            _serve_ui(args.ui_port)
        return 0 if ok else 1
    finally:
        for process in reversed(started):
            process.stop()
        print("stopped the local VLM server and the S3 stand-in")


def _print_report(storage: Any, batch_ids: list[str]) -> tuple[int, list[tuple[str, str]]]:
    """Per input file its outcome; returns (pages done, [(file name, doc_id)] of accepted files)."""
    pages_done = 0
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
    return pages_done, documents


def _webserver() -> str:
    """dagster-webserver beside this Python (the venv the demo runs in), else from PATH."""
    beside = Path(sys.executable).parent / "dagster-webserver"
    return str(beside) if beside.exists() else "dagster-webserver"


def _serve_ui(port: int) -> None:
    argv = [_webserver(), "-w", str(REPO_ROOT / "workspace.yaml"), "-p", str(port)]
    print(f"serving the Dagster UI on http://127.0.0.1:{port} — Ctrl-C to stop everything")
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends the UI; `finally` then stops the servers
        subprocess.run(argv, check=False)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(_parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
