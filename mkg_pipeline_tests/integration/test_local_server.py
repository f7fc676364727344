"""The local VLM server as a real process on 127.0.0.1, spoken to over HTTP as vLLM would be.

OCR is CPU-heavy (seconds per page): these tests use few, small pages, and
assert on answers and metrics, never on timings.
"""

from __future__ import annotations

import asyncio
import io
import json
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from mineru_vl_utils.mineru_client import DEFAULT_PROMPTS
from PIL import Image

from mkg_devstack.local_server.blocks import BlockType
from mkg_devstack.local_server.faults import REPEATED_PHRASE, WRONG_MODEL_NAME
from mkg_devstack.local_server.settings import ANSWER_FAULTS
from mkg_pipeline.engines.prompts import PAGE_MARKDOWN_PROMPT
from mkg_pipeline.quality.similarity import normalise_text, similarity
from mkg_pipeline_tests.fixtures.corpus import corpus_pdf
from mkg_pipeline_tests.fixtures.local_server import (
    LocalVLMServer,
    chat_body,
    corpus_page_text,
    lorem_png,
    mineru_layout_parser,
    render_corpus_page,
)
from mkg_pipeline_tests.fixtures.reading_order import column_order_agreement, text_layer_lines

pytestmark = pytest.mark.integration

StartServer = Callable[..., LocalVLMServer]
ANSWERED_TYPES = {kind.value for kind in BlockType}  # the MinerU 2.x block types the stand-in answers


def content_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def tiny_png() -> bytes:
    """A 40x20 white image: cheap to "read" (nothing there) when a request must not fail."""
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), "white").save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- endpoints and auth


def test_health_and_models(local_vlm_server: LocalVLMServer) -> None:
    assert httpx.get(f"{local_vlm_server.url}/health", timeout=10).status_code == 200
    response = httpx.get(f"{local_vlm_server.base_url}/models", headers=local_vlm_server.headers, timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [model["id"] for model in body["data"]] == [local_vlm_server.model]
    assert body["data"][0]["object"] == "model"
    assert body["data"][0]["owned_by"] == "mkg-local"
    assert body["data"][0]["max_model_len"] > 0


def test_api_key_guards_v1_only(local_vlm_server: LocalVLMServer) -> None:
    assert local_vlm_server.api_key
    models = f"{local_vlm_server.base_url}/models"
    chat = f"{local_vlm_server.base_url}/chat/completions"
    body = chat_body("\nText Recognition:", [tiny_png()], local_vlm_server.model)
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": local_vlm_server.api_key}):
        response = httpx.get(models, headers=headers, timeout=10)
        assert response.status_code == 401
        assert response.json() == {"error": "Unauthorized"}
        assert httpx.post(chat, json=body, headers=headers, timeout=10).status_code == 401
    assert httpx.get(models, headers=local_vlm_server.headers, timeout=10).status_code == 200
    assert httpx.post(chat, json=body, headers=local_vlm_server.headers, timeout=60).status_code == 200
    # Like vLLM: health and metrics are open to probes and scrapers.
    assert httpx.get(f"{local_vlm_server.url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{local_vlm_server.url}/metrics", timeout=10).status_code == 200


def test_api_key_never_on_the_command_line(start_local_vlm_server: StartServer) -> None:
    """Issue 9 row 15b: a key starting with '-' works, and ``ps`` (the process's cmdline) never shows it."""
    key = "-" + secrets.token_urlsafe(16)  # token_urlsafe yields such a key about once in 64 runs
    server = start_local_vlm_server(api_key=key)
    assert server.process.process is not None
    cmdline = Path(f"/proc/{server.process.process.pid}/cmdline").read_bytes()
    assert b"mkg_devstack.local_server" in cmdline
    assert key.encode() not in cmdline
    models = f"{server.base_url}/models"
    assert httpx.get(models, headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code == 200
    assert httpx.get(models, timeout=10).status_code == 401


def test_bad_requests_get_openai_error_objects(local_vlm_server: LocalVLMServer) -> None:
    url = f"{local_vlm_server.base_url}/chat/completions"
    headers = local_vlm_server.headers

    wrong_model = httpx.post(url, json=chat_body("x", [tiny_png()], "no-such-model"), headers=headers, timeout=10)
    assert wrong_model.status_code == 404
    error = wrong_model.json()
    assert error["object"] == "error" and error["type"] == "NotFoundError" and error["code"] == 404
    assert "no-such-model" in error["message"]

    no_image = {"model": local_vlm_server.model, "messages": [{"role": "user", "content": "hello"}]}
    response = httpx.post(url, json=no_image, headers=headers, timeout=10)
    assert response.status_code == 400 and response.json()["type"] == "BadRequestError"

    response = httpx.post(url, content=b"{not json", headers=headers, timeout=10)
    assert response.status_code == 400 and response.json()["object"] == "error"

    remote_url = chat_body("x", [], local_vlm_server.model)
    remote_url["messages"][0]["content"].insert(0, {"type": "image_url", "image_url": {"url": "https://x/p.png"}})
    assert httpx.post(url, json=remote_url, headers=headers, timeout=10).status_code == 400


@pytest.mark.parametrize(
    "make_data",
    [
        lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,  # PNG signature, no image
        lambda: b"not an image at all",
        lambda: render_corpus_page("minimal-document.pdf", 0, dpi=72)[:2000],  # truncated PNG
    ],
    ids=["png-signature-only", "text", "truncated-png"],
)
def test_corrupt_image_is_a_400_and_the_server_lives_on(
    local_vlm_server: LocalVLMServer, make_data: Callable[[], bytes]
) -> None:
    response = local_vlm_server.chat("\nText Recognition:", make_data(), timeout=30)
    assert response.status_code == 400, response.text
    assert "image" in response.json()["message"]
    assert httpx.get(f"{local_vlm_server.url}/health", timeout=10).status_code == 200
    assert local_vlm_server.chat("\nText Recognition:", tiny_png(), timeout=60).status_code == 200


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize(
    ("name", "page"),
    [("pdflatex-4-pages.pdf", 0), ("wang-answer-validation-5p.pdf", 0)],
)
def test_page_markdown_matches_the_text_layer(local_vlm_server: LocalVLMServer, name: str, page: int) -> None:
    response = local_vlm_server.chat(PAGE_MARKDOWN_PROMPT, render_corpus_page(name, page, dpi=150))
    markdown = content_of(response)
    score = similarity(markdown, corpus_page_text(name, page))
    print(f"{name} page {page + 1}: page-to-Markdown similarity {score:.4f}")
    assert score >= 0.90
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == local_vlm_server.model
    assert body["choices"][0]["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


# Two-column pages: a full-width title and abstract over two columns (multicolumn-3p p1, arXiv p1), a
# right column with a large gap in it (multicolumn-3p p2), figures inside the columns (arXiv p3) and a
# second two-column band (the references) under the body text, below a rule (arXiv p4).
READING_ORDER_PAGES = [
    ("multicolumn-3p.pdf", 0),
    ("multicolumn-3p.pdf", 1),
    ("arxiv-0908.0054-4p.pdf", 0),
    ("arxiv-0908.0054-4p.pdf", 2),
    ("arxiv-0908.0054-4p.pdf", 3),
]


@pytest.mark.parametrize(("name", "page"), READING_ORDER_PAGES)
def test_page_markdown_reads_each_column_top_to_bottom(local_vlm_server: LocalVLMServer, name: str, page: int) -> None:
    """Column order agreement with the text layer (see fixtures/reading_order.py), overall and per column."""
    markdown = content_of(local_vlm_server.chat(PAGE_MARKDOWN_PROMPT, render_corpus_page(name, page, dpi=150)))
    agreement = column_order_agreement(markdown, text_layer_lines(str(corpus_pdf(name)), page))
    columns = {column: round(agreement.column_share(column), 3) for column in agreement.column_names()}
    print(
        f"{name} page {page + 1}: column order agreement {agreement.share:.3f} "
        f"({agreement.in_order}/{agreement.lines} lines, {agreement.lost} lost), per column {columns}"
    )
    assert agreement.lines >= 20
    assert agreement.lost <= 0.1 * agreement.lines  # OCR misses are not the point here, but few are allowed
    assert agreement.share >= 0.9  # before the column-aware reading order: 0.87, 0.79 and 0.71 on three pages
    for column, share in columns.items():
        assert share >= 0.95, f"the {column} column is out of order"


def test_scanned_page_without_text_layer_is_read(local_vlm_server: LocalVLMServer) -> None:
    assert corpus_page_text("edgar-scanned.pdf", 0).strip() == ""
    response = local_vlm_server.chat(PAGE_MARKDOWN_PROMPT, render_corpus_page("edgar-scanned.pdf", 0))
    text = normalise_text(content_of(response))
    assert len(text) > 500
    assert "edgar" in text and "england" in text


def test_an_upside_down_page_and_block_are_read(local_vlm_server: LocalVLMServer) -> None:
    """rotated-arabic-4p page 2 is turned 180°: its one line reads nothing upright, so it is read turned.
    (Before: an empty answer for a page with a text layer, rejected as "empty" on every run.)"""
    png = render_corpus_page("rotated-arabic-4p.pdf", 1)
    assert "habibi" in corpus_page_text("rotated-arabic-4p.pdf", 1)
    assert "habibi" in content_of(local_vlm_server.chat(PAGE_MARKDOWN_PROMPT, png))
    # MinerU's recognition step gets the block's crop as the layout answer placed it.
    layout = mineru_layout_parser().parse_layout_output(
        content_of(local_vlm_server.chat(DEFAULT_PROMPTS["[layout]"], png))
    )
    (block,) = layout
    page = Image.open(io.BytesIO(png))
    x1, y1, x2, y2 = block.bbox
    crop = page.crop((x1 * page.width, y1 * page.height, x2 * page.width, y2 * page.height))
    buffer = io.BytesIO()
    crop.save(buffer, format="PNG")
    assert "habibi" in content_of(local_vlm_server.chat(DEFAULT_PROMPTS["[default]"], buffer.getvalue()))


def test_tiny_pages_neither_crash_nor_hang(local_vlm_server: LocalVLMServer) -> None:
    # scanned-images-6p.pdf has 3.84 pt pages: a few pixels at any DPI.
    for index in range(6):
        png = render_corpus_page("scanned-images-6p.pdf", index)
        assert content_of(local_vlm_server.chat(PAGE_MARKDOWN_PROMPT, png, timeout=60)) is not None
    png = render_corpus_page("scanned-images-6p.pdf", 0)
    for prompt in (DEFAULT_PROMPTS["[layout]"], DEFAULT_PROMPTS["[default]"], DEFAULT_PROMPTS["table"]):
        assert local_vlm_server.chat(prompt, png, timeout=60).status_code == 200


def test_layout_detection_answers_in_mineru_format(local_vlm_server: LocalVLMServer) -> None:
    # MinerU sends the page resized to 1036x1036 for layout.
    page = Image.open(io.BytesIO(render_corpus_page("wang-answer-validation-5p.pdf", 0, dpi=150)))
    buffer = io.BytesIO()
    page.convert("RGB").resize((1036, 1036), Image.Resampling.BICUBIC).save(buffer, format="PNG")
    output = content_of(local_vlm_server.chat(DEFAULT_PROMPTS["[layout]"], buffer.getvalue()))
    blocks = mineru_layout_parser().parse_layout_output(output)
    assert len(blocks) == len(output.splitlines()) >= 5
    assert {block.type for block in blocks} <= ANSWERED_TYPES
    assert "text" in {block.type for block in blocks}
    for block in blocks:
        x1, y1, x2, y2 = block.bbox
        assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
        assert block.angle == 0
    tops = [block.bbox[1] for block in blocks]
    assert tops == sorted(tops)  # one column: top to bottom


def test_max_tokens_truncates_with_finish_reason_length(local_vlm_server: LocalVLMServer) -> None:
    before = local_vlm_server.read_metric("vllm:request_success_total", {"finished_reason": "length"})
    png = render_corpus_page("minimal-document.pdf", 0, dpi=100)
    response = local_vlm_server.chat(PAGE_MARKDOWN_PROMPT, png, max_tokens=5)
    body = response.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert len(body["choices"][0]["message"]["content"]) <= 20
    assert body["usage"]["completion_tokens"] <= 5
    after = local_vlm_server.read_metric("vllm:request_success_total", {"finished_reason": "length"})
    assert after == before + 1


def test_streaming_answers_server_sent_events(local_vlm_server: LocalVLMServer) -> None:
    body = chat_body(DEFAULT_PROMPTS["[default]"], [tiny_png()], local_vlm_server.model)
    body.update(stream=True, stream_options={"include_usage": True})
    response = httpx.post(
        f"{local_vlm_server.base_url}/chat/completions", json=body, headers=local_vlm_server.headers, timeout=60
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert any(chunk["choices"] and chunk["choices"][0]["finish_reason"] == "stop" for chunk in chunks)
    assert chunks[-1]["usage"]["total_tokens"] > 0


# --------------------------------------------------------------------------- slots, queue and metrics


def test_concurrent_requests_queue_behind_max_num_seqs(start_local_vlm_server: StartServer) -> None:
    server = start_local_vlm_server(max_num_seqs=2)
    png = lorem_png()
    labels = {"model_name": server.model}
    assert server.read_metric("vllm:request_success_total") == 0
    waiting_seen: list[float] = []

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as client:
            body = chat_body(PAGE_MARKDOWN_PROMPT, [png], server.model)
            requests = asyncio.gather(*(client.post("/chat/completions", json=body) for _ in range(8)))
            sampler_done = asyncio.Event()

            async def sample() -> None:  # evidence for the report; the assertion uses the peak gauge
                async with httpx.AsyncClient(timeout=10) as scraper:
                    while not sampler_done.is_set():
                        text = (await scraper.get(f"{server.url}/metrics")).text
                        for line in text.splitlines():
                            if line.startswith("vllm:num_requests_waiting{"):
                                waiting_seen.append(float(line.rsplit(" ", 1)[1]))
                        await asyncio.sleep(0.2)

            sampler = asyncio.create_task(sample())
            try:
                return await requests
            finally:
                sampler_done.set()
                await sampler

    responses = asyncio.run(burst())
    assert [response.status_code for response in responses] == [200] * 8
    assert all("Lorem ipsum" in content_of(response) for response in responses)

    # Two ran at a time; the other six waited their turn.
    assert server.read_metric("mkg_local_server_num_requests_running_peak", labels) == 2
    assert server.read_metric("mkg_local_server_num_requests_waiting_peak", labels) >= 1
    print(f"sampled vllm:num_requests_waiting during the burst: max {max(waiting_seen, default=0):.0f}")
    assert server.read_metric("vllm:num_requests_running", labels) == 0
    assert server.read_metric("vllm:num_requests_waiting", labels) == 0
    assert server.read_metric("vllm:kv_cache_usage_perc", labels) == 0

    usages: list[dict[str, Any]] = [response.json()["usage"] for response in responses]
    assert server.read_metric("vllm:request_success_total", {**labels, "finished_reason": "stop"}) == 8
    assert server.read_metric("vllm:prompt_tokens_total", labels) == sum(u["prompt_tokens"] for u in usages)
    assert server.read_metric("vllm:generation_tokens_total", labels) == sum(u["completion_tokens"] for u in usages)
    assert server.read_metric("vllm:e2e_request_latency_seconds_count", labels) == 8
    assert server.read_metric("vllm:time_to_first_token_seconds_count", labels) == 8


# --------------------------------------------------------------------------- fault injection and restarts


def test_fault_injection_is_off_by_default(local_vlm_server: LocalVLMServer) -> None:
    assert httpx.get(f"{local_vlm_server.url}/fault-injection", timeout=10).status_code == 404
    response = httpx.post(f"{local_vlm_server.url}/fault-injection", json={"down": True}, timeout=10)
    assert response.status_code == 404
    assert httpx.get(f"{local_vlm_server.url}/health", timeout=10).status_code == 200


def test_fault_injection_when_enabled(start_local_vlm_server: StartServer) -> None:
    server = start_local_vlm_server(api_key="fault-key", error_rate=1.0, seed=7)
    prompt, png = DEFAULT_PROMPTS["[default]"], tiny_png()

    # Errors, from the command line.
    response = server.chat(prompt, png, timeout=30)
    assert response.status_code == 500
    assert response.json()["object"] == "error"
    assert server.read_metric("mkg_local_server_faults_injected_total", {"fault": "error"}) == 1

    # Malformed bodies: 200, but not JSON.
    assert server.set_faults(error_rate=0.0, malformed_rate=1.0)["malformed_rate"] == 1.0
    response = server.chat(prompt, png, timeout=30)
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        response.json()

    # Another error status (for clients that treat 429/503 specially).
    server.set_faults(malformed_rate=0.0, error_rate=1.0, error_status=503)
    assert server.chat(prompt, png, timeout=30).status_code == 503

    # Hangs last longer than any client timeout; the server stays responsive meanwhile.
    server.set_faults(error_rate=0.0, hang_rate=1.0)
    with pytest.raises(httpx.ReadTimeout):
        server.chat(prompt, png, timeout=1.0)
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200

    # Down: every endpoint answers 503 until it is brought back.
    server.set_faults(hang_rate=0.0, down=True)
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 503
    assert httpx.get(f"{server.base_url}/models", headers=server.headers, timeout=10).status_code == 503
    assert server.chat(prompt, png, timeout=30).status_code == 503
    assert server.get_faults()["down"] is True
    server.set_faults(down=False)
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert server.chat(prompt, png, timeout=60).status_code == 200

    # Bad settings are refused.
    response = httpx.post(f"{server.url}/fault-injection", json={"error_rate": 2}, timeout=10)
    assert response.status_code == 400


def test_hostile_answers_when_enabled(start_local_vlm_server: StartServer) -> None:
    """Issue 9's hostile answers, each forced by its rate at run time, each counted in the fault metric."""
    server = start_local_vlm_server(api_key="fault-key", enable_fault_injection=True)
    png = lorem_png()
    prompt = PAGE_MARKDOWN_PROMPT

    def with_only(fault: str) -> httpx.Response:
        server.set_faults(**{f"{other}_rate": float(other == fault) for other in ANSWER_FAULTS})
        response = server.chat(prompt, png, timeout=60)
        assert response.status_code == 200, response.text
        return response

    real = content_of(server.chat(prompt, png, timeout=60))
    assert "Lorem ipsum" in real

    truncated = with_only("truncated").json()["choices"][0]
    assert truncated["finish_reason"] == "length"
    assert real.startswith(truncated["message"]["content"]) and len(truncated["message"]["content"]) < len(real)
    assert with_only("empty").json()["choices"][0]["message"]["content"] == ""
    assert with_only("repetition").json()["choices"][0]["message"]["content"].count(REPEATED_PHRASE) >= 100
    surrogate = with_only("lone_surrogate")
    assert b"\\ud800" in surrogate.content
    assert "\ud800" in surrogate.json()["choices"][0]["message"]["content"]
    html = with_only("html").json()["choices"][0]["message"]["content"]
    assert "<!-- page 99 -->" in html and "<script>" in html and html.rstrip().endswith("an unclosed code fence")
    # Issue 21 rows 2 and 3: answers that end any other way than "stop", and another model's name.
    filtered = with_only("content_filter").json()["choices"][0]
    assert (filtered["finish_reason"], filtered["message"]["content"]) == ("content_filter", "")
    aborted = with_only("abort").json()["choices"][0]
    assert aborted["finish_reason"] == "abort" and real.startswith(aborted["message"]["content"])
    unfinished = with_only("no_finish").json()["choices"][0]
    assert unfinished["finish_reason"] is None and len(unfinished["message"]["content"]) < len(real)
    wrong = with_only("wrong_model").json()
    assert wrong["model"] == WRONG_MODEL_NAME != server.model and wrong["choices"][0]["message"]["content"] == real
    server.set_faults(**{f"{other}_rate": 0.0 for other in ANSWER_FAULTS})
    assert server.chat(prompt, png, timeout=60).json()["model"] == server.model
    for fault in ANSWER_FAULTS:
        if fault not in ("trickle", "huge"):
            assert server.read_metric("mkg_local_server_faults_injected_total", {"fault": fault}) == 1, fault


def test_trickle_never_finishes_and_huge_is_streamed_in_bounded_memory(start_local_vlm_server: StartServer) -> None:
    server = start_local_vlm_server(enable_fault_injection=True, trickle_rate=1.0, trickle_interval_s=0.2)
    url = f"{server.base_url}/chat/completions"
    body = chat_body(DEFAULT_PROMPTS["[default]"], [tiny_png()], server.model)

    # Trickle: a 200 whose body keeps coming, one byte at a time, and never ends (hang_s: an hour).
    # A per-read timeout (here 5 s) never fires; only a total deadline stops the client.
    received: list[bytes] = []
    with httpx.stream("POST", url, json=body, timeout=5) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            received.append(chunk)
            if len(received) >= 5:
                break
    assert b"".join(received).strip() == b""  # whitespace so far: no answer yet
    assert server.read_metric("mkg_local_server_faults_injected_total", {"fault": "trickle"}) == 1

    # Huge: 400 MB, streamed without a Content-Length; the server does not hold it.
    server.set_faults(trickle_rate=0.0, huge_rate=1.0, huge_bytes=400_000_000)
    assert server.process.process is not None
    status = Path(f"/proc/{server.process.process.pid}/status")

    def rss_bytes() -> int:
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024

    before = rss_bytes()
    read = 0
    with httpx.stream("POST", url, json=body, timeout=60) as response:
        assert response.status_code == 200 and "content-length" not in response.headers
        for chunk in response.iter_raw(1 << 20):
            read += len(chunk)
            if read >= 64 << 20:
                break
    assert read >= 64 << 20
    assert rss_bytes() - before < 64 << 20  # 64 MB went out; the server did not hold them
    assert server.read_metric("mkg_local_server_faults_injected_total", {"fault": "huge"}) == 1
    server.set_faults(huge_rate=0.0)
    assert server.chat(DEFAULT_PROMPTS["[default]"], tiny_png(), timeout=60).status_code == 200


def test_server_killed_and_started_again_on_the_same_port(start_local_vlm_server: StartServer) -> None:
    server = start_local_vlm_server()
    port = server.port
    server.kill()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=5)
    server.start()
    assert server.port == port
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert server.chat(DEFAULT_PROMPTS["[default]"], tiny_png(), timeout=60).status_code == 200
