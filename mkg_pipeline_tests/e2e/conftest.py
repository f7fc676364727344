"""A real pipeline environment: moto S3 server, local VLM server, Dagster instance in a temp DAGSTER_HOME."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from mkg_pipeline_tests.fixtures.corpus import REPO_ROOT, corpus_pdf

ALL_ASSETS = "raw_pdfs,parsed_pages,vlm_outputs,quality_baseline_diffs"


@dataclass
class PipelineEnv:
    env: dict[str, str]
    home: Path
    storage: Any
    instance: dg.DagsterInstance
    cursor: str | None = None
    runs: list[str] = field(default_factory=list)

    def upload(self, *names: str, as_name: str | None = None, data: bytes | None = None) -> list[str]:
        keys = []
        for name in names:
            key = f"{self.storage.incoming_prefix}{as_name or name}"
            self.storage.put_bytes(key, data if data is not None else corpus_pdf(name).read_bytes())
            keys.append(key)
        return keys

    def tick(self) -> dg.SensorResult:
        """One evaluation of the real sensor against this instance, carrying the cursor like the daemon."""
        from mkg_pipeline.orchestration.batch_cli import run_sensor_tick

        result = run_sensor_tick(self.instance, self.cursor)
        self.cursor = result.cursor
        return result

    def batch_cli(self) -> subprocess.CompletedProcess[str]:
        """`python -m mkg_pipeline.orchestration.batch_cli`: one sensor tick from the shell, as CI creates a batch."""
        return subprocess.run(
            [sys.executable, "-m", "mkg_pipeline.orchestration.batch_cli"],
            cwd=REPO_ROOT,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=300,
        )

    def materialize_cli(
        self, partition: str, select: str = ALL_ASSETS, extra_env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`dagster asset materialize -m mkg_pipeline ...`, exactly as CI users run it."""
        dagster = Path(sys.executable).parent / "dagster"
        process = subprocess.run(
            [str(dagster), "asset", "materialize", "-m", "mkg_pipeline", "--select", select, "--partition", partition],
            cwd=REPO_ROOT,
            env={**os.environ, **self.env, **(extra_env or {})},
            capture_output=True,
            text=True,
            timeout=900,
        )
        return process

    def materialize(
        self, partition: str, run_config: dict | None = None, select: str | None = None
    ) -> dg.ExecuteInProcessResult:
        """In this process (no Dagster start-up to pay); ``select`` as the CLI's ``--select``, default all."""
        from mkg_pipeline.orchestration.assets import pipeline_assets
        from mkg_pipeline.orchestration.resources import pipeline_resources

        return dg.materialize(
            pipeline_assets,
            selection=select.split(",") if select else None,
            partition_key=partition,
            instance=self.instance,
            resources=pipeline_resources(),  # what the code location uses
            run_config=run_config,
            raise_on_error=False,
        )

    def check_evaluations(self) -> dict[str, list[dg.AssetCheckEvaluation]]:
        evaluations: dict[str, list[dg.AssetCheckEvaluation]] = {}
        for record in self.instance.get_event_records(
            dg.EventRecordsFilter(event_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
        ):
            evaluation = record.event_log_entry.dagster_event.event_specific_data
            evaluations.setdefault(evaluation.check_name, []).append(evaluation)
        return evaluations


@pytest.fixture
def pipeline_env(
    tmp_path: Path, storage_config: Any, storage: Any, local_vlm_server: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[PipelineEnv]:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    env = {
        "DAGSTER_HOME": str(home),
        "MKG_STORAGE__ENDPOINT_URL": str(storage_config.endpoint_url),
        "MKG_STORAGE__BUCKET": storage_config.bucket,
        "MKG_STORAGE__ACCESS_KEY_ID": "testing",
        "MKG_STORAGE__SECRET_ACCESS_KEY": "testing",
        "MKG_VLLM__URL": local_vlm_server.url,
        "MKG_VLLM__API_KEY": local_vlm_server.api_key,
        "MKG_VLLM__MODEL": local_vlm_server.model,
        "MKG_ENGINE": "page_markdown",
        # Letter pages at about 100 dpi (1,100 px on the long side) keep CPU OCR affordable in CI; the
        # engines' own sizes are measured by the integration tests.
        "MKG_PAGE_IMAGES__PAGE_MARKDOWN__LONGEST_SIDE_PX": "1100",
        "MKG_PAGE_IMAGES__MINERU__LONGEST_SIDE_PX": "1100",
        # These tests are about the VLM path (requests, caching, faults): every page goes to the server.
        # Routing (routing.mode auto, the default) has tests of its own that set it back.
        "MKG_ROUTING__MODE": "vlm",
        "MKG_HTTP_CLIENT__BACKOFF_INITIAL_S": "0.1",
        "MKG_HTTP_CLIENT__BACKOFF_MAX_S": "0.5",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        yield PipelineEnv(env=env, home=home, storage=storage, instance=instance)


@pytest.fixture(scope="session")
def campaign_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The fault campaign's local VLM server: fault injection on (every fault off between cases), room for
    many requests at once."""
    import secrets

    from mkg_pipeline_tests.fixtures.local_server import _new_server

    server = _new_server(
        tmp_path_factory.mktemp("campaign-vlm"),
        api_key=f"campaign-{secrets.token_hex(8)}",
        max_num_seqs=8,
        enable_fault_injection=True,
    )
    with server:
        yield server


@pytest.fixture
def campaign(
    pipeline_env: PipelineEnv,
    campaign_server: Any,
    storage_config: Any,
    tcp_proxy: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Any]:
    """One case of the fault campaign (e2e/campaign.py): the pipeline reaches S3 through a proxy the case can
    cut, and the campaign server with every fault off; a short batch lease; every CLI run killed at teardown."""
    from mkg_devstack.local_server.settings import FaultSettings
    from mkg_pipeline_tests.e2e.campaign import LEASE_TTL_S, Campaign

    campaign_server.set_faults(**FaultSettings().to_dict())
    proxy = tcp_proxy(str(storage_config.endpoint_url))
    case = Campaign(pipeline_env, campaign_server, proxy, monkeypatch)
    case.set_env(
        MKG_STORAGE__ENDPOINT_URL=proxy.url,
        MKG_VLLM__URL=campaign_server.url,
        MKG_VLLM__API_KEY=campaign_server.api_key,
        MKG_VLLM__MODEL=campaign_server.model,
        MKG_WORKERS__LEASE_TTL_S=str(LEASE_TTL_S),
        MKG_CIRCUIT_BREAKER__RECOVERY_TIMEOUT_S="1",
    )
    try:
        yield case
    finally:
        case.stop_cli_runs()
