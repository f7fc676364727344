"""Asset checks on page accounting and quality.

The checks are evaluated by the assets themselves (they hold the numbers) and
declared here, so that their names, blocking behaviour and thresholds are in
one place. ``baseline_similarity`` is blocking: a regression against the
golden baseline stops everything downstream of the quality asset.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import dagster as dg

if TYPE_CHECKING:  # the stages import storage/pdf code that the code location does not need at import time
    from mkg_pipeline.stages.quality_diff import QualityReport
    from mkg_pipeline.stages.vlm import VLMSummary

PAGES_ACCOUNTED_FOR = "pages_accounted_for"
NO_FAILED_PAGES = "no_failed_pages"
PAGE_FAILURE_RATE = "page_failure_rate"
BASELINE_SIMILARITY = "baseline_similarity"
TEXT_LAYER_SIMILARITY = "text_layer_similarity"

vlm_output_check_specs = [
    dg.AssetCheckSpec(
        PAGES_ACCOUNTED_FOR,
        asset="vlm_outputs",
        description="Every page of every document is processed or recorded as failed with its reason.",
    ),
    dg.AssetCheckSpec(
        NO_FAILED_PAGES,
        asset="vlm_outputs",
        description="No page is waiting for a retry (warning: failed pages retry on the next materialization).",
    ),
    dg.AssetCheckSpec(
        PAGE_FAILURE_RATE,
        asset="vlm_outputs",
        blocking=True,
        description="At most quality.max_failed_page_rate of the batch's pages failed (olmOCR drops a document "
        "above 0.4 %). Failing it fails the run after every finished page was stored; re-materialize to retry.",
    ),
]

quality_check_specs = [
    dg.AssetCheckSpec(
        BASELINE_SIMILARITY,
        asset="quality_baseline_diffs",
        blocking=True,
        description="Mean normalised similarity to the golden baseline is at least quality.min_baseline_similarity.",
    ),
    dg.AssetCheckSpec(
        TEXT_LAYER_SIMILARITY,
        asset="quality_baseline_diffs",
        description="Mean similarity to the PDF text layer (born-digital pages) is at least "
        "quality.min_text_layer_similarity.",
    ),
]


def evaluate_vlm_checks(summary: VLMSummary, max_failed_page_rate: float) -> list[dg.AssetCheckResult]:
    accounted = summary.processed + summary.cached + summary.failed
    reasons = dg.MetadataValue.json(dict(summary.failure_reasons))
    return [
        dg.AssetCheckResult(
            check_name=PAGES_ACCOUNTED_FOR,
            passed=accounted == summary.pages_total and not summary.unrendered,
            metadata={
                "pages_expected": summary.pages_total,
                "pages_accounted": accounted,
                "pages_failed": summary.failed,
                "documents_without_pages": dg.MetadataValue.json(summary.unrendered),
            },
        ),
        dg.AssetCheckResult(
            check_name=NO_FAILED_PAGES,
            passed=summary.failed == 0,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"pages_failed": summary.failed, "failure_reasons": reasons},
        ),
        dg.AssetCheckResult(
            check_name=PAGE_FAILURE_RATE,
            passed=summary.failed_page_rate <= max_failed_page_rate,
            metadata={
                "failed_page_rate": round(summary.failed_page_rate, 5),
                "threshold": max_failed_page_rate,
                "pages_failed": summary.failed,
                "pages": summary.pages_total,
                "failure_reasons": reasons,
            },
        ),
    ]


def evaluate_quality(report: QualityReport, min_baseline: float, min_text_layer: float) -> list[dg.AssetCheckResult]:
    baseline = report.mean_baseline_similarity
    text_layer = report.mean_text_layer_similarity
    return [
        dg.AssetCheckResult(
            check_name=BASELINE_SIMILARITY,
            # No golden page in this batch: nothing regressed, and the metadata says so.
            passed=baseline is None or baseline >= min_baseline,
            metadata={
                "mean_similarity": baseline if baseline is not None else "no baseline pages",
                "threshold": min_baseline,
                "pages_compared": sum(1 for p in report.pages if p.baseline_similarity is not None),
            },
        ),
        dg.AssetCheckResult(
            check_name=TEXT_LAYER_SIMILARITY,
            passed=text_layer is None or text_layer >= min_text_layer,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "mean_similarity": text_layer if text_layer is not None else "no text-layer pages",
                "threshold": min_text_layer,
                "pages_compared": sum(1 for p in report.pages if p.text_layer_similarity is not None),
            },
        ),
    ]
