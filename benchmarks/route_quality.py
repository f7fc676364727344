"""Routing's quality, side by side (issue 19, "Quality"): the corpus through the real pipeline with
``routing.mode: vlm`` (every page to the VLM, the old path) and ``routing.mode: auto`` (routing on).

Each mode is one run of the demo (``python -m <demo> --files ...``) in a subprocess: moto S3, the local
VLM server, the real sensor and ``ingest_job`` in process (ingest -> pages -> vlm), the outputs exported
to ``<workdir>/<mode>/outputs/``. Then, per accepted corpus document and per mode:

  pages        pages of the document; text / vlm: pages on each route (status.json's ``page_routes``)
  content      mean over its pages of ``similarity(page text, page text layer)``, the page text being
               everything the content list holds for the page, each once: running headers, footers
               and page numbers included, captions once (engines.text_layer.content_list_text). The
               drop check is on this: it compares what each route read
  markdown     the same with the page's Markdown, as the quality assets measure it. The text route
               keeps page furniture out of the Markdown (by design, as MinerU does) and repeats each
               figure caption as the image's alt text, so against the raw text layer it can lose
               where the local server's VLM, which writes everything it sees, does not
               (pages with fewer than MIN_TEXT_LAYER_CHARS characters of text layer are left out, as there)
  expected     the same against the manifest's expected text, for entries that carry an
               ``expected_text`` file (relative to the corpus); the shared manifest has none today

with the deltas (auto - vlm) and ``DROP`` where routing on loses more than DROP_TOLERANCE in content
or expected text. For the
multi-column files the exported Markdown of each page (image links left out: their alt text repeats
the caption printed under them) is checked to read column by column with the
test suite's column order agreement (mkg_pipeline_tests/fixtures/reading_order.py): overall and per
column above MIN_ORDER on every page. The demo's own cost lines (pages that never reached the VLM,
chat requests per page) are printed for each mode.

    python benchmarks/route_quality.py [--files a.pdf,b.pdf] [--workdir .demo/route_quality] [--reuse]

``--reuse`` reads the outputs a previous run left in ``--workdir`` instead of running the demo again.
The local server's CPU OCR makes the ``vlm`` run slow: the whole corpus (201 pages) takes about half an
hour on two shared cores; ``--files`` narrows it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pymupdf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from corpus_files import CORPUS, FILES_HELP, chosen_files, corpus_manifest  # noqa: E402

from mkg_pipeline.engines.page_safety import PAGE_MARKER_RE  # noqa: E402
from mkg_pipeline.engines.text_layer import content_list_text  # noqa: E402
from mkg_pipeline.quality.diff import MIN_TEXT_LAYER_CHARS  # noqa: E402
from mkg_pipeline.quality.similarity import similarity  # noqa: E402
from mkg_pipeline_tests.fixtures.reading_order import column_order_agreement, text_layer_lines  # noqa: E402

MODES = ("vlm", "auto")
#: the corpus README's multi-column files, and arxiv-0908 whose two-column pages test_local_server reads
MULTI_COLUMN = ("multicolumn-3p.pdf", "arxiv-0807.3577-physics-15p.pdf", "arxiv-0908.0054-4p.pdf")
MIN_ORDER = 0.9  # as test_text_engine's corpus check; reading across two columns scores about 0.5
MIN_ORDER_LINES = 5  # a page with fewer text-layer lines (a figure page, references) says nothing about order
DROP_TOLERANCE = 0.001  # rounding: the table prints three decimals
#: an image link's alt text: the caption again, printed under the image too; the order check reads each line
#: once, or a caption found in the alt text of the figure after it counts as out of order
IMAGE_LINK_RE = re.compile(r"!\[(?:[^\[\]]|\[[^\]]*\])*\]\([^)]*\)")
DEMO = "mkg_devstack.demo"


@dataclass
class Measured:
    pages: int
    text: int
    vlm: int
    text_layer: float | None  # content
    markdown: float | None
    expected: float | None
    order: dict[int, tuple[float, float]]  # page -> (agreement, worst column), multi-column files only


def split_pages(markdown: str) -> dict[int, str]:
    """document.md cut at its page markers: page number (1-based) -> that page's Markdown."""
    marks = list(PAGE_MARKER_RE.finditer(markdown))
    return {
        int(m.group(1)): markdown[m.end() : marks[i + 1].start() if i + 1 < len(marks) else len(markdown)]
        for i, m in enumerate(marks)
    }


def run_demo(mode: str, files: list[str], workdir: Path) -> tuple[float, list[str]]:
    """One demo run with ``routing.mode`` = mode; returns (wall seconds, the demo's summary lines)."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MKG_ROUTING__MODE": mode, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", DEMO, "--workdir", str(workdir), "--files", *files]
    print(f"[{mode}] {' '.join(argv[1:])}", flush=True)
    started = time.monotonic()
    with (workdir / "demo.log").open("w") as log:
        code = subprocess.run(argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    wall = time.monotonic() - started
    if code != 0:
        print(f"[{mode}] the demo exited with {code}; see {workdir / 'demo.log'}", flush=True)
    return wall, summary_lines(workdir)


def summary_lines(workdir: Path) -> list[str]:
    log = workdir / "demo.log"
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return [line for line in lines if re.match(r"^\d+ page\(s\) in |^page routes: ", line)]


def measure(name: str, entry: dict, outputs: Path, mode: str) -> Measured | None:
    index = {row["source"]: row for row in json.loads((outputs / "index.json").read_text())}
    row = index.get(name)
    if row is None:
        return None
    markdown = split_pages((outputs / row["folder"] / f"{row['folder']}.md").read_text(encoding="utf-8"))
    items = json.loads((outputs / row["folder"] / f"{row['folder']}_content_list.json").read_text(encoding="utf-8"))
    content: dict[int, list[dict]] = {}
    for item in items:
        content.setdefault(int(item.get("page_idx", 0)) + 1, []).append(item)
    path = CORPUS / "pdfs" / name
    with pymupdf.open(path) as doc:
        layers = [page.get_text("text") for page in doc]
    # mode vlm sends every page to the VLM; an index written before page_routes was exported says nothing
    routes = row.get("page_routes") or ({str(n): "vlm" for n in range(1, len(layers) + 1)} if mode == "vlm" else {})
    measured = [n for n, layer in enumerate(layers, 1) if len(layer.strip()) >= MIN_TEXT_LAYER_CHARS]
    scores = [similarity(content_list_text(content.get(n, [])), layers[n - 1]) for n in measured]
    md_scores = [similarity(markdown.get(n, ""), layers[n - 1]) for n in measured]
    expected = None
    if entry.get("expected_text"):
        expected = similarity("".join(markdown.values()), (CORPUS / entry["expected_text"]).read_text())
    order: dict[int, tuple[float, float]] = {}
    if name in MULTI_COLUMN:
        for number in range(1, len(layers) + 1):
            lines = text_layer_lines(str(path), number - 1)
            if len(lines) < MIN_ORDER_LINES:
                continue
            agreement = column_order_agreement(IMAGE_LINK_RE.sub("", markdown.get(number, "")), lines)
            worst = min((agreement.column_share(c) for c in ("left", "right")), default=1.0)
            order[number] = (agreement.share, worst)
    return Measured(
        pages=len(layers),
        text=sum(1 for r in routes.values() if r == "text"),
        vlm=sum(1 for r in routes.values() if r == "vlm"),
        text_layer=statistics.fmean(scores) if scores else None,
        markdown=statistics.fmean(md_scores) if md_scores else None,
        expected=expected,
        order=order,
    )


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def delta(after: float | None, before: float | None) -> tuple[str, bool]:
    if after is None or before is None:
        return "-", False
    change = after - before
    return f"{change:+.3f}", change < -DROP_TOLERANCE


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", default="", help=FILES_HELP)
    parser.add_argument("--workdir", type=Path, default=REPO / ".demo" / "route_quality")
    parser.add_argument("--reuse", action="store_true", help="read the outputs of a previous run in --workdir")
    args = parser.parse_args()
    manifest = corpus_manifest()
    names = chosen_files(args.files)

    pymupdf.TOOLS.mupdf_display_errors(False)  # the corpus's damaged files are meant to be damaged
    print(f"load average before: {os.getloadavg()}", flush=True)
    walls: dict[str, float | None] = {}
    summaries: dict[str, list[str]] = {}
    for mode in MODES:
        workdir = args.workdir.resolve() / mode
        if args.reuse and (workdir / "outputs" / "index.json").exists():
            walls[mode], summaries[mode] = None, summary_lines(workdir)
        else:
            walls[mode], summaries[mode] = run_demo(mode, names, workdir)
    print(f"load average after the runs: {os.getloadavg()}")

    results = {
        mode: {n: measure(n, manifest[n], args.workdir.resolve() / mode / "outputs", mode) for n in names}
        for mode in MODES
    }
    trio = f"{'vlm':>6} {'auto':>6} {'delta':>7}"
    header = (
        f"{'':34} {'':5} {'':4} {'':4} | {'vs text layer: content':^21} | {'markdown':^21} | {'expected':^21} |"
        f"\n{'file':34} {'pages':>5} {'text':>4} {'vlm':>4} | {trio} | {trio} | {trio} |"
    )
    print("\n" + header)
    print("-" * 112)
    drops: list[str] = []
    for name in names:
        before, after = results["vlm"][name], results["auto"][name]
        if before is None or after is None:
            missing = [m for m, r in (("vlm", before), ("auto", after)) if r is None]
            print(f"{name:34} not exported in mode {', '.join(missing)} (see demo.log)")
            drops.append(f"{name}: missing in {', '.join(missing)}")
            continue
        text_delta, text_drop = delta(after.text_layer, before.text_layer)
        exp_delta, exp_drop = delta(after.expected, before.expected)
        md_delta, _ = delta(after.markdown, before.markdown)
        flag = " DROP" if text_drop or exp_drop else ""
        if flag:
            drops.append(f"{name}: content vs text layer {text_delta}, expected {exp_delta}")
        print(
            f"{name:34} {after.pages:5} {after.text:4} {after.vlm:4} | {fmt(before.text_layer):>6} "
            f"{fmt(after.text_layer):>6} {text_delta:>7} | {fmt(before.markdown):>6} {fmt(after.markdown):>6} "
            f"{md_delta:>7} | {fmt(before.expected):>6} {fmt(after.expected):>6} "
            f"{exp_delta:>7} |{flag}"
        )
    print("-" * 112)
    both = [n for n in names if all(results[m][n] and results[m][n].text_layer is not None for m in MODES)]
    for mode in MODES:
        mean = statistics.fmean(results[mode][n].text_layer for n in both) if both else float("nan")
        md_mean = statistics.fmean(results[mode][n].markdown for n in both) if both else float("nan")
        print(
            f"mean similarity to the text layer, mode {mode}: content {mean:.3f}, markdown {md_mean:.3f} "
            f"({len(both)} documents)"
        )

    print(f"\ncolumn by column (agreement overall / worst column, on every page with >= {MIN_ORDER_LINES} lines):")
    order_failures: list[str] = []
    for name in [n for n in MULTI_COLUMN if n in names]:
        for mode in MODES:
            measured = results[mode][name]
            if measured is None:
                continue
            bad = [n for n, (share, worst) in measured.order.items() if share < MIN_ORDER or worst < MIN_ORDER]
            overall = min((s for s, _ in measured.order.values()), default=1.0)
            worst_column = min((w for _, w in measured.order.values()), default=1.0)
            verdict = "ok" if not bad else f"OUT OF ORDER on page(s) {bad}"
            if bad and mode == "auto":
                order_failures.append(f"{name}: pages {bad}")
            print(
                f"  {name:34} {mode:4}: {len(measured.order)} pages, min agreement {overall:.3f}, "
                f"min column {worst_column:.3f}: {verdict}"
            )

    for mode in MODES:
        wall = f"{walls[mode]:.0f} s wall" if walls[mode] is not None else "reused"
        print(f"\ndemo, mode {mode} ({wall}):")
        for line in summaries[mode]:
            print(f"  {line}")
    print(f"\nload average at the end: {os.getloadavg()}")
    if drops or order_failures:
        print("\nFAILED: " + "; ".join(drops + order_failures))
        return 1
    print("\nno document drops with routing on; the multi-column files read column by column")
    return 0


if __name__ == "__main__":
    sys.exit(main())
