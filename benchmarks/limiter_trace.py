"""What the concurrency limiter does during one client-path run: a timeline, to see where a run loses time.

Starts the simulated GPU server (``simulated_vllm.py``) and runs the client path of ``saturation.py``
(the vlm stage on page images held in memory, default config, a cold limiter) once, printing every
0.25 s: the limiter's limit, the attempts in flight, and the server's running and waiting requests
(its own /metrics). With ``--log`` the limiter's DEBUG lines (each decision and why) come too.

    python benchmarks/limiter_trace.py [--setting 32x0.5] [--engine page_markdown] [--waves 20] [--log]
    python benchmarks/limiter_trace.py --setting h100-fast --pages 400      # a GPU preset (gpu_model.py)

A server running fewer than its slots while the client has more in flight shows the client's own
latency (answers arriving together, requests not yet sent); a limit below the slots, the limiter
holding back. The first and last round trips are the fixed cost of a run.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import saturation  # the benchmark's simulator, corpus pages and client path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="32x0.5", help="server setting SxL or SxL+K (default 32x0.5)")
    parser.add_argument("--engine", default="page_markdown", choices=saturation.ENGINES)
    parser.add_argument("--waves", type=int, default=20, help="requests = waves x slots (default 20)")
    parser.add_argument("--pages", type=int, default=0, help="pages to send instead of --waves (GPU presets)")
    parser.add_argument("--log", action="store_true", help="also the limiter's DEBUG log (its decisions)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(relativeCreated)7.0f ms  %(message)s")
    if args.log:
        logging.getLogger("mkg_pipeline.vllm.limiter").setLevel(logging.DEBUG)

    from mkg_pipeline.local_stack import free_port
    from mkg_pipeline.vllm.limiter import limiter_for

    setting = saturation.Setting.parse(args.setting)
    pages = saturation.load_corpus_pages(saturation.DEFAULT_CORPUS, 150, saturation.DEFAULT_CACHE)
    sim = saturation.Simulator(Path(tempfile.mkdtemp(prefix="mkg-limiter-trace-")), free_port())
    sim.start(setting, 4)
    try:
        cfg = saturation.bench_config(sim.url, args.engine)
        requests_per_page = saturation.requests_per_page(args.engine, 4)
        n_pages = args.pages or math.ceil(args.waves * setting.slots / requests_per_page)
        selected = saturation.cycle_pages(pages, n_pages)
        saturation.reset_process_state()
        # The one the run's client will use (one per URL per process), created as the client creates it.
        limiter = limiter_for(sim.url, cfg.vllm, deadline_s=cfg.http_client.timeout_s)
        rows: list[tuple[float, int, int, float, float, float]] = []
        done = threading.Event()
        started = time.perf_counter()

        def sample() -> None:
            while not done.is_set():
                metrics = sim.scrape()
                running, waiting = metrics["vllm:num_requests_running"], metrics["vllm:num_requests_waiting"]
                kv = metrics.get("vllm:kv_cache_usage_perc", 0.0)
                rows.append((time.perf_counter() - started, limiter.limit, limiter.in_flight, running, waiting, kv))
                done.wait(0.25)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        outcome = saturation.run_client_path(cfg, selected)
        wall = time.perf_counter() - started
        done.set()
        sampler.join()
    finally:
        sim.stop()
    ideal = n_pages * requests_per_page / setting.capacity  # a preset's capacity: reference pages/s
    print(f"\n{args.engine} on {setting.name}: {outcome.pages_done} pages, {outcome.pages_failed} failed; "
          f"wall {wall:.2f} s against {ideal:.2f} s at full capacity ({ideal / wall:.2f})")  # fmt: skip
    print(f"{'t s':>6} {'limit':>6} {'in flight':>9} {'running':>8} {'waiting':>8} {'KV use':>6}")
    for t, limit, in_flight, running, waiting, kv in rows:
        print(f"{t:6.2f} {limit:6d} {in_flight:9d} {running:8.0f} {waiting:8.0f} {kv:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
