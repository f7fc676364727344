"""The daily baseline-quality schedule over the golden set."""

# No `from __future__ import annotations`: Dagster reads the config/context annotations at definition time.
import dagster as dg

from mkg_pipeline.orchestration.jobs import baseline_quality_job, golden_partition

BASELINE_SET = "default"


@dg.schedule(
    job=baseline_quality_job,
    cron_schedule="0 5 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every day, re-run the golden set against the live server and compare with the golden baseline "
    "(blocking check on a regression). Promote a baseline first with promote_baseline_job.",
)
def daily_baseline_quality_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
    partition = golden_partition(BASELINE_SET)
    if not context.instance.has_dynamic_partition("ingest_batches", partition):
        return dg.SkipReason(f"no golden set yet: run promote_baseline_job (set_name={BASELINE_SET!r}) once")
    return dg.RunRequest(partition_key=partition, tags={"mkg/golden_set": BASELINE_SET})
