"""The sensor on the bucket's incoming/ prefix: new or replaced PDFs become ingestion batches.

The planning (what is new, the cursor) is in ``stages/sensor_plan.py``; this module adds what only
Dagster knows: which runs of a batch failed or were canceled. Their objects still in ``incoming/``
are requested again, for the same batch under a new run key, at most ``MAX_AUTOMATIC_RETRIES`` times.
"""

# No `from __future__ import annotations`: Dagster reads the config/context annotations at definition time.
import os
from datetime import UTC, datetime

import dagster as dg

from mkg_pipeline.orchestration.assets import ingest_batches
from mkg_pipeline.orchestration.jobs import GOLDEN_PREFIX, ingest_job
from mkg_pipeline.orchestration.resources import S3StorageResource

#: re-requests of one batch after failed/canceled runs; then it waits for a person (docs/runbook.md)
MAX_AUTOMATIC_RETRIES = 3
#: failed/canceled runs looked at per tick (the rest on the next ticks)
ENDED_RUNS_PER_TICK = 200
#: seconds between the daemon's evaluations of the sensor; the demo shortens it so a dropped file starts soon
SENSOR_INTERVAL_S = int(os.environ.get("MKG_SENSOR_INTERVAL_S", "30"))

_ENDED = [dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]
_ACTIVE = {
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
}


def _timestamp(value: datetime) -> float:
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def _retry_requests(context: dg.SensorEvaluationContext, storage, cursor):  # type: ignore[no-untyped-def]
    """Run requests for batches whose latest run failed or was canceled with objects still in incoming/."""
    from mkg_pipeline.stages.sensor_plan import (
        EndedRun,
        mark_runs_handled,
        pending_objects,
        query_after,
        retry_run_key,
        unseen_ended_runs,
    )

    instance = context.instance
    records = instance.get_run_records(
        dg.RunsFilter(
            job_name=ingest_job.name,
            statuses=_ENDED,
            updated_after=datetime.fromtimestamp(query_after(cursor), UTC),
        ),
        limit=ENDED_RUNS_PER_TICK,
        order_by="update_timestamp",
        ascending=True,
    )
    ended = unseen_ended_runs(
        (
            EndedRun(r.dagster_run.run_id, r.dagster_run.tags.get("dagster/partition"), _timestamp(r.update_timestamp))
            for r in records
        ),
        cursor,
    )
    requests: list[dg.RunRequest] = []
    planned: set[str] = set()
    for run in ended:
        batch = run.partition
        if not batch or batch in planned or batch.startswith(GOLDEN_PREFIX):
            continue
        runs = instance.get_runs(dg.RunsFilter(tags={"dagster/partition": batch}))
        if any(r.status in _ACTIVE for r in runs):
            continue  # another run of the batch is queued or running: it takes the objects
        try:
            pending = pending_objects(storage, batch)
        except (FileNotFoundError, ValueError) as exc:  # no manifest, or an unreadable one: never the whole tick
            context.log.warning(f"run {run.run_id} of batch {batch} ended; {exc}")
            continue
        if not pending:
            continue  # every object was ingested: a later step failed, which re-materializing fixes
        attempt = sum(1 for r in runs if r.status in _ENDED)
        if attempt > MAX_AUTOMATIC_RETRIES:
            context.log.error(
                f"batch {batch}: {attempt} runs failed or were canceled (last {run.run_id}); its "
                f"{len(pending)} object(s) stay in incoming/ and are not requested again automatically. "
                "Read the last run's error, fix the cause, then materialize the batch (docs/runbook.md)."
            )
            continue
        planned.add(batch)
        requests.append(
            dg.RunRequest(
                run_key=retry_run_key(batch, attempt),
                partition_key=batch,
                tags={"mkg/batch_size": str(len(pending)), "mkg/retry_of": run.run_id},
            )
        )
        context.log.info(
            f"batch {batch}: run {run.run_id} failed or was canceled with {len(pending)} object(s) still in "
            f"incoming/; requesting it again (attempt {attempt} of {MAX_AUTOMATIC_RETRIES})"
        )
    return requests, mark_runs_handled(cursor, ended)


@dg.sensor(
    job=ingest_job,
    minimum_interval_seconds=SENSOR_INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Lists incoming/ (which raw_pdfs drains) and turns new or replaced objects into batches of up to "
    "workers.batch_size documents, one dynamic partition and one run each, with a stable run key. A batch whose "
    "run failed or was canceled is requested again while its objects are still in incoming/.",
)
def incoming_pdfs_sensor(context: dg.SensorEvaluationContext, s3: S3StorageResource) -> dg.SensorResult:
    from mkg_pipeline.stages.batches import new_batch_id, write_batch_manifest
    from mkg_pipeline.stages.sensor_plan import Cursor, ListedObject, plan_tick

    storage = s3.storage()
    settings = s3.pipeline_config()
    cursor = Cursor.load(context.cursor)
    run_requests, cursor = _retry_requests(context, storage, cursor)

    listing = (
        ListedObject(o.key, o.etag, o.size, o.last_modified.timestamp() if o.last_modified else 0.0)
        for o in storage.list_objects(storage.incoming_prefix)
        if not o.key.endswith("/")
    )
    plan = plan_tick(listing, cursor, batch_size=settings.workers.batch_size)
    batch_ids = []
    for objects in plan.batches:
        batch_id = new_batch_id(objects)
        write_batch_manifest(storage, batch_id, objects, origin="incoming_pdfs_sensor")
        batch_ids.append(batch_id)
        run_requests.append(
            dg.RunRequest(run_key=batch_id, partition_key=batch_id, tags={"mkg/batch_size": str(len(objects))})
        )
        context.log.info(f"batch {batch_id}: {len(objects)} object(s): {[o.key for o in objects][:10]}")
    if plan.deferred:
        context.log.info(f"{plan.deferred} more new object(s) in incoming/ are left for the next ticks")
    if not run_requests:
        return dg.SensorResult(
            skip_reason=f"no new objects in incoming/ ({plan.already_requested} already requested)",
            cursor=plan.cursor.dump(),
        )
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[ingest_batches.build_add_request(batch_ids)] if batch_ids else [],
        cursor=plan.cursor.dump(),
    )
