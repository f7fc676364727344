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

``--cold-start`` (GPU presets): how fast a cold run fills an idle server. Three cases, each on a
freshly started server: the ideal client (every page's request at once), the client path (vlm stage,
default config, ``routing.mode`` pinned to ``vlm``) with the server's /metrics, and the same without
them (the client's /metrics scrape answers an empty page, as a server that exposes no vLLM gauges:
the limiter steers by answers alone). Each case stops once the server has run >= 0.9 x max_num_seqs
for a few seconds (or after ``--max-s``). Printed: seconds from the first request at the server to
running >= 0.9 x max_num_seqs, ours against the ideal's (the step's 8,192-token prefill budget makes
even the ideal take ~16 s on the H100 preset), and in round trips of one page alone (10 s).
``--repeat`` gives the median.

    python benchmarks/limiter_trace.py --setting h100 --cold-start --pages 600 [--repeat 3]
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import saturation  # the benchmark's simulator, corpus pages and client path


def pages_in_memory(pages: list, tag: str) -> tuple[Any, list[str]]:
    """Documents over ``pages`` in a MemoryStorage, each page's PNG under its own document's prefix.

    As parsed_pages writes them: the stage LISTs that prefix for the PNG sizes its memory budget counts.
    ``saturation.write_page_manifests`` keeps one copy of a corpus page under ``pages/corpus-...``, which that
    LIST does not see, so the stage would bound each page by its pixels (~15 MB at 150 dpi) and the
    default 1.5 GiB budget would cap a process at ~100 pages in flight: a benchmark artefact, not the
    limiter's doing.
    """
    from mkg_pipeline.storage import MemoryStorage

    storage = MemoryStorage()
    for page in {p.key: p for p in pages}.values():
        storage.put_bytes(page.key, page.png, "image/png")
    doc_ids = saturation.write_page_manifests(storage, pages, tag)
    for doc_id in doc_ids:
        manifest = storage.get_json(storage.page_manifest_key(doc_id))
        for entry in manifest["pages"]:
            key = storage.page_png_key(doc_id, int(entry["page"]))
            storage.put_bytes(key, storage.get_bytes(entry["png_key"]), "image/png")
            entry["png_key"] = key
        storage.put_json(storage.page_manifest_key(doc_id), manifest)
    return storage, doc_ids


def cold_case(setting: saturation.Setting, kind: str, pages: list, max_s: float) -> tuple[float, float]:
    """One case on a fresh server: (seconds to 0.9 full, seconds the case ran); nan when it never filled."""
    import asyncio

    from mkg_devstack.local_stack import free_port

    gpu = setting.gpu
    assert gpu is not None
    sim = saturation.Simulator(Path(tempfile.mkdtemp(prefix="mkg-cold-start-")), free_port())
    sim.start(setting, 4)
    timeline = saturation.Timeline(sim.url, interval_s=0.25)
    try:
        cfg = saturation.bench_config(sim.url, "page_markdown", MKG_ROUTING__MODE="vlm")
        saturation.reset_process_state()

        async def filled() -> None:
            while not any(r["running"] >= 0.9 * gpu.max_num_seqs for r in timeline.rows):
                await asyncio.sleep(0.1)
            await asyncio.sleep(3.0)  # a few readings of the full server, for the record

        async def ideal() -> None:
            import aiohttp

            bodies = {p.index: saturation.page_request_body(p.png, cfg.answers.max_tokens) for p in pages}
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as http:

                async def one(body: bytes) -> None:
                    headers = {"Content-Type": "application/json"}
                    async with http.post(sim.url + "/v1/chat/completions", data=body, headers=headers) as response:
                        await response.read()

                await asyncio.gather(*(one(bodies[p.index]) for p in pages))

        async def client_path() -> None:
            from mkg_pipeline.stages.vlm import process_documents

            storage, doc_ids = pages_in_memory(pages, "cold")
            async with saturation.open_engine(cfg) as (client, engine):
                await process_documents(
                    storage, engine, doc_ids, client.limiter, server_url=client.server_url, model=client.model,
                    force_refresh=True, progress=lambda _message: None,
                )  # fmt: skip

        async def go() -> float:
            started = time.perf_counter()
            work = asyncio.create_task(ideal() if kind == "ideal" else client_path())
            watch = asyncio.create_task(filled())
            await asyncio.wait({work, watch}, timeout=max_s, return_when=asyncio.FIRST_COMPLETED)
            for task in (work, watch):
                task.cancel()
            for outcome in await asyncio.gather(work, watch, return_exceptions=True):
                if isinstance(outcome, Exception):  # a failed case must not pass for a slow one
                    print(f"  {kind}: {type(outcome).__name__}: {outcome}", file=sys.stderr)
            return time.perf_counter() - started

        timeline.start()
        ran = asyncio.run(go())
        timeline.stop()
    finally:
        sim.stop()
    peak = max((r["running"] for r in timeline.rows), default=0.0)
    if math.isnan(timeline.fill_s(gpu.max_num_seqs)):
        print(f"  {kind}: never 0.9 full in {ran:.1f} s (peak running {peak:.0f})", file=sys.stderr)
    return timeline.fill_s(gpu.max_num_seqs), ran


def cold_start(args: argparse.Namespace) -> int:
    import statistics

    from mkg_pipeline.vllm.client import VLLMClient

    setting = saturation.Setting.parse(args.setting)
    gpu = setting.gpu
    if gpu is None:
        print("--cold-start needs a GPU preset (--setting h100)", file=sys.stderr)
        return 2
    corpus = saturation.load_corpus_pages(saturation.DEFAULT_CORPUS, 150, saturation.DEFAULT_CACHE)
    pages = saturation.cycle_pages(corpus, args.pages or 600)
    saturation.machine_report("before")
    real_fetch = VLLMClient.fetch_server_metrics

    async def no_vllm_gauges(self: VLLMClient, timeout_s: float | None = None) -> str:
        return "# a server without vLLM's gauges\n"

    alone = gpu.single_request_s()
    names = {"ideal": "ideal", "metrics": "with /metrics", "no-metrics": "without /metrics"}
    fills: dict[str, list[float]] = {names[c]: [] for c in args.cases.split(",")}
    if "ideal" not in fills:
        print("--cases must include ideal (the yardstick)", file=sys.stderr)
        return 2
    for number in range(args.repeat):
        for kind in fills:
            VLLMClient.fetch_server_metrics = no_vllm_gauges if kind == "without /metrics" else real_fetch  # type: ignore[method-assign]
            fill, ran = cold_case(setting, kind, pages, args.max_s)
            fills[kind].append(fill)
            print(f"run {number + 1} {kind:17s}: 0.9 full after {fill:6.2f} s (case ran {ran:5.1f} s; "
                  f"loadavg {saturation.loadavg().split()[0]})", flush=True)  # fmt: skip
    VLLMClient.fetch_server_metrics = real_fetch  # type: ignore[method-assign]
    ideal = statistics.median(fills["ideal"])
    print(f"\ncold start on {setting.name} ({len(pages)} pages offered, max_num_seqs {gpu.max_num_seqs}; one page "
          f"alone {alone:.1f} s), median of {args.repeat}: seconds from the first request to running >= 0.9 x "
          f"max_num_seqs")  # fmt: skip
    for kind, values in fills.items():
        median = statistics.median(values)
        print(f"  {kind:17s} {median:6.2f} s = {median / ideal:5.2f} x the ideal's, {median / alone:4.2f} round "
              f"trips of one page alone  (runs: {', '.join(f'{v:.2f}' for v in values)})")  # fmt: skip
    saturation.machine_report("after")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="32x0.5", help="server setting SxL or SxL+K (default 32x0.5)")
    parser.add_argument("--engine", default="page_markdown", choices=saturation.ENGINES)
    parser.add_argument("--waves", type=int, default=20, help="requests = waves x slots (default 20)")
    parser.add_argument("--pages", type=int, default=0, help="pages to send instead of --waves (GPU presets)")
    parser.add_argument("--log", action="store_true", help="also the limiter's DEBUG log (its decisions)")
    parser.add_argument("--cold-start", action="store_true", help="ideal vs with/without /metrics: time to 0.9 full")
    parser.add_argument("--repeat", type=int, default=1, help="--cold-start: runs of the three cases (median)")
    parser.add_argument("--max-s", type=float, default=150.0, help="--cold-start: a case stops after this long")
    parser.add_argument("--cases", default="ideal,metrics,no-metrics", help="--cold-start: which of the three")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(relativeCreated)7.0f ms  %(message)s")
    if args.log:
        logging.getLogger("mkg_pipeline.vllm.limiter").setLevel(logging.DEBUG)
    if args.cold_start:
        return cold_start(args)

    from mkg_devstack.local_stack import free_port
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
