"""How much a sensor tick costs as the bucket fills up: tick time and cursor size, side by side in one run.

Starts a moto S3 server on 127.0.0.1 and times the real ``incoming_pdfs_sensor`` (cursor carried
like the daemon does, a real Dagster instance in a temp DAGSTER_HOME) in four situations:

  empty      nothing stored anywhere (the floor)
  processed  N documents already ingested and drained to raw/ (the steady state)
  new        N objects just dropped into incoming/: the first tick (it requests at most
             MAX_BATCHES_PER_TICK batches; the rest follow on later ticks)
  requested  N objects waiting in incoming/, all already requested (their runs are queued):
             every tick must list them, and must not re-request them

For each: median tick time over --repeat ticks, the time of the incoming/ listing alone (what S3
costs, apart from the sensor's own work), and the cursor's size in bytes; for the last one also the
planning alone. Note: moto answers each ListObjectsV2 page in time proportional to the bucket, so a
listing of N objects costs O(N^2) there; S3 and MinIO answer a page in roughly constant time.

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


class Ticker:
    def __init__(self, bucket: str, dagster_home: str) -> None:
        import dagster as dg

        from mkg_pipeline.config import get_settings

        os.environ["MKG_STORAGE__BUCKET"] = bucket
        get_settings.cache_clear()  # settings are loaded once per process: load this bucket's
        self.instance = dg.DagsterInstance.from_config(dagster_home)
        self.cursor: str | None = None

    def tick(self) -> tuple[float, int]:
        """One tick: (seconds, run requests)."""
        import dagster as dg

        from mkg_pipeline.orchestration.definitions import defs
        from mkg_pipeline.orchestration.resources import S3StorageResource
        from mkg_pipeline.orchestration.sensors import incoming_pdfs_sensor

        with dg.build_sensor_context(
            instance=self.instance, cursor=self.cursor, resources={"s3": S3StorageResource()}, definitions=defs
        ) as context:
            started = time.perf_counter()
            result = incoming_pdfs_sensor(context)
            elapsed = time.perf_counter() - started
        self.cursor = result.cursor
        return elapsed, len(result.run_requests or [])

    def planning_s(self) -> float:
        """The sensor's own work on the listing (plan_tick), apart from S3: median of 3."""
        from mkg_pipeline.config import get_settings
        from mkg_pipeline.orchestration.resources import S3StorageResource
        from mkg_pipeline.stages.sensor_plan import Cursor, ListedObject, plan_tick

        storage = S3StorageResource().storage()
        listing = [
            ListedObject(o.key, o.etag, o.size, o.last_modified.timestamp() if o.last_modified else 0.0)
            for o in storage.list_objects(storage.incoming_prefix)
        ]
        cursor = Cursor.load(self.cursor)
        timings = []
        for _ in range(3):
            started = time.perf_counter()
            plan_tick(listing, cursor, batch_size=get_settings().workers.batch_size)
            timings.append(time.perf_counter() - started)
        return statistics.median(timings)

    def listing_s(self) -> float:
        from mkg_pipeline.orchestration.resources import S3StorageResource

        storage = S3StorageResource().storage()
        started = time.perf_counter()
        sum(1 for _ in storage.list_objects(storage.incoming_prefix))
        return time.perf_counter() - started


def _row(name: str, ticks: list[float], listing: float, cursor: str | None, note: str) -> None:
    print(
        f"{name:10s} tick median {statistics.median(ticks) * 1000:9.1f} ms   listing alone {listing * 1000:9.1f} ms"
        f"   cursor {len(cursor or ''):7d} bytes   {note}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    import boto3

    from mkg_devstack.local_stack import moto_s3_server
    from mkg_pipeline.stages.sensor_plan import MAX_BATCHES_PER_TICK

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
        print(f"batch size 500, at most {MAX_BATCHES_PER_TICK} batches per tick\n")

        medians = {}
        for name in ("empty", "processed"):
            ticker = Ticker(f"bench-{name}", str(workdir))
            ticks = [ticker.tick()[0] for _ in range(args.repeat + 1)][1:]
            medians[name] = statistics.median(ticks)
            _row(name, ticks, ticker.listing_s(), ticker.cursor, "")

        ticker = Ticker("bench-backlog", str(workdir))
        first, requested = ticker.tick()
        _row("new", [first], ticker.listing_s(), ticker.cursor, f"(first tick: {requested} batch(es) requested)")
        medians["new"] = first
        drained_ticks = 1
        while requested:  # request the whole backlog, as the daemon's next ticks would
            _, requested = ticker.tick()
            drained_ticks += 1
        ticks = [ticker.tick() for _ in range(args.repeat)]
        assert all(requests == 0 for _, requests in ticks), "already-requested objects were requested again"
        medians["requested"] = statistics.median(t for t, _ in ticks)
        _row(
            "requested",
            [t for t, _ in ticks],
            ticker.listing_s(),
            ticker.cursor,
            f"(after {drained_ticks} ticks requested all {args.objects}; then 0 requests per tick)",
        )
        print(f"{'':10s} of which planning (plan_tick, no S3) {ticker.planning_s() * 1000:.1f} ms")
        base = medians["empty"]
        print(
            f"\nratios vs empty bucket: processed {medians['processed'] / base:.1f}x, first tick of {args.objects} "
            f"new objects {medians['new'] / base:.1f}x, {args.objects} already-requested objects "
            f"{medians['requested'] / base:.1f}x"
        )


if __name__ == "__main__":
    main()
