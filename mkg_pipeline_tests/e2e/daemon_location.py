"""A tiny code location for the daemon tests: partitioned assets that hold their run (and pool slot).

``slot_holder`` is in pool ``vllm``; ``partition_worker`` is in no pool. ``batch_job`` is an ingest run's shape:
``rendered`` (no pool, like ingest and render) writes ``rendered-<partition>-<run_id>`` and ends, then
``vlm_holder`` (pool ``vllm``, like ``vlm_outputs``) holds. Each holding step writes
``started-<partition>-<run_id>`` (its process id) into ``$MKG_TEST_GUARD_DIR``, then waits until
``release-<partition>`` exists there (at most ``MAX_HOLD_S``), so a test decides how long a run holds the
``vllm`` pool slot, and which process to kill. In-process executor: the step runs in the run's process.
"""

import os
import time
from pathlib import Path

import dagster as dg

MAX_HOLD_S = 300

partitions = dg.StaticPartitionsDefinition([f"p{i}" for i in range(1, 9)])


def _hold(context: dg.AssetExecutionContext) -> None:
    guard = Path(os.environ["MKG_TEST_GUARD_DIR"])
    partition = context.partition_key
    (guard / f"started-{partition}-{context.run_id}").write_text(str(os.getpid()))
    deadline = time.monotonic() + MAX_HOLD_S
    while not (guard / f"release-{partition}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)


@dg.asset(partitions_def=partitions, pool="vllm")
def slot_holder(context: dg.AssetExecutionContext) -> None:
    _hold(context)


@dg.asset(partitions_def=partitions)
def partition_worker(context: dg.AssetExecutionContext) -> None:
    _hold(context)


@dg.asset(partitions_def=partitions)
def rendered(context: dg.AssetExecutionContext) -> None:
    (Path(os.environ["MKG_TEST_GUARD_DIR"]) / f"rendered-{context.partition_key}-{context.run_id}").touch()


@dg.asset(partitions_def=partitions, pool="vllm", deps=[rendered])
def vlm_holder(context: dg.AssetExecutionContext) -> None:
    _hold(context)


slot_job = dg.define_asset_job("slot_job", selection=[slot_holder], executor_def=dg.in_process_executor)
partition_job = dg.define_asset_job("partition_job", selection=[partition_worker], executor_def=dg.in_process_executor)

batch_job = dg.define_asset_job("batch_job", selection=[rendered, vlm_holder], executor_def=dg.in_process_executor)

defs = dg.Definitions(
    assets=[slot_holder, partition_worker, rendered, vlm_holder], jobs=[slot_job, partition_job, batch_job]
)
