"""Asset checks on page accounting, quality and the bucket audit.

The page and quality checks are evaluated by the assets themselves (they hold the numbers) and
declared here, so that their names, blocking behaviour and thresholds are in one place;
``bucket_accounting`` runs the audit (``mkg_pipeline/audit/``) for the partition's batch.
``baseline_similarity`` is blocking: a regression against the golden baseline stops everything
downstream of the quality asset.

Every check is partitioned like its asset (one result per ingestion batch, shown against the batch in
the UI). A check with nothing to compare (no page of the batch has a golden baseline, or a text layer)
does not pass: it fails with WARN severity and says why, so that it is never green for a comparison
that did not happen, and never blocks the run either.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import dagster as dg

if TYPE_CHECKING:  # the stages import storage/pdf code that the code location does not need at import time
    from mkg_pipeline.quality.diff import QualityReport
    from mkg_pipeline.stages.vlm import VLMSummary

PAGES_ACCOUNTED_FOR = "pages_accounted_for"
NO_FAILED_PAGES = "no_failed_pages"
PAGE_FAILURE_RATE = "page_failure_rate"
BASELINE_SIMILARITY = "baseline_similarity"
TEXT_LAYER_SIMILARITY = "text_layer_similarity"

# The assets' partitions (assets/partitions.py), built by name: importing that module would import the assets
# package, whose modules import this one. Dynamic partitions definitions are equal when their names are.
ingest_batches = dg.DynamicPartitionsDefinition(name="ingest_batches")
# Partitioned checks are a preview in Dagster 1.13 (the UI shows each result against its batch); say so once
# here, not in every process that loads the code location.
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec", category=Warning)

vlm_output_check_specs = [
    dg.AssetCheckSpec(
        PAGES_ACCOUNTED_FOR,
        partitions_def=ingest_batches,
        asset="vlm_outputs",
        description="Every page of every document is processed or recorded as failed with its reason.",
    ),
    dg.AssetCheckSpec(
        NO_FAILED_PAGES,
        partitions_def=ingest_batches,
        asset="vlm_outputs",
        description="No page is waiting for a retry (warning: failed pages retry on the next materialization).",
    ),
    dg.AssetCheckSpec(
        PAGE_FAILURE_RATE,
        partitions_def=ingest_batches,
        asset="vlm_outputs",
        blocking=True,
        description="At most quality.max_failed_page_rate of the batch's pages failed (olmOCR drops a document "
        "above 0.4 %). Failing it fails the run after every finished page was stored; re-materialize to retry.",
    ),
]

quality_check_specs = [
    dg.AssetCheckSpec(
        BASELINE_SIMILARITY,
        partitions_def=ingest_batches,
        asset="quality_baseline_diffs",
        blocking=True,
        description="Mean normalised similarity to the golden baseline is at least quality.min_baseline_similarity. "
        "A batch without golden pages warns 'nothing compared' (promote a baseline with promote_baseline_job; the "
        "daily_baseline_quality_schedule compares the golden set).",
    ),
    dg.AssetCheckSpec(
        TEXT_LAYER_SIMILARITY,
        partitions_def=ingest_batches,
        asset="quality_baseline_diffs",
        description="Mean similarity to the PDF text layer (born-digital pages) is at least "
        "quality.min_text_layer_similarity. A batch without text-layer pages (scans only) warns 'nothing compared'.",
    ),
]


def evaluate_vlm_checks(summary: VLMSummary, max_failed_page_rate: float) -> list[dg.AssetCheckResult]:
    # text-route pages are finished by parsed_pages: found done here, never processed nor cached
    accounted = summary.processed + summary.cached + summary.text_done + summary.failed
    reasons = dg.MetadataValue.json(dict(summary.failure_reasons))
    return [
        dg.AssetCheckResult(
            check_name=PAGES_ACCOUNTED_FOR,
            passed=accounted == summary.pages_total and not summary.unrendered,
            metadata={
                "pages_expected": summary.pages_total,
                "pages_accounted": accounted,
                "pages_failed": summary.failed,
                "pages_text": summary.text_done,
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


def _similarity_check(
    check_name: str, mean: float | None, threshold: float, compared: int, what: str, severity: dg.AssetCheckSeverity
) -> dg.AssetCheckResult:
    """Pass or fail against the threshold; with nothing compared, a visible WARN failure, never a pass."""
    metadata = {"threshold": threshold, "pages_compared": compared}
    if mean is None or compared == 0:
        return dg.AssetCheckResult(
            check_name=check_name,
            passed=False,
            severity=dg.AssetCheckSeverity.WARN,
            description=f"Nothing compared: no page of this batch has {what}. This is not a pass.",
            metadata={**metadata, "mean_similarity": "n/a (nothing compared)"},
        )
    return dg.AssetCheckResult(
        check_name=check_name,
        passed=mean >= threshold,
        severity=severity,
        description=f"mean similarity {mean:.4f} over {compared} page(s); threshold {threshold}",
        metadata={**metadata, "mean_similarity": round(mean, 4)},
    )


def evaluate_quality(report: QualityReport, min_baseline: float, min_text_layer: float) -> list[dg.AssetCheckResult]:
    return [
        _similarity_check(
            BASELINE_SIMILARITY,
            report.mean_baseline_similarity,
            min_baseline,
            sum(1 for p in report.pages if p.baseline_similarity is not None),
            "a golden baseline",
            dg.AssetCheckSeverity.ERROR,
        ),
        _similarity_check(
            TEXT_LAYER_SIMILARITY,
            report.mean_text_layer_similarity,
            min_text_layer,
            sum(1 for p in report.pages if p.text_layer_similarity is not None),
            "a trustworthy text layer",
            dg.AssetCheckSeverity.WARN,
        ),
    ]


# ---- the bucket audit, per batch -------------------------------------------------------------------------------

BUCKET_ACCOUNTING = "bucket_accounting"
#: findings shown in the check's metadata table (the command lists them all)
AUDIT_ROWS = 50


# Imported here, at the end of the module: the resources module is light, but the assets' vlm module imports
# the specs above from this module. Dagster resolves the annotations below from this module's globals.
from mkg_pipeline.orchestration.resources import S3StorageResource, VLLMResource  # noqa: E402


@dg.asset_check(
    asset="vlm_outputs",
    name=BUCKET_ACCOUNTING,
    blocking=False,
    partitions_def=ingest_batches,
    description="The accounting invariant over the batch's records in the bucket (`python -m mkg_pipeline.audit "
    "--batch <partition>`): every object ended in raw/ or rejected/ or is pending, every document is rendered "
    "or has a recorded render failure, every page has a result or a recorded failure. See docs/runbook.md.",
)
def bucket_accounting(
    context,  # AssetCheckExecutionContext; unannotated: Dagster cannot resolve it from a string annotation
    s3: S3StorageResource,
    vllm: VLLMResource,
) -> dg.AssetCheckResult:
    from mkg_pipeline.audit import ERROR, audit_bucket
    from mkg_pipeline.engines.base import engine_identity
    from mkg_pipeline.orchestration.metadata import audit_metadata

    settings = vllm.pipeline_config()
    identity = engine_identity(settings.engine, settings.vllm.model, settings.prompt_version)
    # The check is partitioned like vlm_outputs (a preview feature in Dagster 1.13), so it runs for one batch;
    # `python -m mkg_pipeline.audit` without --batch audits the whole bucket.
    batch = context.partition_key if context.has_partition_key else context.run.tags.get("dagster/partition")
    report = audit_bucket(s3.storage(), identity, batch_id=batch)
    findings = sorted(report.findings, key=lambda f: (f.severity != ERROR, f.kind))
    for finding in findings[:10]:
        context.log.warning(f"{finding.severity} {finding.kind}: {finding.subject}: {finding.message}")
    return dg.AssetCheckResult(
        passed=report.ok,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata=audit_metadata(report, findings, batch, AUDIT_ROWS),
    )
