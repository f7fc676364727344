"""The code location loads the way the webserver and CI load it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mkg_pipeline_tests.fixtures.corpus import REPO_ROOT

pytestmark = pytest.mark.e2e

ASSETS = {"raw_pdfs", "parsed_pages", "vlm_outputs", "quality_baseline_diffs"}
CHECKS = {
    ("vlm_outputs", "pages_accounted_for"),
    ("vlm_outputs", "no_failed_pages"),
    ("vlm_outputs", "page_failure_rate"),
    ("vlm_outputs", "bucket_accounting"),
    ("quality_baseline_diffs", "baseline_similarity"),
    ("quality_baseline_diffs", "text_layer_similarity"),
}


@pytest.mark.parametrize("target", [["-m", "mkg_pipeline"], ["-w", "workspace.yaml"]])
def test_definitions_validate(tmp_path: Path, target: list[str]) -> None:
    (tmp_path / "dagster.yaml").write_text((REPO_ROOT / "dagster.yaml").read_text())
    dagster = Path(sys.executable).parent / "dagster"
    process = subprocess.run(
        [str(dagster), "definitions", "validate", *target],
        cwd=REPO_ROOT,
        env={**os.environ, "DAGSTER_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    assert "Validation successful for code location mkg_pipeline" in process.stderr + process.stdout


def test_assets_checks_sensor_schedule_present() -> None:
    from mkg_pipeline import defs

    graph = defs.resolve_asset_graph()
    assert {key.to_user_string() for key in graph.get_all_asset_keys()} == ASSETS
    assert {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys} == CHECKS
    assert defs.resolve_sensor_def("incoming_pdfs_sensor")
    assert defs.resolve_schedule_def("daily_baseline_quality_schedule")
    for job in ("ingest_job", "baseline_quality_job", "promote_baseline_job"):
        assert defs.resolve_job_def(job)


def test_importing_the_code_location_loads_no_model_runtime() -> None:
    code = (
        "import sys, mkg_pipeline; mkg_pipeline.defs; "
        "heavy = [m for m in ('onnxruntime', 'rapidocr_onnxruntime', 'mineru_vl_utils', 'mineru', 'torch', 'cv2') "
        "if m in sys.modules]; print(','.join(heavy))"
    )
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert process.stdout.strip() == ""
