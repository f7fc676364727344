"""The pipeline end to end: real moto S3, real local VLM server, real Dagster instance, the CLI users run."""

from __future__ import annotations

import threading
import time

import pytest

from mkg_pipeline_tests.e2e.campaign import tiny_pdf
from mkg_pipeline_tests.e2e.conftest import PipelineEnv

pytestmark = pytest.mark.e2e

GOOD = ["minimal-document.pdf", "blank-page.pdf"]
BAD = {"bad-not-a-pdf.pdf": "not_a_pdf", "bad-encrypted-password.pdf": "encrypted"}


def _requests(server) -> float:
    return server.read_metric("vllm:request_success_total")


def test_cli_materialize_good_and_bad_batch(pipeline_env: PipelineEnv, local_vlm_server, corpus) -> None:
    pipeline_env.upload(*GOOD, *BAD)
    created = pipeline_env.batch_cli()  # the CI path: shell out for the batch, then the Dagster CLI
    assert created.returncode == 0, created.stderr[-3000:]
    (batch,) = created.stdout.split()
    assert pipeline_env.batch_cli().returncode == 1  # the cursor remembers: no second batch of the same files

    process = pipeline_env.materialize_cli(batch)
    assert process.returncode == 0, process.stdout[-4000:] + process.stderr[-4000:]

    storage = pipeline_env.storage
    manifest = storage.get_json(storage.batch_key(batch))
    results = {key.rsplit("/", 1)[-1]: r for key, r in manifest["results"].items()}
    for name in GOOD:
        assert results[name]["status"] == "accepted"
        doc_id = results[name]["doc_id"]
        assert doc_id == corpus[name]["sha256"][:16]
        status = storage.get_json(storage.vlm_status_key(doc_id))
        assert status["state"] == "complete", status
        assert status["pages_done"] == corpus[name]["pages"]
        content = storage.get_json(storage.content_list_key(doc_id))
        assert all({"type", "text", "page_idx"} <= set(block) for block in content)
    # The born-digital page's Markdown really carries its text.
    minimal = storage.get_bytes(storage.document_md_key(results["minimal-document.pdf"]["doc_id"])).decode()
    assert "<!-- page 1 -->" in minimal
    assert len(minimal.split()) > 50
    for name, reason in BAD.items():
        assert results[name]["status"] == "rejected"
        rejection = storage.get_json(storage.rejected_key(name))
        assert rejection["reason"] == reason
        assert name in rejection["message"]
    # incoming/ is drained: the sensor only ever lists pending work.
    assert not list(storage.list_objects(storage.incoming_prefix))

    checks = pipeline_env.check_evaluations()
    assert {"pages_accounted_for", "no_failed_pages", "baseline_similarity", "text_layer_similarity"} <= set(checks)
    assert all(e.passed for e in checks["pages_accounted_for"])


def test_rematerialization_makes_no_requests(pipeline_env: PipelineEnv, local_vlm_server) -> None:
    data = tiny_pdf("rematerialization")  # one line of text: what matters here is the requests, not the text
    pipeline_env.upload("document.pdf", data=data)
    batch = pipeline_env.tick().run_requests[0].partition_key
    # In-process runs: the CLI path has tests of its own (above, and test_secrets); what matters here is
    # what a second materialization asks of the server.
    start = _requests(local_vlm_server)
    assert pipeline_env.materialize(batch).success
    before = _requests(local_vlm_server)
    assert before - start == 1  # the one page, read once
    assert pipeline_env.materialize(batch, select="parsed_pages,vlm_outputs,quality_baseline_diffs").success
    assert _requests(local_vlm_server) - before == 0

    # The same bytes dropped again under another name are the same document: still no request.
    pipeline_env.upload("copy-of-document.pdf", data=data)
    second_batch = pipeline_env.tick().run_requests[0].partition_key
    third = pipeline_env.materialize(second_batch)
    assert third.success
    assert _requests(local_vlm_server) - before == 0


def test_server_stopped_mid_run_loses_nothing(pipeline_env: PipelineEnv, start_local_vlm_server, monkeypatch) -> None:
    # Each answer takes half a second more (a sleep in the server, no CPU), so the stop lands mid-document
    # however fast the pages are read; four one-line pages keep the OCR cheap.
    server = start_local_vlm_server(latency_s=0.5)
    monkeypatch.setenv("MKG_VLLM__URL", server.url)
    monkeypatch.setenv("MKG_VLLM__API_KEY", server.api_key or "")
    # Pages one after another, so the stop lands mid-document.
    monkeypatch.setenv("MKG_VLLM__ADAPTIVE", "false")
    monkeypatch.setenv("MKG_VLLM__MIN_IN_FLIGHT", "1")
    monkeypatch.setenv("MKG_VLLM__MAX_IN_FLIGHT", "1")
    # The breaker is per process and outlives the run, as in a long-lived worker. Registered here first, with
    # the run's own settings and a clock of the test's: its recovery timeout passes when the test says so.
    monkeypatch.setenv("MKG_CIRCUIT_BREAKER__RECOVERY_TIMEOUT_S", "1")
    from mkg_pipeline.config import get_settings
    from mkg_pipeline.vllm.breaker import breaker_for

    get_settings.cache_clear()
    settings = get_settings()
    now = [0.0]
    breaker = breaker_for(settings.vllm.url, settings.circuit_breaker, clock=lambda: now[0])
    pipeline_env.upload("server-stopped.pdf", data=tiny_pdf("server stopped", 4))
    batch = pipeline_env.tick().run_requests[0].partition_key
    storage = pipeline_env.storage

    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("result", pipeline_env.materialize(batch)))
    runner.start()
    doc_id = None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # bounded: wait for the first finished page, then pull the plug
        manifest = storage.get_json(storage.batch_key(batch))
        accepted = [r for r in manifest.get("results", {}).values() if r.get("status") == "accepted"]
        if accepted:
            doc_id = accepted[0]["doc_id"]
            if any(True for _ in storage.list_objects(storage.vlm_page_prefix(doc_id))):
                break
        time.sleep(0.2)
    assert doc_id is not None
    server.kill()
    runner.join(timeout=600)
    assert not runner.is_alive()
    # Every finished page is kept, and the run fails visibly: far more than 0.4 % of the pages failed.
    assert not outcome["result"].success

    status = storage.get_json(storage.vlm_status_key(doc_id))
    failed = [f["page"] for f in status["failed_pages"]]
    assert status["pages_done"] >= 1
    assert failed, "stopping the server should leave failed pages"
    assert status["pages_done"] + len(failed) == status["pages_total"] == 4
    assert all(f["reason"] in {"connect", "circuit_open", "timeout", "server_error"} for f in status["failed_pages"])

    server.start()  # back on the same port, fresh metrics
    assert breaker.is_rejecting()  # open, and the test's clock has not moved
    now[0] += 1.2  # past the breaker's recovery timeout: the retry run's first page is its probe
    before = server.read_metric("vllm:request_success_total")
    retry = pipeline_env.materialize(batch)
    assert retry.success, storage.get_json(storage.vlm_status_key(doc_id))["failed_pages"]
    assert server.read_metric("vllm:request_success_total") - before == len(failed)
    status = storage.get_json(storage.vlm_status_key(doc_id))
    assert status["state"] == "complete"
    assert status["pages_done"] == 4


def test_sensor_new_replaced_and_seen_objects(pipeline_env: PipelineEnv) -> None:
    assert not pipeline_env.tick().run_requests

    pipeline_env.upload("minimal-document.pdf", "two-pages.pdf")
    first = pipeline_env.tick()
    assert len(first.run_requests) == 1
    batch = first.run_requests[0].partition_key
    assert first.run_requests[0].run_key == batch
    listed = {o["key"] for o in pipeline_env.storage.get_json(pipeline_env.storage.batch_key(batch))["objects"]}
    assert listed == {"incoming/minimal-document.pdf", "incoming/two-pages.pdf"}
    assert pipeline_env.instance.has_dynamic_partition("ingest_batches", batch)

    # Already requested and unchanged: nothing new on the next tick.
    assert not pipeline_env.tick().run_requests

    # Replaced under the same name (new bytes, new ETag): new work.
    pipeline_env.upload("pdflatex-4-pages.pdf", as_name="two-pages.pdf")
    replaced = pipeline_env.tick()
    assert len(replaced.run_requests) == 1
    objects = pipeline_env.storage.get_json(pipeline_env.storage.batch_key(replaced.run_requests[0].partition_key))
    assert [o["key"] for o in objects["objects"]] == ["incoming/two-pages.pdf"]
    assert replaced.run_requests[0].run_key != batch
    assert not pipeline_env.tick().run_requests


def test_routing_auto_sends_only_the_scanned_page_of_a_mixed_document(
    pipeline_env: PipelineEnv, local_vlm_server, monkeypatch
) -> None:
    """Issue 19 items 1 and 3 through Dagster: the born-digital page never reaches the server."""
    from mkg_pipeline.config import get_settings
    from mkg_pipeline.ids import doc_id_for
    from mkg_pipeline_tests.fixtures.routing_pages import TITLE, mixed_pdf

    monkeypatch.setenv("MKG_ROUTING__MODE", "auto")  # the fixture pins vlm for the VLM-path tests
    get_settings.cache_clear()
    data = mixed_pdf()
    pipeline_env.upload("mixed.pdf", data=data)
    batch = pipeline_env.tick().run_requests[0].partition_key
    start = _requests(local_vlm_server)
    result = pipeline_env.materialize(batch)
    assert result.success
    assert _requests(local_vlm_server) - start == 1  # the scan only
    storage, doc_id = pipeline_env.storage, doc_id_for(data)
    status = storage.get_json(storage.vlm_status_key(doc_id))
    assert (status["state"], status["page_routes"]) == ("complete", {"1": "text", "2": "vlm"})
    assert TITLE in storage.get_bytes(storage.document_md_key(doc_id)).decode()
    metadata = {
        e.asset_key.path[-1]: e.metadata
        for e in (m.event_specific_data.materialization for m in result.get_asset_materialization_events())
    }
    assert metadata["parsed_pages"]["pages_text"].value == 1 and metadata["vlm_outputs"]["pages_vlm"].value == 1
    checks = pipeline_env.check_evaluations()
    assert all(e.passed for e in checks["pages_accounted_for"])
