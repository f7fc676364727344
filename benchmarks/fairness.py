"""Several worker processes against one simulated GPU server: do their adaptive limiters share it fairly?

Starts ``benchmarks/simulated_vllm.py`` (S slots x L seconds, optionally with latency growing
with the batch) on 127.0.0.1, then ``--processes`` worker processes, ``--stagger`` seconds apart.
Each worker is what a vlm step is to the server: a ``VLLMClient`` with the default configuration
(adaptive limiter, floor 2, ceiling 256) and unlimited demand, starting the next request whenever
``client.limiter.wait_for_capacity()`` returns. After ``--duration`` seconds all stop; the last
``--measure`` seconds, when all of them run, are measured:

- each worker's requests/s against a fair share (total / processes), and its mean limit;
- the sum of the limits against the server's slots S, and the throughput against capacity
  (S / L for a fixed latency; the batch-S throughput S / (L + K*S) otherwise);
- the server's peak waiting queue (its own ``simulated_vllm_peak_requests_waiting``) against S.

    python benchmarks/fairness.py [--slots 32] [--latency 0.5] [--latency-per-running 0]
        [--processes 3] [--stagger 10] [--duration 300] [--measure 120]
        [--server benchmarks/simulated_vllm.py] [--trace]

Shares converge as AIMD does: each back-off narrows the gap between a late starter and the
others by a tenth, so allow a couple of minutes after the last start before measuring.

``--preset h100|h100-kv|h100-fast``: the GPU-faithful server of ``gpu_model.py`` instead, and each
worker is the real client path of ``saturation.py`` (b'): the vlm stage (default config, engine
page_markdown, ``routing.mode`` pinned to ``vlm`` so every page goes to the server) on ``--pages``
corpus page images held in memory (no S3), its engine, ``VLLMClient`` and limiter, stopped at the
end (a worker that runs out of pages first says so: it was not busy to the end). Reported:

- total answers/s in the measured window against capacity: the preset's full-batch rate
  (max_num_seqs running) for the mean prompt and output tokens of the requests sent in that
  window; as a cross-check, ``gpu_model``'s replay of those requests all at t = 0 (the steady
  rate between 20 % and 80 % of the answers, the ideal's own ramp and tail left out), which agrees
  on ``h100`` and is lower on ``h100-kv`` (a dump of every page overfills the cache and thrashes);
- each worker's answers/s against a fair share (min / max), its mean limit and steering;
- the server's waiting queue (max over the whole run and over the window) against max_num_seqs,
  its preemptions in the window, and the workers' timeouts and other failed attempts;
- the load average and the busiest other processes before and after (other people's work on the
  same cores); ``--timeline PREFIX`` writes the server's timeline PNG/CSV.

    python benchmarks/fairness.py --preset h100 --processes 8 --stagger 20 --duration 300 --measure 120

Everything listens on 127.0.0.1 and is stopped before the script exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent


def tiny_png(width: int = 256, height: int = 256) -> bytes:
    """A white greyscale PNG (the payload does not matter here, its size barely)."""
    from mkg_pipeline import png

    return png.encode(b"\xff" * width * height, width, height, 1, width, 6)


# -- one worker process ---------------------------------------------------------------------


async def worker(args: argparse.Namespace) -> dict[str, object]:
    from mkg_pipeline.config import PipelineConfig, VLLMServerConfig
    from mkg_pipeline.vllm.client import VLLMClient
    from mkg_pipeline.vllm.errors import VLLMClientError

    if args.trace:  # every limit change, with its reason, on stderr
        import logging

        logging.basicConfig(format=f"%(created).3f worker {os.getpid()} %(message)s", stream=sys.stderr)
        logging.getLogger("mkg_pipeline.vllm.limiter").setLevel(logging.DEBUG)
    config = PipelineConfig(vllm=VLLMServerConfig(url=args.url, model=args.model))
    png = tiny_png()
    done_in_window = 0
    errors: dict[str, int] = {}
    limits: list[int] = []
    tasks: set[asyncio.Task[None]] = set()
    await asyncio.sleep(max(0.0, args.start_at - time.time()))

    async with VLLMClient.from_config(config) as client:
        limiter = client.limiter

        async def one() -> None:
            nonlocal done_in_window
            try:
                await client.chat_completion("Convert this page to Markdown.", [png], max_tokens=1024)
            except VLLMClientError as exc:
                errors[exc.error_type] = errors.get(exc.error_type, 0) + 1
                return
            if args.measure_from <= time.time() < args.stop_at:
                done_in_window += 1

        async def sample_limit() -> None:
            while time.time() < args.stop_at:
                if time.time() >= args.measure_from:
                    limits.append(limiter.limit)
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample_limit())
        while time.time() < args.stop_at:
            try:
                await asyncio.wait_for(limiter.wait_for_capacity(), timeout=max(0.01, args.stop_at - time.time()))
            except TimeoutError:
                break
            task = asyncio.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(0)  # let the request take its slot before asking again
        await sampler
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        window = args.stop_at - args.measure_from
        return {
            "pid": os.getpid(),
            "requests_per_s": done_in_window / window,
            "mean_limit": statistics.fmean(limits) if limits else 0.0,
            "last_limit": limiter.limit,
            "steering": "queue" if limiter.uses_server_metrics else "latency",
            "errors": errors,
        }


# -- the driver -----------------------------------------------------------------------------


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(None, 1)[-1]) for line in text.splitlines() if line.startswith(name))


# -- GPU presets: the real client path in each worker ---------------------------------------


def stage_worker(args: argparse.Namespace) -> dict[str, object]:
    """The vlm stage on corpus pages in memory, from ``--start-at`` until ``--stop-at`` (or its pages run out)."""
    sys.path.insert(0, str(HERE))
    import saturation

    from mkg_pipeline.metrics.client import CLIENT_FAILURES, CLIENT_RETRIES
    from mkg_pipeline.stages.vlm import process_documents
    from mkg_pipeline.vllm import client as client_module

    if args.trace:
        import logging

        logging.basicConfig(format=f"%(created).3f worker {os.getpid()} %(message)s", stream=sys.stderr)
        logging.getLogger("mkg_pipeline.vllm.limiter").setLevel(logging.DEBUG)
    cfg = saturation.bench_config(args.url, "page_markdown", MKG_ROUTING__MODE="vlm")
    corpus = saturation.load_corpus_pages(saturation.DEFAULT_CORPUS, 150, saturation.DEFAULT_CACHE)
    selected = saturation.cycle_pages(corpus, args.pages)
    import limiter_trace  # each PNG under its document's prefix, as the stage's memory budget expects

    storage, doc_ids = limiter_trace.pages_in_memory(selected, f"w{os.getpid()}")

    # Count answers as they come (the stage is stopped before its summary): the engine's one call per page.
    answered: list[float] = []
    original = client_module.VLLMClient.chat_completion

    async def counted(self: object, *a: object, **k: object) -> object:
        result = await original(self, *a, **k)  # type: ignore[arg-type]
        answered.append(time.time())
        return result

    client_module.VLLMClient.chat_completion = counted  # type: ignore[method-assign,assignment]
    limits: list[int] = []
    outcome = {"finished_at": None, "error": None}

    async def go() -> tuple[str, bool]:
        await asyncio.sleep(max(0.0, args.start_at - time.time()))
        async with saturation.open_engine(cfg) as (client, engine):
            limiter = client.limiter

            async def sample_limit() -> None:
                while True:
                    if time.time() >= args.measure_from:
                        limits.append(limiter.limit)
                    await asyncio.sleep(0.25)

            sampler = asyncio.create_task(sample_limit())
            stage = process_documents(
                storage,
                engine,
                doc_ids,
                limiter,
                server_url=client.server_url,
                model=client.model,
                force_refresh=True,
                progress=lambda _message: None,
            )
            try:
                await asyncio.wait_for(stage, timeout=max(0.01, args.stop_at - time.time()))
                outcome["finished_at"] = time.time()
            except TimeoutError:
                pass
            except Exception as exc:  # reported, not hidden: the worker's figures are then suspect
                outcome["error"] = f"{type(exc).__name__}: {exc}"
            sampler.cancel()
            return ("queue" if limiter.uses_server_metrics else "latency"), bool(limits)

    steering, _ = asyncio.run(go())
    failures = {
        sample.labels["error_type"]: int(sample.value)
        for metric in CLIENT_FAILURES.collect()
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.value
    }
    retries = sum(s.value for m in CLIENT_RETRIES.collect() for s in m.samples if s.name.endswith("_total"))
    window = args.stop_at - args.measure_from
    return {
        "pid": os.getpid(),
        "requests_per_s": sum(1 for t in answered if args.measure_from <= t < args.stop_at) / window,
        "answers": len(answered),
        "mean_limit": statistics.fmean(limits) if limits else 0.0,
        "steering": steering,
        "failures": failures,
        "retries": int(retries),
        "finished_at": outcome["finished_at"],
        "error": outcome["error"],
    }


def worker_results(workers: list[subprocess.Popen[str]]) -> list[dict[str, object]]:
    """Each worker's result: the JSON object on the last line it prints."""
    results = []
    for process in workers:
        out, _ = process.communicate(timeout=120)
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def stop_processes(processes: list[subprocess.Popen[Any]]) -> None:
    """Stop whichever of the processes still run: terminate, and kill what does not end within 10 s."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


def steady_rate(preset: object, requests: list[tuple[int, int]], at_least: int = 3000) -> float:
    """Answers/s of an ideal client for this request mix: the replay (all at t = 0) between 20 % and 80 % of answers."""
    import gpu_model

    if not requests:
        return float("nan")
    mix = requests * -(-at_least // len(requests))
    _, seqs = gpu_model.run_offline(preset, ((0.0, p, o) for p, o in mix))  # type: ignore[arg-type]
    done = sorted(s.finished_at or 0.0 for s in seqs)
    lo, hi = int(0.2 * len(done)), int(0.8 * len(done))
    return (hi - lo) / (done[hi] - done[lo])


def run_preset(args: argparse.Namespace, env: dict[str, str]) -> dict[str, object]:
    """One run on a GPU preset; prints its report and returns the figures (for the median of repeats)."""
    sys.path.insert(0, str(HERE))
    import gpu_model
    import saturation

    from mkg_devstack.local_stack import free_port

    preset = gpu_model.PRESETS[args.preset]
    sim = saturation.Simulator(Path(tempfile.mkdtemp(prefix="mkg-fairness-")), free_port())
    sim.start(saturation.Setting.parse(args.preset), 4)
    workers: list[subprocess.Popen[str]] = []
    timeline = saturation.Timeline(sim.url)
    try:
        start = time.time() + 8  # the workers import the project and load their pages meanwhile
        stop = start + args.duration
        measure_from = stop - args.measure
        for i in range(args.processes):
            argv = [sys.executable, __file__, "--worker", "--preset", args.preset, "--url", sim.url]
            argv += ["--pages", str(args.pages), "--start-at", str(start + i * args.stagger)]
            argv += ["--measure-from", str(measure_from), "--stop-at", str(stop)] + (["--trace"] if args.trace else [])
            workers.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env))
        time.sleep(max(0.0, start - time.time()))
        timeline.start()
        time.sleep(max(0.0, measure_from - time.time()))
        sim.reset_peaks()  # peaks and the request log from here on
        before = sim.scrape()
        window_from = len(timeline.rows)
        time.sleep(max(0.0, stop - time.time()))
        after = sim.scrape()
        requests = sim.requests_log()
        timeline.stop()
        results = worker_results(workers)
    finally:
        stop_processes(workers)
        sim.stop()

    window = args.measure
    replay = steady_rate(preset, requests)
    mean_p = statistics.fmean(p for p, _ in requests) if requests else 0.0
    mean_o = statistics.fmean(o for _, o in requests) if requests else 0.0
    formula = preset.full_batch_requests_per_s(round(mean_p), round(mean_o)) if requests else float("nan")
    # Capacity: the preset's full-batch rate for the requests sent (max_num_seqs running). The replay of
    # them all at once says the same on h100; on h100-kv it is lower (a dump of every page overfills the
    # cache and thrashes on preemptions), so it is only a cross-check.
    capacity = formula
    total = sum(float(r["requests_per_s"]) for r in results)  # type: ignore[arg-type]
    fair = total / len(results)
    shares = [float(r["requests_per_s"]) / fair if fair else 0.0 for r in results]  # type: ignore[arg-type]
    server_total = (after.get("vllm:request_success_total", 0) - before.get("vllm:request_success_total", 0)) / window
    rows = timeline.rows
    max_waiting_all = max((r["waiting"] for r in rows), default=0.0)
    max_waiting_window = max(after.get("simulated_vllm_peak_requests_waiting", 0.0),
                             max((r["waiting"] for r in rows[window_from:]), default=0.0))  # fmt: skip
    mean_running = statistics.fmean(r["running"] for r in rows[window_from:]) if rows[window_from:] else 0.0
    preempt = after.get("vllm:num_preemptions_total", 0) - before.get("vllm:num_preemptions_total", 0)
    preempt_all = after.get("vllm:num_preemptions_total", 0)
    timeouts = sum(int(r["failures"].get("timeout", 0)) for r in results)  # type: ignore[union-attr]
    other_failures = sum(sum(r["failures"].values()) for r in results) - timeouts  # type: ignore[union-attr]
    scale = " (10x time-scaled: every duration / 10)" if args.preset == "h100-fast" else ""
    print(
        f"server: preset {args.preset}{scale}, max_num_seqs {preset.max_num_seqs}, KV {preset.kv_cache_tokens} "
        f"tokens; {len(results)} workers (vlm stage, {args.pages} pages each) started {args.stagger:g} s apart, "
        f"{args.duration:g} s in all, last {window:g} s measured"
    )
    for i, (r, share) in enumerate(zip(results, shares, strict=True)):
        ran_out = r["finished_at"] is not None and float(r["finished_at"]) < stop - 1  # type: ignore[arg-type]
        print(
            f"  worker {i}: {float(r['requests_per_s']):6.3f} answers/s = {share:4.2f} x fair share, "  # type: ignore[arg-type]
            f"mean limit {float(r['mean_limit']):5.1f}, {r['answers']} answers, steering by {r['steering']}"  # type: ignore[arg-type]
            + (f", failed attempts {r['failures']}" if r["failures"] else "")
            + (f", retries {r['retries']}" if r["retries"] else "")
            + (" , RAN OUT OF PAGES" if ran_out else "")
            + (f", ERROR {r['error']}" if r["error"] else "")
        )
    print(
        f"  total {total:.3f} answers/s (server: {server_total:.3f}) = {total / capacity:.3f} of capacity "
        f"{capacity:.3f}/s (the preset's full batch for the window's {len(requests)} requests, mean P={mean_p:.0f} "
        f"N={mean_o:.0f}; cross-check, gpu_model's replay of them all at once: {replay:.3f}/s, ratio "
        f"{total / replay:.3f})"
    )
    print(
        f"  shares min {min(shares):.2f} max {max(shares):.2f} x fair (goal >= 0.8); mean running in window "
        f"{mean_running:.0f} / {preset.max_num_seqs}; max waiting {max_waiting_window:.0f} in window, "
        f"{max_waiting_all:.0f} over the run (max_num_seqs {preset.max_num_seqs}: "
        f"{'<=' if max_waiting_all <= preset.max_num_seqs else '>'}); timeouts {timeouts}, other failed attempts "
        f"{other_failures}; preemptions {preempt:.0f} in window, {preempt_all:.0f} over the run"
    )
    if args.timeline:
        png = timeline.write(Path(args.timeline), f"fairness: {len(results)} workers on {args.preset}",
                             preset.max_num_seqs)  # fmt: skip
        print(f"  timeline {png}")
    return {
        "capacity_ratio": total / capacity,
        "min_share": min(shares),
        "max_share": max(shares),
        "max_waiting": max_waiting_all,
        "timeouts": timeouts,
        "preemptions": preempt,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--latency-per-running", type=float, default=0.0)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--stagger", type=float, default=10.0, help="seconds between two workers' starts")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds from the first start to the end")
    parser.add_argument("--measure", type=float, default=120.0, help="the last seconds, measured")
    parser.add_argument("--server", default=str(HERE / "simulated_vllm.py"), help="the simulated server script")
    parser.add_argument("--model", default="Qwen/Qwen2.5-VL-7B-Instruct")
    parser.add_argument("--trace", action="store_true", help="workers log every limit change to stderr")
    parser.add_argument("--preset", default=None, help="a GPU preset of gpu_model.py (h100, h100-kv, h100-fast)")
    parser.add_argument("--pages", type=int, default=1500, help="GPU presets: pages per worker (enough to stay busy)")
    parser.add_argument("--repeat", type=int, default=1, help="GPU presets: runs; the median is printed")
    parser.add_argument("--timeline", default=None, help="GPU presets: path prefix of the server's timeline PNG/CSV")
    # worker mode (internal)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--measure-from", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--stop-at", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(stage_worker(args) if args.preset else asyncio.run(worker(args))))
        return 0

    from mkg_devstack.local_stack import free_port, wait_for_http

    if not Path(args.server).is_file():
        print(f"simulated server {args.server} not found (--server)", file=sys.stderr)
        return 2
    if args.measure > args.duration - args.stagger * (args.processes - 1):
        print("--measure must fit after the last worker has started", file=sys.stderr)
        return 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    if args.preset:
        sys.path.insert(0, str(HERE))
        import saturation

        saturation.load_corpus_pages(saturation.DEFAULT_CORPUS, 150, saturation.DEFAULT_CACHE)  # rendered once
        saturation.machine_report("before")
        runs = []
        for number in range(args.repeat):
            if args.repeat > 1:
                print(f"-- run {number + 1} of {args.repeat}")
            runs.append(run_preset(args, env))
            print(f"  loadavg {saturation.loadavg()}")
        if args.repeat > 1:
            print(f"median of {args.repeat}: " + ", ".join(
                f"{key} {statistics.median(float(r[key]) for r in runs):.3f}" for key in runs[0]))  # fmt: skip
        saturation.machine_report("after")
        return 0
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_argv = [sys.executable, args.server, "--host", "127.0.0.1", "--port", str(port)]
    server_argv += ["--slots", str(args.slots), "--latency", str(args.latency)]
    server_argv += ["--latency-per-running", str(args.latency_per_running)]
    server = subprocess.Popen(server_argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    workers: list[subprocess.Popen[str]] = []
    try:
        wait_for_http(f"{url}/health", 30, server)
        start = time.time() + 2
        stop = start + args.duration
        measure_from = stop - args.measure
        for i in range(args.processes):
            argv = [sys.executable, __file__, "--worker", "--url", url, "--model", args.model]
            argv += ["--start-at", str(start + i * args.stagger), "--measure-from", str(measure_from)]
            argv += ["--stop-at", str(stop)] + (["--trace"] if args.trace else [])
            workers.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env))
        time.sleep(max(0.0, measure_from - time.time()))
        with urllib.request.urlopen(urllib.request.Request(f"{url}/simulated/reset-peaks", method="POST"), timeout=5):
            pass
        time.sleep(max(0.0, stop - time.time()))
        peak_waiting = metric(url, "simulated_vllm_peak_requests_waiting")
        peak_running = metric(url, "simulated_vllm_peak_requests_running")
        results = worker_results(workers)
    finally:
        stop_processes([*workers, server])

    capacity = args.slots / (args.latency + args.latency_per_running * args.slots)
    total = sum(float(r["requests_per_s"]) for r in results)  # type: ignore[arg-type]
    fair = total / len(results)
    limit_sum = sum(float(r["mean_limit"]) for r in results)  # type: ignore[arg-type]
    print(
        f"server: {args.slots} slots x {args.latency}s"
        + (f" + {args.latency_per_running}s x running" if args.latency_per_running else "")
        + f" (batch-{args.slots} capacity {capacity:.1f} req/s); {len(results)} workers started "
        f"{args.stagger:g}s apart, {args.duration:g}s in all, last {args.measure:g}s measured"
    )
    for i, r in enumerate(results):
        share = float(r["requests_per_s"]) / fair if fair else 0.0  # type: ignore[arg-type]
        print(
            f"  worker {i}: {float(r['requests_per_s']):6.1f} req/s = {share:4.2f} x fair share, "  # type: ignore[arg-type]
            f"mean limit {float(r['mean_limit']):5.1f} (last {r['last_limit']}), steering by {r['steering']}"  # type: ignore[arg-type]
            + (f", errors {r['errors']}" if r["errors"] else "")
        )
    print(
        f"  total {total:.1f} req/s = {total / capacity:.3f} of capacity; sum of mean limits {limit_sum:.1f} "
        f"= {limit_sum / args.slots:.2f} x S; server peak running {peak_running:.0f}, "
        f"peak waiting {peak_waiting:.0f} (S = {args.slots})"
    )
    worst = min(float(r["requests_per_s"]) for r in results) / fair if fair else 0.0  # type: ignore[arg-type]
    print(f"  worst share {worst:.2f} x fair (goal >= 0.8); peak waiting <= S: {peak_waiting <= args.slots}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
