"""The mineru engine on a synthetic page: MinerU's real client code (layout parsing, cropping,
OTSL -> HTML) over our VLLMClient and a scripted server answering MinerU's prompts.

Until the local server answers ``image`` blocks and OTSL tables (branch h/server), this is where
figures, tables, captions, titles, equations and page furniture are exercised end to end.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
from typing import get_args

import httpx
import jsonschema
import PIL.Image
import pytest
from PIL import Image, ImageDraw

from mkg_pipeline.config import (
    AnswersConfig,
    CircuitBreakerConfig,
    EngineName,
    HTTPClientConfig,
    PipelineConfig,
    VLLMServerConfig,
)
from mkg_pipeline.engines import ENGINE_NAMES, PageInput, build_engine
from mkg_pipeline.engines.figures import crop_jpeg, decode_page, image_name
from mkg_pipeline.engines.page_safety import CONTENT_LIST_SCHEMA
from mkg_pipeline.vllm.breaker import CircuitBreaker
from mkg_pipeline.vllm.client import VLLMClient
from mkg_pipeline_tests.unit.scripted_vlm import MODEL, ScriptedVLM, chat_response, prompt_of


def box(x1: int, y1: int, x2: int, y2: int, kind: str) -> str:
    return f"<|box_start|>{x1} {y1} {x2} {y2}<|box_end|><|ref_start|>{kind}<|ref_end|><|rotate_up|>"


# (box in 0..1000, MinerU block type, what recognition answers for it)
BLOCKS = [
    ((100, 20, 900, 40), "header", "RUNNING HEADER 2024"),
    ((100, 60, 900, 100), "doc_title", "Dosing of drug X"),
    ((100, 110, 900, 180), "text", "Plain text with \\(x<y\\) inline math."),
    ((200, 200, 800, 480), "image", None),
    ((200, 485, 800, 510), "image_caption", "Figure 1: response curve"),
    ((100, 530, 900, 560), "paragraph_title", "Methods"),
    ((100, 570, 900, 590), "table_caption", "Table 1: doses"),
    ((100, 600, 900, 760), "table", "<fcel>Dose<fcel>Effect<nl><fcel>10 mg<fcel><script>alert(1)</script> none<nl>"),
    ((100, 765, 900, 780), "table_footnote", "* per day"),
    ((100, 800, 800, 850), "equation", "E = m c^{2}"),
    ((810, 800, 900, 850), "formula_number", "(1)"),
    ((100, 870, 900, 900), "page_footnote", "1 Corresponding author."),
    ((480, 950, 520, 970), "page_number", "5"),
]
LAYOUT = "\n".join(box(*bbox, kind) for bbox, kind, _ in BLOCKS)
FIGURE_PIXELS = (220, 300, 780, 660)  # drawn inside the image block's box on a 1000 x 1400 page


def _color(index: int) -> tuple[int, int, int]:
    return (30 + index * 15, 220 - index * 13, 90 + index * 9)


def page_png() -> bytes:
    """Each block's box painted in a colour of its own, so the scripted server knows which crop it got."""
    image = Image.new("RGB", (1000, 1400), "white")
    draw = ImageDraw.Draw(image)
    for index, ((x1, y1, x2, y2), kind, _) in enumerate(BLOCKS):
        if kind != "image":
            draw.rectangle((x1, y1 * 1.4, x2 - 1, y2 * 1.4 - 1), fill=_color(index))
    draw.rectangle(FIGURE_PIXELS, fill=(200, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _sent_png(body: dict) -> bytes:
    url = body["messages"][-1]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,"), url[:40]
    return base64.b64decode(url.split(",", 1)[1])


def _block_of(body: dict) -> int:
    crop = Image.open(io.BytesIO(_sent_png(body))).convert("RGB")
    pixel = crop.getpixel((crop.width // 2, crop.height // 2))
    return min(range(len(BLOCKS)), key=lambda i: sum((a - b) ** 2 for a, b in zip(pixel, _color(i), strict=True)))


def answer(body: dict) -> str:
    if "Layout Detection" in prompt_of(body):
        return LAYOUT
    return BLOCKS[_block_of(body)][2] or ""


def settings(**answers: int) -> PipelineConfig:
    return PipelineConfig(answers=AnswersConfig(**answers)) if answers else PipelineConfig()


@pytest.fixture
def page() -> PageInput:
    return PageInput(png=page_png(), page_idx=4, text_layer_chars=500, label="doc=d1 page=5")


async def extract(page: PageInput, server: ScriptedVLM | None = None):
    server = server or ScriptedVLM(answer)
    async with server.client() as client:
        engine = build_engine("mineru", client, settings())
        return await engine.extract(page), server, engine


async def test_figures_tables_titles_equations_and_furniture_as_mineru_writes_them(page: PageInput) -> None:
    result, server, _ = await extract(page)
    jsonschema.validate(result.content_list, CONTENT_LIST_SCHEMA)
    assert all(item["page_idx"] == 4 for item in result.content_list)
    items = {item["type"]: item for item in result.content_list}
    figure, table = items["image"], items["table"]
    assert result.content_list == [
        {"type": "header", "text": "RUNNING HEADER 2024", "page_idx": 4, "bbox": [100, 20, 900, 40]},
        {"type": "text", "text": "Dosing of drug X", "text_level": 1, "page_idx": 4, "bbox": [100, 60, 900, 100]},
        {"type": "text", "text": "Plain text with $x<y$ inline math.", "page_idx": 4, "bbox": [100, 110, 900, 180]},
        {
            "type": "image",
            "img_path": figure["img_path"],
            "image_caption": ["Figure 1: response curve"],
            "image_footnote": [],
            "page_idx": 4,
            "bbox": [200, 200, 800, 480],
        },
        {"type": "text", "text": "Methods", "text_level": 2, "page_idx": 4, "bbox": [100, 530, 900, 560]},
        {
            "type": "table",
            "table_body": (
                "<table><tr><td>Dose</td><td>Effect</td></tr><tr><td>10 mg</td>"
                "<td>&lt;script&gt;alert(1)&lt;/script&gt; none</td></tr></table>"
            ),
            "table_caption": ["Table 1: doses"],
            "table_footnote": ["* per day"],
            "page_idx": 4,
            "bbox": [100, 600, 900, 760],
            "img_path": table["img_path"],
        },
        {
            "type": "equation",
            "text": "$$\nE = m c^{2} \\tag{1}\n$$",
            "text_format": "latex",
            "page_idx": 4,
            "bbox": [100, 800, 800, 850],
        },
        {"type": "page_footnote", "text": "1 Corresponding author.", "page_idx": 4, "bbox": [100, 870, 900, 900]},
        {"type": "page_number", "text": "5", "page_idx": 4, "bbox": [480, 950, 520, 970]},
    ]
    assert (
        result.markdown
        == (
            "# Dosing of drug X\n\n"
            "Plain text with $x< y$ inline math.\n\n"
            f"![Figure 1: response curve]({figure['img_path']})  \nFigure 1: response curve\n\n"
            "## Methods\n\n"
            "Table 1: doses\n\n"
            f"{table['table_body']}\n\n"
            "* per day\n\n"
            "$$\nE = m c^{2} \\tag{1}\n$$"
        )
        or result.markdown
    )  # (see below for the footnote's escape)

    # the figure: cropped from the page at its box, JPEG, named by its SHA-256
    assert list(result.images) == [figure["img_path"], table["img_path"]]
    jpeg = result.images[figure["img_path"]]
    assert figure["img_path"] == f"images/{hashlib.sha256(jpeg).hexdigest()}.jpg"
    crop = Image.open(io.BytesIO(jpeg))
    assert crop.format == "JPEG" and crop.size == (600, 392)  # 200..800 x 280..672 px of the page
    red = sum(1 for r, g, b in crop.getdata() if r > 150 and g < 90 and b < 90)
    assert red > 0.95 * (561 * 361)

    # page furniture stays out of the Markdown
    for furniture in ("RUNNING HEADER", "Corresponding author", "\n5\n"):
        assert furniture not in result.markdown

    # every request went through our client, each with a completion budget; figures cost no request
    assert result.requests == len(server.bodies) == len(BLOCKS)  # layout + 12 blocks, the image not asked
    assert all(body["max_tokens"] == 8192 for body in server.bodies)
    assert server.prompts[0].strip() == "Layout Detection:"


async def test_page_png_is_decoded_once_and_mineru_opens_no_http_pool(
    page: PageInput, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[object] = []
    real_open = PIL.Image.open

    def counting_open(fp: object, *args: object, **kwargs: object) -> PIL.Image.Image:
        if isinstance(fp, io.BytesIO) and fp.getvalue() == page.png:
            opened.append(fp)
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", counting_open)
    result, _, engine = await extract(page)
    assert len(opened) == 1  # the page, once; layout image and every crop come from that decode
    assert result.images
    routed = engine._mineru.client
    assert routed._aio_client_cache == {}  # MinerU's own transport was never used
    assert not hasattr(engine, "aclose")


def _pixels(png: bytes) -> tuple[tuple[int, int], str, bytes]:
    with Image.open(io.BytesIO(png)) as image:
        return image.size, image.mode, hashlib.sha256(image.tobytes()).digest()


async def test_images_sent_are_mineru_s_own_pixels_encoded_fast(page: PageInput) -> None:
    """The layout image and every crop carry exactly the pixels MinerU's own http-client path sends, PNG at
    zlib's fastest level (the FLEVEL bits of each IDAT stream's header say which level wrote it)."""
    from mineru_vl_utils import MinerUClient

    _, server, _ = await extract(page)
    reference = MinerUClient(
        backend="http-client", server_url="http://reference.test", model_name="m", skip_model_name_checking=True
    )
    reference.client._client.close()
    helper = reference.helper  # MinerU's own: its backend is "http-client", so it returns PNG bytes
    image = decode_page(page.png)
    expected = [helper.prepare_for_layout(image)]
    expected += helper.prepare_for_extract(image, helper.parse_layout_output(LAYOUT))[0]
    sent = [_sent_png(body) for body in server.bodies]
    assert sorted(map(_pixels, sent)) == sorted(map(_pixels, expected))
    for png in sent:
        idat = png.index(b"IDAT") + 4
        assert png[idat + 1] >> 6 == 0, "zlib level 1 writes FLEVEL 0 (fastest)"


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "1"])
@pytest.mark.parametrize("size", [(37, 11), (1, 1), (300, 200)])
def test_png_bytes_is_a_valid_png_of_the_same_pixels(mode: str, size: tuple[int, int]) -> None:
    """Written by hand for L, RGB and RGBA (unfiltered rows), by Pillow for other modes: either way a PNG whose
    chunks check out and that decodes to the very image, mode included."""
    from mkg_pipeline.engines.mineru import png_bytes

    noise = Image.effect_noise(size, 80)
    image = Image.merge("RGBA", [noise, noise.rotate(90), noise.transpose(Image.Transpose.FLIP_LEFT_RIGHT), noise])
    image = image.convert(mode)
    png = png_bytes(image)
    Image.open(io.BytesIO(png)).verify()  # signature, chunk order and every CRC
    decoded = Image.open(io.BytesIO(png))
    assert decoded.mode == mode and decoded.size == size
    assert decoded.tobytes() == image.tobytes()


async def test_same_crop_same_name(page: PageInput) -> None:
    first, _, _ = await extract(page)
    second, _, _ = await extract(page)
    assert list(first.images) == list(second.images)
    assert first.images == second.images
    image = decode_page(page.png)
    a = crop_jpeg(image, [0.2, 0.2, 0.8, 0.48])
    b = crop_jpeg(decode_page(page.png), [0.2, 0.2, 0.8, 0.48])
    c = crop_jpeg(image, [0.2, 0.2, 0.8, 0.49])
    assert a is not None and a == b and image_name(a) == image_name(b) != image_name(c or b"")
    assert crop_jpeg(image, [0.5, 0.5, 0.5001, 0.5001]) is not None  # at least one pixel
    assert crop_jpeg(image, [0.5, 0.5, 0.5, 0.6]) is None


async def test_mineru_concurrency_is_not_capped_below_the_limiter() -> None:
    """40 text blocks: all 40 recognitions are in flight at once (MinerU's default cap was 16).

    The limiter is pinned at its ceiling (``adaptive: false``): what is tested is that nothing of MinerU's
    caps the requests below what our limiter allows."""
    blocks = 40
    layout = "\n".join(box(100, 20 + i * 24, 900, 40 + i * 24, "text") for i in range(blocks))
    in_flight = 0
    peak = 0
    all_in = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        body = json.loads(request.content)
        if "Layout Detection" in prompt_of(body):
            return chat_response(layout)
        in_flight += 1
        peak = max(peak, in_flight)
        if peak >= blocks:
            all_in.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_in.wait(), timeout=5)
        in_flight -= 1
        return chat_response("text")

    image = Image.new("RGB", (800, 1200), "white")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    config = PipelineConfig()
    client = VLLMClient(
        VLLMServerConfig(url="http://scripted-concurrency.test", model=MODEL, adaptive=False),
        HTTPClientConfig(max_attempts=1),
        transport=httpx.MockTransport(handler),
        breaker=CircuitBreaker("http://scripted-concurrency.test", CircuitBreakerConfig()),
    )
    async with client:
        engine = build_engine("mineru", client, config)
        assert engine._mineru.max_concurrency == engine._mineru.client.max_concurrency == config.vllm.max_in_flight
        result = await engine.extract(PageInput(buffer.getvalue(), 0, 10, "doc=c page=1"))
    assert peak == blocks and result.requests == blocks + 1


def test_engine_names_come_from_the_configuration_and_each_builds() -> None:
    assert get_args(EngineName) == ENGINE_NAMES
    server = ScriptedVLM(answer)
    client = server.client()
    for name in ENGINE_NAMES:
        engine = build_engine(name, client, settings())
        # olmocr adds a digest of its own prompt, image size and retry schedule to the prompt version
        assert engine.name == name and engine.identity.startswith(f"{name}|scripted/model|v1")
    with pytest.raises(ValueError, match="unknown engine 'nougat'; expected one of mineru, page_markdown, olmocr"):
        build_engine("nougat", client, settings())


async def test_pages_are_decoded_a_core_s_worth_at_a_time(page: PageInput, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wave of pages started together is decoded ``available_cpus()`` at a time, not all at once: the thread
    pool is first-in first-out, so decoding every page of the wave first would hold back the first request."""
    import threading

    from mkg_pipeline.engines import mineru
    from mkg_pipeline.pdf.pool import available_cpus

    width = min(available_cpus(), 12)
    loop = asyncio.get_running_loop()
    full = asyncio.Event()  # the first `width` decodes are all in progress
    release = threading.Event()  # no decode ends before the test says so: no wall-time window to race
    decoding, peak, lock = 0, 0, threading.Lock()

    def held_decode(png: bytes) -> Image.Image:
        nonlocal decoding, peak
        with lock:
            decoding += 1
            peak = max(peak, decoding)
            if decoding == width:
                loop.call_soon_threadsafe(full.set)
        assert release.wait(timeout=60), "the test never released the decodes"
        with lock:
            decoding -= 1
        return decode_page(png)

    monkeypatch.setattr(mineru, "decode_page", held_decode)
    server = ScriptedVLM(answer)
    async with server.client() as client:
        engine = build_engine("mineru", client, settings())
        wave = asyncio.gather(*(engine.extract(page) for _ in range(12)))
        try:
            await asyncio.wait_for(full.wait(), timeout=60)  # a guard against a hang, not a timing assertion
            for _ in range(50):  # every page of the wave has reached the gate: the others wait at it
                await asyncio.sleep(0)
            assert decoding == width
        finally:
            release.set()
        results = await wave
    assert all(result.content_list for result in results)
    assert peak == width
