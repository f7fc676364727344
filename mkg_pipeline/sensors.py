"""The sensor on the bucket's incoming/ prefix: new or replaced PDFs become ingestion batches."""

# No `from __future__ import annotations`: Dagster reads the config/context annotations at definition time.
import time

import dagster as dg

from mkg_pipeline.assets import ingest_batches
from mkg_pipeline.config import get_settings
from mkg_pipeline.jobs import ingest_job
from mkg_pipeline.resources import S3StorageResource

#: an object still in incoming/ this long after it was requested is requested again (its run failed)
REQUEUE_AFTER_S = 6 * 3600


@dg.sensor(
    job=ingest_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Lists incoming/ (which raw_pdfs drains) and turns new or replaced objects into batches of up to "
    "workers.batch_size documents, one dynamic partition and one run each, with a stable run key.",
)
def incoming_pdfs_sensor(context: dg.SensorEvaluationContext, s3: S3StorageResource) -> dg.SensorResult:
    from mkg_pipeline.stages.batches import IncomingObject, new_batch_id, write_batch_manifest
    from mkg_pipeline.stages.sensor_plan import plan_tick

    storage = s3.storage()
    settings = get_settings()
    listing = (
        IncomingObject(o.key, o.etag, o.size)
        for o in storage.list_objects(storage.incoming_prefix)
        if not o.key.endswith("/")
    )
    plan = plan_tick(
        listing,
        context.cursor,
        batch_size=settings.workers.batch_size,
        now=time.time(),
        requeue_after_s=REQUEUE_AFTER_S,
    )
    if not plan.batches:
        return dg.SensorResult(
            skip_reason=f"no new objects in incoming/ ({plan.already_requested} already requested)",
            cursor=plan.cursor,
        )
    batch_ids = []
    run_requests = []
    for objects in plan.batches:
        batch_id = new_batch_id(objects)
        write_batch_manifest(storage, batch_id, objects, origin="incoming_pdfs_sensor")
        batch_ids.append(batch_id)
        run_requests.append(
            dg.RunRequest(
                run_key=batch_id,
                partition_key=batch_id,
                tags={"mkg/batch_size": str(len(objects))},
            )
        )
        context.log.info(f"batch {batch_id}: {len(objects)} object(s): {[o.key for o in objects][:10]}")
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[ingest_batches.build_add_request(batch_ids)],
        cursor=plan.cursor,
    )
