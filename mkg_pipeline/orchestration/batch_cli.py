"""One sensor tick from the command line: turn what is in incoming/ into batches (dynamic partitions).

For CI and scripts that run `dagster asset materialize` without a daemon:

    python -m mkg_pipeline.orchestration.batch_cli            # prints one batch id per line
    batch="$(python -m mkg_pipeline.orchestration.batch_cli | head -1)"
    dagster asset materialize -m mkg_pipeline --select '*' --partition "$batch"

It evaluates the real ``incoming_pdfs_sensor`` against the instance in
``$DAGSTER_HOME``, registers the partitions it asks for and stores the
sensor's cursor in ``$DAGSTER_HOME/mkg_batch_cli.cursor`` so that a second call
does not batch the same objects again. A batch whose run failed or was canceled
(as recorded in that instance) with objects still in ``incoming/`` is printed again.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import dagster as dg


def run_sensor_tick(instance: dg.DagsterInstance, cursor: str | None = None) -> dg.SensorResult:
    """Evaluate incoming_pdfs_sensor once, as the daemon would, and register its partitions."""
    from mkg_pipeline.orchestration.assets import ingest_batches
    from mkg_pipeline.orchestration.definitions import defs
    from mkg_pipeline.orchestration.resources import S3StorageResource
    from mkg_pipeline.orchestration.sensors import incoming_pdfs_sensor

    with dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"s3": S3StorageResource()}, definitions=defs
    ) as context:
        result = incoming_pdfs_sensor(context)
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(ingest_batches.name, list(request.partition_keys))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mkg_pipeline.orchestration.batch_cli",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.parse_args(argv)
    from mkg_pipeline.orchestration.instance import DagsterHomeUnusable, check_dagster_home

    try:
        # also when $DAGSTER_HOME has no dagster.yaml of ours (whose storage runs the same check)
        if os.environ.get("DAGSTER_HOME"):
            check_dagster_home(os.environ["DAGSTER_HOME"])
        instance = dg.DagsterInstance.get()
    except DagsterHomeUnusable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cursor_file = Path(instance.root_directory) / "mkg_batch_cli.cursor"
    cursor = cursor_file.read_text() if cursor_file.exists() else None
    result = run_sensor_tick(instance, cursor)
    if result.cursor is not None:
        cursor_file.write_text(result.cursor)
    requests = result.run_requests or []
    if not requests:
        print(f"no new batch: {result.skip_reason or 'nothing new in incoming/'}", file=sys.stderr)
        return 1
    for request in requests:
        print(request.partition_key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
