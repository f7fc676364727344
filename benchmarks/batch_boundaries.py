"""Does the GPU stay busy across ingestion batches? A corpus copy through the real sensor, daemon and run queue.

Issue 18, section 3 ("No idle GPU at batch boundaries"); its done-when: a 2,000-page corpus copy dropped into
``incoming/`` and run by the sensor and the daemon as several batches, on the H100 preset: the server is busy
(running >= 0.9 of its maximum) for >= 0.9 of the time between the first request and the last answer.

What it starts (all on 127.0.0.1, free ports, stopped on the way out, bounded in time):

- moto in server mode (the S3 / MinIO stand-in), with one bucket;
- the simulated GPU server, ``benchmarks/simulated_vllm.py --preset h100`` (256 seqs, ~4.5 pages/s at a full
  batch, ~10 s for one page alone);
- a temp ``DAGSTER_HOME`` with the repository's ``dagster.yaml`` (queued run coordinator, its run and pool
  limits) and ``dagster-daemon run -m mkg_pipeline``: the real sensor, run queue and run launcher.

Before the daemon starts it drops distinct copies of the corpus's accepted PDFs (``expect: ok`` in the
manifest; a trailing PDF comment makes each copy's bytes, so its doc id, new) into ``incoming/`` until about
``--pages`` pages. ``MKG_ROUTING__MODE=vlm`` sends every page to the server: routing would otherwise send
born-digital pages down the text route, and the point is the GPU. Everything else is the shipped default
config (batch size, sensor interval, engine).

It reads the server's ``/metrics`` (running, waiting, KV use, answers) every ``--interval`` seconds until every
run has ended, then reads each run's step start/end from the instance. It reports the share of the time from
the first request to the last answer with running >= 0.9 x max_num_seqs, each batch (run) with its steps, the
gaps below 0.9 with what the runs were doing then, pages/s against the preset's capacity, and writes
``timeline.csv`` and ``timeline.png`` (gauges plus each run's render and vlm steps) beside ``report.txt``.

    python benchmarks/batch_boundaries.py [--pages 2000] [--out benchmarks/.bench/batch_boundaries]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import gpu_model  # noqa: E402  (a sibling script, not a package)
from saturation import scrape_metric_totals  # noqa: E402

SIMULATOR = HERE / "simulated_vllm.py"
MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
BUCKET = "batch-boundaries"
BUSY_SHARE = 0.9
SHORT = {"raw_pdfs": "ingest", "parsed_pages": "render", "vlm_outputs": "vlm", "quality_baseline_diffs": "quality"}


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def busiest(interval_s: float = 1.0, top: int = 8) -> list[str]:
    """The processes that used the most CPU over ``interval_s`` (the machine is shared)."""
    clk = os.sysconf("SC_CLK_TCK")

    def snapshot() -> dict[int, int]:
        ticks = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    data = Path(f"/proc/{entry.name}/stat").read_text()
                    fields = data[data.rindex(")") + 2 :].split()
                    ticks[int(entry.name)] = int(fields[11]) + int(fields[12])
                except (OSError, ValueError):
                    continue
        return ticks

    before = snapshot()
    time.sleep(interval_s)
    after = snapshot()
    lines = []
    for ticks, pid in sorted(((after[p] - before.get(p, 0), p) for p in after), reverse=True)[:top]:
        if ticks <= 0:
            break
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmd = "?"
        lines.append(f"{100 * ticks / clk / interval_s:5.0f}%  pid {pid}  {cmd[:120]}")
    return lines


# --------------------------------------------------------------------------- the corpus copy


def corpus_copies(corpus: Path, pages: int) -> tuple[list[tuple[str, bytes]], int]:
    """Distinct copies of the accepted corpus PDFs, in manifest order, copy after copy, until ``pages``."""
    entries = [e for e in json.loads((corpus / "manifest.json").read_text()) if e.get("expect") == "ok"]
    out: list[tuple[str, bytes]] = []
    total = 0
    k = 0
    while total < pages:
        for entry in entries:
            data = (corpus / "pdfs" / entry["file"]).read_bytes() + f"\n%mkg-bench batch-boundaries copy {k}\n".encode()
            out.append((f"copy{k:02d}-{entry['file']}", data))
            total += int(entry["pages"])
            if total >= pages:
                break
        k += 1
    return out, total


# --------------------------------------------------------------------------- readings


@dataclass
class Sampler:
    """The server's gauges every ``interval_s`` (wall-clock times, comparable with Dagster's event times)."""

    url: str
    interval_s: float
    rows: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.sample()
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def sample(self) -> None:
        now = time.time()
        totals = scrape_metric_totals(self.url)
        if totals is None:
            return
        self.rows.append(
            {
                "time": now,
                "running": totals.get("vllm:num_requests_running", 0.0),
                "waiting": totals.get("vllm:num_requests_waiting", 0.0),
                "kv": totals.get("vllm:kv_cache_usage_perc", 0.0),
                "preemptions": totals.get("vllm:num_preemptions_total", 0.0),
                "finished": totals.get("vllm:request_success_total", 0.0),
            }
        )


@dataclass
class RunTimes:
    run_id: str
    batch: str
    status: str
    documents: int
    start: float | None
    end: float | None
    #: step key -> (start, end) wall-clock times
    steps: dict[str, tuple[float, float | None]]
    pages_vlm: int | None = None


def run_times(instance: Any) -> list[RunTimes]:
    import dagster as dg

    out = []
    for record in instance.get_run_records(dg.RunsFilter(job_name="ingest_job")):
        run = record.dagster_run
        steps: dict[str, tuple[float, float | None]] = {}
        pages_vlm = None
        for event in instance.all_logs(run.run_id):
            de = event.dagster_event
            if de is None or not de.step_key:
                continue
            if de.event_type_value == "STEP_START":
                steps[de.step_key] = (event.timestamp, None)
            elif de.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE") and de.step_key in steps:
                steps[de.step_key] = (steps[de.step_key][0], event.timestamp)
            elif de.event_type_value == "ASSET_MATERIALIZATION" and de.step_key == "parsed_pages":
                value = de.event_specific_data.materialization.metadata.get("pages_vlm")
                pages_vlm = int(value.value) if value is not None else None
        out.append(
            RunTimes(
                run.run_id,
                run.tags.get("dagster/partition", "?"),
                run.status.value,
                int(run.tags.get("mkg/batch_size", "0")),
                record.start_time,
                record.end_time,
                steps,
                pages_vlm,
            )
        )
    return sorted(out, key=lambda r: r.start or math.inf)


# --------------------------------------------------------------------------- analysis


@dataclass
class Analysis:
    first: float  # first reading with a request at the server
    last: float  # first empty reading after the last answer
    busy_s: float
    gaps: list[tuple[float, float, float]]  # (start, end, mean running) of stretches below the busy line
    answers: float

    @property
    def window_s(self) -> float:
        return self.last - self.first

    @property
    def busy_share(self) -> float:
        return self.busy_s / self.window_s if self.window_s > 0 else math.nan


def analyse(rows: list[dict[str, float]], max_num_seqs: int) -> Analysis | None:
    """Time-weighted: each reading holds until the next one."""
    active = [i for i, r in enumerate(rows) if r["running"] + r["waiting"] > 0]
    if not active:
        return None
    lo, hi = active[0], min(active[-1] + 1, len(rows) - 1)
    line = BUSY_SHARE * max_num_seqs
    busy = 0.0
    gaps: list[tuple[float, float, float]] = []
    gap_start: float | None = None
    gap_running: list[float] = []
    for i in range(lo, hi):
        dt = rows[i + 1]["time"] - rows[i]["time"]
        if rows[i]["running"] >= line:
            busy += dt
            if gap_start is not None:
                gaps.append((gap_start, rows[i]["time"], sum(gap_running) / len(gap_running)))
                gap_start, gap_running = None, []
        else:
            if gap_start is None:
                gap_start = rows[i]["time"]
            gap_running.append(rows[i]["running"])
    if gap_start is not None:
        gaps.append((gap_start, rows[hi]["time"], sum(gap_running) / len(gap_running)))
    return Analysis(rows[lo]["time"], rows[hi]["time"], busy, gaps, rows[hi]["finished"] - rows[lo]["finished"])


def what_runs_did(runs: list[RunTimes], start: float, end: float) -> str:
    """Which steps were running during [start, end], by batch."""
    parts = []
    for i, run in enumerate(runs, 1):
        doing = [SHORT.get(step, step) for step, (s, e) in run.steps.items() if s < end and (e or math.inf) > start]
        if doing:
            parts.append(f"b{i}:{'+'.join(doing)}")
    return ", ".join(parts) or "no step running"


def write_timeline(
    out: Path, rows: list[dict[str, float]], runs: list[RunTimes], t0: float, max_num_seqs: int, title: str
) -> Path | None:
    keys = ["time", "running", "waiting", "kv", "preemptions", "finished"]
    lines = ["t," + ",".join(keys)] + [f"{r['time'] - t0:.3f}," + ",".join(f"{r[k]:.6g}" for k in keys) for r in rows]
    (out / "timeline.csv").write_text("\n".join(lines) + "\n")
    steps = ["run,batch,step,start_t,end_t"] + [
        f"{run.run_id},{run.batch},{step},{s - t0:.3f},{'' if e is None else f'{e - t0:.3f}'}"
        for run in runs
        for step, (s, e) in run.steps.items()
    ]
    (out / "steps.csv").write_text("\n".join(steps) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    t = [r["time"] - t0 for r in rows]
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(12, 7), sharex=True, height_ratios=[3, max(1.2, 0.35 * len(runs) + 0.4)]
    )
    top.axhline(max_num_seqs, color="grey", linestyle=":", linewidth=1, label=f"max_num_seqs {max_num_seqs}")
    top.axhline(BUSY_SHARE * max_num_seqs, color="grey", linestyle="--", linewidth=0.8, label="busy line (0.9)")
    top.plot(t, [r["running"] for r in rows], color="tab:green", linewidth=1.6, label="running")
    top.plot(t, [r["waiting"] for r in rows], color="tab:red", linewidth=1.0, label="waiting")
    top.plot(t, [r["kv"] * max_num_seqs for r in rows], color="tab:purple", linewidth=0.8, label="KV use x seqs")
    peak = max([max_num_seqs] + [r["waiting"] for r in rows])
    top.set_ylim(0, peak * 1.25)
    top.set_ylabel("requests")
    top.legend(loc="upper right", fontsize=8, ncol=5)
    top.grid(alpha=0.3)
    top.set_title(title, fontsize=10)
    colours = {"raw_pdfs": "tab:gray", "parsed_pages": "tab:orange", "vlm_outputs": "tab:green"}
    colours["quality_baseline_diffs"] = "tab:blue"
    end_t = t[-1] if t else 0.0
    for i, run in enumerate(runs):
        for step, (s, e) in run.steps.items():
            stop = (e if e is not None else t0 + end_t) - t0
            bottom.barh(i, stop - (s - t0), left=s - t0, color=colours.get(step, "black"), height=0.6)
    bottom.set_yticks(range(len(runs)), [f"b{i + 1} ({r.documents} docs)" for i, r in enumerate(runs)], fontsize=8)
    bottom.invert_yaxis()
    bottom.set_xlabel("seconds since the daemon started")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in [*colours.values(), "black"]]
    labels = ["ingest", "render", "vlm", "quality", "checks"]
    bottom.legend(handles, labels, loc="lower right", fontsize=8, ncol=5)
    bottom.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    png = out / "timeline.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


# --------------------------------------------------------------------------- processes


def stop_group(process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """Stop a process this benchmark started and its process group (the code server and the runs it launched)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # whatever is left of the group
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout_s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=2000, help="pages to drop (whole corpus copies)")
    parser.add_argument("--preset", default="h100", choices=sorted(gpu_model.PRESETS))
    parser.add_argument("--corpus", type=Path, default=Path(os.environ.get("MKG_CORPUS_DIR", "/work/shared/corpus")))
    parser.add_argument("--out", type=Path, default=HERE / ".bench" / "batch_boundaries")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between /metrics readings")
    parser.add_argument("--timeout", type=float, default=2400, help="give up (and stop everything) after this")
    parser.add_argument("--sensor-interval", type=int, default=None, help="MKG_SENSOR_INTERVAL_S (default: shipped)")
    parser.add_argument("--env", action="append", default=[], help="extra KEY=VALUE for the daemon and its runs")
    parser.add_argument("--keep", action="store_true", help="keep the temp DAGSTER_HOME")
    args = parser.parse_args()

    # Stopped by SIGTERM or SIGINT, it still stops what it started (the finally below): a background job
    # starts with SIGINT ignored, so both are set here.
    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)

    import boto3
    import dagster as dg

    from mkg_devstack.local_stack import LOOPBACK, ManagedProcess, free_port, moto_s3_server

    preset = gpu_model.PRESETS[args.preset]
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    logs = out / "logs"
    report_lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        report_lines.append(text)

    started_at = time.monotonic()
    say(f"batch_boundaries: {args.pages} pages, preset {preset.name} ({preset.description})")
    say(f"start: loadavg {loadavg()} ({os.cpu_count()} CPUs); busiest processes over 1 s:")
    for line in busiest():
        say(f"    {line}")

    work = Path(tempfile.mkdtemp(prefix="mkg-batch-boundaries-"))
    home = work / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    moto = moto_s3_server(logs)
    sim_port = free_port()
    shape = ["--preset", preset.name, "--model", MODEL]
    simulator = ManagedProcess(
        name="simulated-vllm",
        argv=[sys.executable, str(SIMULATOR), "--host", LOOPBACK, "--port", str(sim_port), *shape],
        host=LOOPBACK,
        port=sim_port,
        health_path="/health",
        log_path=logs / "simulated-vllm.log",
        startup_timeout_s=60.0,
    )
    daemon: subprocess.Popen[bytes] | None = None
    sampler: Sampler | None = None
    instance = None
    try:
        moto.start()
        simulator.start()
        s3 = boto3.client(
            "s3",
            endpoint_url=moto.url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        s3.create_bucket(Bucket=BUCKET)
        copies, pages = corpus_copies(args.corpus, args.pages)
        for name, data in copies:
            s3.put_object(Bucket=BUCKET, Key=f"incoming/{name}", Body=data, ContentType="application/pdf")
        say(f"dropped {len(copies)} PDFs ({pages} pages) into s3://{BUCKET}/incoming/")

        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "DAGSTER_HOME": str(home),
            "MKG_STORAGE__ENDPOINT_URL": moto.url,
            "MKG_STORAGE__BUCKET": BUCKET,
            "MKG_STORAGE__ACCESS_KEY_ID": "testing",
            "MKG_STORAGE__SECRET_ACCESS_KEY": "testing",
            "MKG_VLLM__URL": simulator.url,
            "MKG_VLLM__MODEL": MODEL,
            # every page to the GPU: routing.mode auto would send born-digital pages down the text route
            "MKG_ROUTING__MODE": "vlm",
        }
        if args.sensor_interval is not None:
            env["MKG_SENSOR_INTERVAL_S"] = str(args.sensor_interval)
        for item in args.env:
            key, _, value = item.partition("=")
            env[key] = value
        overrides = {k: v for k, v in env.items() if k.startswith("MKG_") and "SECRET" not in k}
        say(f"config overrides: {overrides}")

        # The instance's SQLite schema is created here, once, before the daemon and its code server open it:
        # two processes creating it at once can leave two alembic heads, and then neither loads.
        instance = dg.DagsterInstance.from_config(str(home))
        sampler = Sampler(simulator.url, args.interval).start()
        t0 = time.time()
        with (logs / "daemon.log").open("ab") as daemon_log:
            daemon = subprocess.Popen(
                [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-m", "mkg_pipeline"],
                cwd=REPO,
                env=env,
                stdout=daemon_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        say(f"daemon started (pid {daemon.pid}); DAGSTER_HOME {home}")

        deadline = time.monotonic() + args.timeout
        seen_runs = 0
        next_note = time.monotonic() + 60
        mid_load: list[str] = []
        while True:
            if daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited with {daemon.returncode}; see {logs / 'daemon.log'}")
            if time.monotonic() > deadline:
                say(f"TIMEOUT after {args.timeout:.0f} s: stopping everything")
                break
            runs = instance.get_runs(dg.RunsFilter(job_name="ingest_job"))
            left = sum(1 for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="incoming/").get("Contents", []))
            if len(runs) > seen_runs:
                seen_runs = len(runs)
            if runs and all(r.is_finished for r in runs) and left == 0:
                break
            if time.monotonic() > next_note:
                row = sampler.rows[-1] if sampler.rows else {}
                states: dict[str, int] = {}
                for r in runs:
                    states[r.status.value] = states.get(r.status.value, 0) + 1
                note = (
                    f"t={time.time() - t0:6.0f}s runs {states} incoming/ {left}, server running "
                    f"{row.get('running', 0):.0f} waiting {row.get('waiting', 0):.0f} answered "
                    f"{row.get('finished', 0):.0f}; loadavg {loadavg()}"
                )
                say(note)
                if not mid_load:
                    mid_load = busiest()
                next_note = time.monotonic() + 60
            time.sleep(2)
        sampler.stop()
        sampler.sample()
        runs_t = run_times(instance)
    finally:
        if sampler is not None:
            sampler.stop()
        if daemon is not None:
            stop_group(daemon)
        if instance is not None:
            instance.dispose()
        simulator.stop()
        moto.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    rows = sampler.rows
    say(f"\nend: loadavg {loadavg()}; busiest processes during the run (first minute's note):")
    for line in mid_load:
        say(f"    {line}")
    analysis = analyse(rows, preset.max_num_seqs)
    say(f"\n{len(runs_t)} runs (batches):")
    for i, run in enumerate(runs_t, 1):
        steps = "  ".join(
            f"{SHORT.get(step, step)} {s - t0:6.1f}-{(e - t0) if e else math.nan:6.1f}"
            for step, (s, e) in run.steps.items()
            if step in SHORT
        )
        say(
            f"  b{i} {run.batch[:12]} {run.status:8s} {run.documents:3d} docs {run.pages_vlm or 0:4d} vlm pages  "
            f"run {(run.start or t0) - t0:6.1f}-{(run.end or math.nan) - t0:6.1f}  {steps}"
        )
    if analysis is None:
        say("no request reached the server")
        (out / "report.txt").write_text("\n".join(report_lines) + "\n")
        return 1
    say(
        f"\nfirst request t={analysis.first - t0:.1f}s, last answer t={analysis.last - t0:.1f}s: "
        f"{analysis.window_s:.1f} s; answers {analysis.answers:.0f}"
    )
    pps = analysis.answers / analysis.window_s
    nominal = 4.5 * gpu_model.H100.step_base_s / preset.step_base_s  # the presets are the H100's clock scaled
    say(
        f"busy (running >= {BUSY_SHARE} x {preset.max_num_seqs}) {analysis.busy_s:.1f} s = "
        f"{analysis.busy_share:.3f} of the window (done-when: >= 0.9)"
    )
    say(f"pages/s {pps:.2f} over the window vs the preset's ~{nominal:.1f} at a full batch ({pps / nominal:.2f})")
    say("stretches below the busy line (>= 2 s), with what the runs were doing:")
    for start, end, mean in analysis.gaps:
        if end - start >= 2.0:
            say(
                f"  {start - t0:7.1f}-{end - t0:7.1f}s ({end - start:5.1f} s) mean running {mean:5.1f}: "
                f"{what_runs_did(runs_t, start, end)}"
            )
    renders = [run.steps["parsed_pages"] for run in runs_t if "parsed_pages" in run.steps]
    if renders:
        first_render = min(s for s, _ in renders)
        last_render = max(e or math.nan for _, e in renders)
        say(
            f"rendering: first render step start t={first_render - t0:.1f}s, last end t={last_render - t0:.1f}s: "
            f"{pages / (last_render - first_render):.2f} pages/s on {os.cpu_count()} CPUs (GPU: ~{nominal:.1f})"
        )
    say(f"wall time of the benchmark {time.monotonic() - started_at:.0f} s")
    png = write_timeline(
        out,
        rows,
        runs_t,
        t0,
        preset.max_num_seqs,
        f"{pages} pages, {len(runs_t)} batches, preset {preset.name}: busy {analysis.busy_share:.2f} of "
        f"{analysis.window_s:.0f} s, {pps:.2f} pages/s",
    )
    say(f"timeline: {out / 'timeline.csv'}, {out / 'steps.csv'}, {png or '(no matplotlib: no PNG)'}")
    (out / "report.txt").write_text("\n".join(report_lines) + "\n")
    failed = [r for r in runs_t if r.status != "SUCCESS"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
