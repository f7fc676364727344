"""Vision tokens per page for page_markdown (Qwen2.5-VL), before and after issue 19, over the shared corpus.

before  every page drawn at 150 dpi and sent (the pipeline before routing and engine-sized images)
after   the page's route under ``routing.mode: auto`` (a text page costs no vision token), and a VLM
        page drawn at page_markdown's size (page_images.page_markdown: longest side, pixel cap)

Tokens are :func:`mkg_pipeline.pdf.render.qwen25vl_vision_tokens` of the image size the renderer would
produce (no PNG is encoded: sizes come from MuPDF's own rounding of the page rectangle), so the figures
are exact for the images and cheap to get.

    python benchmarks/vision_tokens.py [--files a.pdf,b.pdf] [--engine page_markdown] [--pages]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pymupdf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from corpus_files import CORPUS, FILES_HELP, chosen_files  # noqa: E402

from mkg_pipeline.config import PageImagesConfig  # noqa: E402
from mkg_pipeline.pdf.render import effective_dpi, qwen25vl_vision_tokens, size_dpi  # noqa: E402
from mkg_pipeline.pdf.routing import route_page  # noqa: E402

MAX_RENDER_PIXELS = 40_000_000
BEFORE_DPI = 150


def image_size(rect: pymupdf.Rect, dpi: float) -> tuple[int, int]:
    box = (pymupdf.Rect(0, 0, rect.width, rect.height) * pymupdf.Matrix(dpi / 72, dpi / 72)).irect
    return box.width, box.height


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", default="", help=FILES_HELP)
    parser.add_argument("--engine", default="page_markdown", choices=["page_markdown", "olmocr", "mineru"])
    parser.add_argument("--pages", action="store_true", help="one line per page")
    args = parser.parse_args()
    names = chosen_files(args.files)
    size = PageImagesConfig().for_engine(args.engine)
    print(
        f"engine {args.engine}: longest side {size.longest_side_px} px, cap {size.max_pixels} px; "
        f"before: {BEFORE_DPI} dpi"
    )
    print(f"{'file':44} {'pages':>5} {'text':>4} {'before':>8} {'after vlm':>9} {'after':>8} {'saved':>6}")
    totals = {"pages": 0, "text": 0, "before": 0, "vlm_sized": 0, "after": 0}
    for name in names:
        row = {"pages": 0, "text": 0, "before": 0, "vlm_sized": 0, "after": 0}
        with pymupdf.open(CORPUS / "pdfs" / name) as doc:
            for page in doc:
                rect = page.rect
                if rect.width <= 0 or rect.height <= 0:
                    continue
                before = qwen25vl_vision_tokens(
                    *image_size(rect, effective_dpi(rect.width, rect.height, BEFORE_DPI, MAX_RENDER_PIXELS))
                )
                cap = min(size.max_pixels, MAX_RENDER_PIXELS)
                dpi = effective_dpi(
                    rect.width, rect.height, size_dpi(rect.width, rect.height, size.longest_side_px), cap
                )
                width, height = image_size(rect, dpi)
                sized = qwen25vl_vision_tokens(width, height)
                route = route_page(page).route
                after = 0 if route == "text" else sized
                row["pages"] += 1
                row["text"] += route == "text"
                row["before"] += before
                row["vlm_sized"] += sized
                row["after"] += after
                if args.pages:
                    print(
                        f"  {name} p{page.number + 1}: {route:4} before {before:5} "
                        f"({width}x{height} px) after {after:5}"
                    )
        for key in totals:
            totals[key] += row[key]
        saved = 1 - row["after"] / row["before"] if row["before"] else 0.0
        print(
            f"{name[:44]:44} {row['pages']:5} {row['text']:4} {row['before']:8} {row['vlm_sized']:9} "
            f"{row['after']:8} {saved:6.0%}"
        )
    pages = totals["pages"] or 1
    print(
        f"\n{totals['pages']} pages, {totals['text']} on the text route ({totals['text'] / pages:.0%}). Vision tokens "
        f"per page: before {totals['before'] / pages:.0f}; every page sent at the engine's size "
        f"{totals['vlm_sized'] / pages:.0f}; with routing {totals['after'] / pages:.0f} "
        f"({1 - totals['after'] / max(1, totals['before']):.0%} fewer)"
    )


if __name__ == "__main__":
    main()
