"""The local server's pure parts: routing, request parsing, layout format, Markdown assembly.

No model and no server here: OCR lines are synthetic boxes with text.
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

from mkg_pipeline.engines.prompts import PAGE_MARKDOWN_PROMPT
from mkg_pipeline.local_server import protocol
from mkg_pipeline.local_server.app import create_app
from mkg_pipeline.local_server.faults import FaultInjector
from mkg_pipeline.local_server.ocr import EnginePool, Reading
from mkg_pipeline.local_server.protocol import Block, BlockType, OcrLine, RequestError, Route, Row
from mkg_pipeline.local_server.settings import DEFAULT_MODEL_NAME, FaultSettings, ServerSettings, parse_args
from mkg_pipeline.local_server.slots import SlotScheduler
from mkg_pipeline.quality import normalise_text, similarity
from mkg_pipeline_tests.fixtures.local_server import mineru_layout_parser

BODY_H = 20.0  # synthetic body text: 20 px tall rows, 8 px per character


def line(x1: float, y1: float, text: str, *, advance: float = 8.0, height: float = BODY_H) -> OcrLine:
    """A synthetic OCR line whose width follows its text, like real type."""
    return OcrLine(x1, y1, x1 + advance * len(text), y1 + height, text)


def paragraph(
    x1: float, y1: float, words: str, rows: int, *, indent: float = 0.0, pitch: float = 24.0
) -> list[OcrLine]:
    """``rows`` justified rows of 48 characters, the first indented by ``indent`` px."""
    lines = []
    for index in range(rows):
        text = f"{words} {index}".ljust(48, "x")
        left = x1 + (indent if index == 0 else 0.0)
        lines.append(OcrLine(left, y1 + index * pitch, x1 + 8.0 * 48, y1 + index * pitch + BODY_H, text))
    return lines


def mineru_helper() -> Any:
    return mineru_layout_parser()


# --------------------------------------------------------------------------- routing


@pytest.mark.parametrize(
    ("prompt", "route"),
    [
        (DEFAULT_PROMPTS["[layout]"], Route.LAYOUT),
        (DEFAULT_PROMPTS["[default]"], Route.RECOGNITION),
        (DEFAULT_PROMPTS["table"], Route.RECOGNITION),
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
    assert chat.max_tokens == 50  # max_completion_tokens wins, as in vLLM
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
    assert chat.max_tokens is None


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


# --------------------------------------------------------------------------- rows and reading order


def test_rows_join_pieces_left_to_right_with_a_space() -> None:
    lines = [line(300, 101, "world"), line(100, 100, "hello"), line(100, 140, "next row")]
    rows = protocol.group_rows(lines)
    assert [row.text for row in rows] == ["hello world", "next row"]


def test_two_columns_read_column_by_column_under_a_spanning_title() -> None:
    title = line(150, 20, "A Two Column Title", advance=16.0, height=34.0)
    left = paragraph(100, 100, "left", 10)
    right = paragraph(540, 100, "right", 10)
    footer = line(100, 400, "a footnote spanning the whole page width", advance=20.0)  # below both columns
    lines = [title, *right, *left, footer]
    assert protocol.find_gutter(lines) is not None
    order = [row.text for block in protocol.build_blocks(lines) for row in block.rows]
    assert order[0] == title.text
    assert order[1:11] == [item.text for item in left]
    assert order[11:21] == [item.text for item in right]
    assert order[21] == footer.text


def test_one_column_and_narrow_table_cells_are_not_split_into_columns() -> None:
    assert protocol.find_gutter(paragraph(100, 100, "body", 12)) is None
    # A two-cell table: narrow items on both sides keep reading row by row.
    table = [line(100, 100 + 24 * i, f"name {i}") for i in range(8)] + [
        line(600, 100 + 24 * i, f"value {i}") for i in range(8)
    ]
    assert protocol.find_gutter(table) is None
    rows = protocol.group_rows(table)
    assert rows[0].text == "name 0 value 0"


def test_vertical_lines_are_read_last_each_on_its_own() -> None:
    stamp = OcrLine(10, 100, 30, 400, "arXiv:0000.0000v1 [cs.XX] 1 Jan 2000", vertical=True)
    body = paragraph(100, 100, "body", 5)
    blocks = protocol.build_blocks([stamp, *body])
    assert blocks[-1].text == stamp.text
    assert all(stamp.text not in block.text for block in blocks[:-1])


# --------------------------------------------------------------------------- blocks and Markdown


def test_markdown_headings_paragraphs_and_indent() -> None:
    title = line(100, 20, "Big Title", advance=18.0, height=36.0)  # >= 1.75x body: level 1
    section = line(100, 90, "1 Introduction", advance=11.0, height=24.0)  # >= 1.3x body: level 2
    first = paragraph(100, 130, "first", 3)
    second = paragraph(100, 130 + 3 * 24, "second", 3, indent=30.0)  # no gap, but an indented first line
    third = paragraph(100, 130 + 6 * 24 + 25, "third", 2)  # a blank gap before it
    markdown = protocol.lines_to_markdown([title, section, *first, *second, *third])
    parts = markdown.split("\n\n")
    assert parts[0] == "# Big Title"
    assert parts[1] == "## 1 Introduction"
    assert parts[2] == " ".join(item.text for item in first)
    assert parts[3] == " ".join(item.text for item in second)
    assert parts[4] == " ".join(item.text for item in third)
    assert len(parts) == 5


def test_formula_sized_rows_are_not_headings() -> None:
    formula = line(100, 20, "ds2=a2{-(1+2w)dt2}(1)", advance=14.0)
    body = paragraph(100, 60, "body", 4)
    assert protocol.lines_to_markdown([formula, *body]).startswith("ds2=")


def test_recognition_text_joins_rows_with_spaces_and_paragraphs_with_newlines() -> None:
    first = paragraph(0, 0, "one", 2)
    second = paragraph(0, 2 * 24 + 30, "two", 2)
    assert protocol.lines_to_text([*first, *second]) == "\n".join(
        [" ".join(item.text for item in first), " ".join(item.text for item in second)]
    )
    assert protocol.lines_to_text([]) == ""
    assert protocol.lines_to_markdown([]) == ""


def test_page_numbers_are_marked_only_when_numeric_and_at_the_edge() -> None:
    body = paragraph(100, 200, "body", 10)
    number = line(490, 960, "12")
    footer = line(100, 10, "Journal")  # a running head: stays text
    blocks = protocol.mark_page_numbers(protocol.build_blocks([*body, number, footer]), 1000, 1000)
    types = {block.text: block.type for block in blocks}
    assert types["12"] is BlockType.PAGE_NUMBER
    assert types["Journal"] is BlockType.TEXT
    candidates = protocol.page_number_candidates([*body, number], 1000, 1000)
    assert candidates == [number]


def test_edge_slivers_of_neighbouring_lines_are_dropped() -> None:
    sliver = OcrLine(0, 0, 500, 6, "noise")
    lines = [sliver, *paragraph(0, 10, "kept", 3)]
    assert protocol.drop_edge_slivers(lines, 500, 90)[0].text.startswith("kept")


# --------------------------------------------------------------------------- MinerU layout format


def test_layout_output_parses_back_with_mineru_to_the_same_boxes() -> None:
    width, height = 1036, 1036
    blocks = [
        Block(BlockType.TITLE, [Row([OcrLine(100, 50, 900, 90, "Title")])], level=1),
        Block(BlockType.TEXT, [Row([OcrLine(100, 120, 900, 140, "a")]), Row([OcrLine(100, 144, 880, 164, "b")])]),
        Block(BlockType.PAGE_NUMBER, [Row([OcrLine(500, 1000, 520, 1020, "3")])]),
    ]
    output = protocol.format_layout(blocks, width, height)
    assert len(output.splitlines()) == 3
    parsed = mineru_helper().parse_layout_output(output)
    assert [block.type for block in parsed] == ["title", "text", "page_number"]
    for original, back in zip(blocks, parsed, strict=True):
        expected = [original.x1 / width, original.y1 / height, original.x2 / width, original.y2 / height]
        assert back.bbox == pytest.approx(expected, abs=0.0011)
        assert back.angle == 0


def test_layout_padding_grows_boxes_but_not_into_the_next_block() -> None:
    upper = Block(BlockType.TEXT, [Row([OcrLine(100, 100, 900, 130, "upper")])])
    lower = Block(BlockType.TEXT, [Row([OcrLine(100, 128, 900, 160, "lower")])])  # detection boxes overlap
    parsed = mineru_helper().parse_layout_output(protocol.format_layout([upper, lower], 1000, 1000, pad_x=5, pad_y=5))
    assert parsed[0].bbox[0] == pytest.approx(0.095)  # padded sideways
    assert parsed[0].bbox[1] == pytest.approx(0.095)  # and upwards, where nothing is
    assert parsed[0].bbox[3] <= parsed[1].bbox[1]  # but the two crops do not overlap


def test_layout_boxes_never_collapse() -> None:
    edge = Block(BlockType.TEXT, [Row([OcrLine(999.8, 10, 1000, 10.2, ".")])])
    parsed = mineru_helper().parse_layout_output(protocol.format_layout([edge], 1000, 1000))
    assert len(parsed) == 1


def test_empty_page_gives_empty_layout() -> None:
    assert protocol.format_layout([], 1036, 1036) == ""
    assert mineru_helper().parse_layout_output("") == []


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


# --------------------------------------------------------------------------- quality measure and imports


def test_normalise_and_similarity() -> None:
    assert normalise_text("# The \ufb01rst\n\n  Some   TEXT\n## Next") == "the first some text next"
    assert similarity("Hello  world", "hello world") == 1.0
    assert 0.0 <= similarity("abc", "xyz") < 0.5


def test_importing_the_package_loads_no_model_runtime() -> None:
    # In a fresh interpreter: this session may have imported onnxruntime for other reasons.
    code = (
        "import sys, mkg_pipeline.local_server.protocol, mkg_pipeline.local_server.settings\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('onnxruntime', 'rapidocr_onnxruntime', 'cv2')]\n"
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
