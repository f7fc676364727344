"""The text route's CPU per page, next to rendering's, over the shared corpus (issue 19, "Speed").

For every page of the corpus's readable files, in one process, the cases interleaved in each round so
drift hits them alike, CPU time (``time.process_time``) of:

  route        pdf.routing.route_page: the features and the decision (runs at render time, every page)
  text engine  engines.text_layer.extract_text_page: Markdown, content list, figure crops (text-route pages)
  tables       the text engine's table step alone (text-route pages): the ruled-table gate, and on pages
               that pass it, ``page.find_tables()`` and the HTML; part of "text engine", shown apart since
               find_tables is its expensive part
  render       what pdf.render does per page at --dpi: pixmap, PNG (level PNG_COMPRESSION), get_text, sha256

Each page's figure is the median of --repeat rounds; the table gives, per file, the median page and
the sum over pages, and the last lines the same over the whole corpus. The text route's cost is
route + text engine; a VLM page costs route + render (+ the GPU).

    python benchmarks/text_route.py [--dpi 150] [--repeat 3] [--files a.pdf,b.pdf]

CPU figures still depend on what else runs: the load average before and after is printed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pymupdf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from corpus_files import CORPUS, FILES_HELP, chosen_files  # noqa: E402

from mkg_pipeline.engines import text_layer  # noqa: E402
from mkg_pipeline.engines.text_layer import extract_text_page  # noqa: E402
from mkg_pipeline.pdf.render import effective_dpi, encode_png  # noqa: E402
from mkg_pipeline.pdf.routing import route_page  # noqa: E402

MAX_RENDER_PIXELS = 40_000_000


def render(page: pymupdf.Page, dpi: int) -> None:
    """pdf.render's per-page work (_render_one) with its public pieces."""
    rect = page.rect
    used = effective_dpi(rect.width, rect.height, dpi, MAX_RENDER_PIXELS)
    zoom = used / 72
    pix = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), colorspace=pymupdf.csRGB, alpha=False)
    png = encode_png(pix)
    page.get_text("text")
    hashlib.sha256(png).hexdigest()


def cpu_ms(action: Callable[[], object]) -> float:
    start = time.process_time()
    action()
    return (time.process_time() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dpi", type=int, default=150)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--files", default="", help=FILES_HELP)
    args = parser.parse_args()
    names = chosen_files(args.files)
    pymupdf.TOOLS.mupdf_display_errors(False)

    print(f"load average before: {os.getloadavg()}  repeat={args.repeat} dpi={args.dpi}")
    header = (
        f"{'file':34} {'pages':>5} {'text':>4} {'ruled':>5} | {'route ms':>9} {'text eng ms':>11} "
        f"{'render ms':>9} | {'sum text route':>14} {'sum tables':>10} {'sum render':>10}"
    )
    print(header)
    print("-" * len(header))
    all_route: list[float] = []
    all_text: list[float] = []
    all_render: list[float] = []
    all_tables: list[float] = []  # text-route pages whose rules passed the gate: find_tables ran
    total_text_route = total_render = total_tables = 0.0
    for name in names:
        with pymupdf.open(CORPUS / "pdfs" / name) as doc:
            pages = list(doc)
            routes = [route_page(page).route for page in pages]
            ruled = [text_layer._may_hold_a_ruled_table(page) for page in pages]
            kinds = ("route", "text", "tables", "render")
            samples: dict[str, list[list[float]]] = {k: [[] for _ in pages] for k in kinds}
            for _ in range(args.repeat):
                for index, page in enumerate(pages):
                    samples["route"][index].append(cpu_ms(lambda page=page: route_page(page)))
                    samples["text"][index].append(cpu_ms(lambda page=page, i=index: extract_text_page(page, i)))
                    samples["tables"][index].append(
                        cpu_ms(lambda page=page: text_layer._tables(page, pymupdf.Identity))
                    )
                    samples["render"][index].append(cpu_ms(lambda page=page: render(page, args.dpi)))
                pymupdf.TOOLS.store_shrink(100)  # no round reuses the previous one's decoded resources
        route = [statistics.median(s) for s in samples["route"]]
        text = [statistics.median(s) for s, r in zip(samples["text"], routes, strict=True) if r == "text"]
        rendered = [statistics.median(s) for s in samples["render"]]
        tables = [statistics.median(s) for s, r in zip(samples["tables"], routes, strict=True) if r == "text"]
        ruled_text = [
            statistics.median(s) for s, r, g in zip(samples["tables"], routes, ruled, strict=True) if r == "text" and g
        ]
        text_route = sum(route[i] for i, r in enumerate(routes) if r == "text") + sum(text)
        render_same = sum(rendered[i] for i, r in enumerate(routes) if r == "text")
        all_route += route
        all_text += text
        all_render += rendered
        all_tables += ruled_text
        total_tables += sum(tables)
        total_text_route += text_route
        total_render += render_same
        print(
            f"{name:34} {len(pages):5} {len(text):4} {len(ruled_text):5} | {statistics.median(route):9.1f} "
            f"{statistics.median(text) if text else float('nan'):11.1f} {statistics.median(rendered):9.1f} | "
            f"{text_route:14.0f} {sum(tables):10.0f} {render_same:10.0f}"
        )
    print("-" * len(header))
    print(
        f"median page: route {statistics.median(all_route):.1f} ms, text engine {statistics.median(all_text):.1f} ms "
        f"({len(all_text)} text-route pages), render {statistics.median(all_render):.1f} ms ({len(all_render)} pages)"
    )
    print(
        f"tables (part of the text engine): {len(all_tables)} text-route pages passed the ruled-table gate and ran "
        f"find_tables, median {statistics.median(all_tables) if all_tables else float('nan'):.1f} ms a page; "
        f"{total_tables:.0f} ms summed over the text-route pages, "
        f"{total_tables / total_text_route if total_text_route else 0:.0%} of the text route's CPU"
    )
    print(
        f"text-route pages, summed: route + text engine {total_text_route:.0f} ms CPU against "
        f"{total_render:.0f} ms to render the same pages at {args.dpi} dpi "
        f"({total_text_route / total_render:.2f}x)"
    )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
