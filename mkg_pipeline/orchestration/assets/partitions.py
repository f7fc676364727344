"""Partitioning by ingestion batch (docs/architecture.md, "Partitions and scale"), and a run's claim on its batch."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import dagster as dg

if TYPE_CHECKING:
    from mkg_pipeline.stages.lease import BatchLease
    from mkg_pipeline.storage import Storage

INGEST_BATCHES = "ingest_batches"

ingest_batches = dg.DynamicPartitionsDefinition(name=INGEST_BATCHES)


@contextmanager
def claimed_batch(context: dg.AssetExecutionContext, storage: "Storage", ttl_s: float) -> Iterator["BatchLease"]:
    """Hold the batch's lease (one writer per partition) for the step; another run's claim fails it clearly.

    The queue already runs one run per partition (dagster.yaml); the lease also covers what bypasses the
    queue: `dagster asset materialize` from a shell or CI, two instances, a run retried by hand.
    ``ttl_s`` (workers.lease_ttl_s) comes from the settings of the step's resource, like every setting.
    """
    from mkg_pipeline.stages.lease import LeaseHeld, batch_lease

    lease = batch_lease(storage, context.partition_key, context.run_id, ttl_s=ttl_s, progress=context.log.info)
    try:
        lease.acquire()
    except LeaseHeld as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from None
    try:
        yield lease
    finally:
        lease.release()
