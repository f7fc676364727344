"""The Dagster code location: one Definitions object.

Importing this module loads Dagster and our thin asset layer only; OCR models,
ONNX runtimes and MinerU are imported inside the steps that use them, so a run
pod is ready in seconds.
"""

from __future__ import annotations

import dagster as dg

from mkg_pipeline.orchestration.assets import pipeline_assets
from mkg_pipeline.orchestration.checks import bucket_accounting
from mkg_pipeline.orchestration.jobs import baseline_quality_job, ingest_job, promote_baseline_job
from mkg_pipeline.orchestration.resources import pipeline_resources
from mkg_pipeline.orchestration.schedules import daily_baseline_quality_schedule
from mkg_pipeline.orchestration.sensors import incoming_pdfs_sensor

#: who answers for the pipeline's assets: shown on each asset in the UI and filterable there (Dagster's "team:"
#: form); the runbook (docs/runbook.md) says what they do when a check fails
OWNERS = ["team:mkg-pipeline"]

defs = dg.Definitions(
    # Set here rather than in each decorator: one owner for the whole graph, in one place.
    assets=dg.map_asset_specs(lambda spec: spec.replace_attributes(owners=OWNERS), pipeline_assets),
    # One process per run: the steps of a batch (raw_pdfs -> parsed_pages -> vlm_outputs -> checks) depend on
    # one another, so Dagster's default multiprocess executor bought no parallelism, only a new Python process
    # per step and per check, each importing Dagster and this code location again (about 1 s of CPU each, and
    # ~150 MB each at once on a run pod). Rendering has its own worker pool (pdf/pool.py), and a run killed
    # as a whole is what run monitoring and the batch lease already handle.
    executor=dg.in_process_executor,
    asset_checks=[bucket_accounting],
    jobs=[ingest_job, baseline_quality_job, promote_baseline_job],
    sensors=[incoming_pdfs_sensor],
    schedules=[daily_baseline_quality_schedule],
    resources=pipeline_resources(),
)
