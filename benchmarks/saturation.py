"""How busy the project keeps a GPU server, side by side with MinerU's own client, in one run.

Against ``benchmarks/simulated_vllm.py``, for each server setting and each case, run back to back
and repeated ``--repeat`` times (median shown). Two kinds of server setting:

- ``SxL`` / ``SxL+K``: S slots of L seconds (or L + K*running): the client's CPU and its limiter
  at short, fixed latencies (issue 8's figures);
- a GPU preset (``h100``, ``h100-kv``, ``h100-fast``; see ``gpu_model.py``): continuous batching by
  token, a KV cache with preemption, calibrated to one H100 serving Qwen2.5-VL-7B (olmOCR's 4.5
  pages/s): whether the GPU stays busy with real page latencies (10 s alone, ~57 s in a full batch).
  Each case then runs batches of ``--batches`` pages (default 200 and 1,000).

Cases:

  (i)  GPU presets: the ideal client: every page's page_markdown request sent at once, no limit;
  (a)  MinerU's own client: ``mineru_vl_utils.MinerUClient(backend="http-client")`` with its
       defaults, ``aio_batch_two_step_extract`` on the corpus page images (decoded beforehand:
       its API takes PIL images);
  (a1) MinerU's own HTTP client (``HttpVlmClient``, defaults: 100 in flight) with the page_markdown
       prompt: the same requests as (i) and (b), so pages/s compare directly;
  (b)  the project's vlm stage with the default config (engine page_markdown, and mineru),
       pages in S3 (a moto server), ``force_refresh`` so pages may repeat;
  (b') the client path alone: the same engine and client on page images held in memory
       (S3 excluded), as MinerU's client runs;
  (c)  the whole path: corpus PDFs in ``incoming/``, a sensor tick, then raw_pdfs,
       parsed_pages and vlm_outputs materialized in-process in a temp DAGSTER_HOME;
  (s)  growing-latency settings only: the client path with a FIXED concurrency c
       (``vllm.adaptive=false``, ``vllm.max_in_flight=c``) for each c of ``--sweep``, to
       find the best fixed concurrency; the default (adaptive) run is reported against it.

Fixed settings, each row: requests/s (the server's own count), saturation = requests/s / capacity
(capacity S/L, or S/(L+K*S) for a growing latency: every slot busy), pages/s, the client's CPU
per request (getrusage of this process, children included), moto's and the server's CPU per
request (from /proc/<pid>/stat), and the server's peak running / waiting requests.
Requests per case are ``--waves`` x S (pages repeat), so the last partial wave costs < 1/waves.

GPU presets, each row: pages/s; vs ideal = pages/s / the ideal client's in the same batch (for the
cases that send the same page_markdown requests); GPU busy = the wall an ideal client would need
for this case's own requests (the server's log of their token counts, replayed all at t = 0
through ``gpu_model``) / the wall (fair for any request mix, MinerU's two-step included); seconds
from the first request to running >= 0.9 x max_num_seqs; preemptions. Each case's timeline (the
server's running, waiting, KV use and answers/s, and the limiter's limit and in-flight, every
0.5 s) is written as a PNG and a CSV under ``--timelines`` (a path prefix).

    python benchmarks/saturation.py                     # fixed settings, everything: about an hour on 2 cores
    python benchmarks/saturation.py --repeat 1 --settings 32x0.5 --cases a,b,b2 --waves 5   # a quick look
    python benchmarks/saturation.py --preset h100 --repeat 1            # ideal, MinerU, stage: 200 and 1,000 pages
    python benchmarks/saturation.py --preset h100-fast --batches 200 --cases ideal,a1,b   # the same, 10x faster

Corpus pages (the 'ok' files of /work/shared/corpus, 201 pages) are rendered once at
``--dpi`` and cached under ``benchmarks/.bench/``. The numbers are only meaningful on a quiet
machine: the header shows the load average and the busiest other processes, before and after.
Exit status 1 on errors (failed pages, server errors, failed runs), never on slowness.

``SAT_TRACE=1`` adds a line per run of (b) and (b'): the limiter's mean limit, in flight and waiting, and how
often the stage left it short (a free slot and no page ready for it), sampled every 5 ms. With S3 in the
path on a loaded machine the stage is short because the process runs out of CPU (S3 calls cost ~7 ms of
client CPU a page), not because it waits on the wrong thing.

Cases (b), (b') and (c) reach the project only through the ADAPTERS section below, so that they
can be re-pointed when the stage and client APIs change.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib
import inspect
import io
import itertools
import json
import logging
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_model  # noqa: E402  (a sibling script: the GPU presets, and the ideal client's replay)

DEFAULT_CORPUS = REPO_ROOT.parent / "shared" / "corpus"
if not DEFAULT_CORPUS.exists():  # a git worktree under /work/wt/<name>
    DEFAULT_CORPUS = Path("/work/shared/corpus")
DEFAULT_CACHE = Path(__file__).resolve().parent / ".bench"
SIMULATOR = Path(__file__).resolve().parent / "simulated_vllm.py"
MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"  # the project's default vllm.model; the simulator serves it
PAGES_BUCKET = "bench-pages"
E2E_BUCKET = "bench-e2e"
CLK_TCK = os.sysconf("SC_CLK_TCK")
ENGINES = ("page_markdown", "mineru")

log = logging.getLogger("saturation")


# =========================================================================== settings and results


def scrape_metric_totals(url: str) -> dict[str, float] | None:
    """The server's ``/metrics``, each metric summed over its labels; None if it did not answer."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            totals[name] = totals.get(name, 0.0) + float(value)
    return totals


@dataclass(frozen=True)
class Setting:
    slots: int
    latency: float
    per_running: float = 0.0
    preset: str | None = None  # a GPU-faithful preset of gpu_model.PRESETS instead of S slots x L s

    @classmethod
    def parse(cls, text: str) -> Setting:
        """``SxL`` or ``SxL+K``, e.g. ``32x0.5`` or ``64x0.1+0.005``, or a GPU preset name (``h100``)."""
        if text in gpu_model.PRESETS:
            preset = gpu_model.PRESETS[text]
            return cls(preset.max_num_seqs, preset.single_request_s(), 0.0, preset=text)
        slots, _, rest = text.partition("x")
        latency, _, per_running = rest.partition("+")
        return cls(int(slots), float(latency), float(per_running or 0.0))

    @property
    def gpu(self) -> gpu_model.GpuPreset | None:
        return gpu_model.PRESETS[self.preset] if self.preset else None

    @property
    def growing(self) -> bool:
        return self.per_running > 0

    @property
    def capacity(self) -> float:
        """Requests/s with every slot busy: S / (L + K*S); a preset's full-batch pages/s for its reference page."""
        if self.gpu is not None:
            return self.gpu.full_batch_requests_per_s()
        return self.slots / (self.latency + self.per_running * self.slots)

    @property
    def name(self) -> str:
        if self.preset:
            return self.preset
        if self.growing:
            return f"{self.slots} x ({self.latency:g}+{self.per_running:g}n) s"
        return f"{self.slots} x {self.latency:g} s"


@dataclass
class PartCost:
    wall_s: float = 0.0
    cpu_s: float = 0.0
    moto_cpu_s: float = 0.0
    calls: int = 0


@dataclass
class Outcome:
    """What a case's run returns: pages finished and failed, errors, optional per-part costs, a check to run after."""

    pages_done: int = 0
    pages_failed: int = 0
    errors: list[str] = field(default_factory=list)
    parts: dict[str, PartCost] = field(default_factory=dict)
    verify: Callable[[], Outcome] | None = None


@dataclass
class Sample:
    wall_s: float
    requests: int
    server_errors: int
    pages: int
    failed: int
    client_cpu_s: float
    moto_cpu_s: float
    server_cpu_s: float
    peak_running: int
    peak_waiting: int
    errors: list[str]
    parts: dict[str, PartCost]
    # GPU presets only
    preemptions: int = 0
    ideal_wall_s: float = math.nan  # the same requests all sent at t = 0, replayed through gpu_model
    fill_s: float = math.nan  # first request -> running >= 0.9 of max_num_seqs (from the timeline)
    timeline: Path | None = None

    @property
    def gpu_busy(self) -> float:
        """What the server achieved for this case's own requests, against every one sent at once."""
        return self.ideal_wall_s / self.wall_s if self.wall_s else math.nan

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s if self.wall_s else 0.0

    @property
    def pps(self) -> float:
        return self.pages / self.wall_s if self.wall_s else 0.0

    def per_request_ms(self, seconds: float) -> float:
        return 1000 * seconds / self.requests if self.requests else math.nan


@dataclass
class Row:
    setting: Setting
    case: str
    engine: str
    samples: list[Sample] = field(default_factory=list)
    note: str = ""
    batch: int | None = None  # pages per case on a GPU preset

    def median(self, fn: Callable[[Sample], float]) -> float:
        values = [fn(s) for s in self.samples if not math.isnan(fn(s))]
        return statistics.median(values) if values else math.nan

    @property
    def failed(self) -> bool:
        return any(s.errors or s.failed or s.server_errors for s in self.samples)


# =========================================================================== machine accounting


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def _stat_fields(pid: int) -> list[str]:
    data = Path(f"/proc/{pid}/stat").read_text()
    return data[data.rindex(")") + 2 :].split()  # fields from 3 (state) on: the name may hold spaces


def proc_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system, all threads) of a live child process (moto, the simulator: one process each)."""
    if pid is None:
        return 0.0
    try:
        fields = _stat_fields(pid)
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14, 15: utime, stime


def own_cpu_s() -> float:
    """This process (all threads) plus its waited-for children (a render pool), user + system."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def busiest_processes(interval_s: float = 1.0, top: int = 6) -> list[str]:
    """The processes that used the most CPU over ``interval_s`` (other engineers share the machine)."""

    def snapshot() -> dict[int, int]:
        ticks = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    fields = _stat_fields(int(entry.name))
                    ticks[int(entry.name)] = int(fields[11]) + int(fields[12])
                except (OSError, ValueError):
                    continue
        return ticks

    before = snapshot()
    time.sleep(interval_s)
    after = snapshot()
    used = sorted(((after[p] - before.get(p, 0), p) for p in after), reverse=True)
    lines = []
    for ticks, pid in used[:top]:
        if ticks <= 0:
            break
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmd = "?"
        mine = " (this benchmark)" if pid == os.getpid() else ""
        lines.append(f"{100 * ticks / CLK_TCK / interval_s:5.0f}%  pid {pid}{mine}  {cmd[:110]}")
    return lines


def machine_report(title: str) -> None:
    print(f"{title}: loadavg {loadavg()} ({os.cpu_count()} CPUs); busiest processes over 1 s:")
    for line in busiest_processes() or ["(none measurable)"]:
        print(f"    {line}")


# =========================================================================== corpus pages


@dataclass(frozen=True)
class CorpusPage:
    index: int  # position in the corpus page order
    source: str
    page: int  # 1-based
    png: bytes
    sha256: str
    width: int
    height: int
    text_chars: int

    @property
    def key(self) -> str:
        return f"pages/corpus-{self.source.removesuffix('.pdf')}/{self.page}.png"


def ok_files(corpus: Path) -> list[dict[str, Any]]:
    manifest = json.loads((corpus / "manifest.json").read_text())
    return sorted((f for f in manifest if f.get("expect") == "ok"), key=lambda f: f["file"])


def load_corpus_pages(corpus: Path, dpi: int, cache_dir: Path) -> list[CorpusPage]:
    """Every page of the corpus's 'ok' files at ``dpi``, rendered once and cached as PNGs."""
    cache = cache_dir / f"pages-{dpi}dpi"
    cache.mkdir(parents=True, exist_ok=True)
    index_path = cache / "index.json"
    index: dict[str, Any] = json.loads(index_path.read_text()) if index_path.exists() else {}
    pages: list[CorpusPage] = []
    rendered = 0
    for entry in ok_files(corpus):
        name = entry["file"]
        cached = index.get(name)
        folder = cache / name.removesuffix(".pdf")
        if not (cached and cached["sha256"] == entry["sha256"] and all((folder / f"{p['page']}.png").exists()
                                                                        for p in cached["pages"])):  # fmt: skip
            cached = {"sha256": entry["sha256"], "pages": _render_pdf(corpus / "pdfs" / name, dpi, folder)}
            index[name] = cached
            rendered += len(cached["pages"])
        for p in cached["pages"]:
            png = (folder / f"{p['page']}.png").read_bytes()
            pages.append(
                CorpusPage(len(pages), name, p["page"], png, p["sha256"], p["width"], p["height"], p["text_chars"])
            )
    if rendered:
        index_path.write_text(json.dumps(index, indent=1))
        print(f"rendered {rendered} corpus page(s) at {dpi} DPI into {cache}")
    return pages


def _render_pdf(path: Path, dpi: int, folder: Path) -> list[dict[str, Any]]:
    import pymupdf

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    with pymupdf.open(path) as document:
        for number, page in enumerate(document, start=1):
            pix = page.get_pixmap(dpi=dpi)
            png = pix.tobytes("png")
            (folder / f"{number}.png").write_bytes(png)
            text = page.get_text()
            out.append(
                {
                    "page": number,
                    "sha256": hashlib.sha256(png).hexdigest(),
                    "width": pix.width,
                    "height": pix.height,
                    "text_chars": len(text.strip()),
                }
            )
    return out


def cycle_pages(pages: list[CorpusPage], n: int) -> list[CorpusPage]:
    """The first ``n`` pages of the corpus order, repeated as often as needed."""
    return [pages[i % len(pages)] for i in range(n)]


# =========================================================================== servers


class Simulator:
    """The simulated GPU server, restarted on the same port for each setting (the URL never changes)."""

    def __init__(self, log_dir: Path, port: int) -> None:
        self.log_dir = log_dir
        self.port = port
        self.process: Any = None
        self.setting: Setting | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.process.pid if self.process and self.process.process else None

    def start(self, setting: Setting, layout_blocks: int) -> None:
        from mkg_devstack.local_stack import ManagedProcess

        self.stop()
        if setting.preset:
            shape = ["--preset", setting.preset]
        else:
            shape = ["--slots", str(setting.slots), "--latency", str(setting.latency)]
            shape += ["--latency-per-running", str(setting.per_running)]
        argv = [
            sys.executable,
            str(SIMULATOR),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *shape,
            "--layout-blocks",
            str(layout_blocks),
            "--model",
            MODEL,
        ]
        self.process = ManagedProcess(
            name="simulated-vllm",
            argv=argv,
            host="127.0.0.1",
            port=self.port,
            health_path="/health",
            log_path=self.log_dir / f"simulated-vllm-{self.port}.log",
            startup_timeout_s=30.0,
        ).start()
        self.setting = setting

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def scrape(self) -> dict[str, float]:
        """Sums of the series the benchmark reads, by metric name (labels summed over)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            text = response.read().decode()
        totals: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            totals[name] = totals.get(name, 0.0) + float(value)
        return totals

    def reset_peaks(self) -> None:
        """Peaks from now on; on a GPU preset also a new request log."""
        request = urllib.request.Request(self.url + "/simulated/reset-peaks", method="POST", data=b"")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def requests_log(self) -> list[tuple[int, int]]:
        """GPU presets: (prompt, output) tokens of every request since the last reset, in arrival order."""
        with urllib.request.urlopen(self.url + "/simulated/requests", timeout=30) as response:
            return [(int(p), int(o)) for p, o in json.loads(response.read())["requests"]]


# =========================================================================== ADAPTERS
# Everything below that names a project API. The stage (process_documents), the client
# (limiter) and the engines' extract() are being rewritten: re-point these few functions.


def bench_config(url: str, engine: str, **env_overrides: str) -> Any:
    """The project's DEFAULT config (config/mineru.yaml + env) pointed at the simulator, plus ``env_overrides``.

    Built explicitly with ``load_config(environ=...)`` so that a process-wide cached settings object
    cannot hide an override between cases.
    """
    from mkg_pipeline.config import load_config

    environ = {**os.environ, "MKG_VLLM__URL": url, "MKG_VLLM__MODEL": MODEL, "MKG_ENGINE": engine, **env_overrides}
    return load_config(environ=environ)


def fixed_concurrency_overrides(concurrency: int) -> dict[str, str]:
    """Env overrides for a fixed limit of ``concurrency`` requests (the limiter pinned at its ceiling)."""
    return {
        "MKG_VLLM__ADAPTIVE": "false",
        "MKG_VLLM__MIN_IN_FLIGHT": "1",
        "MKG_VLLM__MAX_IN_FLIGHT": str(concurrency),
    }


def reset_process_state() -> None:
    """Each case starts like a fresh run process: new breakers and limiters."""
    from mkg_pipeline.vllm.breaker import reset_breakers
    from mkg_pipeline.vllm.limiter import reset_limiters

    reset_breakers()
    reset_limiters()


def limiter_state(url: str) -> tuple[float, float] | None:
    """(limit, in flight) of this process's limiter for ``url`` if one exists, for the timeline; never creates one.

    Read from the registry behind ``limiter_for``; tolerant of the limiter's rewrite (None when not found).
    """
    try:
        module = importlib.import_module("mkg_pipeline.vllm.limiter")
    except ImportError:
        return None
    registry = getattr(module, "_LIMITERS", None)
    limiter = registry.get(url.rstrip("/")) if isinstance(registry, dict) else None
    if limiter is None:
        return None
    limit, in_flight = getattr(limiter, "limit", None), getattr(limiter, "in_flight", None)
    if not isinstance(limit, int | float):
        return None
    return float(limit), float(in_flight) if isinstance(in_flight, int | float) else math.nan


def page_request_body(png: bytes, max_tokens: int) -> bytes:
    """The page_markdown engine's request for one page (system prompt, image, prompt), as the ideal client sends it."""
    import base64

    from mkg_pipeline.engines.prompts import PAGE_MARKDOWN_PROMPT, PAGE_MARKDOWN_SYSTEM_PROMPT

    url = "data:image/png;base64," + base64.b64encode(png).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": PAGE_MARKDOWN_PROMPT}]
    body = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": PAGE_MARKDOWN_SYSTEM_PROMPT},
            {"role": "user", "content": content},
        ],
        "temperature": 0.0,
        "max_tokens": max_tokens,
    }
    return json.dumps(body).encode()


def make_storage(endpoint_url: str, bucket: str) -> Any:
    from mkg_pipeline.config import StorageConfig
    from mkg_pipeline.storage import Storage

    cfg = StorageConfig(endpoint_url=endpoint_url, bucket=bucket, access_key_id="testing", secret_access_key="testing")
    return Storage.from_config(cfg)


@contextlib.asynccontextmanager
async def open_engine(cfg: Any) -> Any:
    """Client + engine as VLLMResource.open_engine builds them, from an explicit config."""
    from mkg_pipeline.engines import build_engine
    from mkg_pipeline.vllm.client import VLLMClient

    async with VLLMClient.from_config(cfg) as client:
        yield client, build_engine(cfg.engine, client, cfg)


def write_page_manifests(storage: Any, pages: list[CorpusPage], tag: str) -> list[str]:
    """Documents for the stage over ``pages``: runs of consecutive pages of one source become one document
    whose manifest points at the page PNGs (already in ``storage``). Returns the doc ids."""
    docs: list[list[CorpusPage]] = []
    for page in pages:
        if docs and docs[-1][-1].source == page.source and docs[-1][-1].page + 1 == page.page:
            docs[-1].append(page)
        else:
            docs.append([page])
    doc_ids = []
    for number, doc_pages in enumerate(docs):
        doc_id = f"{tag}-{number:04d}"
        manifest = {
            "version": 1,
            "doc_id": doc_id,
            "source": doc_pages[0].source,
            "dpi": 150,
            "page_count": len(doc_pages),
            "pages": [
                {
                    "page": p.page,
                    "png_key": p.key,
                    "png_bytes": len(p.png),
                    "png_sha256": p.sha256,
                    "width_px": p.width,
                    "height_px": p.height,
                    "dpi": 150,
                    "width_pt": p.width * 72 / 150,
                    "height_pt": p.height * 72 / 150,
                    "rotation": 0,
                    "text_layer": "",
                    "text_layer_chars": p.text_chars,
                }
                for p in doc_pages
            ],
            "failed_pages": [],
            "rendered_at": "2026-01-01T00:00:00+00:00",
        }
        storage.put_json(storage.page_manifest_key(doc_id), manifest)
        doc_ids.append(doc_id)
    return doc_ids


async def _trace_gate(gate: Any) -> None:
    """With ``SAT_TRACE=1``: sample the limiter every 5 ms while the stage runs, and print how often the stage
    left it short (in flight + waiting < limit: a free slot with no page ready for it). Over the first 90 % of
    the busy time, so the last wave's tail is not counted."""
    samples: list[tuple[float, int, int, int]] = []
    t0 = time.perf_counter()
    try:
        while True:
            samples.append((time.perf_counter() - t0, gate.limit, gate.in_flight, gate.waiting))
            await asyncio.sleep(0.005)
    except asyncio.CancelledError:
        busy = [s for s in samples if s[2] > 0]
        if not busy:
            raise
        window = [s for s in busy if s[0] <= busy[-1][0] * 0.9]
        short = sum(1 for s in window if s[2] < s[1]) / len(window)
        starved = sum(1 for s in window if s[2] + s[3] < s[1]) / len(window)
        limit, in_flight, waiting = (statistics.mean(s[i] for s in window) for i in (1, 2, 3))
        print(
            f"    trace: {len(window)} samples; mean limit {limit:.1f}, in flight {in_flight:.1f}, waiting "
            f"{waiting:.1f}; slots short {short:.2f}, stage starved (in flight + waiting < limit) {starved:.2f}",
            flush=True,
        )
        raise


def run_vlm_stage(storage: Any, cfg: Any, doc_ids: list[str]) -> Outcome:
    """(b) the vlm stage as the vlm_outputs asset calls it, with force_refresh (pages repeat)."""
    from mkg_pipeline.stages.vlm import process_documents

    async def go() -> Outcome:
        async with open_engine(cfg) as (client, engine):
            trace = asyncio.create_task(_trace_gate(client.limiter)) if os.environ.get("SAT_TRACE") else None
            summary = await process_documents(
                storage,
                engine,
                doc_ids,
                client.limiter,
                server_url=client.server_url,
                model=client.model,
                force_refresh=True,
                progress=lambda _message: None,
            )
            if trace is not None:
                trace.cancel()
        return Outcome(
            pages_done=summary.processed,
            pages_failed=summary.failed + len(summary.unrendered),
            errors=[f"{r['doc_id']} p{r['page']}: {r['reason']}: {r['message']}" for r in summary.failure_rows[:3]],
        )

    return asyncio.run(go())


def run_client_path(cfg: Any, pages: list[CorpusPage]) -> Outcome:
    """(b') the same stage, engine and limiter on page images held in memory: S3 excluded, as MinerU's
    client runs (its pages are in memory too)."""
    from mkg_pipeline.storage import MemoryStorage

    storage = MemoryStorage()
    for page in {p.key: p for p in pages}.values():
        storage.put_bytes(page.key, page.png, "image/png")
    doc_ids = write_page_manifests(storage, pages, "mem")
    return run_vlm_stage(storage, cfg, doc_ids)


#: (part, module, function) wrapped during case (c) to split its CPU and wall time by step
E2E_PARTS = (
    ("ingest", "mkg_pipeline.stages.ingest", "ingest_batch"),
    ("render", "mkg_pipeline.stages.pages", "render_batch"),
    ("vlm", "mkg_pipeline.stages.vlm", "process_documents"),
)


@contextlib.contextmanager
def instrument_parts(parts: dict[str, PartCost], moto_pid: int | None) -> Iterator[None]:
    """Wrap the stage functions the assets call (looked up at call time) to add up CPU and wall per part."""
    restore = []
    for part, module_name, function in E2E_PARTS:
        module = importlib.import_module(module_name)
        original = getattr(module, function, None)
        if original is None:
            continue
        cost = parts.setdefault(part, PartCost())

        def wrap(original: Any = original, cost: PartCost = cost) -> Any:
            def start() -> tuple[float, float, float]:
                return time.perf_counter(), own_cpu_s(), proc_cpu_s(moto_pid)

            def stop(t0: float, c0: float, m0: float) -> None:
                cost.wall_s += time.perf_counter() - t0
                cost.cpu_s += own_cpu_s() - c0
                cost.moto_cpu_s += proc_cpu_s(moto_pid) - m0
                cost.calls += 1

            if inspect.iscoroutinefunction(original):

                async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                    marks = start()
                    try:
                        return await original(*args, **kwargs)
                    finally:
                        stop(*marks)

                return async_wrapper

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                marks = start()
                try:
                    return original(*args, **kwargs)
                finally:
                    stop(*marks)

            return wrapper

        setattr(module, function, wrap())
        restore.append((module, function, original))
    try:
        yield
    finally:
        for module, function, original in restore:
            setattr(module, function, original)


def run_end_to_end(env: Env, engine: str, moto_pid: int | None) -> Outcome:
    """(c) sensor tick + materialize raw_pdfs, parsed_pages, vlm_outputs per batch, in-process (as demo.py does)."""
    import dagster as dg

    from mkg_pipeline.orchestration.assets import pipeline_assets
    from mkg_pipeline.orchestration.batch_cli import run_sensor_tick
    from mkg_pipeline.orchestration.resources import S3StorageResource, VLLMResource

    outcome = Outcome()
    with instrument_parts(outcome.parts, moto_pid):
        result = run_sensor_tick(env.instance)
        batch_ids = [r.partition_key for r in result.run_requests or []]
        if not batch_ids:
            outcome.errors.append(f"the sensor requested no batch: {result.skip_reason}")
        for request in result.run_requests or []:
            run = dg.materialize(
                pipeline_assets,
                selection=["raw_pdfs", "parsed_pages", "vlm_outputs"],
                partition_key=request.partition_key,
                instance=env.instance,
                resources={"s3": S3StorageResource(), "vllm": VLLMResource(engine=engine)},
                tags=dict(request.tags),
                run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
                raise_on_error=False,
            )
            if not run.success:
                outcome.errors.append(f"run for batch {request.partition_key} failed")

    def verify() -> Outcome:
        checked = Outcome(errors=list(outcome.errors), parts=outcome.parts)
        storage = env.e2e_storage
        for batch_id in batch_ids:
            for key, res in storage.get_json(storage.batch_key(batch_id)).get("results", {}).items():
                if res.get("status") != "accepted":
                    checked.errors.append(f"{key}: {res.get('status')} {res.get('reason') or res.get('message')}")
                    continue
                try:
                    status = storage.get_json(storage.vlm_status_key(res["doc_id"]))
                except FileNotFoundError:
                    checked.errors.append(f"{key}: no vlm status")
                    continue
                checked.pages_done += int(status.get("pages_done", 0))
                checked.pages_failed += len(status.get("failed_pages", []))
        return checked

    outcome.verify = verify
    return outcome


# =========================================================================== the run


@dataclass
class Env:
    args: argparse.Namespace
    workdir: Path
    pages: list[CorpusPage]
    moto: Any
    sim: Simulator
    pages_storage: Any
    e2e_storage: Any
    instance: Any
    images: dict[int, Any] = field(default_factory=dict)
    decode_ms_per_page: float = math.nan
    manifests: dict[tuple[str, int], list[str]] = field(default_factory=dict)
    pdfs: dict[int, list[tuple[str, bytes]]] = field(default_factory=dict)
    batch: int = 0  # pages per case on a GPU preset (the batch being run)
    label: str = ""  # the case being measured, for its timeline's file name and title

    @property
    def moto_pid(self) -> int | None:
        return self.moto.process.pid if self.moto.process else None


def requests_per_page(engine: str, layout_blocks: int) -> int:
    return 1 if engine == "page_markdown" else 1 + layout_blocks


def pages_needed(env: Env, setting: Setting, engine: str) -> int:
    if setting.preset:
        return env.batch  # a GPU preset runs batches of pages, whatever the requests per page
    return math.ceil(env.args.waves * setting.slots / requests_per_page(engine, env.args.layout_blocks))


# =========================================================================== timelines (GPU presets)


@dataclass
class Timeline:
    """The server's gauges (and the limiter's limit, when this process has one) every ``interval_s``."""

    url: str
    interval_s: float = 0.5
    rows: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="timeline", daemon=True)
        self._started = time.perf_counter()

    def start(self) -> Timeline:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)
        self.sample()

    def sample(self) -> None:
        t = time.perf_counter() - self._started
        totals = scrape_metric_totals(self.url)
        if totals is None:
            return
        state = limiter_state(self.url)
        self.rows.append(
            {
                "t": t,
                "running": totals.get("vllm:num_requests_running", 0.0),
                "waiting": totals.get("vllm:num_requests_waiting", 0.0),
                "kv": totals.get("vllm:kv_cache_usage_perc", 0.0),
                "preemptions": totals.get("vllm:num_preemptions_total", 0.0),
                "finished": totals.get("vllm:request_success_total", 0.0),
                "limit": state[0] if state else math.nan,
                "in_flight": state[1] if state else math.nan,
            }
        )

    def fill_s(self, max_num_seqs: int, share: float = 0.9) -> float:
        """Seconds from the first reading with a request at the server to running >= share x max_num_seqs."""
        first = next((r["t"] for r in self.rows if r["running"] + r["waiting"] > 0), None)
        full = next((r["t"] for r in self.rows if r["running"] >= share * max_num_seqs), None)
        return full - first if first is not None and full is not None else math.nan

    def write(self, path: Path, title: str, max_num_seqs: int) -> Path:
        """A CSV of the readings and a PNG: counts (running, waiting, limit, in flight) over KV use and pages/s."""
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = list(self.rows[0]) if self.rows else ["t"]
        lines = [",".join(keys)] + [",".join(f"{r[k]:.4g}" for k in keys) for r in self.rows]
        path.with_suffix(".csv").write_text("\n".join(lines) + "\n")
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("    (no matplotlib: pip install -e '.[bench]' for the timeline PNG; CSV written)")
            return path.with_suffix(".csv")
        t = [r["t"] for r in self.rows]
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True, height_ratios=[3, 2])
        top.axhline(max_num_seqs, color="grey", linestyle=":", linewidth=1, label=f"max_num_seqs {max_num_seqs}")
        top.plot(t, [r["running"] for r in self.rows], color="tab:green", linewidth=1.8, label="running")
        top.plot(t, [r["waiting"] for r in self.rows], color="tab:red", linewidth=1.2, label="waiting")
        if any(not math.isnan(r["limit"]) for r in self.rows):
            top.plot(t, [r["limit"] for r in self.rows], color="tab:blue", linewidth=1.2, label="limiter: limit")
            top.plot(t, [r["in_flight"] for r in self.rows], color="tab:cyan", linewidth=0.8, label="in flight")
        top.set_ylabel("requests")
        peak = max([max_num_seqs] + [max(r["running"], r["waiting"]) for r in self.rows])
        top.set_ylim(0, peak * 1.25)  # room above the lines for the legend
        top.legend(loc="upper right", fontsize=8, ncol=3)
        top.grid(alpha=0.3)
        top.set_title(title, fontsize=10)
        bottom.plot(t, [r["kv"] for r in self.rows], color="tab:purple", linewidth=1.2, label="KV cache use")
        bottom.set_ylim(0, 1.3)
        bottom.set_ylabel("KV cache use (0-1)")
        bottom.set_xlabel("seconds since the case started")
        bottom.grid(alpha=0.3)
        rate = bottom.twinx()
        window = max(1, round(5.0 / (t[1] - t[0]))) if len(t) > 1 else 1  # pages/s over ~5 s
        rates = [
            (self.rows[i]["finished"] - self.rows[i - window]["finished"]) / (t[i] - t[i - window])
            for i in range(window, len(t))
        ]
        rate.plot(t[window:], rates, color="tab:orange", linewidth=1, label="answers/s (5 s)")
        preempt = [r["preemptions"] - self.rows[0]["preemptions"] for r in self.rows]
        if preempt and preempt[-1] > 0:
            rate.plot(t, preempt, color="black", linewidth=0.8, linestyle="--", label="preemptions")
        rate.set_ylabel("answers/s, preemptions")
        top_rate = max([1.0, *rates, *preempt])
        rate.set_ylim(0, top_rate * 1.3)
        handles = bottom.get_legend_handles_labels()[0] + rate.get_legend_handles_labels()[0]
        bottom.legend(handles=handles, loc="upper right", fontsize=8, ncol=3)
        fig.tight_layout()
        png = path.with_suffix(".png")
        fig.savefig(png, dpi=100)
        plt.close(fig)
        return png


def measure(env: Env, run: Callable[[], Outcome]) -> Sample:
    reset_process_state()
    env.sim.reset_peaks()
    before = env.sim.scrape()
    gpu = env.sim.setting.gpu if env.sim.setting else None
    timeline = Timeline(env.sim.url).start() if gpu else None
    cpu0, moto0, sim0 = own_cpu_s(), proc_cpu_s(env.moto_pid), proc_cpu_s(env.sim.pid)
    started = time.perf_counter()
    errors: list[str] = []
    try:
        outcome = run()
    except Exception as exc:
        outcome = Outcome(errors=[f"{type(exc).__name__}: {exc}"])
        traceback.print_exc()
    wall = time.perf_counter() - started
    cpu1, moto1, sim1 = own_cpu_s(), proc_cpu_s(env.moto_pid), proc_cpu_s(env.sim.pid)
    after = env.sim.scrape()
    extra: dict[str, Any] = {}
    if gpu is not None and timeline is not None:
        timeline.stop()
        requests = env.sim.requests_log()
        ideal = gpu_model.ideal_makespan(gpu, requests)
        name = f"{env.args.timelines}-{gpu.name}-{env.batch}p-{env.label}"
        title = (
            f"{env.label} on {gpu.name}, {env.batch} pages: wall {wall:.1f} s, {len(requests)} requests; "
            f"all at once would take {ideal:.1f} s (GPU busy {ideal / wall:.2f})"
        )
        extra = {
            "preemptions": int(
                after.get("vllm:num_preemptions_total", 0) - before.get("vllm:num_preemptions_total", 0)
            ),
            "ideal_wall_s": ideal,
            "fill_s": timeline.fill_s(gpu.max_num_seqs),
            "timeline": timeline.write(Path(name), title, gpu.max_num_seqs),
        }
    if outcome.verify is not None:
        try:
            outcome = outcome.verify()
        except Exception as exc:
            outcome.errors.append(f"verification failed: {type(exc).__name__}: {exc}")
    errors.extend(outcome.errors)
    return Sample(
        wall_s=wall,
        requests=int(after.get("vllm:request_success_total", 0) - before.get("vllm:request_success_total", 0)),
        server_errors=int(
            after.get("simulated_vllm_request_errors_total", 0) - before.get("simulated_vllm_request_errors_total", 0)
        ),
        pages=outcome.pages_done,
        failed=outcome.pages_failed,
        client_cpu_s=cpu1 - cpu0,
        moto_cpu_s=moto1 - moto0,
        server_cpu_s=sim1 - sim0,
        peak_running=int(after.get("simulated_vllm_peak_requests_running", 0)),
        peak_waiting=int(after.get("simulated_vllm_peak_requests_waiting", 0)),
        errors=errors,
        parts=outcome.parts,
        **extra,
    )


def decoded_images(env: Env, pages: list[CorpusPage]) -> list[Any]:
    """PIL images for MinerU's client (its API takes decoded images); one decode per distinct page."""
    from PIL import Image

    started = time.process_time()
    decoded = 0
    out = []
    for page in pages:
        image = env.images.get(page.index)
        if image is None:
            with Image.open(io.BytesIO(page.png)) as opened:
                image = opened.convert("RGB")
            env.images[page.index] = image
            decoded += 1
        out.append(image)
    if decoded:
        env.decode_ms_per_page = 1000 * (time.process_time() - started) / decoded
    return out


def case_mineru_client(env: Env, setting: Setting) -> Callable[[], Outcome]:
    """(a) MinerU's own client with its defaults (progress bars and its DEBUG log off: display only)."""
    from loguru import logger as loguru_logger
    from mineru_vl_utils import MinerUClient

    loguru_logger.disable("mineru_vl_utils")  # it logs every raw layout answer at DEBUG to stderr by default
    images = decoded_images(env, cycle_pages(env.pages, pages_needed(env, setting, "mineru")))
    client = MinerUClient(backend="http-client", server_url=env.sim.url, model_name=MODEL, use_tqdm=False)

    def run() -> Outcome:
        async def go() -> list[Any]:
            try:
                return await client.aio_batch_two_step_extract(images)
            finally:
                await client.aclose()

        results = asyncio.run(go())
        done = sum(1 for blocks in results if blocks and all(b.content for b in blocks))
        return Outcome(pages_done=done, pages_failed=len(results) - done)

    return run


def case_ideal_client(env: Env, setting: Setting) -> Callable[[], Outcome]:
    """(i) the ideal client: every page's request sent at once (no limit, no timeout), the page_markdown prompt.

    What a client that never holds a page back achieves: the yardstick of a GPU preset. Bodies are
    built before the clock starts (one per distinct page), so only the HTTP exchange is timed.
    """
    import aiohttp

    max_tokens = bench_config(env.sim.url, "page_markdown").answers.max_tokens
    pages = cycle_pages(env.pages, pages_needed(env, setting, "page_markdown"))
    bodies = {p.index: page_request_body(p.png, max_tokens) for p in pages}
    url = env.sim.url + "/v1/chat/completions"

    def run() -> Outcome:
        async def go() -> Outcome:
            connector = aiohttp.TCPConnector(limit=0)
            timeout = aiohttp.ClientTimeout(total=None)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

                async def one(body: bytes) -> str | None:
                    headers = {"Content-Type": "application/json"}
                    async with session.post(url, data=body, headers=headers) as response:
                        if response.status != 200:
                            return f"HTTP {response.status}: {(await response.text())[:200]}"
                        answer = await response.json()
                        reason = answer["choices"][0]["finish_reason"]
                        return None if reason == "stop" else f"finish_reason {reason}"

                results = await asyncio.gather(*(one(bodies[p.index]) for p in pages), return_exceptions=True)
            problems = [str(r) for r in results if r is not None]
            return Outcome(pages_done=len(results) - len(problems), pages_failed=len(problems), errors=problems[:3])

        return asyncio.run(go())

    return run


def case_mineru_page_prompt(env: Env, setting: Setting) -> Callable[[], Outcome]:
    """(a1) MinerU's own HTTP client (``HttpVlmClient``, its defaults: 100 in flight, its retries) sending the
    page_markdown prompt: the same requests as the ideal client and the stage, so pages/s compare directly."""
    from loguru import logger as loguru_logger
    from mineru_vl_utils.vlm_client.http_client import HttpVlmClient

    from mkg_pipeline.engines.prompts import PAGE_MARKDOWN_PROMPT, PAGE_MARKDOWN_SYSTEM_PROMPT

    loguru_logger.disable("mineru_vl_utils")
    images = decoded_images(env, cycle_pages(env.pages, pages_needed(env, setting, "page_markdown")))
    client = HttpVlmClient(
        model_name=MODEL,
        server_url=env.sim.url,
        prompt=PAGE_MARKDOWN_PROMPT,
        system_prompt=PAGE_MARKDOWN_SYSTEM_PROMPT,
        use_tqdm=False,
    )

    def run() -> Outcome:
        async def go() -> list[Any]:
            try:
                return await client.aio_batch_predict(images, PAGE_MARKDOWN_PROMPT)
            finally:
                aclose = getattr(client, "aclose", None)
                if aclose is not None:
                    await aclose()

        results = asyncio.run(go())
        done = sum(1 for text in results if isinstance(text, str) and text)
        return Outcome(pages_done=done, pages_failed=len(results) - done)

    return run


def case_vlm_stage(env: Env, setting: Setting, engine: str) -> Callable[[], Outcome]:
    n = pages_needed(env, setting, engine)
    key = (engine, n)
    if key not in env.manifests:
        env.manifests[key] = write_page_manifests(env.pages_storage, cycle_pages(env.pages, n), f"b{n}")
    cfg = bench_config(env.sim.url, engine)
    doc_ids = env.manifests[key]
    return lambda: run_vlm_stage(env.pages_storage, cfg, doc_ids)


def case_client_path(
    env: Env, setting: Setting, engine: str, overrides: dict[str, str] | None = None
) -> Callable[[], Outcome]:
    cfg = bench_config(env.sim.url, engine, **(overrides or {}))
    pages = cycle_pages(env.pages, pages_needed(env, setting, engine))
    return lambda: run_client_path(cfg, pages)


def pdf_copies(env: Env, copies: int) -> list[tuple[str, bytes]]:
    """``copies`` distinct copies of the corpus's 'ok' PDFs (a trailing comment changes the bytes, so the doc ids)."""
    if copies not in env.pdfs:
        out = []
        for k in range(copies):
            for entry in ok_files(env.args.corpus):
                data = (env.args.corpus / "pdfs" / entry["file"]).read_bytes()
                if k:
                    data += f"\n%mkg-bench copy {k}\n".encode()
                out.append((f"copy{k}-{entry['file']}", data))
        env.pdfs[copies] = out
    return env.pdfs[copies]


def case_end_to_end(env: Env, setting: Setting, engine: str) -> Callable[[], Outcome]:
    copies = env.args.e2e_copies or math.ceil(pages_needed(env, setting, engine) / len(env.pages))
    storage = env.e2e_storage
    clear_bucket(storage)
    for name, data in pdf_copies(env, copies):
        storage.put_bytes(f"{storage.incoming_prefix}{name}", data, "application/pdf")
    return lambda: run_end_to_end(env, engine, env.moto_pid)


def clear_bucket(storage: Any) -> None:
    storage.delete_many([obj.key for obj in storage.list_objects("")])


CASES = {
    "ideal": "(i) ideal client",
    "a": "(a) MinerU client",
    "a1": "(a1) MinerU HTTP, page",
    "b": "(b) vlm stage, S3",
    "b2": "(b') client path, memory",
    "c": "(c) end to end",
}


def plan_rows(env: Env, setting: Setting) -> list[tuple[Row, Callable[[], Callable[[], Outcome]]]]:
    """Rows for one setting, each with a factory that prepares (untimed) and returns the timed run."""
    args = env.args
    cases = cases_for(args, setting)
    engines = engines_for(args, setting)
    batch = env.batch if setting.preset else None
    rows: list[tuple[Row, Callable[[], Callable[[], Outcome]]]] = []
    if "ideal" in cases:
        rows.append(
            (Row(setting, CASES["ideal"], "page_markdown", batch=batch), lambda: case_ideal_client(env, setting))
        )
    if "a" in cases:
        rows.append((Row(setting, CASES["a"], "mineru", batch=batch), lambda: case_mineru_client(env, setting)))
    if "a1" in cases:
        rows.append(
            (Row(setting, CASES["a1"], "page_markdown", batch=batch), lambda: case_mineru_page_prompt(env, setting))
        )
    for case, factory in (("b", case_vlm_stage), ("b2", case_client_path), ("c", case_end_to_end)):
        if case not in cases:
            continue
        for engine in engines:
            row = Row(setting, CASES[case], engine, batch=batch)
            rows.append((row, lambda f=factory, e=engine: f(env, setting, e)))
    if setting.growing and "sweep" in cases:
        for c in args.sweep:
            row = Row(setting, f"(s) fixed c={c}", "page_markdown", note="client path, adaptive=false")
            rows.append(
                (row, lambda c=c: case_client_path(env, setting, "page_markdown", fixed_concurrency_overrides(c)))
            )
    return rows


def run_setting(env: Env, setting: Setting) -> list[Row]:
    print(f"\n=== server {setting.name}: capacity {setting.capacity:.1f} requests/s ===", flush=True)
    if setting.growing:
        knee = setting.latency / setting.per_running
        print(
            "    throughput at n running = n / (L + K n): "
            + ", ".join(
                f"n={n:g}: {n / (setting.latency + setting.per_running * n):.0f}/s "
                f"({(setting.latency + setting.per_running * n) / setting.latency:.1f}x idle latency)"
                for n in sorted({1, round(knee / 2), round(knee), round(2 * knee), setting.slots})
                if 1 <= n <= setting.slots
            )
            + f"; knee L/K = {knee:g}",
            flush=True,
        )
    gpu = setting.gpu
    if gpu is not None:
        print(
            f"    {gpu.description}\n    {gpu.max_num_seqs} seqs, KV cache {gpu.kv_cache_tokens} tokens, step "
            f"{gpu.step_base_s * 1000:.2f} ms + {gpu.step_per_seq_s * 1000:.4f} ms x running + "
            f"{gpu.prefill_per_token_s * 1e6:.0f} us x prefill token; {gpu.max_num_batched_tokens} batched tokens "
            f"per step; one reference page alone {gpu.single_request_s():.1f} s",
            flush=True,
        )
    env.sim.start(setting, env.args.layout_blocks)
    batches = env.args.batches if gpu is not None else [0]
    rows: list[Row] = []
    try:
        for batch in batches:
            env.batch = batch
            if gpu is not None:
                print(f"  --- batch of {batch} pages", flush=True)
            rows += run_rows(env, setting, plan_rows(env, setting))
    finally:
        env.sim.stop()
    return rows


def run_rows(env: Env, setting: Setting, planned: list[tuple[Row, Callable[[], Callable[[], Outcome]]]]) -> list[Row]:
    """Every planned row, ``--repeat`` times, back to back."""
    for rep in range(env.args.repeat):
        for row, factory in planned:
            env.label = f"{row.case.split(' ', 1)[0].strip('()')}-{row.engine}-r{rep + 1}"
            try:
                run = factory()
            except Exception as exc:
                traceback.print_exc()
                row.samples.append(Sample(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, [f"setup: {type(exc).__name__}: {exc}"], {}))
                continue
            sample = measure(env, run)
            row.samples.append(sample)
            status = f"{len(sample.errors)} error(s): {sample.errors[:2]}" if sample.errors else "ok"
            if setting.gpu is not None:
                print(
                    f"  [{rep + 1}/{env.args.repeat}] {row.case:26s} {row.engine:13s} {sample.pps:6.2f} pages/s  "
                    f"{sample.pages:5d} pages {sample.requests:5d} req in {sample.wall_s:6.1f} s  GPU busy "
                    f"{sample.gpu_busy:4.2f}  peak run {sample.peak_running:4d} wait {sample.peak_waiting:4d}  "
                    f"0.9 full after {fmt(sample.fill_s)} s  preempt {sample.preemptions}  "
                    f"load {loadavg().split()[0]}  {status}\n      timeline {sample.timeline}",
                    flush=True,
                )
                continue
            print(
                f"  [{rep + 1}/{env.args.repeat}] {row.case:26s} {row.engine:13s} {sample.rps:7.1f} req/s "
                f"({sample.rps / setting.capacity:5.2f})  {sample.pps:6.1f} pages/s  {sample.requests:5d} req "
                f"in {sample.wall_s:6.1f} s  peak wait {sample.peak_waiting:4d}  "
                f"load {loadavg().split()[0]}  {status}",
                flush=True,
            )
    return [row for row, _ in planned]


# =========================================================================== report


def fmt(value: float, digits: int = 1) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def print_gpu_report(rows: list[Row], env: Env) -> None:
    """GPU presets: per batch, each case's pages/s against the ideal client's, side by side (medians)."""
    print("\n" + "=" * 150)
    print(
        f"GPU PRESETS (median of {env.args.repeat}): vs ideal = pages/s / the ideal client's pages/s in the same batch "
        "(same requests for page_markdown cases); GPU busy = the case's own requests all sent at once, replayed "
        "through gpu_model, / the wall (fair for any request mix, MinerU's two-step included); 0.9 full = seconds "
        "from the first request to running >= 0.9 x max_num_seqs"
    )
    header = (
        f"{'preset':10s} {'pages':>5s} {'case':26s} {'engine':13s} {'pages/s':>7s} {'vs ideal':>8s} {'GPU busy':>8s} "
        f"{'wall s':>7s} {'ideal s':>7s} {'0.9 full':>8s} {'peak run':>8s} {'peak wait':>9s} {'preempt':>7s} "
        f"{'client':>7s}  status"
    )
    print(header)
    print("-" * len(header))
    for (setting, batch), group in itertools.groupby(rows, key=lambda r: (r.setting, r.batch)):
        group = list(group)
        ideal = next((r for r in group if r.case == CASES["ideal"]), None)
        ideal_pps = ideal.median(lambda s: s.pps) if ideal else math.nan
        for row in group:
            pps = row.median(lambda s: s.pps)
            same_work = row.engine == "page_markdown"
            print(
                f"{setting.name:10s} {batch:5d} {row.case:26s} {row.engine:13s} {fmt(pps, 2):>7s} "
                f"{fmt(pps / ideal_pps if same_work else math.nan, 2):>8s} "
                f"{fmt(row.median(lambda s: s.gpu_busy), 2):>8s} {fmt(row.median(lambda s: s.wall_s)):>7s} "
                f"{fmt(row.median(lambda s: s.ideal_wall_s)):>7s} {fmt(row.median(lambda s: s.fill_s)):>8s} "
                f"{max((s.peak_running for s in row.samples), default=0):>8d} "
                f"{max((s.peak_waiting for s in row.samples), default=0):>9d} "
                f"{max((s.preemptions for s in row.samples), default=0):>7d} "
                f"{fmt(row.median(lambda s: s.per_request_ms(s.client_cpu_s))):>7s}  "
                f"{'ERRORS' if row.failed else 'ok'}"
            )
        print()
    timelines = [str(s.timeline) for r in rows for s in r.samples if s.timeline]
    if timelines:
        print("timelines (running, waiting, limit, KV use, answers/s):\n  " + "\n  ".join(timelines))


def print_report(rows: list[Row], env: Env) -> None:
    gpu_rows = [r for r in rows if r.setting.preset]
    if gpu_rows:
        print_gpu_report(gpu_rows, env)
    rows = [r for r in rows if not r.setting.preset]
    if not rows:
        return
    print("\n" + "=" * 150)
    print(
        f"RESULTS (median of {env.args.repeat}; saturation = requests/s / capacity; CPU in ms per request; "
        f"MinerU layout answer = {env.args.layout_blocks} text blocks)"
    )
    header = (
        f"{'server':22s} {'case':26s} {'engine':13s} {'req/s':>7s} {'satur.':>6s} {'pages/s':>7s} "
        f"{'client':>7s} {'moto':>6s} {'server':>6s} {'peak run':>8s} {'peak wait':>9s} {'requests':>8s} "
        f"{'wall s':>7s}  status"
    )
    default = bench_config("http://127.0.0.1:1", "page_markdown")
    pool = getattr(default.http_client, "pool_size", None)
    print(
        f"default config: vllm.adaptive={default.vllm.adaptive}, vllm.max_in_flight={default.vllm.max_in_flight}, "
        f"vllm.min_in_flight={getattr(default.vllm, 'min_in_flight', 'n/a')}"
        + (f", http_client.pool_size={pool}, keepalive={default.http_client.keepalive}" if pool else "")
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        cap = row.setting.capacity
        print(
            f"{row.setting.name:22s} {row.case:26s} {row.engine:13s} "
            f"{fmt(row.median(lambda s: s.rps)):>7s} {fmt(row.median(lambda s, cap=cap: s.rps / cap), 2):>6s} "
            f"{fmt(row.median(lambda s: s.pps)):>7s} "
            f"{fmt(row.median(lambda s: s.per_request_ms(s.client_cpu_s))):>7s} "
            f"{fmt(row.median(lambda s: s.per_request_ms(s.moto_cpu_s))):>6s} "
            f"{fmt(row.median(lambda s: s.per_request_ms(s.server_cpu_s)), 2):>6s} "
            f"{max((s.peak_running for s in row.samples), default=0):>8d} "
            f"{max((s.peak_waiting for s in row.samples), default=0):>9d} "
            f"{fmt(row.median(lambda s: s.requests), 0):>8s} {fmt(row.median(lambda s: s.wall_s)):>7s}  "
            f"{'ERRORS' if row.failed else 'ok'}"
        )
    print(
        f"\n(a) page images are decoded to PIL before timing (MinerU's API takes images): "
        f"{fmt(env.decode_ms_per_page)} ms CPU per page not included above."
    )

    by_key = {(r.setting, r.case, r.engine): r for r in rows}
    notes = []
    for row in rows:
        if row.case != CASES["b"]:
            continue
        memory = by_key.get((row.setting, CASES["b2"], row.engine))
        if memory:
            b = row.median(lambda s: s.per_request_ms(s.client_cpu_s))
            b2 = memory.median(lambda s: s.per_request_ms(s.client_cpu_s))
            notes.append(
                f"{row.setting.name:22s} {row.engine:13s} S3 client side ((b) - (b') client CPU): {fmt(b - b2)} ms/req"
            )
    if notes:
        print("\n" + "\n".join(notes))

    e2e = [r for r in rows if r.case == CASES["c"] and r.samples]
    if e2e:
        print("\n(c) end to end, CPU ms per page by part (median); wall s by part:")
        for row in e2e:
            pages = row.median(lambda s: s.pages) or math.nan
            parts = {
                name: (
                    row.median(lambda s, n=name: s.parts.get(n, PartCost()).cpu_s) * 1000 / pages,
                    row.median(lambda s, n=name: s.parts.get(n, PartCost()).moto_cpu_s) * 1000 / pages,
                    row.median(lambda s, n=name: s.parts.get(n, PartCost()).wall_s),
                )
                for name, _, _ in E2E_PARTS
            }
            total_cpu = row.median(lambda s: s.client_cpu_s) * 1000 / pages
            other = total_cpu - sum(v[0] for v in parts.values())
            walls = ", ".join(f"{name} {fmt(v[2])}" for name, v in parts.items())
            print(
                f"  {row.setting.name:22s} {row.engine:13s} {fmt(pages, 0)} pages: "
                + "  ".join(f"{name} {fmt(v[0])} (moto {fmt(v[1])})" for name, v in parts.items())
                + f"  other (sensor, Dagster) {fmt(other)}"
                + f"  | S3 server (moto) total {fmt(row.median(lambda s: s.moto_cpu_s) * 1000 / pages)}"
                + f"  sim server {fmt(row.median(lambda s: s.server_cpu_s) * 1000 / pages, 2)}"
                + f"  | wall: {walls}, total {fmt(row.median(lambda s: s.wall_s))}"
            )

    for setting in dict.fromkeys(r.setting for r in rows):
        sweep = [r for r in rows if r.setting == setting and r.case.startswith("(s)")]
        default = by_key.get((setting, CASES["b2"], "page_markdown"))
        if not sweep:
            continue
        best = max(sweep, key=lambda r: r.median(lambda s: s.rps))
        best_rps = best.median(lambda s: s.rps)
        print(f"\nsweep on {setting.name}: best fixed concurrency {best.case.split('=')[1]} at {fmt(best_rps)} req/s")
        if default is not None:
            rps = default.median(lambda s: s.rps)
            peak = max((s.peak_waiting for s in default.samples), default=0)
            print(
                f"  default config client path: {fmt(rps)} req/s = {fmt(rps / best_rps, 2)} of the best "
                f"fixed; server's peak waiting queue {peak} (S = {setting.slots})"
            )


# =========================================================================== main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--settings",
        default="32x0.5,64x0.25,64x0.1+0.005",
        help="server settings SxL or SxL+K, comma-separated (default: 32x0.5,64x0.25,64x0.1+0.005)",
    )
    parser.add_argument(
        "--cases",
        default=None,
        help="subset of ideal,a,a1,b,b2,c,sweep (default: a,b,b2,c,sweep; on a GPU preset ideal,a,b)",
    )
    parser.add_argument(
        "--engines", default=None, help="engines for b, b2, c (default: both; on a GPU preset page_markdown)"
    )
    parser.add_argument(
        "--preset",
        default=None,
        choices=sorted(gpu_model.PRESETS),
        help="shorthand for --settings PRESET: a GPU-faithful server (see gpu_model.py)",
    )
    parser.add_argument(
        "--batches", default="200,1000", help="pages per case on a GPU preset, comma-separated (default 200,1000)"
    )
    parser.add_argument(
        "--timelines",
        default=str(DEFAULT_CACHE / "timelines" / "saturation"),
        help="path prefix of each GPU-preset case's timeline PNG and CSV (default benchmarks/.bench/timelines/)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of every case; the median is shown")
    parser.add_argument("--waves", type=int, default=20, help="requests per case = waves x slots (default 20)")
    parser.add_argument("--sweep", default="8,16,24,32,48,64,96", help="fixed concurrencies on growing settings")
    parser.add_argument("--layout-blocks", type=int, default=4, help="text blocks per MinerU layout answer")
    parser.add_argument("--e2e-copies", type=int, default=0, help="corpus copies for (c); 0: enough for the waves")
    parser.add_argument("--dpi", type=int, default=150, help="corpus page rendering for a, b, b2 (default 150)")
    parser.add_argument("--corpus", type=Path, default=Path(os.environ.get("MKG_CORPUS_DIR", DEFAULT_CORPUS)))
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="rendered page cache")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the temp dir (logs, DAGSTER_HOME)")
    args = parser.parse_args(argv)
    try:
        args.settings = [Setting.parse(s) for s in ([args.preset] if args.preset else args.settings.split(",")) if s]
        args.batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError as exc:
        parser.error(f"bad --settings/--batches: {exc}")
    if args.cases is not None:
        args.cases = {c.strip() for c in args.cases.split(",") if c.strip()}
    if args.engines is not None:
        args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    args.sweep = [int(c) for c in args.sweep.split(",") if c]
    unknown = (args.cases or set()) - {*CASES, "sweep"}
    if unknown or set(args.engines or ()) - set(ENGINES) or args.repeat < 1 or args.waves < 1:
        parser.error(f"bad --cases/--engines/--repeat/--waves (unknown: {sorted(unknown)})")
    if not args.batches or min(args.batches) < 1:
        parser.error("--batches needs positive page counts")
    return args


def cases_for(args: argparse.Namespace, setting: Setting) -> set[str]:
    if args.cases is not None:
        return args.cases
    return {"ideal", "a", "b"} if setting.preset else {"a", "b", "b2", "c", "sweep"}


def engines_for(args: argparse.Namespace, setting: Setting) -> list[str]:
    if args.engines is not None:
        return args.engines
    return ["page_markdown"] if setting.preset else list(ENGINES)


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    print(f"saturation benchmark, {time.strftime('%Y-%m-%d %H:%M:%S')}, revision {git_revision()}, {sys.executable}")
    machine_report("before")

    import pymupdf

    from mkg_devstack.local_stack import free_port, moto_s3_server

    pymupdf.TOOLS.mupdf_display_errors(False)  # display only: some corpus files print harmless ICC warnings
    workdir = Path(tempfile.mkdtemp(prefix="mkg-saturation-"))
    pages = load_corpus_pages(args.corpus, args.dpi, args.cache_dir)
    print(f"{len(pages)} corpus pages at {args.dpi} DPI, {sum(len(p.png) for p in pages) / len(pages) / 1024:.0f} KiB "
          f"PNG on average; work dir {workdir}")  # fmt: skip
    moto = moto_s3_server(workdir / "logs")
    sim = Simulator(workdir / "logs", free_port())
    rows: list[Row] = []
    instance = None
    try:
        moto.start()
        home = workdir / "dagster_home"
        home.mkdir()
        shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
        # Set once, before anything reads the config: the sensor and the Dagster resources read it from env.
        os.environ.update(
            {
                "DAGSTER_HOME": str(home),
                "MKG_STORAGE__ENDPOINT_URL": moto.url,
                "MKG_STORAGE__BUCKET": E2E_BUCKET,
                "MKG_STORAGE__ACCESS_KEY_ID": "testing",
                "MKG_STORAGE__SECRET_ACCESS_KEY": "testing",
                "MKG_VLLM__URL": sim.url,
                "MKG_VLLM__MODEL": MODEL,
            }
        )
        import dagster as dg

        import mkg_pipeline.orchestration.definitions  # noqa: F401  (imported once here, not inside a timed case)

        instance = dg.DagsterInstance.from_config(str(home))
        pages_storage = make_storage(moto.url, PAGES_BUCKET)
        pages_storage.ensure_bucket()
        e2e_storage = make_storage(moto.url, E2E_BUCKET)
        e2e_storage.ensure_bucket()
        for page in pages:
            pages_storage.put_bytes(page.key, page.png, "image/png")
        env = Env(args, workdir, pages, moto, sim, pages_storage, e2e_storage, instance)
        for setting in args.settings:
            rows.extend(run_setting(env, setting))
        print_report(rows, env)
    finally:
        sim.stop()
        moto.stop()
        if instance is not None:
            instance.dispose()
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\ntotal wall {time.perf_counter() - started:.0f} s")
    machine_report("after")
    failed = [r for r in rows if r.failed]
    for row in failed:
        errors = [e for s in row.samples for e in s.errors][:3]
        extra = [f"{s.failed} failed page(s), {s.server_errors} server error(s)" for s in row.samples if s.failed or
                 s.server_errors][:1]  # fmt: skip
        print(f"ERRORS in {row.setting.name} {row.case} {row.engine}: {errors + extra}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
