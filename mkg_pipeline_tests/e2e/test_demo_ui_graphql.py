"""What a Dagster user sees after the demo (issue 20), asked of the demo's own webserver through Dagster's
GraphQL API (the ``dagster-graphql`` client), as the UI asks it.

The demo runs its ``--serve-ui`` path on a cheap set (a one-page PDF and an encrypted one): ``dagster dev``
first, then the files dropped into ``incoming/``; the daemon's sensor requests the runs and the daemon
launches them. Then: the runs belong to ``ingest_job`` (not ``__ephemeral_asset_job__``) and one is
re-executed from its parent, as the UI's "Re-execute" button does; the sensor has ticks with run requests;
the daemons are running; ``bucket_accounting`` was evaluated for the batch and passed; ``baseline_similarity``
with no golden baseline is not a pass.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dagster_graphql import DagsterGraphQLClient

from mkg_devstack.local_stack import LOOPBACK
from mkg_pipeline_tests.e2e.demo_process import DemoProcess

pytestmark = pytest.mark.e2e

JOB = "ingest_job"
LOCATION = "mkg_pipeline"
RUN_S = 600  # a bounded wait for the re-executed run (CPU OCR of one page on a shared machine)

RUNS = """
query { runsOrError { ... on Runs { results { runId jobName status tags { key value } } } } }
"""
REEXECUTE = """
mutation($parentRunId: String!) {
  launchPipelineReexecution(reexecutionParams: {parentRunId: $parentRunId, strategy: ALL_STEPS}) {
    __typename
    ... on LaunchRunSuccess { run { runId jobName } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""
SENSOR_TICKS = """
query($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) {
    __typename
    ... on Sensor { sensorState { status ticks(limit: 50) { status runIds skipReason } } }
  }
}
"""
DAEMONS = "query { instance { daemonHealth { allDaemonStatuses { daemonType required healthy } } } }"
CHECK_EXECUTIONS = """
query($asset: AssetKeyInput!, $check: String!) {
  assetCheckExecutions(assetKey: $asset, checkName: $check, limit: 10) {
    runId status partition evaluation { success severity description partition }
  }
}
"""


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoProcess]:
    tmp_path: Path = tmp_path_factory.mktemp("demo-ui")
    with DemoProcess.start(tmp_path, ["minimal-document.pdf", "bad-encrypted-password.pdf"]) as process:
        process.wait_for("serving the Dagster UI")
        yield process


@pytest.fixture(scope="module")
def client(demo: DemoProcess) -> DagsterGraphQLClient:
    return DagsterGraphQLClient(LOOPBACK, port_number=demo.ui_port, timeout=60)


def _query(client: DagsterGraphQLClient, query: str, **variables: Any) -> dict[str, Any]:
    return client._execute(query, variables)  # the public methods cover a few queries only


def _runs(client: DagsterGraphQLClient) -> list[dict[str, Any]]:
    return list(_query(client, RUNS)["runsOrError"]["results"])


def test_runs_belong_to_the_named_job_and_can_be_reexecuted(client: DagsterGraphQLClient) -> None:
    runs = _runs(client)
    assert runs and {r["jobName"] for r in runs} == {JOB}, runs  # no __ephemeral_asset_job__
    assert all(r["status"] == "SUCCESS" for r in runs), runs
    tags = {t["key"]: t["value"] for t in runs[-1]["tags"]}
    assert tags["dagster/sensor_name"] == "incoming_pdfs_sensor"
    assert tags["dagster/partition"].startswith("b")

    launched = _query(client, REEXECUTE, parentRunId=runs[-1]["runId"])["launchPipelineReexecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    assert launched["run"]["jobName"] == JOB
    run_id = launched["run"]["runId"]
    deadline = time.monotonic() + RUN_S
    while (status := client.get_run_status(run_id).value) not in {"SUCCESS", "FAILURE", "CANCELED"}:
        assert time.monotonic() < deadline, f"re-executed run {run_id} still {status} after {RUN_S}s"
        time.sleep(1)
    assert status == "SUCCESS"


def test_the_sensor_ticked_with_run_requests(client: DagsterGraphQLClient) -> None:
    selector = {"repositoryLocationName": LOCATION, "repositoryName": "__repository__"}
    result = _query(client, SENSOR_TICKS, selector={**selector, "sensorName": "incoming_pdfs_sensor"})
    sensor = result["sensorOrError"]
    assert sensor["__typename"] == "Sensor", sensor
    assert sensor["sensorState"]["status"] == "RUNNING"
    ticks = sensor["sensorState"]["ticks"]
    assert not [t for t in ticks if t["status"] == "FAILURE"], ticks  # e.g. a tick before the bucket existed
    requested = [t for t in ticks if t["status"] == "SUCCESS" and t["runIds"]]
    assert requested, ticks
    assert {run["runId"] for run in _runs(client)} >= {run_id for tick in requested for run_id in tick["runIds"]}


def test_the_daemons_are_running(client: DagsterGraphQLClient) -> None:
    statuses = _query(client, DAEMONS)["instance"]["daemonHealth"]["allDaemonStatuses"]
    by_type = {s["daemonType"]: s for s in statuses}
    for daemon in ("SENSOR", "SCHEDULER", "QUEUED_RUN_COORDINATOR"):
        assert by_type[daemon]["healthy"], statuses
    assert all(s["healthy"] for s in statuses if s["required"]), statuses


def test_bucket_accounting_was_evaluated_for_the_batch_and_passed(client: DagsterGraphQLClient) -> None:
    executions = _query(client, CHECK_EXECUTIONS, asset={"path": ["vlm_outputs"]}, check="bucket_accounting")
    runs = {r["runId"]: r for r in _runs(client)}
    executions = [e for e in executions["assetCheckExecutions"] if e["runId"] in runs]
    assert executions
    for execution in executions:
        assert execution["status"] == "SUCCEEDED", execution
        assert execution["evaluation"]["success"]
        # tied to the batch, as the UI shows it against the partition
        batch = {t["key"]: t["value"] for t in runs[execution["runId"]]["tags"]}["dagster/partition"]
        assert execution["partition"] == execution["evaluation"]["partition"] == batch


def test_a_baseline_check_without_a_baseline_is_not_a_pass(client: DagsterGraphQLClient) -> None:
    result = _query(client, CHECK_EXECUTIONS, asset={"path": ["quality_baseline_diffs"]}, check="baseline_similarity")
    executions = result["assetCheckExecutions"]
    assert executions
    for execution in executions:
        assert execution["status"] != "SUCCEEDED", execution
        assert execution["evaluation"]["success"] is False
        assert execution["evaluation"]["severity"] == "WARN"
        assert "Nothing compared" in execution["evaluation"]["description"]
