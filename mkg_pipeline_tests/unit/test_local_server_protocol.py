"""The local server without its model: routing, the request model, settings, fault injection, slots,
and the ASGI app in process with a fake OCR engine (hostile answers included).

Page geometry and MinerU's formats are in test_local_server_geometry.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from mineru_vl_utils.mineru_client import DEFAULT_PROMPTS
from PIL import Image

from mkg_devstack.local_server import protocol
from mkg_devstack.local_server.app import create_app
from mkg_devstack.local_server.faults import REPEATED_PHRASE, WRONG_MODEL_NAME, FaultInjector, hostile_content
from mkg_devstack.local_server.geometry import OcrLine
from mkg_devstack.local_server.ocr import EnginePool, Reading
from mkg_devstack.local_server.protocol import RequestError, Route
from mkg_devstack.local_server.settings import (
    ANSWER_FAULTS,
    DEFAULT_MODEL_NAME,
    FaultSettings,
    ServerSettings,
    parse_args,
)
from mkg_devstack.slots import SlotScheduler
from mkg_pipeline.engines.prompts import PAGE_MARKDOWN_PROMPT
from mkg_pipeline.quality.similarity import normalise_text, similarity
from mkg_pipeline_tests.fixtures.local_server import mineru_layout_parser


def mineru_helper() -> Any:
    return mineru_layout_parser()


# --------------------------------------------------------------------------- routing


@pytest.mark.parametrize(
    ("prompt", "route"),
    [
        (DEFAULT_PROMPTS["[layout]"], Route.LAYOUT),
        (DEFAULT_PROMPTS["[default]"], Route.RECOGNITION),
        (DEFAULT_PROMPTS["table"], Route.TABLE),
        (DEFAULT_PROMPTS["equation"], Route.RECOGNITION),
        (DEFAULT_PROMPTS["image"], Route.RECOGNITION),
        (PAGE_MARKDOWN_PROMPT, Route.PAGE_MARKDOWN),
        ("Describe this page.", Route.PAGE_MARKDOWN),
        ("", Route.PAGE_MARKDOWN),
        (None, Route.PAGE_MARKDOWN),
    ],
)
def test_route_for_prompt(prompt: str | None, route: Route) -> None:
    assert protocol.route_for_prompt(prompt) is route


PNG_URL = "data:image/png;base64," + base64.b64encode(b"\x89PNG fake").decode()


def test_parse_chat_request_mineru_body_routes_on_last_user_text() -> None:
    # The body shape mineru_vl_utils' HttpVlmClient.build_request_body sends.
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": PNG_URL}},
                    {"type": "text", "text": "\nLayout Detection:"},
                ],
            },
        ],
        "temperature": 0.0,
        "top_p": 0.01,
        "top_k": 1,
        "presence_penalty": 0.0,
        "vllm_xargs": {"no_repeat_ngram_size": 100, "debug": False},
        "skip_special_tokens": False,
        "max_tokens": 100,
        "max_completion_tokens": 50,
        "priority": 3,
    }
    chat = protocol.parse_chat_request(body)
    assert chat.model == "m"
    assert chat.image_urls == (PNG_URL,)
    assert protocol.route_for_prompt(chat.prompt) is Route.LAYOUT
    assert chat.token_limit == 50  # max_completion_tokens wins, as in vLLM
    assert isinstance(chat, protocol.ChatCompletionRequest)  # a pydantic model, as vLLM's protocol.py has
    assert chat.text_chars == len("You are a helpful assistant.") + len("\nLayout Detection:")


def test_parse_chat_request_accepts_string_content_and_bare_image_url() -> None:
    body = {
        "messages": [
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "an answer"},
            {"role": "user", "content": [{"type": "image_url", "image_url": PNG_URL}, {"type": "text", "text": "go"}]},
        ]
    }
    chat = protocol.parse_chat_request(body)
    assert chat.model is None
    assert chat.prompt == "go"
    assert chat.image_urls == (PNG_URL,)
    assert chat.token_limit is None


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"messages": []},
        {"messages": "hello"},
        {"messages": [{"content": "no role"}]},
        {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": "10"},
        {"model": 7, "messages": [{"role": "user", "content": "x"}]},
    ],
)
def test_parse_chat_request_rejects_malformed_bodies(body: object) -> None:
    with pytest.raises(RequestError):
        protocol.parse_chat_request(body)


def test_request_errors_name_the_field() -> None:
    with pytest.raises(RequestError, match=r"messages\.0\.content"):
        protocol.parse_chat_request({"messages": [{"role": "user", "content": [{"type": "audio"}]}]})
    with pytest.raises(RequestError, match="max_tokens"):
        protocol.parse_chat_request({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1})


def test_decode_data_url() -> None:
    assert protocol.decode_data_url("data:image/jpeg;base64,aGVsbG8=") == b"hello"
    for bad in (
        "https://example.com/page.png",
        "data:text/plain;base64,aGVsbG8=",
        "data:image/png,rawbytes",
        "data:image/png;base64,@@@",
        "data:image/png;base64,",
    ):
        with pytest.raises(RequestError):
            protocol.decode_data_url(bad)


def test_tokens_and_truncation() -> None:
    assert protocol.estimate_text_tokens(0) == 0
    assert protocol.estimate_text_tokens(9) == 3
    assert protocol.estimate_image_tokens(1036, 1036) == 37 * 37
    assert protocol.truncate_to_tokens("abcdefgh", None) == ("abcdefgh", "stop")
    assert protocol.truncate_to_tokens("abcdefgh", 2) == ("abcdefgh", "stop")
    assert protocol.truncate_to_tokens("abcdefghij", 2) == ("abcdefgh", "length")


# --------------------------------------------------------------------------- settings, faults, slots


def test_cli_defaults_and_vllm_flags() -> None:
    settings = parse_args(["--port", "9000"], environ={})
    assert settings.host == "127.0.0.1"
    assert settings.served_model_names == [DEFAULT_MODEL_NAME]
    assert settings.max_num_seqs == 2
    assert settings.api_key is None
    assert not settings.fault_injection
    ignored_vllm_flags = ["--dtype", "bfloat16", "--trust-remote-code", "--model", "x/y"]
    settings = parse_args(ignored_vllm_flags, environ={"VLLM_API_KEY": "secret-key-123"})
    assert settings.api_key == "secret-key-123"
    assert settings.model_name == "x/y"
    assert "secret-key-123" not in repr(settings)


def test_cli_fault_flags_are_inert_without_enable_and_validated() -> None:
    assert parse_args(["--fault-error-rate", "1"], environ={}).faults == FaultSettings()
    settings = parse_args(["--enable-fault-injection", "--fault-error-rate", "0.5", "--fault-seed", "3"], environ={})
    assert settings.fault_injection and settings.faults.error_rate == 0.5 and settings.fault_seed == 3
    with pytest.raises(SystemExit):
        parse_args(["--enable-fault-injection", "--fault-error-rate", "2"], environ={})
    with pytest.raises(SystemExit):
        parse_args(["--no-such-flag"], environ={})


def test_faults_are_reproducible_with_a_seed_and_updatable() -> None:
    def fates(seed: int) -> list[tuple[bool, bool]]:
        injector = FaultInjector(FaultSettings(error_rate=0.3, malformed_rate=0.3), seed)
        return [
            (decision.error_status is not None, decision.malformed)
            for decision in (injector.decide() for _ in range(50))
        ]

    assert fates(7) == fates(7)
    assert any(error for error, _ in fates(7)) and any(malformed for _, malformed in fates(7))
    injector = FaultInjector(FaultSettings(), 1)
    assert all(injector.decide().error_status is None for _ in range(20))
    assert injector.update({"error_rate": 1.0, "down": True}).down
    assert injector.decide().error_status == 500
    for bad in ({"error_rate": 1.5}, {"nope": 1}, {"down": "yes"}, []):
        with pytest.raises(ValueError):
            injector.update(bad)


def test_cli_hostile_answer_flags() -> None:
    argv = ["--enable-fault-injection", "--fault-trickle-rate", "1", "--fault-trickle-interval-s", "0.5"]
    argv += ["--fault-huge-rate", "0.5", "--fault-huge-bytes", "1000", "--fault-lone-surrogate-rate", "0.25"]
    faults = parse_args(argv, environ={}).faults
    assert (faults.trickle_rate, faults.trickle_interval_s) == (1.0, 0.5)
    assert (faults.huge_rate, faults.huge_bytes, faults.lone_surrogate_rate) == (0.5, 1000, 0.25)
    for fault in ANSWER_FAULTS:
        flag = f"--fault-{fault.replace('_', '-')}-rate"
        assert parse_args(["--enable-fault-injection", flag, "1"], environ={}).faults.rate(fault) == 1.0
    with pytest.raises(SystemExit):
        parse_args(["--enable-fault-injection", "--fault-trickle-interval-s", "0"], environ={})


@pytest.mark.parametrize("fault", ANSWER_FAULTS)
def test_each_hostile_answer_is_drawn_at_its_rate_and_updatable(fault: str) -> None:
    injector = FaultInjector(FaultSettings(), 3)
    assert all(injector.decide().answer is None for _ in range(10))
    injector.update({f"{fault}_rate": 1.0})
    assert injector.decide().answer == fault
    with pytest.raises(ValueError):
        injector.update({f"{fault}_rate": 2})


def test_hostile_contents() -> None:
    answer = "A real answer of the model, long enough to be cut in the middle."
    cut, finish = hostile_content("truncated", answer)
    assert finish == "length" and answer.startswith(cut) and 0 < len(cut) < len(answer)
    assert hostile_content("truncated", "")[0]  # cut short even when the model said nothing
    assert hostile_content("empty", answer) == ("", "stop")
    loop, finish = hostile_content("repetition", answer)
    assert finish == "stop" and loop.count(REPEATED_PHRASE) >= 100
    surrogate, _ = hostile_content("lone_surrogate", answer)
    assert "\ud800" in surrogate and len(surrogate) == len(answer) + 1
    html, _ = hostile_content("html", answer)
    assert html.startswith(answer)
    for hostile in ("<!-- page 99 -->", "<script>", "<!--", "```"):
        assert hostile in html[len(answer) :]
    assert html.count("<!--") == 2 and html.count("-->") == 1  # one comment is left open
    assert html.count("```") == 1  # and one fence


def test_fault_settings_update_checks_integers() -> None:
    injector = FaultInjector(FaultSettings(), 1)
    assert injector.update({"huge_bytes": 2048, "trickle_interval_s": 0.1}).huge_bytes == 2048
    for bad in ({"huge_bytes": 1.5}, {"huge_bytes": 0}, {"trickle_interval_s": 0}):
        with pytest.raises(ValueError):
            injector.update(bad)


async def test_slots_queue_fifo_and_report_waiting() -> None:
    seen: list[tuple[int, int]] = []
    slots = SlotScheduler(2, lambda running, waiting: seen.append((running, waiting)))
    release = asyncio.Event()
    order: list[int] = []

    async def job(index: int) -> None:
        async with slots.slot():
            order.append(index)
            await release.wait()

    tasks = []
    for index in range(5):
        tasks.append(asyncio.create_task(job(index)))
        await asyncio.sleep(0)  # arrive one after the other
    await asyncio.sleep(0.01)
    assert (slots.running, slots.waiting) == (2, 3)
    release.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert max(waiting for _, waiting in seen) == 3
    assert max(running for running, _ in seen) == 2
    assert (slots.running, slots.waiting) == (0, 0)


async def test_slots_cancelled_waiter_leaves_the_queue() -> None:
    slots = SlotScheduler(1)
    hold = asyncio.Event()

    async def holder() -> None:
        async with slots.slot():
            await hold.wait()

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    waiter = asyncio.create_task(holder())
    await asyncio.sleep(0.01)
    assert slots.waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert slots.waiting == 0
    hold.set()
    await first
    assert slots.running == 0


async def test_slots_waiter_cancelled_as_the_slot_frees_ends_cancelled() -> None:
    """The release skips a waiter already cancelled (its task has not run yet); that task then ends with
    CancelledError, not a ValueError from a queue that no longer holds it, and the counts stay right."""
    slots = SlotScheduler(1)
    held = slots.slot()
    await held.__aenter__()
    waiter = asyncio.create_task(_hold(slots, asyncio.Event()))
    await asyncio.sleep(0)
    assert (slots.running, slots.waiting) == (1, 1)
    waiter.cancel()  # cancels the future it awaits at once; its task runs on the next loop iteration
    await held.__aexit__(None, None, None)  # releases before that: the cancelled waiter is skipped
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (slots.running, slots.waiting) == (0, 0)


async def test_slots_report_peaks_until_reset() -> None:
    slots = SlotScheduler(2)
    hold = asyncio.Event()
    tasks = [asyncio.create_task(_hold(slots, hold)) for _ in range(4)]
    await asyncio.sleep(0.01)
    assert (slots.peak_running, slots.peak_waiting) == (2, 2)
    hold.set()
    await asyncio.gather(*tasks)
    assert (slots.peak_running, slots.peak_waiting) == (2, 2)
    slots.reset_peaks()
    assert (slots.peak_running, slots.peak_waiting) == (0, 0)


async def _hold(slots: SlotScheduler, release: asyncio.Event) -> None:
    async with slots.slot():
        await release.wait()


# --------------------------------------------------------------------------- quality measure and imports


def test_normalise_and_similarity() -> None:
    assert normalise_text("# The \ufb01rst\n\n  Some   TEXT\n## Next") == "the first some text next"
    assert similarity("Hello  world", "hello world") == 1.0
    assert 0.0 <= similarity("abc", "xyz") < 0.5


def test_importing_the_package_and_its_pure_modules_loads_no_model_runtime() -> None:
    # In a fresh interpreter: this session may have imported onnxruntime for other reasons.
    pure = ["protocol", "settings", "geometry", "blocks", "tables", "mineru_format", "faults"]
    code = (
        f"import sys, mkg_devstack.local_server, {', '.join(f'mkg_devstack.local_server.{m}' for m in pure)}\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('onnxruntime', 'rapidocr_onnxruntime', 'cv2', 'numpy', 'PIL')]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- the app, in process, with a fake model


class _FakeEngine:
    """Stands in for OcrEngine: reads "hello" everywhere, and fails on 41-pixel-wide images."""

    def _reading(self, image: Any) -> Reading:
        height, width = image.shape[:2]
        if width == 41:
            raise RuntimeError("simulated OCR crash")
        return Reading([OcrLine(2, 2, 30, 12, "hello")], 0, width, height)

    def read(self, image: Any, *, min_long_side: int = 0) -> Reading:
        return self._reading(image)

    def detect(self, image: Any) -> Reading:
        return self._reading(image)

    def read_boxes(self, image: Any, boxes: Any) -> list[OcrLine]:
        return list(boxes)


class _FakePool(EnginePool):
    def load(self) -> None:
        pass

    @contextlib.contextmanager
    def engine(self) -> Iterator[Any]:
        yield _FakeEngine()


def _png(width: int, height: int = 20) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buffer, format="PNG")
    return buffer.getvalue()


def _body(png: bytes, prompt: str = "Convert to Markdown", **extra: Any) -> dict[str, Any]:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]
    return {"model": DEFAULT_MODEL_NAME, "messages": [{"role": "user", "content": content}], **extra}


@contextlib.asynccontextmanager
async def _in_process(settings: ServerSettings, pool: EnginePool) -> AsyncIterator[httpx.AsyncClient]:
    """The ASGI app with its lifespan running, reached through httpx without a socket."""
    app = create_app(settings, pool=pool)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://local") as client:
            yield client


async def _wait_healthy(client: httpx.AsyncClient) -> None:
    for _ in range(200):  # the (fake) model loads in a background thread
        if (await client.get("/health")).status_code == 200:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never became healthy")


async def test_app_isolates_an_ocr_failure_to_its_request() -> None:
    settings = ServerSettings(api_key="k1")
    headers = {"Authorization": "Bearer k1"}
    async with _in_process(settings, _FakePool(settings.max_num_seqs)) as client:
        await _wait_healthy(client)
        crashed = await client.post("/v1/chat/completions", json=_body(_png(41)), headers=headers)
        assert crashed.status_code == 500
        assert crashed.json()["type"] == "InternalServerError"
        assert "simulated OCR crash" in crashed.json()["message"]
        fine = await client.post("/v1/chat/completions", json=_body(_png(40)), headers=headers)
        assert fine.status_code == 200
        assert fine.json()["choices"][0]["message"]["content"] == "hello"
        layout_body = _body(_png(40), "\nLayout Detection:")
        layout = await client.post("/v1/chat/completions", json=layout_body, headers=headers)
        assert mineru_helper().parse_layout_output(layout.json()["choices"][0]["message"]["content"])
        metrics = (await client.get("/metrics")).text
        success = 'vllm:request_success_total{finished_reason="stop",model_name="Qwen/Qwen2.5-VL-7B-Instruct"} 2.0'
        assert success in metrics
        assert "vllm:num_requests_running" in metrics and "vllm:kv_cache_usage_perc" in metrics
        assert (await client.get("/fault-injection")).status_code == 404


async def test_app_health_is_503_until_the_model_is_loaded() -> None:
    release = threading.Event()

    class SlowPool(_FakePool):
        def load(self) -> None:
            release.wait(5)

    async with _in_process(ServerSettings(), SlowPool(1)) as client:
        assert (await client.get("/health")).status_code == 503
        assert (await client.post("/v1/chat/completions", json=_body(_png(40)))).status_code == 503
        release.set()
        await _wait_healthy(client)
        assert (await client.get("/v1/models")).status_code == 200  # no key configured: open


async def _answer(client: httpx.AsyncClient, **extra: Any) -> httpx.Response:
    response = await client.post("/v1/chat/completions", json=_body(_png(40), **extra))
    assert response.status_code == 200, response.text
    return response


def _fault_count(metrics: str, fault: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(f'mkg_local_server_faults_injected_total{{fault="{fault}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_app_answers_each_hostile_answer_and_counts_it() -> None:
    settings = ServerSettings(fault_injection=True)
    async with _in_process(settings, _FakePool(settings.max_num_seqs)) as client:
        await _wait_healthy(client)
        assert (await _answer(client)).json()["choices"][0]["message"]["content"] == "hello"

        async def hostile(fault: str) -> httpx.Response:
            reset = {f"{other}_rate": 0.0 for other in ANSWER_FAULTS}
            assert (await client.post("/fault-injection", json={**reset, f"{fault}_rate": 1.0})).status_code == 200
            return await _answer(client)

        truncated = (await hostile("truncated")).json()["choices"][0]
        assert truncated["finish_reason"] == "length" and truncated["message"]["content"] == "he"
        assert (await hostile("empty")).json()["choices"][0]["message"]["content"] == ""
        repetition = (await hostile("repetition")).json()["choices"][0]
        assert repetition["finish_reason"] == "stop" and repetition["message"]["content"].count(REPEATED_PHRASE) > 100
        surrogate = await hostile("lone_surrogate")
        assert b"\\ud800" in surrogate.content  # the JSON escape: a lone surrogate has no UTF-8 form
        assert "\ud800" in surrogate.json()["choices"][0]["message"]["content"]
        html = (await hostile("html")).json()["choices"][0]["message"]["content"]
        assert "<!-- page 99 -->" in html and "<script>" in html and html.count("```") == 1
        metrics = (await client.get("/metrics")).text
        for fault in ("truncated", "empty", "repetition", "lone_surrogate", "html"):
            assert _fault_count(metrics, fault) == 1.0, fault


async def test_app_trickles_and_streams_a_huge_answer_without_content_length() -> None:
    settings = ServerSettings(fault_injection=True)
    async with _in_process(settings, _FakePool(settings.max_num_seqs)) as client:
        await _wait_healthy(client)
        await client.post("/fault-injection", json={"trickle_rate": 1.0, "trickle_interval_s": 0.02, "hang_s": 0.2})
        trickled = await _answer(client)
        assert trickled.content.startswith(b"   ")  # leading whitespace, one byte at a time
        assert trickled.json()["choices"][0]["message"]["content"] == "hello"  # then the answer, if one waits
        trickled_events = await _answer(client, stream=True)
        assert trickled_events.text.startswith("\n\n") and trickled_events.text.endswith("data: [DONE]\n\n")

        size = 3_000_000
        await client.post("/fault-injection", json={"trickle_rate": 0.0, "huge_rate": 1.0, "huge_bytes": size})
        huge = await _answer(client)
        assert "content-length" not in huge.headers
        assert abs(len(huge.content) - size) < 1000
        assert len(huge.json()["choices"][0]["message"]["content"]) > size - 1000
        streamed = await _answer(client, stream=True)
        assert streamed.headers["content-type"].startswith("text/event-stream")
        assert len(streamed.content) >= size and streamed.text.endswith("data: [DONE]\n\n")
        metrics = (await client.get("/metrics")).text
        assert _fault_count(metrics, "trickle") == 2.0 and _fault_count(metrics, "huge") == 2.0


def test_dishonest_endings() -> None:
    """Issue 21 row 2: answers that end any other way than ``stop``."""
    answer = "A real answer of the model, long enough to be cut in the middle."
    assert hostile_content("content_filter", answer) == ("", "content_filter")
    for fault, finish in (("abort", "abort"), ("no_finish", None)):
        cut, reason = hostile_content(fault, answer)
        assert reason == finish and answer.startswith(cut) and 0 < len(cut) < len(answer), fault
        assert hostile_content(fault, "")[0]  # something, even when the model said nothing


async def test_app_answers_dishonest_endings_and_another_models_name() -> None:
    """Issue 21 rows 2 and 3: odd finish reasons and a wrong model name, each counted; JSON and events alike."""
    settings = ServerSettings(fault_injection=True)
    async with _in_process(settings, _FakePool(settings.max_num_seqs)) as client:
        await _wait_healthy(client)

        async def only(fault: str, **extra: Any) -> httpx.Response:
            reset = {f"{other}_rate": 0.0 for other in ANSWER_FAULTS}
            assert (await client.post("/fault-injection", json={**reset, f"{fault}_rate": 1.0})).status_code == 200
            return await _answer(client, **extra)

        filtered = (await only("content_filter")).json()
        assert filtered["choices"][0]["finish_reason"] == "content_filter"
        assert filtered["choices"][0]["message"]["content"] == "" and filtered["model"] == DEFAULT_MODEL_NAME
        aborted = (await only("abort")).json()["choices"][0]
        assert (aborted["finish_reason"], aborted["message"]["content"]) == ("abort", "he")
        unfinished = (await only("no_finish")).json()["choices"][0]
        assert "finish_reason" in unfinished and unfinished["finish_reason"] is None
        assert unfinished["message"]["content"] == "he"
        # A max_tokens cut does not hide the injected ending.
        limited = (await only("abort", max_tokens=1)).json()["choices"][0]
        assert limited["finish_reason"] == "abort"

        wrong = (await only("wrong_model")).json()
        assert wrong["model"] == WRONG_MODEL_NAME != DEFAULT_MODEL_NAME
        assert (wrong["choices"][0]["finish_reason"], wrong["choices"][0]["message"]["content"]) == ("stop", "hello")
        events = (await only("wrong_model", stream=True)).text
        assert f'"model":"{WRONG_MODEL_NAME}"' in events and DEFAULT_MODEL_NAME not in events
        stream_unfinished = (await only("no_finish", stream=True)).text
        assert '"finish_reason":"stop"' not in stream_unfinished and stream_unfinished.endswith("data: [DONE]\n\n")

        metrics = (await client.get("/metrics")).text
        for fault, count in (("content_filter", 1.0), ("abort", 2.0), ("no_finish", 2.0), ("wrong_model", 2.0)):
            assert _fault_count(metrics, fault) == count, fault
        assert 'finished_reason="none"' in metrics and 'finished_reason="content_filter"' in metrics

        # Off again: the model's own answer, under the requested name.
        reset = {f"{other}_rate": 0.0 for other in ANSWER_FAULTS}
        await client.post("/fault-injection", json=reset)
        healthy = (await _answer(client)).json()
        assert (healthy["model"], healthy["choices"][0]["finish_reason"]) == (DEFAULT_MODEL_NAME, "stop")
