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
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent


def tiny_png(width: int = 256, height: int = 256) -> bytes:
    """A white greyscale PNG (the payload does not matter here, its size barely)."""
    from mkg_pipeline import png

    return png.encode(b"\xff" * width * height, width, height, 1, width, 6)


# -- one worker process ---------------------------------------------------------------------


async def worker(args: argparse.Namespace) -> dict[str, object]:
    from mkg_pipeline.config import MinerUConfig, VLLMServerConfig
    from mkg_pipeline.vllm.client import VLLMClient
    from mkg_pipeline.vllm.errors import VLLMClientError

    if args.trace:  # every limit change, with its reason, on stderr
        import logging

        logging.basicConfig(format=f"%(created).3f worker {os.getpid()} %(message)s", stream=sys.stderr)
        logging.getLogger("mkg_pipeline.vllm.limiter").setLevel(logging.DEBUG)
    config = MinerUConfig(vllm=VLLMServerConfig(url=args.url, model=args.model))
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
    # worker mode (internal)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--measure-from", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--stop-at", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(asyncio.run(worker(args))))
        return 0

    from mkg_pipeline.local_stack import free_port, wait_for_http

    if not Path(args.server).is_file():
        print(f"simulated server {args.server} not found (--server)", file=sys.stderr)
        return 2
    if args.measure > args.duration - args.stagger * (args.processes - 1):
        print("--measure must fit after the last worker has started", file=sys.stderr)
        return 2
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_argv = [sys.executable, args.server, "--host", "127.0.0.1", "--port", str(port)]
    server_argv += ["--slots", str(args.slots), "--latency", str(args.latency)]
    server_argv += ["--latency-per-running", str(args.latency_per_running)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
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
        results = []
        for process in workers:
            out, _ = process.communicate(timeout=120)
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for process in [*workers, server]:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()

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
