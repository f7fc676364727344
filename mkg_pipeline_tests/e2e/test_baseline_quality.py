"""Golden baseline: promote a run's outputs, then the daily job's blocking check catches a regression."""

from __future__ import annotations

import dagster as dg
import pytest

from mkg_pipeline_tests.e2e.campaign import tiny_pdf
from mkg_pipeline_tests.e2e.conftest import PipelineEnv

pytestmark = pytest.mark.e2e


def _check(result: dg.ExecuteInProcessResult, name: str) -> dg.AssetCheckEvaluation:
    (evaluation,) = [e for e in result.get_asset_check_evaluations() if e.check_name == name]
    return evaluation


def test_promote_then_daily_job_detects_regression(pipeline_env: PipelineEnv, local_vlm_server) -> None:
    from mkg_pipeline.orchestration.definitions import defs
    from mkg_pipeline.orchestration.jobs import golden_partition
    from mkg_pipeline.orchestration.schedules import daily_baseline_quality_schedule

    # Before any promotion the schedule skips with an instruction.
    with dg.build_schedule_context(instance=pipeline_env.instance) as context:
        skipped = daily_baseline_quality_schedule(context)
    assert isinstance(skipped, dg.SkipReason)
    assert "promote_baseline_job" in skipped.skip_message

    pipeline_env.upload("golden.pdf", data=tiny_pdf("golden"))  # two lines of text: cheap to read three times
    batch = pipeline_env.tick().run_requests[0].partition_key
    assert pipeline_env.materialize(batch).success

    promote = defs.resolve_job_def("promote_baseline_job").execute_in_process(
        instance=pipeline_env.instance,
        run_config={"ops": {"promote_baseline": {"config": {"batch_id": batch, "sources": ["golden.pdf"]}}}},
    )
    assert promote.success
    golden = golden_partition("default")
    assert pipeline_env.instance.has_dynamic_partition("ingest_batches", golden)

    with dg.build_schedule_context(instance=pipeline_env.instance) as context:
        request = daily_baseline_quality_schedule(context)
    assert isinstance(request, dg.RunRequest) and request.partition_key == golden

    job = defs.resolve_job_def("baseline_quality_job")
    before = local_vlm_server.read_metric("vllm:request_success_total")
    same = job.execute_in_process(instance=pipeline_env.instance, partition_key=golden)
    assert same.success
    # The daily job really asks the server again (force_refresh) ...
    assert local_vlm_server.read_metric("vllm:request_success_total") - before >= 1
    # ... and a deterministic server gives back the baseline.
    assert _check(same, "baseline_similarity").passed

    # A regression: the golden text no longer matches what the server answers.
    storage = pipeline_env.storage
    doc_id = storage.get_json(storage.batch_key(golden))["doc_ids"][0]
    storage.put_bytes(
        storage.baseline_key("default", doc_id, "pages/1.md"), b"# Entirely different\n\nnothing alike at all"
    )
    regressed = job.execute_in_process(instance=pipeline_env.instance, partition_key=golden, raise_on_error=False)
    evaluation = _check(regressed, "baseline_similarity")
    assert not evaluation.passed
    assert evaluation.metadata["mean_similarity"].value < 0.95
