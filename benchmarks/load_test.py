"""Load test of a VLM server through the production client (breaker, retries, in-flight bound).

Renders a few corpus pages to PNG with PyMuPDF, sends ``--requests`` page-to-Markdown
chat completions at ``--concurrency`` through :class:`VLLMClient`, then prints latency
percentiles, throughput and errors by type. Exits after exactly N requests.

    python benchmarks/load_test.py --url http://127.0.0.1:8000 [--requests 100] [--concurrency 10]
        [--api-key K] [--model M] [--dpi 100] [--pdf PATH ...] [--max-tokens 1024]

Everything else (pool, timeouts, retry policy, breaker) comes from the project
configuration (``config/mineru.yaml`` + ``MKG_*``), as in production; only the
concurrency is fixed at ``--concurrency`` (``vllm.adaptive: false``) so that the test drives what it says.
Latency is per request as the caller sees it (retries and backoff included).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
import time
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

DEFAULT_PDFS = [
    REPO_ROOT.parent / "shared" / "corpus" / "pdfs" / "pdflatex-4-pages.pdf",
    REPO_ROOT.parent / "shared" / "corpus" / "pdfs" / "minimal-document.pdf",
]
MAX_PAGES_PER_PDF = 4  # a few distinct images are enough; rendering is not what we measure


def render_pages(pdfs: list[Path], dpi: int) -> list[tuple[str, bytes]]:
    import pymupdf

    pages: list[tuple[str, bytes]] = []
    for path in pdfs:
        with pymupdf.open(path) as document:
            for index in range(min(len(document), MAX_PAGES_PER_PDF)):
                pages.append((f"{path.name} page={index + 1}", document[index].get_pixmap(dpi=dpi).tobytes("png")))
    return pages


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


async def run(args: argparse.Namespace) -> int:
    from mkg_pipeline.config import load_config
    from mkg_pipeline.engines.prompts import PAGE_MARKDOWN_PROMPT, PAGE_MARKDOWN_SYSTEM_PROMPT
    from mkg_pipeline.vllm.client import VLLMClient
    from mkg_pipeline.vllm.errors import VLLMClientError

    config = load_config()
    overrides = {"url": args.url, "max_in_flight": args.concurrency, "min_in_flight": 1, "adaptive": False}
    if args.model:
        overrides["model"] = args.model
    if args.api_key:
        overrides["api_key"] = args.api_key
    server = config.vllm.model_validate({**config.vllm.model_dump(), **overrides})

    pdfs = [Path(p) for p in args.pdf] if args.pdf else DEFAULT_PDFS
    missing = [str(p) for p in pdfs if not p.exists()]
    if missing:
        print(f"missing PDF(s): {', '.join(missing)}", file=sys.stderr)
        return 2
    pages = render_pages(pdfs, args.dpi)
    if not pages:
        print("no pages rendered", file=sys.stderr)
        return 2
    http = config.http_client
    print(
        f"{len(pages)} page image(s) at {args.dpi} dpi from {len(pdfs)} PDF(s); {args.requests} requests, "
        f"concurrency {args.concurrency}, model {server.model}, pool {server.max_in_flight}, "
        f"timeout {http.timeout_s}s, max_attempts {http.max_attempts}"
    )

    latencies: list[float] = []
    errors: Counter[str] = Counter()
    attempts = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(args.requests):
        queue.put_nowait(i)

    async with VLLMClient(server, http, config.circuit_breaker) as client:
        if not await client.health_check():
            print(f"warning: {client.server_url}/health is not answering 200", file=sys.stderr)

        async def worker() -> None:
            nonlocal attempts
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                label, png = pages[i % len(pages)]
                started = time.perf_counter()
                try:
                    result = await client.chat_completion(
                        PAGE_MARKDOWN_PROMPT,
                        [png],
                        system_prompt=PAGE_MARKDOWN_SYSTEM_PROMPT,
                        max_tokens=args.max_tokens,
                        label=f"load-test #{i} {label}",
                    )
                except VLLMClientError as exc:
                    errors[exc.error_type] += 1
                    logging.getLogger("load_test").info("request %d failed: %s", i, exc)
                else:
                    latencies.append(time.perf_counter() - started)
                    attempts += result.attempts

        wall_started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - wall_started
        breaker_state = client.breaker.state.value

    latencies.sort()
    ok = len(latencies)
    print(f"\n{'requests':<22}{args.requests}")
    print(f"{'succeeded':<22}{ok}")
    print(f"{'failed':<22}{sum(errors.values())}")
    for error_type, count in sorted(errors.items()):
        print(f"  {error_type:<20}{count}")
    print(f"{'wall time':<22}{wall:.2f} s")
    print(f"{'throughput':<22}{args.requests / wall:.2f} req/s ({ok / wall:.2f} successful req/s)")
    if ok:
        print(f"{'latency p50':<22}{percentile(latencies, 50):.3f} s")
        print(f"{'latency p95':<22}{percentile(latencies, 95):.3f} s")
        print(f"{'latency p99':<22}{percentile(latencies, 99):.3f} s")
        print(f"{'latency max':<22}{latencies[-1]:.3f} s")
        print(f"{'attempts/success':<22}{attempts / ok:.2f}")
    print(f"{'breaker at end':<22}{breaker_state}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="server base URL, without /v1")
    parser.add_argument("--requests", type=int, default=100, help="total requests (default 100)")
    parser.add_argument("--concurrency", type=int, default=10, help="requests in flight (default 10)")
    parser.add_argument("--api-key", default=None, help="bearer token (default: from config/env)")
    parser.add_argument("--model", default=None, help="served model name (default: from config)")
    parser.add_argument("--dpi", type=int, default=100, help="page render resolution (default 100)")
    parser.add_argument("--pdf", nargs="+", default=None, help="PDFs to render pages from (default: two corpus files)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="max_tokens per request (default 1024)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log retries and failures")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.dpi < 1:
        parser.error("--requests, --concurrency and --dpi must be positive")
    # -v shows retries (WARNING) and breaker transitions (WARNING/INFO); httpx's per-request INFO lines stay quiet.
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
