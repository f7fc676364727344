"""Rendering cost, side by side in one run: bare PyMuPDF against the project's page path and its process pool.

Every figure is the median of --repeat runs over the same pages (corpus files of every kind: born-digital,
scanned, tables, rotated), at the same DPI, the cases interleaved in each round so drift hits them alike:

  bare render+png         page.get_pixmap(dpi) + pix.tobytes("png")        (MuPDF's encoder, zlib level 6)
  bare +text              the same + page.get_text()                        (what a page manifest needs)
  project (in-process)    pdf.render.iter_rendered_pages: pixmap, PNG (level PNG_COMPRESSION), text, sha256
  pool N processes        pages/s of pdf.pool.WorkerPool rendering the documents N at a time (no S3)

    python benchmarks/render.py [--dpi 150] [--repeat 5] [--processes 1,2]
    python benchmarks/render.py --levels            # ms and KiB per page for each zlib level
    python benchmarks/render.py --rss-pages 2000    # peak RSS of parsed_pages' worker on a 2,000-page document
                                                    # (built from corpus pages), pages uploaded to moto S3

Timing figures mean something only on an otherwise idle machine: the load average before and after is
printed with the results; say what else was running when you quote them.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import pymupdf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mkg_pipeline.pdf.pool import WorkerPool, available_cpus  # noqa: E402
from mkg_pipeline.pdf.render import PNG_COMPRESSION, RenderedPage, encode_png, iter_rendered_pages  # noqa: E402

CORPUS = Path(os.environ.get("MKG_CORPUS_DIR", REPO.parent / "shared" / "corpus")) / "pdfs"
FILES = [
    "pdflatex-4-pages.pdf",
    "arxiv-0908.0054-4p.pdf",
    "sci-tables-6p.pdf",
    "multicolumn-3p.pdf",
    "patent-8p.pdf",
    "rotated-arabic-4p.pdf",
    "edgar-scanned.pdf",
    "gadr-3p.pdf",
]


def _documents() -> list[tuple[str, bytes]]:
    return [(name, (CORPUS / name).read_bytes()) for name in FILES]


def bare(data: bytes, dpi: int, text: bool) -> int:
    pages = 0
    with pymupdf.open(stream=data, filetype="pdf") as doc:
        for page in doc:
            pix = page.get_pixmap(dpi=dpi)
            pix.tobytes("png")
            if text:
                page.get_text()
            pages += 1
    return pages


def project(name: str, data: bytes, dpi: int) -> int:
    pages = 0
    for item in iter_rendered_pages(data, name, dpi, 40_000_000):
        assert isinstance(item, RenderedPage), item
        pages += 1
    return pages


def _time_per_page(fn, documents: list[tuple[str, bytes]]) -> float:
    started = time.perf_counter()
    pages = sum(fn(name, data) for name, data in documents)
    return (time.perf_counter() - started) * 1000 / pages


def _render_task(name: str, data: bytes, dpi: int) -> int:
    """A pool task: render one document in the worker, discard the pages (no S3 in this measurement)."""
    return project(name, data, dpi)


def _pool_pages_per_s(documents: list[tuple[str, bytes]], dpi: int, processes: int) -> float:
    with WorkerPool(processes, timeout_s=None) as pool:
        # Warm the workers (forkserver start, imports) so the figure is rendering, not process start-up.
        list(pool.run(_render_task, [(str(i), ("warm", documents[0][1], 36)) for i in range(processes)]))
        started = time.perf_counter()
        pages = sum(n for _, n in pool.run(_render_task, [(name, (name, data, dpi)) for name, data in documents]))
        return pages / (time.perf_counter() - started)


def compare(args: argparse.Namespace) -> None:
    documents = _documents()
    pages = sum(project(name, data, 36) for name, data in documents)  # also warms caches and imports
    processes = [int(p) for p in args.processes.split(",")] if args.processes else sorted({1, available_cpus()})
    print(f"{pages} pages from {len(documents)} corpus files at {args.dpi} dpi, median of {args.repeat} rounds")
    print(f"PNG level {PNG_COMPRESSION}; CPUs available: {available_cpus()}; load average before: {os.getloadavg()}")
    samples: dict[str, list[float]] = {"bare": [], "bare_text": [], "project": []}
    pool: dict[int, list[float]] = {n: [] for n in processes}
    for _ in range(args.repeat):
        samples["bare"].append(_time_per_page(lambda n, d: bare(d, args.dpi, text=False), documents))
        samples["bare_text"].append(_time_per_page(lambda n, d: bare(d, args.dpi, text=True), documents))
        samples["project"].append(_time_per_page(lambda n, d: project(n, d, args.dpi), documents))
        for n in processes:
            pool[n].append(_pool_pages_per_s(documents, args.dpi, n))
    med = {k: statistics.median(v) for k, v in samples.items()}
    print()
    print(f"{'case':<28}{'ms/page':>10}{'pages/s':>10}{'x bare+text':>13}")
    for label, key in (
        ("bare render+png", "bare"),
        ("bare render+png+text", "bare_text"),
        ("project (in-process)", "project"),
    ):
        print(f"{label:<28}{med[key]:>10.1f}{1000 / med[key]:>10.1f}{med[key] / med['bare_text']:>13.2f}")
    for n, values in pool.items():
        rate = statistics.median(values)
        print(
            f"{f'pool, {n} process(es)':<28}{1000 / rate:>10.1f}{rate:>10.1f}{(1000 / rate) / med['bare_text']:>13.2f}"
        )
    print(f"\nload average after: {os.getloadavg()}")


def levels(args: argparse.Namespace) -> None:
    pixmaps = []
    for _name, data in _documents():
        with pymupdf.open(stream=data, filetype="pdf") as doc:
            pixmaps.extend(page.get_pixmap(dpi=args.dpi) for page in doc)
    print(f"PNG encoding of {len(pixmaps)} pages at {args.dpi} dpi, median of {args.repeat}; load {os.getloadavg()}")
    print(f"{'encoder':<22}{'ms/page':>10}{'KiB/page':>10}")
    cases = [("MuPDF tobytes (6)", lambda p: p.tobytes("png"))]
    cases += [(f"encode_png level {lv}", lambda p, lv=lv: encode_png(p, lv)) for lv in (1, 2, 3, 4, 6, 9)]
    for label, fn in cases:
        times = []
        size = 0
        for _ in range(args.repeat):
            started = time.perf_counter()
            size = sum(len(fn(p)) for p in pixmaps)
            times.append((time.perf_counter() - started) * 1000 / len(pixmaps))
        print(f"{label:<22}{statistics.median(times):>10.1f}{size / len(pixmaps) / 1024:>10.0f}")


def _build_book(path: Path, pages: int) -> None:
    """A ``pages``-page PDF made of the corpus files' pages, over and over."""
    book = pymupdf.open()
    sources = [pymupdf.open(CORPUS / name) for name in FILES]
    while book.page_count < pages:
        for src in sources:
            take = min(src.page_count, pages - book.page_count)
            if take > 0:
                book.insert_pdf(src, to_page=take - 1)
    book.save(path, garbage=1, deflate=True)


def _children_peak_rss(stop: threading.Event, peaks: dict[int, int]) -> None:
    """Sample the peak RSS (VmHWM, KiB) of this process's worker children until ``stop`` is set."""
    me = str(os.getpid())
    while not stop.wait(0.2):
        for proc in Path("/proc").iterdir():
            try:
                status = (proc / "status").read_text()
                if f"\nPPid:\t{me}\n" not in status or b"spawn_main" not in (proc / "cmdline").read_bytes():
                    continue
                hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
            except (OSError, StopIteration, ValueError):
                continue
            peaks[int(proc.name)] = max(peaks.get(int(proc.name), 0), hwm)


def rss(args: argparse.Namespace) -> None:
    from mkg_devstack.local_stack import moto_s3_server
    from mkg_pipeline.config import PDFConfig, StorageConfig, WorkersConfig
    from mkg_pipeline.stages.pages import render_documents
    from mkg_pipeline.storage import Storage

    with tempfile.TemporaryDirectory() as scratch:
        # Built in a child process, so this process's peak RSS is the stage's own, not the builder's.
        path = Path(scratch) / "book.pdf"
        builder = multiprocessing.get_context("spawn").Process(target=_build_book, args=(path, args.rss_pages))
        builder.start()
        builder.join()
        data = path.read_bytes()
    print(f"{args.rss_pages}-page document, {len(data) / 2**20:.1f} MiB, at {args.dpi} dpi; load {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as logs:
        server = moto_s3_server(Path(logs)).start()
        try:
            cfg = StorageConfig(
                endpoint_url=server.url, bucket="rss", access_key_id="x", secret_access_key="x", region="us-east-1"
            )
            storage = Storage.from_config(cfg)
            storage.ensure_bucket()
            storage.put_bytes(storage.raw_key("book"), data)
            del data
            stop, peaks = threading.Event(), {}
            sampler = threading.Thread(target=_children_peak_rss, args=(stop, peaks), daemon=True)
            sampler.start()
            started = time.perf_counter()
            summary = render_documents(
                storage, ["book"], PDFConfig(dpi=args.dpi), WorkersConfig(render_processes=1), progress=print
            )
            elapsed = time.perf_counter() - started
            stop.set()
            sampler.join()
            worker = max(peaks.values(), default=0) / 1024
            parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        finally:
            server.stop()
    print(f"rendered {summary.pages} pages in {elapsed:.0f} s ({summary.pages / elapsed:.1f} pages/s, S3 = moto)")
    print(
        f"peak RSS (VmHWM): render worker {worker:.0f} MiB, the stage's own process {parent:.0f} MiB "
        "(moto's not counted)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dpi", type=int, default=150)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--processes", help="comma-separated pool sizes (default: 1 and the CPUs available)")
    parser.add_argument("--levels", action="store_true", help="compare PNG compression levels")
    parser.add_argument("--rss-pages", type=int, help="measure peak RSS rendering a document of this many pages")
    args = parser.parse_args()
    if args.levels:
        levels(args)
    elif args.rss_pages:
        rss(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
