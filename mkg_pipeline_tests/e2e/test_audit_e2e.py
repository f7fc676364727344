"""The audit over what the real pipeline leaves: clean after a run (asset check and CLI), broken after a loss."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mkg_pipeline_tests.e2e.conftest import PipelineEnv
from mkg_pipeline_tests.fixtures.corpus import REPO_ROOT

pytestmark = pytest.mark.e2e


def _audit_cli(env: PipelineEnv, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkg_pipeline.audit", *args],
        cwd=REPO_ROOT,
        env={**os.environ, **env.env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_clean_pipeline_output_passes_the_audit_and_a_loss_does_not(pipeline_env: PipelineEnv) -> None:
    from mkg_pipeline.orchestration.definitions import defs

    pipeline_env.upload("minimal-document.pdf", "bad-not-a-pdf.pdf")
    batch = pipeline_env.tick().run_requests[0].partition_key
    result = defs.resolve_job_def("ingest_job").execute_in_process(
        instance=pipeline_env.instance, partition_key=batch, raise_on_error=False
    )
    (check,) = [e for e in result.get_asset_check_evaluations() if e.check_name == "bucket_accounting"]
    assert check.passed, check.metadata["findings"]
    assert check.metadata["errors"].value == 0
    assert check.metadata["command"].value == f"python -m mkg_pipeline.audit --batch {batch}"

    for args in (["--batch", batch], []):
        clean = _audit_cli(pipeline_env, *args)
        assert clean.returncode == 0, clean.stdout + clean.stderr
        assert "OK: nothing lost" in clean.stdout

    # The status vouches for each page result by the ETag S3 lists for it: the audit reads none of them.
    storage = pipeline_env.storage
    manifest = storage.get_json(storage.batch_key(batch))
    doc_id = next(r["doc_id"] for r in manifest["results"].values() if r["status"] == "accepted")
    listed = {o.key.split("/")[-1].split(".")[0]: o.etag for o in storage.list_objects(storage.vlm_page_prefix(doc_id))}
    assert storage.get_json(storage.vlm_status_key(doc_id))["page_etags"] == listed

    # A page result cut in half: named, with the command that redoes it.
    (result_key,) = [o.key for o in storage.list_objects(storage.vlm_page_prefix(doc_id))]
    whole = storage.get_bytes(result_key)
    storage.put_bytes(result_key, whole[: len(whole) // 2])
    broken = _audit_cli(pipeline_env, "--batch", batch)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "[page_result_unreadable]" in broken.stdout and "page(s) 1 " in broken.stdout
    assert f"--select vlm_outputs --partition {batch}" in broken.stdout
    storage.put_bytes(result_key, whole)

    # Lose one page result behind the pipeline's back: the audit names the page and what to run.
    (result_key,) = [o.key for o in storage.list_objects(storage.vlm_page_prefix(doc_id))]
    storage.delete(result_key)
    broken = _audit_cli(pipeline_env, "--batch", batch)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "[page_unaccounted]" in broken.stdout and "page(s) 1 " in broken.stdout
    assert f"--select vlm_outputs --partition {batch}" in broken.stdout
    sys.stderr.write(broken.stdout)  # the example in the report
