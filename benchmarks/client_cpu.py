"""Client CPU per request: the project's VLLMClient side by side with MinerU's own HTTP client.

A minimal OpenAI-compatible answer server runs in a child process (so its CPU is not counted),
full corpus pages are rendered to PNG once, then each client sends the same pages at the same
concurrency. The figure is this process's user+system CPU (``getrusage``) per request, after a
warm-up; the server's CPU and the rendering are excluded, as in MinerU's own measurement.

    PYTHONPATH=. python benchmarks/client_cpu.py [--requests 400] [--concurrency 16] [--dpi 150]

Run it with PYTHONPATH pointing at another checkout to compare versions of the client.
``--clients page_markdown --answer markdown`` measures a whole page_markdown request instead: the
client, the answer's validation, its safe Markdown and content list (what the vlm stage's engine
does per page), on a page answer with a heading, lists, math, a pipe table, a model-written HTML table
and code; it also prints markdown-it parses per request.
``--without-sniffio`` makes ``import sniffio`` fail after the same sys.path search as when the
package is absent (httpcore tries that import on every lock it sets up), to compare with the
environment before sniffio became a dependency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

# The corpus lives beside the repository (../shared/corpus) unless MKG_CORPUS_DIR says otherwise.
CORPUS = Path(os.environ.get("MKG_CORPUS_DIR", Path(__file__).resolve().parent.parent.parent / "shared" / "corpus"))
DEFAULT_PDFS = ("arxiv-0908.0054-4p.pdf", "gadr-3p.pdf")
PROMPT = "Convert this document page to Markdown."
ANSWER_CHARS = 3000  # a typical page of Markdown


# A page answer as a page-to-Markdown VLM writes it (about ANSWER_CHARS characters).
MARKDOWN_ANSWER = (
    "# Dosing of drug X in adults\n\n"
    + "Patients with a creatinine clearance below 30 mL/min (\\(n = 42\\)) received 10<sup>-3</sup> mg/kg, "
    "see the [protocol](https://example.org/protocol) and Table 2 for x < 3. "
    * 4
    + "\n\n## Results\n\n- first finding, with $p < 0.05$\n- second finding\n  over two lines\n\n"
    "| Dose | Effect | n |\n|---|---|---|\n| 10 mg | none | 12 |\n| 20 mg | mild | 15 |\n| 40 mg | strong | 15 |\n\n"
    '<table>\n  <tr><th>Group</th><th colspan="2">Outcome</th></tr>\n'
    "  <tr><td>A</td><td>1.2</td><td>3.4</td></tr>\n  <tr><td>B</td><td>5.6</td><td>7.8</td></tr>\n</table>\n\n"
    "$$\nE = m c^2 \\quad \\text{for } v \\ll c\n$$\n\n"
    + "The discussion continues over several paragraphs of running text without any markup at all. " * 8
    + "\n\n```python\nprint('dose', 10)\n```\n\n"
    + "A closing paragraph that summarises the page and the doses given to each group of patients. " * 12
)


def _answer(kind: str = "lorem") -> bytes:
    if kind == "markdown":
        text = MARKDOWN_ANSWER
    else:
        text = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 60)[:ANSWER_CHARS]
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "model": "bench",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1000, "completion_tokens": 700, "total_tokens": 1700},
    }
    return json.dumps(body).encode()


def _serve(port: int, kind: str = "lorem") -> None:
    """Answer every request with one fixed chat completion (HTTP/1.1 keep-alive); /v1/models too."""
    answer = _answer(kind)
    models = json.dumps({"object": "list", "data": [{"id": "bench"}]}).encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                if length:
                    await reader.readexactly(length)
                payload = models if b"/v1/models" in head.split(b"\r\n", 1)[0] else answer
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                    + str(len(payload)).encode()
                    + b"\r\n\r\n"
                    + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=512)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _render(dpi: int) -> list[bytes]:
    import pymupdf

    pages = []
    for name in DEFAULT_PDFS:
        with pymupdf.open(CORPUS / "pdfs" / name) as document:
            pages.extend(page.get_pixmap(dpi=dpi).tobytes("png") for page in document)
    return pages


class _NoSniffio:
    """A meta-path finder for which sniffio is not installed: it searches sys.path, then fails."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name != "sniffio":
            return None
        import importlib.machinery

        others = [p for p in sys.path if not (Path(p) / "sniffio").is_dir()]
        importlib.machinery.PathFinder.find_spec(name, others)
        raise ModuleNotFoundError("No module named 'sniffio'", name=name)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _drive(call, pages: list[bytes], requests: int, concurrency: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) for ``requests`` calls at ``concurrency``."""
    queue = list(range(requests))

    async def worker() -> None:
        while queue:
            i = queue.pop()
            await call(pages[i % len(pages)])

    cpu, wall = _cpu(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return _cpu() - cpu, time.perf_counter() - wall


async def _ours(url: str, mode: str, pages: list[bytes], args: argparse.Namespace) -> tuple[float, float]:
    from mkg_pipeline.config import CircuitBreakerConfig, HTTPClientConfig, VLLMServerConfig
    from mkg_pipeline.vllm.breaker import CircuitBreaker
    from mkg_pipeline.vllm.client import VLLMClient

    server = VLLMServerConfig(url=url, model="bench", max_in_flight=args.concurrency, adaptive=False)
    breaker = CircuitBreaker(url, CircuitBreakerConfig())
    http = HTTPClientConfig(**({"keepalive": args.keepalive} if args.keepalive is not None else {}))
    async with VLLMClient(server, http, breaker=breaker) as client:
        if mode == "page_markdown":
            from mkg_pipeline import config
            from mkg_pipeline.engines import PageInput, build_engine

            # PipelineConfig since issue 22; MinerUConfig before it (to measure an older checkout)
            settings_class = getattr(config, "PipelineConfig", None) or config.MinerUConfig
            settings = settings_class(answers=config.AnswersConfig(max_tokens=8192, max_reasks=0))
            engine = build_engine("page_markdown", client, settings)

            async def call(png: bytes) -> None:
                await engine.extract(PageInput(png=png, page_idx=0, text_layer_chars=100, label="bench"))

        elif mode == "chat_completion":

            async def call(png: bytes) -> None:
                await client.chat_completion(PROMPT, [png], system_prompt="You are OCR.", max_tokens=8192)

        else:  # post_chat_completion with a body built like MinerU's engine builds it
            from mineru_vl_utils.vlm_client.http_client import HttpVlmClient

            mineru = HttpVlmClient(
                model_name="bench", server_url=url, skip_model_name_checking=True, max_retries=0, use_tqdm=False
            )

            async def call(png: bytes) -> None:
                body = mineru.build_request_body(
                    system_prompt=mineru.system_prompt,
                    image=[png],
                    prompt=PROMPT,
                    sampling_params=None,
                    image_format="png",
                    priority=None,
                )
                await client.post_chat_completion(body)

        await _drive(call, pages, args.warmup, args.concurrency)
        return await _drive(call, pages, args.requests, args.concurrency)


async def _mineru(url: str, pages: list[bytes], args: argparse.Namespace) -> tuple[float, float]:
    from mineru_vl_utils.vlm_client.http_client import HttpVlmClient

    client = HttpVlmClient(
        model_name="bench",
        server_url=url,
        skip_model_name_checking=True,
        max_retries=0,
        max_concurrency=args.concurrency,
        use_tqdm=False,
    )

    async def call(png: bytes) -> None:
        await client.aio_predict(png, PROMPT)

    await _drive(call, pages, args.warmup, args.concurrency)
    result = await _drive(call, pages, args.requests, args.concurrency)
    await client.aclose()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--dpi", type=int, default=150)
    parser.add_argument("--repeat", type=int, default=3, help="runs per client; the median is printed")
    parser.add_argument("--keepalive", type=int, default=None, help="http_client.keepalive (default: the config's)")
    parser.add_argument("--without-sniffio", action="store_true", help="behave as if sniffio were not installed")
    parser.add_argument(
        "--clients",
        default="mineru,chat_completion,post_chat_completion",
        help="comma-separated subset; page_markdown: the page_markdown engine's whole request",
    )
    parser.add_argument(
        "--answer", choices=("lorem", "markdown"), default="lorem", help="the server's answer: plain text or a page"
    )
    args = parser.parse_args()
    if args.without_sniffio:
        sys.modules.pop("sniffio", None)
        sys.meta_path.insert(0, _NoSniffio())

    import mkg_pipeline

    pages = _render(args.dpi)
    sizes = sorted(len(p) for p in pages)
    port = _free_port()
    server = multiprocessing.get_context("spawn").Process(target=_serve, args=(port, args.answer), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    print(f"mkg_pipeline from {Path(mkg_pipeline.__file__).parent}")
    print(
        f"{len(pages)} full pages at {args.dpi} dpi (PNG {sizes[0] // 1024}-{sizes[-1] // 1024} KiB, "
        f"median {statistics.median(sizes) // 1024} KiB); {args.requests} requests per run, "
        f"concurrency {args.concurrency}, median of {args.repeat} runs"
    )
    from markdown_it import MarkdownIt

    parses = [0]
    original_parse = MarkdownIt.parse

    def counting_parse(self: MarkdownIt, src: str, env: object = None) -> list:
        parses[0] += 1
        return original_parse(self, src, env)

    MarkdownIt.parse = counting_parse  # a counter: every parse still runs
    try:
        for name in args.clients.split(","):
            parses[0] = 0
            runs = []
            for _ in range(args.repeat):
                if name == "mineru":
                    runs.append(asyncio.run(_mineru(url, pages, args)))
                else:
                    runs.append(asyncio.run(_ours(url, name, pages, args)))
            cpu = statistics.median(r[0] for r in runs) / args.requests * 1000
            rate = statistics.median(args.requests / r[1] for r in runs)
            label = "MinerU HttpVlmClient.aio_predict" if name == "mineru" else f"VLLMClient.{name}"
            total = args.repeat * (args.warmup + args.requests)
            print(
                f"{label:40s} {cpu:6.2f} ms CPU/request   {rate:7.1f} requests/s   "
                f"{parses[0] / total:.2f} markdown-it parses/request"
            )
    finally:
        server.terminate()
        server.join(5)


if __name__ == "__main__":
    main()
