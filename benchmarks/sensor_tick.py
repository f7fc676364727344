"""How much a sensor tick costs as the bucket fills up, measured side by side in one run.

Starts a moto S3 server on 127.0.0.1 and times the real ``incoming_pdfs_sensor``
(median of --repeat ticks, cursor carried like the daemon does) in three buckets:

  empty      nothing stored anywhere (the floor)
  processed  N documents already ingested and drained to raw/ (the steady state)
  backlog    N objects still waiting in incoming/, all already requested (worst case:
             the runs have not drained them yet, so the tick must list them)

    python benchmarks/sensor_tick.py [--objects 10000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _populate(client, bucket: str, prefix: str, n: int) -> None:
    def put(i: int) -> None:
        client.put_object(Bucket=bucket, Key=f"{prefix}{i:07d}.pdf", Body=b"%PDF-1.4 stub")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(n)))


def _time_ticks(bucket: str, repeat: int, dagster_home: str) -> tuple[float, int]:
    import dagster as dg

    from mkg_pipeline.definitions import defs
    from mkg_pipeline.resources import S3StorageResource
    from mkg_pipeline.sensors import incoming_pdfs_sensor

    os.environ["MKG_STORAGE__BUCKET"] = bucket
    instance = dg.DagsterInstance.from_config(dagster_home)
    cursor = None
    timings = []
    requested = 0
    for i in range(repeat + 1):
        with dg.build_sensor_context(
            instance=instance, cursor=cursor, resources={"s3": S3StorageResource()}, definitions=defs
        ) as context:
            started = time.perf_counter()
            result = incoming_pdfs_sensor(context)
            elapsed = time.perf_counter() - started
        cursor = result.cursor
        if i == 0:
            requested = sum(1 for _ in result.run_requests or [])  # first tick requests the backlog
        else:
            timings.append(elapsed)
    return statistics.median(timings), requested


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    import boto3

    from mkg_pipeline.local_stack import moto_s3_server

    workdir = Path(tempfile.mkdtemp(prefix="mkg-sensor-bench-"))
    (workdir / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with moto_s3_server(workdir / "logs") as s3:
        os.environ.update(
            {
                "MKG_STORAGE__ENDPOINT_URL": s3.url,
                "MKG_STORAGE__ACCESS_KEY_ID": "testing",
                "MKG_STORAGE__SECRET_ACCESS_KEY": "testing",
                "MKG_WORKERS__BATCH_SIZE": "500",
            }
        )
        client = boto3.client(
            "s3",
            endpoint_url=s3.url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        for bucket in ("bench-empty", "bench-processed", "bench-backlog"):
            client.create_bucket(Bucket=bucket)
        print(f"populating {args.objects} objects twice (moto on {s3.url}) ...")
        _populate(client, "bench-processed", "raw/", args.objects)
        _populate(client, "bench-backlog", "incoming/", args.objects)

        results = {}
        for name in ("empty", "processed", "backlog"):
            median, first = _time_ticks(f"bench-{name}", args.repeat, str(workdir))
            results[name] = median
            print(f"{name:10s} median tick {median * 1000:8.1f} ms   (first tick requested {first} batch(es))")
        base = results["empty"]
        print(
            f"\nratios vs empty bucket: processed {results['processed'] / base:.2f}x, "
            f"backlog of {args.objects} already-requested objects {results['backlog'] / base:.2f}x"
        )


if __name__ == "__main__":
    main()
