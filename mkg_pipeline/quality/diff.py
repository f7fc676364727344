"""quality_baseline_diffs: how far today's outputs are from the golden baseline and from the text layer.

Two references per page:
- the golden baseline ``baseline/<set>/<doc_id>/pages/<n>.md`` — outputs a person
  accepted once (the ``promote_baseline`` job copies a run's outputs there); a drop
  means the model, the prompts or the server changed behaviour;
- the PDF's own text layer, where the page has one — a cheap ground truth for
  born-digital pages.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from mkg_pipeline.markdown_table import markdown_table
from mkg_pipeline.quality.similarity import similarity
from mkg_pipeline.records import page_result_cache_key
from mkg_pipeline.stages.pages import read_page_manifest
from mkg_pipeline.storage import Storage

log = logging.getLogger(__name__)

#: pages whose text layer is shorter than this are not compared with it (blank pages, scans, page numbers)
MIN_TEXT_LAYER_CHARS = 50
SNIPPET_CHARS = 160


@dataclass(frozen=True)
class PageDiff:
    doc_id: str
    source: str
    page: int
    status: str  # "compared" | "missing_output"
    baseline_similarity: float | None
    text_layer_similarity: float | None
    output_snippet: str
    reference_snippet: str


@dataclass
class QualityReport:
    batch_id: str
    baseline_set: str
    engine: str
    pages: list[PageDiff] = field(default_factory=list)
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    def _values(self, attr: str) -> list[float]:
        return [v for p in self.pages if (v := getattr(p, attr)) is not None]

    @property
    def mean_baseline_similarity(self) -> float | None:
        values = self._values("baseline_similarity")
        return statistics.fmean(values) if values else None

    @property
    def mean_text_layer_similarity(self) -> float | None:
        values = self._values("text_layer_similarity")
        return statistics.fmean(values) if values else None

    @property
    def missing_outputs(self) -> int:
        return sum(1 for p in self.pages if p.status == "missing_output")

    def worst(self, n: int = 5) -> list[PageDiff]:
        def key(p: PageDiff) -> float:
            candidates = [v for v in (p.baseline_similarity, p.text_layer_similarity) if v is not None]
            return min(candidates) if candidates else 2.0

        return sorted((p for p in self.pages if p.status == "compared"), key=key)[:n]

    def to_json(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id,
            "baseline_set": self.baseline_set,
            "engine": self.engine,
            "created_at": self.created_at,
            "mean_baseline_similarity": self.mean_baseline_similarity,
            "mean_text_layer_similarity": self.mean_text_layer_similarity,
            "pages": [asdict(p) for p in self.pages],
        }

    def to_markdown(self) -> str:
        def fmt(v: float | None) -> str:
            return "—" if v is None else f"{v:.3f}"

        lines = [
            f"**Batch** `{self.batch_id}` · **engine** `{self.engine}` · **baseline set** `{self.baseline_set}`",
            "",
            f"Mean similarity vs baseline: **{fmt(self.mean_baseline_similarity)}** "
            f"({len(self._values('baseline_similarity'))} pages) · vs text layer: "
            f"**{fmt(self.mean_text_layer_similarity)}** ({len(self._values('text_layer_similarity'))} pages)",
            "",
            "Worst pages:",
            "",
            markdown_table(
                ["document", "page", "vs baseline", "vs text layer", "output", "reference"],
                [
                    [
                        f"{p.source} (`{p.doc_id}`)",
                        p.page,
                        fmt(p.baseline_similarity),
                        fmt(p.text_layer_similarity),
                        p.output_snippet,
                        p.reference_snippet,
                    ]
                    for p in self.worst()
                ],
                max_cell=SNIPPET_CHARS,
            ),
        ]
        if self.missing_outputs:
            lines += [
                "",
                f"{self.missing_outputs} page(s) have no output yet (failed or pending) and were not compared.",
            ]
        return "\n".join(lines)


def baseline_page_key(storage: Storage, set_name: str, doc_id: str, page: int) -> str:
    return storage.baseline_key(set_name, doc_id, f"pages/{page}.md")


def compare_documents(
    storage: Storage, batch_id: str, doc_ids: list[str], identity: str, baseline_set: str
) -> QualityReport:
    report = QualityReport(batch_id=batch_id, baseline_set=baseline_set, engine=identity)
    for doc_id in doc_ids:
        try:
            manifest = read_page_manifest(storage, doc_id)
        except FileNotFoundError as exc:  # reported by vlm_outputs' accounting check; nothing to compare here
            log.warning("%s", exc)
            continue
        baseline_keys = {o.key for o in storage.list_objects(storage.baseline_key(baseline_set, doc_id, "pages/"))}
        for page in manifest["pages"]:
            n = page["page"]
            result_key = storage.vlm_page_key(doc_id, n, page_result_cache_key(page, identity))
            try:
                output = storage.get_json(result_key)["markdown"]
            except FileNotFoundError:
                report.pages.append(
                    PageDiff(doc_id, manifest.get("source", ""), n, "missing_output", None, None, "", "")
                )
                continue
            baseline_key = baseline_page_key(storage, baseline_set, doc_id, n)
            baseline = storage.get_bytes(baseline_key).decode() if baseline_key in baseline_keys else None
            text_layer = page.get("text_layer", "")
            use_text_layer = len(text_layer.strip()) >= MIN_TEXT_LAYER_CHARS
            report.pages.append(
                PageDiff(
                    doc_id=doc_id,
                    source=manifest.get("source", ""),
                    page=n,
                    status="compared",
                    baseline_similarity=similarity(output, baseline) if baseline is not None else None,
                    text_layer_similarity=similarity(output, text_layer) if use_text_layer else None,
                    output_snippet=output[:SNIPPET_CHARS],
                    reference_snippet=(baseline if baseline is not None else text_layer)[:SNIPPET_CHARS],
                )
            )
    day = report.created_at[:10]
    storage.put_json(storage.quality_report_key(day, f"{batch_id}.json"), report.to_json())
    storage.put_bytes(storage.quality_report_key(day, f"{batch_id}.md"), report.to_markdown().encode(), "text/markdown")
    return report
