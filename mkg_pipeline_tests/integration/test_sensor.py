"""The real incoming_pdfs_sensor against moto S3 and a real Dagster instance (temp DAGSTER_HOME), in-process.

No VLM server and no run is executed: runs are recorded in the instance in the state the daemon would
leave them (queued, failed, canceled), which is all the sensor asks the instance about.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.remote_origin import InProcessCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

from mkg_pipeline.storage import Storage

pytestmark = pytest.mark.integration

# Queued runs must name where their job comes from; this one is never launched.
_ORIGIN = RemoteJobOrigin(
    RemoteRepositoryOrigin(
        InProcessCodeLocationOrigin(LoadableTargetOrigin(module_name="mkg_pipeline.orchestration.definitions")),
        "__repository__",
    ),
    "ingest_job",
)


@dataclass
class SensorEnv:
    storage: Storage
    instance: dg.DagsterInstance
    cursor: str | None = None

    def drop(self, *names: str, data: bytes = b"%PDF-1.4 stub") -> None:
        for name in names:
            self.storage.put_bytes(f"{self.storage.incoming_prefix}{name}", data)

    def tick(self) -> dg.SensorResult:
        from mkg_pipeline.orchestration.batch_cli import run_sensor_tick

        result = run_sensor_tick(self.instance, self.cursor)
        self.cursor = result.cursor
        return result

    def batch_objects(self, batch_id: str) -> list[str]:
        return [o["key"] for o in self.storage.get_json(self.storage.batch_key(batch_id))["objects"]]

    def record_run(self, request: dg.RunRequest, status: DagsterRunStatus) -> str:
        """A run of ingest_job for the request, as the daemon would have created it, in ``status``."""
        run_id = str(uuid.uuid4())
        tags = {
            **(request.tags or {}),
            "dagster/partition": request.partition_key,
            "dagster/run_key": request.run_key,
            "dagster/sensor_name": "incoming_pdfs_sensor",
        }
        self.instance.add_run(
            DagsterRun(job_name="ingest_job", run_id=run_id, tags=tags, status=status, remote_job_origin=_ORIGIN)
        )
        return run_id

    def set_status(self, run_id: str, status: DagsterRunStatus) -> None:
        """Fail or cancel a run the way the run worker or the run monitoring daemon reports it."""
        run = self.instance.get_run_by_id(run_id)
        assert run is not None
        if status == DagsterRunStatus.FAILURE:
            self.instance.report_run_failed(run, "killed in a test")
        elif status == DagsterRunStatus.CANCELED:
            self.instance.report_run_canceled(run, "canceled in a test")
        else:
            raise ValueError(status)
        updated = self.instance.get_run_by_id(run_id)
        assert updated is not None and updated.status == status


@pytest.fixture
def sensor_env(
    tmp_path: Path, storage_config, storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> Iterator[SensorEnv]:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("MKG_STORAGE__ENDPOINT_URL", str(storage_config.endpoint_url))
    monkeypatch.setenv("MKG_STORAGE__BUCKET", storage_config.bucket)
    monkeypatch.setenv("MKG_STORAGE__ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("MKG_STORAGE__SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("MKG_WORKERS__BATCH_SIZE", "10")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        yield SensorEnv(storage=storage, instance=instance)


def _requested_keys(env: SensorEnv, result: dg.SensorResult) -> list[str]:
    return [key for r in result.run_requests or [] for key in env.batch_objects(r.partition_key)]


def test_new_unchanged_and_replaced_objects(sensor_env: SensorEnv) -> None:
    assert not sensor_env.tick().run_requests
    sensor_env.drop("a.pdf", "b.pdf")
    first = sensor_env.tick()
    (request,) = first.run_requests
    assert request.run_key == request.partition_key
    assert sorted(_requested_keys(sensor_env, first)) == ["incoming/a.pdf", "incoming/b.pdf"]
    assert sensor_env.instance.has_dynamic_partition("ingest_batches", request.partition_key)

    assert not sensor_env.tick().run_requests  # unchanged: already requested

    sensor_env.drop("b.pdf", data=b"%PDF-1.4 other bytes")  # replaced under the same name: new work
    replaced = sensor_env.tick()
    assert _requested_keys(sensor_env, replaced) == ["incoming/b.pdf"]
    assert replaced.run_requests[0].run_key != request.run_key
    assert not sensor_env.tick().run_requests


def test_same_bytes_dropped_again_after_ingest_is_new_work(sensor_env: SensorEnv) -> None:
    sensor_env.drop("a.pdf")
    (first,) = sensor_env.storage.list_objects(sensor_env.storage.incoming_prefix)
    assert first.last_modified is not None
    assert len(sensor_env.tick().run_requests) == 1
    sensor_env.storage.delete("incoming/a.pdf")  # raw_pdfs drained it
    assert not sensor_env.tick().run_requests
    # A real wait, kept: identical bytes have the same ETag, so only LastModified tells the new copy apart,
    # and S3 (moto too) gives it to the second; no clock of ours sets it. Wait only for the next second after
    # the first copy's (the ticks above took part of it). plan_tick's handling of a later LastModified is
    # tested on fake timestamps in unit/test_sensor_plan.py.
    time.sleep(max(0.0, first.last_modified.timestamp() + 1.0 - time.time()))
    sensor_env.drop("a.pdf")  # identical bytes, same ETag, dropped again
    assert _requested_keys(sensor_env, sensor_env.tick()) == ["incoming/a.pdf"]


def test_cursor_does_not_grow_with_the_backlog(sensor_env: SensorEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """Row 16: the cursor held every pending key; now its size is bounded whatever the backlog."""
    from mkg_pipeline.stages import sensor_plan

    # Small bounds so that a backlog of 120 objects exceeds them (defaults: 20 batches, 500 keys).
    monkeypatch.setattr(sensor_plan, "MAX_BATCHES_PER_TICK", 3, raising=False)
    monkeypatch.setattr(sensor_plan, "RECENT_LIMIT", 8, raising=False)
    keys = [f"incoming/doc-{i:04d}.pdf" for i in range(120)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: sensor_env.storage.put_bytes(key, b"%PDF-1.4"), keys))

    requested: list[str] = []
    sizes = []
    for _ in range(10):
        result = sensor_env.tick()
        sizes.append(len(result.cursor or ""))
        requested.extend(_requested_keys(sensor_env, result))
    assert sorted(requested) == keys  # each exactly once
    assert len(requested) == len(set(requested))
    assert max(sizes) < 2000, f"cursor sizes per tick: {sizes}"


def test_queued_run_is_never_requested_again_by_age(sensor_env: SensorEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """Row 16: objects whose run merely waited 6 h in the queue were batched again."""
    sensor_env.drop("a.pdf", "b.pdf")
    (request,) = sensor_env.tick().run_requests
    sensor_env.record_run(request, DagsterRunStatus.QUEUED)

    later = time.time() + 7 * 3600
    monkeypatch.setattr(time, "time", lambda: later)
    assert not sensor_env.tick().run_requests


def test_objects_of_a_failed_run_are_requested_again_once(sensor_env: SensorEnv) -> None:
    """Row 16: re-request only what the instance says failed or was canceled, for the same batch."""
    sensor_env.drop("a.pdf", "b.pdf")
    (request,) = sensor_env.tick().run_requests
    batch = request.partition_key
    run_id = sensor_env.record_run(request, DagsterRunStatus.STARTED)
    assert not sensor_env.tick().run_requests  # running: nothing to do

    sensor_env.set_status(run_id, DagsterRunStatus.FAILURE)
    (retry,) = sensor_env.tick().run_requests
    assert retry.partition_key == batch  # the same batch (its manifest keeps the accounting), a new run key
    assert retry.run_key != request.run_key
    assert not sensor_env.tick().run_requests  # the failure is handled once

    retry_run = sensor_env.record_run(retry, DagsterRunStatus.STARTED)
    sensor_env.set_status(retry_run, DagsterRunStatus.CANCELED)
    (second,) = sensor_env.tick().run_requests
    assert second.partition_key == batch and second.run_key not in {request.run_key, retry.run_key}

    # A failed run whose objects all left incoming/ (ingested, then a later step failed) is not re-requested.
    sensor_env.record_run(second, DagsterRunStatus.STARTED)
    for key in ("incoming/a.pdf", "incoming/b.pdf"):
        sensor_env.storage.delete(key)
    last = sensor_env.instance.get_runs(dg.RunsFilter(tags={"dagster/run_key": second.run_key}))[0]
    sensor_env.set_status(last.run_id, DagsterRunStatus.FAILURE)
    assert not sensor_env.tick().run_requests


def test_cursor_is_json_with_a_version(sensor_env: SensorEnv) -> None:
    sensor_env.drop("a.pdf")
    result = sensor_env.tick()
    assert json.loads(result.cursor or "{}").get("v") is not None


def test_a_corrupt_manifest_of_a_failed_run_does_not_stop_the_sensor(sensor_env: SensorEnv) -> None:
    """Issue 21 row 10: the manifest of a failed batch that is `[]` crashed every tick (AttributeError)."""
    sensor_env.drop("a.pdf")
    (request,) = sensor_env.tick().run_requests
    run_id = sensor_env.record_run(request, DagsterRunStatus.STARTED)
    sensor_env.storage.put_bytes(sensor_env.storage.batch_key(request.partition_key), b"[]")
    sensor_env.set_status(run_id, DagsterRunStatus.FAILURE)
    sensor_env.drop("b.pdf")
    result = sensor_env.tick()  # the corrupt batch is skipped with a warning, new objects are still batched
    assert _requested_keys(sensor_env, result) == ["incoming/b.pdf"]
