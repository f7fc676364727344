"""The demo without ``--serve-ui`` (what ``make demo`` runs): its runs execute in the demo's process but are
recorded as runs of ``ingest_job`` from the ``mkg_pipeline`` code location, as the daemon would record them,
so that the UI can re-execute them (``execute_in_process`` records no origin, and re-executing such a run
fails); every check of the batch was evaluated, against the batch (issue 20).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from mkg_pipeline_tests.fixtures.corpus import REPO_ROOT, corpus_root

pytestmark = pytest.mark.e2e


def test_in_process_runs_are_runs_of_the_code_locations_job(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    argv = [sys.executable, "-m", "mkg_devstack.demo", "--files", "minimal-document.pdf", "bad-encrypted-password.pdf"]
    argv += ["--corpus", str(corpus_root()), "--workdir", str(workdir)]
    demo = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "pages 1/1" in demo.stdout  # the progress, from the same records as the run log

    with dg.DagsterInstance.from_config(str(workdir / "dagster_home")) as instance:
        (run,) = instance.get_runs()
        assert run.job_name == "ingest_job" and run.status == dg.DagsterRunStatus.SUCCESS
        origin = run.remote_job_origin
        assert origin is not None, "a run without its code location cannot be re-executed from the UI"
        assert (origin.location_name, origin.repository_origin.repository_name) == ("mkg_pipeline", "__repository__")
        batch = run.tags["dagster/partition"]
        evaluations = {
            e.dagster_event.event_specific_data.check_name: e.dagster_event.event_specific_data
            for e in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
        }
    assert evaluations["bucket_accounting"].passed
    assert all(e.partition == batch for e in evaluations.values()), evaluations
    assert not evaluations["baseline_similarity"].passed  # no golden baseline: nothing compared
