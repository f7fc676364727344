"""Issue 19 item 4 through the real local server: an invalid answer is re-asked up the temperature schedule.

The server's fault injection makes every answer invalid; the request bodies are read off the real
HTTP transport on their way out (what the server got), not from a scripted stand-in.
"""

from __future__ import annotations

import json

import httpx
import pytest

from mkg_pipeline.config import AnswersConfig, CircuitBreakerConfig, HTTPClientConfig, PipelineConfig, VLLMServerConfig
from mkg_pipeline.engines import AnswerRejected, PageInput, build_engine
from mkg_pipeline.engines.schedule import reask_temperature
from mkg_pipeline.vllm.breaker import CircuitBreaker
from mkg_pipeline.vllm.client import VLLMClient
from mkg_pipeline_tests.fixtures.local_server import lorem_png

pytestmark = pytest.mark.integration


class RecordingTransport(httpx.AsyncHTTPTransport):
    """The real transport; every chat body it sends is kept."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[dict] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/chat/completions"):
            self.bodies.append(json.loads(await request.aread()))
        return await super().handle_async_request(request)


@pytest.mark.parametrize(("fault", "reason"), [("truncated", "truncated"), ("repetition", "repetition")])
async def test_invalid_answers_from_the_server_are_reasked_up_the_schedule(
    start_local_vlm_server, fault: str, reason: str
) -> None:
    server = start_local_vlm_server(enable_fault_injection=True)
    server.set_faults(**{f"{fault}_rate": 1.0})
    transport = RecordingTransport()
    client = VLLMClient(
        VLLMServerConfig(url=server.url, model=server.model, api_key=server.api_key),
        HTTPClientConfig(max_attempts=1, timeout_s=60),
        transport=transport,
        breaker=CircuitBreaker(server.url, CircuitBreakerConfig()),
    )
    settings = PipelineConfig(answers=AnswersConfig(max_reasks=3))
    page = PageInput(png=lorem_png(), page_idx=0, text_layer_chars=55, label="doc=lorem page=1")
    async with client:
        with pytest.raises(AnswerRejected) as caught:
            await build_engine("page_markdown", client, settings).extract(page)
    assert caught.value.reason == reason and caught.value.requests == 4
    assert [body["temperature"] for body in transport.bodies] == [reask_temperature(n, 0.0) for n in (1, 2, 3, 4)]
    assert [body["temperature"] for body in transport.bodies] == [0.0, 0.1, 0.2, 0.3]

    server.set_faults(**{f"{fault}_rate": 0.0})
    transport.bodies.clear()
    async with VLLMClient(
        VLLMServerConfig(url=server.url, model=server.model, api_key=server.api_key),
        HTTPClientConfig(max_attempts=1, timeout_s=60),
        transport=transport,
        breaker=CircuitBreaker(server.url, CircuitBreakerConfig()),
    ) as client:
        result = await build_engine("page_markdown", client, settings).extract(page)
    assert "Lorem ipsum" in result.markdown and [b["temperature"] for b in transport.bodies] == [0.0]


# ----------------------------------------------------------------------------- the text-layer fallback


def _pdf_of(*parts: bytes) -> bytes:
    import pymupdf

    out = pymupdf.open()
    for part in parts:
        with pymupdf.open(stream=part, filetype="pdf") as src:
            out.insert_pdf(src)
    return out.tobytes(garbage=3, deflate=True)


def _stage(storage, batch: str, server, answers: AnswersConfig, transport=None):  # type: ignore[no-untyped-def]
    import asyncio

    from mkg_pipeline.stages.batches import accepted_doc_ids, read_batch_manifest
    from mkg_pipeline.stages.vlm import process_documents

    async def go():  # type: ignore[no-untyped-def]
        client = VLLMClient(
            VLLMServerConfig(url=server.url, model=server.model, api_key=server.api_key),
            HTTPClientConfig(max_attempts=1, timeout_s=120),
            transport=transport,
            breaker=CircuitBreaker(server.url, CircuitBreakerConfig()),
        )
        async with client:
            engine = build_engine("page_markdown", client, PipelineConfig(answers=answers))
            return await process_documents(
                storage,
                engine,
                accepted_doc_ids(read_batch_manifest(storage, batch), None),
                client.limiter,
                server_url=server.url,
                model=server.model,
                run_id="policy",  # the fallback settings come from the engine, as in the asset
            )

    return asyncio.run(go())


def _fallback_pages_counted(reason: str) -> float:
    from mkg_pipeline.metrics.pipeline import REGISTRY

    return REGISTRY.get_sample_value("mkg_pipeline_pages_fallback_total", {"reason": reason}) or 0.0


def test_fallback_pages_are_flagged_never_cached_and_budgeted(start_local_vlm_server) -> None:
    """Every answer of the server truncated (fault injection): the one VLM page of a 4-page document (its
    other pages take the text route) falls back to its text layer, within a budget of 0.3 of the pages; a
    1-page document whose page falls back is over it and fails visibly. Faults off, a second run asks the
    VLM again for exactly those pages."""
    from mkg_pipeline.audit import audit_bucket
    from mkg_pipeline.config import PDFConfig
    from mkg_pipeline.ids import doc_id_for
    from mkg_pipeline.stages.ingest import ingest_batch
    from mkg_pipeline.stages.pages import render_batch
    from mkg_pipeline.storage import MemoryStorage
    from mkg_pipeline_tests.fixtures.routing_pages import born_digital_pdf, scan_with_ocr_pdf
    from mkg_pipeline_tests.stages.conftest import drop

    garbage_scan = scan_with_ocr_pdf(garbage=True)  # routes vlm, yet has a text layer to fall back on
    mostly_text = _pdf_of(born_digital_pdf(), born_digital_pdf(columns=2), born_digital_pdf(), garbage_scan)
    storage = MemoryStorage()
    batch = drop(storage, {"mostly-text.pdf": mostly_text, "scan.pdf": garbage_scan})
    ingest_batch(storage, batch, PDFConfig())
    render_batch(storage, batch, PDFConfig())
    under, over = doc_id_for(mostly_text), doc_id_for(garbage_scan)

    server = start_local_vlm_server(enable_fault_injection=True)
    server.set_faults(truncated_rate=1.0)
    answers = AnswersConfig(max_reasks=1, text_fallback=True, max_fallback_share=0.3)
    fallback_before = _fallback_pages_counted("truncated")
    summary = _stage(storage, batch, server, answers)
    # both fallback pages counted for Prometheus, the one of the document over budget too (it also fails)
    assert _fallback_pages_counted("truncated") == fallback_before + 2
    assert summary.routes == {"text": 3, "vlm": 2}
    assert summary.requests == 4  # two VLM pages, each asked twice (greedy, then 0.1)
    assert summary.fallback == 2 and summary.fallback_by_document == {under: 1, over: 1}
    assert summary.over_fallback_budget == [over]

    status = storage.get_json(storage.vlm_status_key(under))
    assert status["state"] == "complete" and status["failed_pages"] == []
    assert [(f["page"], f["reason"]) for f in status["fallback_pages"]] == [(4, "truncated")]
    assert status["fallback_budget"] == {"max_share": 0.3, "pages": 1, "exceeded": False}
    assert "4" not in status["page_etags"]  # never cached as a VLM result
    assert not [k for k in storage.keys(storage.vlm_page_prefix(under)) if "/4." in k]
    assert "<!-- page 4 -->" in storage.get_bytes(storage.document_md_key(under)).decode()

    failed = storage.get_json(storage.vlm_status_key(over))
    assert (failed["state"], failed["failure_reason"]) == ("failed", "fallback_budget")
    assert [(f["page"], f["reason"]) for f in failed["failed_pages"]] == [(1, "truncated")]
    assert "fallback is not used" in failed["failed_pages"][0]["message"]
    assert failed["fallback_budget"] == {"max_share": 0.3, "pages": 1, "exceeded": True}

    report = audit_bucket(storage, summary.engine)
    assert report.counts["pages_fallback"] == 1 and report.counts["pages_failed"] == 1
    assert not [f for f in report.findings if f.kind == "page_unaccounted"], report.to_text()

    server.set_faults(truncated_rate=0.0)
    again = _stage(storage, batch, server, answers)
    assert again.requests == 2 and again.fallback == 0  # exactly the two fallback pages asked again
    assert _fallback_pages_counted("truncated") == fallback_before + 2
    assert storage.get_json(storage.vlm_status_key(under))["fallback_pages"] == []
    assert storage.get_json(storage.vlm_status_key(over))["state"] == "complete"


@pytest.mark.parametrize("how", ["page", "text"])
def test_a_rotated_page_forced_to_the_vlm_is_sent_upright(start_local_vlm_server, how: str) -> None:
    """A page whose /Rotate (or its text) turns it sideways, forced to the vlm route: the image the server
    receives is the upright page (compared with the same paper page drawn unrotated), and it is read."""
    import base64
    import io

    import numpy as np
    import pymupdf
    from PIL import Image

    from mkg_pipeline.config import PDFConfig, RoutingConfig
    from mkg_pipeline.ids import doc_id_for
    from mkg_pipeline.quality.similarity import normalise_text, similarity
    from mkg_pipeline.stages.ingest import ingest_batch
    from mkg_pipeline.stages.pages import read_page_manifest, render_batch
    from mkg_pipeline.storage import MemoryStorage
    from mkg_pipeline_tests.fixtures.routing_pages import born_digital_pdf, rotated_pdf
    from mkg_pipeline_tests.stages.conftest import drop

    rotated = rotated_pdf(how)
    storage = MemoryStorage()
    batch = drop(storage, {"rotated.pdf": rotated})
    ingest_batch(storage, batch, PDFConfig())
    render_batch(storage, batch, PDFConfig(), routing=RoutingConfig(mode="vlm"))
    doc_id = doc_id_for(rotated)
    (entry,) = read_page_manifest(storage, doc_id)["pages"]
    assert entry["route"] == "vlm" and entry["rotation_applied"] in (90, 270)

    server = start_local_vlm_server()
    transport = RecordingTransport()
    summary = _stage(storage, batch, server, AnswersConfig(), transport)
    assert summary.processed == 1 and summary.routes["vlm"] == 1
    (body,) = transport.bodies
    url = next(part["image_url"]["url"] for part in body["messages"][-1]["content"] if part["type"] == "image_url")
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("L")
    with pymupdf.open(stream=born_digital_pdf(), filetype="pdf") as pdf:  # the same paper page, unrotated
        expected_text = pdf[0].get_text()
        pix = pdf[0].get_pixmap(matrix=pymupdf.Matrix(sent.width / pdf[0].rect.width, sent.height / pdf[0].rect.height))
    upright = np.asarray(Image.open(io.BytesIO(pix.tobytes("png"))).convert("L").resize(sent.size), dtype=float)
    image = np.asarray(sent, dtype=float)
    assert sent.height > sent.width  # portrait, as the paper page
    assert abs(image - upright).mean() < 6 < abs(image - upright[::-1, ::-1]).mean()
    markdown = storage.get_bytes(storage.document_md_key(doc_id)).decode()
    assert similarity(normalise_text(markdown), normalise_text(expected_text)) > 0.8
