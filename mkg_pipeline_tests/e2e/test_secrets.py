"""Secrets the Dagster way (issue 9 row 12): the API key and the S3 secret reach the resources as
``dg.EnvVar`` and never land in the instance's storage (runs.db, event logs, compute logs)."""

from __future__ import annotations

import json
import secrets
import sqlite3
import zlib
from contextlib import closing, suppress
from pathlib import Path

import dagster as dg
import pytest

from mkg_pipeline.orchestration.assets import pipeline_assets
from mkg_pipeline.orchestration.resources import S3StorageResource, VLLMResource
from mkg_pipeline_tests.e2e.campaign import tiny_pdf
from mkg_pipeline_tests.e2e.conftest import PipelineEnv
from mkg_pipeline_tests.fixtures.corpus import REPO_ROOT

pytestmark = pytest.mark.e2e


def stored_copies(home: Path, secret: str) -> list[str]:
    """Every place under DAGSTER_HOME that holds ``secret``: raw file bytes, and every value of every
    SQLite table (Dagster zlib-compresses snapshots, so blobs are decompressed before looking)."""
    needle = secret.encode()
    found = set()
    for path in sorted(p for p in home.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if needle in data:
            found.add(str(path.relative_to(home)))
        if not data.startswith(b"SQLite format 3"):
            continue
        with closing(sqlite3.connect(path)) as db:
            for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
                for row in db.execute(f'SELECT * FROM "{table}"'):
                    for value in row:
                        if isinstance(value, str):
                            value = value.encode()
                        if isinstance(value, bytes):
                            with suppress(zlib.error):
                                value = zlib.decompress(value)
                            if needle in value:
                                found.add(f"{path.relative_to(home)}:{table}")
    return sorted(found)


def resource_defaults(instance: dg.DagsterInstance, run_id: str) -> dict[str, dict]:
    """The resource config the instance stored with the run's job snapshot."""
    run = instance.get_run_by_id(run_id)
    assert run is not None and run.job_snapshot_id is not None
    snapshot = instance.get_job_snapshot(run.job_snapshot_id)
    return {
        resource.name: json.loads(resource.config_field_snap.default_value_as_json_str or "{}")
        for mode in snapshot.mode_def_snaps
        for resource in mode.resource_def_snaps
        if resource.config_field_snap is not None
    }


def test_secrets_reach_the_resources_as_env_vars_and_stay_out_of_the_run_storage(
    pipeline_env: PipelineEnv, local_vlm_server
) -> None:
    api_key = local_vlm_server.api_key  # the server refuses requests without it
    s3_secret = f"s3-secret-{secrets.token_hex(12)}"  # moto accepts any secret key
    pipeline_env.upload("document.pdf", data=tiny_pdf("secrets"))
    batch = pipeline_env.tick().run_requests[0].partition_key
    before = local_vlm_server.read_metric("vllm:request_success_total")

    # `dagster asset materialize -m mkg_pipeline`: the code location's Definitions, secrets in the env
    process = pipeline_env.materialize_cli(batch, extra_env={"MKG_STORAGE__SECRET_ACCESS_KEY": s3_secret})
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    assert local_vlm_server.read_metric("vllm:request_success_total") > before, "the key reached the server"

    (run,) = pipeline_env.instance.get_runs()
    defaults = resource_defaults(pipeline_env.instance, run.run_id)
    assert defaults["vllm"]["api_key"] == {"env": "MKG_VLLM__API_KEY"}
    assert defaults["s3"]["secret_access_key"] == {"env": "MKG_STORAGE__SECRET_ACCESS_KEY"}
    assert stored_copies(pipeline_env.home, api_key) == []
    assert stored_copies(pipeline_env.home, s3_secret) == []

    # What the scan would find: a key given as a literal (row 12's fault) is stored in runs.db.
    literal = dg.materialize(
        pipeline_assets,
        partition_key=batch,
        instance=pipeline_env.instance,
        resources={"s3": S3StorageResource(), "vllm": VLLMResource(api_key=api_key)},
    )
    assert literal.success
    assert "history/runs.db:snapshots" in stored_copies(pipeline_env.home, api_key)


def test_api_key_stays_optional(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server without auth: MKG_VLLM__API_KEY unset must not fail the run (an EnvVar of an unset
    variable would: Dagster refuses to start the run)."""
    from mkg_pipeline.orchestration.resources import pipeline_resources

    monkeypatch.delenv("MKG_VLLM__API_KEY", raising=False)
    monkeypatch.delenv("MKG_STORAGE__SECRET_ACCESS_KEY", raising=False)
    seen = {}

    @dg.asset
    def server_settings(vllm: VLLMResource) -> None:
        seen["config"] = vllm.pipeline_config()

    (tmp_path / "dagster.yaml").write_text((REPO_ROOT / "dagster.yaml").read_text())
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        result = dg.materialize([server_settings], instance=instance, resources={"vllm": pipeline_resources()["vllm"]})
    assert result.success
    assert seen["config"].vllm.api_key is None
