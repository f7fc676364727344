"""benchmarks/simulated_vllm.py as a real process: slots and queueing on /metrics, answers MinerU can parse.

The simulated GPU server is what the saturation benchmark measures against, so it must
behave like vLLM where the measurement depends on it: at most S requests run, the rest wait
in vLLM's gauges, a client that goes away frees its place, and MinerU's own client reads its
layout answers. Everything is checked by polling the server's state, never by timing.
"""

from __future__ import annotations

import asyncio
import base64
import io
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from mkg_devstack.local_stack import ManagedProcess, free_port

pytestmark = pytest.mark.integration

SIMULATOR = Path(__file__).resolve().parents[2] / "benchmarks" / "simulated_vllm.py"
MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"

StartSimulator = Callable[..., ManagedProcess]


@pytest.fixture
def start_simulator(tmp_path: Path) -> Iterator[StartSimulator]:
    started: list[ManagedProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ManagedProcess:
        port = free_port()
        argv = [sys.executable, str(SIMULATOR), "--host", "127.0.0.1", "--port", str(port), *args]
        process = ManagedProcess(
            name="simulated-vllm",
            argv=argv,
            host="127.0.0.1",
            port=port,
            health_path="/health",
            log_path=tmp_path / f"simulated-vllm-{port}.log",
            env=env or {},
            startup_timeout_s=30.0,
        )
        started.append(process.start())
        return process

    yield start
    for process in started:
        process.stop()


def gauges(url: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"never saw {what}")


def png_data_url(width: int = 64, height: int = 80) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def page_body(prompt: str = "Convert this document page to Markdown.", **extra: object) -> dict[str, object]:
    content = [{"type": "image_url", "image_url": {"url": png_data_url()}}, {"type": "text", "text": prompt}]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def test_requests_beyond_the_slots_wait_and_a_client_that_leaves_frees_its_place(
    start_simulator: StartSimulator,
) -> None:
    server = start_simulator("--slots", "2", "--latency", "600")  # nothing finishes during the test
    running = f'vllm:num_requests_running{{model_name="{MODEL}"}}'
    waiting = f'vllm:num_requests_waiting{{model_name="{MODEL}"}}'

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=None) as client:
            tasks = [asyncio.create_task(client.post("/v1/chat/completions", json=page_body())) for _ in range(5)]

            async def until(check: Callable[[dict[str, float]], bool], what: str) -> dict[str, float]:
                for _ in range(1200):
                    values = await asyncio.to_thread(gauges, server.url)
                    if check(values):
                        return values
                    await asyncio.sleep(0.05)
                raise AssertionError(f"never saw {what}; last: {values}")

            seen = await until(lambda g: g[running] == 2 and g[waiting] == 3, "2 running and 3 waiting")
            # Slots are the only limit here: no KV cache is modelled, none is reported (full slots once read
            # as a full cache, and the limiter kept no queue).
            assert not any(name.startswith("vllm:kv_cache_usage_perc") for name in seen)
            assert seen["simulated_vllm_peak_requests_waiting"] == 3
            assert seen["simulated_vllm_peak_requests_running"] == 2
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        # the client closed its connections: the server aborts those requests, as vLLM does
        await until(lambda g: g[running] == 0 and g[waiting] == 0, "the queue empty after the clients left")

    asyncio.run(scenario())
    assert gauges(server.url)[f'vllm:request_success_total{{model_name="{MODEL}",finished_reason="stop"}}'] == 0


def test_queued_requests_are_served_in_arrival_order_and_counted(start_simulator: StartSimulator) -> None:
    server = start_simulator("--slots", "1", "--latency", "0.3")
    stop = f'vllm:request_success_total{{model_name="{MODEL}",finished_reason="stop"}}'

    def arrived(values: dict[str, float]) -> float:
        return (
            values[stop]
            + values[f'vllm:num_requests_running{{model_name="{MODEL}"}}']
            + values[f'vllm:num_requests_waiting{{model_name="{MODEL}"}}']
        )

    async def scenario() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            tasks = []
            for i in range(6):
                tasks.append(asyncio.create_task(client.post("/v1/chat/completions", json=page_body())))
                # the next request is sent only once the server has this one: the arrival order is known
                await asyncio.to_thread(
                    wait_until, lambda i=i: arrived(gauges(server.url)) >= i + 1, f"request {i} at the server"
                )
            responses = await asyncio.gather(*tasks)
        assert all(r.status_code == 200 for r in responses)
        return [r.json()["id"] for r in responses]

    ids = asyncio.run(scenario())
    # the server numbers answers as they finish: FIFO means request i finishes i-th
    assert ids == [f"chatcmpl-sim-{i}" for i in range(1, 7)]
    values = gauges(server.url)
    assert values[stop] == 6
    assert values[f'vllm:e2e_request_latency_seconds_count{{model_name="{MODEL}"}}'] == 6
    assert values["simulated_vllm_peak_requests_running"] == 1


def test_mineru_client_parses_the_layout_answer_and_reads_every_block(start_simulator: StartSimulator) -> None:
    from mineru_vl_utils import MinerUClient
    from mineru_vl_utils.mineru_client import DEFAULT_PROMPTS

    server = start_simulator("--slots", "4", "--latency", "0.01", "--layout-blocks", "5")
    client = MinerUClient(backend="http-client", server_url=server.url, model_name=MODEL, use_tqdm=False)
    image = Image.new("RGB", (850, 1100), "white")

    layout = client.layout_detect(image)
    assert [block.type for block in layout] == ["text"] * 5
    tops = [block.bbox[1] for block in layout]
    assert tops == sorted(tops) and all(0 <= v <= 1 for block in layout for v in block.bbox)
    assert all(block.angle == 0 for block in layout)

    blocks = client.two_step_extract(image)
    assert len(blocks) == 5
    assert all(block.content for block in blocks)

    answer = httpx.post(
        f"{server.url}/v1/chat/completions", json=page_body(DEFAULT_PROMPTS["table"].strip()), timeout=30
    ).json()
    assert "<fcel>" in answer["choices"][0]["message"]["content"]
    routes = gauges(server.url)
    assert routes['simulated_vllm_requests_total{route="layout"}'] == 2
    assert routes['simulated_vllm_requests_total{route="text"}'] == 5


def test_page_markdown_answer_is_a_realistic_page_with_usage(start_simulator: StartSimulator) -> None:
    server = start_simulator("--slots", "2", "--latency", "0.01")
    data = httpx.post(f"{server.url}/v1/chat/completions", json=page_body(max_tokens=8192), timeout=30).json()
    choice = data["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"].startswith("# ")
    assert len(choice["message"]["content"].encode()) > 2000
    assert "|---|" in choice["message"]["content"]
    # 64 x 80 px image: Qwen2.5-VL's 28 px patches -> 3 x 3 = 9 image tokens, plus the prompt text
    assert data["usage"]["prompt_tokens"] >= 9
    assert data["usage"]["completion_tokens"] > 0

    cut = httpx.post(f"{server.url}/v1/chat/completions", json=page_body(max_tokens=10), timeout=30).json()
    assert cut["choices"][0]["finish_reason"] == "length"
    assert cut["usage"]["completion_tokens"] == 10

    models = httpx.get(f"{server.url}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    wrong = httpx.post(f"{server.url}/v1/chat/completions", json={**page_body(), "model": "other"}, timeout=30)
    assert wrong.status_code == 404


def test_api_key_from_the_environment_guards_v1_only(start_simulator: StartSimulator) -> None:
    server = start_simulator("--slots", "1", "--latency", "0.01", "--api-key-env", "SIM_KEY", env={"SIM_KEY": "s3cret"})
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 401
    refused = httpx.post(f"{server.url}/v1/chat/completions", json=page_body(), timeout=30)
    assert refused.status_code == 401
    served = httpx.post(
        f"{server.url}/v1/chat/completions",
        json=page_body(),
        headers={"Authorization": "Bearer s3cret"},
        timeout=30,
    )
    assert served.status_code == 200
    log = server.log_path.read_text()
    assert "s3cret" not in log


def png_bytes_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_gpu_preset_serves_page_dependent_lengths_and_vllms_metrics(start_simulator: StartSimulator) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    server = start_simulator("--preset", "h100-fast")
    blank = png_bytes_data_url(Image.new("RGB", (1275, 1650), "white"))  # compresses to almost nothing
    noise = png_bytes_data_url(Image.frombytes("RGB", (300, 400), random.Random(0).randbytes(360_000)))  # dense

    def body(url: str) -> dict[str, object]:
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Convert to Markdown."}]
        return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8192}

    async def scenario() -> list[dict[str, object]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            responses = await asyncio.gather(
                *(client.post("/v1/chat/completions", json=body(url)) for url in [blank, noise] * 3)
            )
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        return [r.json() for r in responses]

    answers = asyncio.run(scenario())
    usage = [a["usage"] for a in answers]
    # the blank page writes the least, the dense one the most; the same page always the same
    blank_tokens = usage[0]["completion_tokens"]
    assert 200 <= blank_tokens < 300
    assert [u["completion_tokens"] for u in usage] == [blank_tokens, 2000] * 3
    assert all(a["choices"][0]["finish_reason"] == "stop" for a in answers)
    # a 150-DPI letter page after Qwen2.5-VL's resizing to max_pixels: about 1,280 image tokens
    assert 1100 < usage[0]["prompt_tokens"] < 1300
    assert len(answers[1]["choices"][0]["message"]["content"]) > 4 * 1500

    cut = httpx.post(f"{server.url}/v1/chat/completions", json={**body(noise), "max_tokens": 50}, timeout=60).json()
    assert cut["choices"][0]["finish_reason"] == "length" and cut["usage"]["completion_tokens"] == 50

    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}  # parses as Prometheus text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:num_preemptions",
        "vllm:generation_tokens",
        "vllm:prompt_tokens",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_success",
    ):
        assert name in families, name
    values = gauges(server.url)
    labels = f'model_name="{MODEL}"'
    assert values[f"vllm:num_requests_running{{{labels}}}"] == 0
    assert values[f"vllm:kv_cache_usage_perc{{{labels}}}"] == 0.0  # every sequence finished: KV freed
    assert values[f"vllm:num_preemptions_total{{{labels}}}"] == 0
    assert values[f"vllm:generation_tokens_total{{{labels}}}"] == 3 * (blank_tokens + 2000) + 50
    assert values[f"vllm:e2e_request_latency_seconds_count{{{labels}}}"] == 7
    assert values['simulated_vllm_config{param="max_num_seqs"}'] == 256
    log = httpx.get(f"{server.url}/simulated/requests", timeout=10).json()
    assert log["preset"] == "h100-fast"
    assert sorted(output for _, output in log["requests"]) == sorted([blank_tokens, 2000] * 3 + [50])


def test_gpu_preset_shows_running_and_kv_use_while_it_decodes(start_simulator: StartSimulator) -> None:
    server = start_simulator("--preset", "h100-fast")
    noise = png_bytes_data_url(Image.frombytes("RGB", (300, 400), random.Random(0).randbytes(360_000)))
    content = [{"type": "image_url", "image_url": {"url": noise}}, {"type": "text", "text": "Convert to Markdown."}]
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    labels = f'model_name="{MODEL}"'

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            tasks = [asyncio.create_task(client.post("/v1/chat/completions", json=body)) for _ in range(4)]
            seen: dict[str, float] = {}
            for _ in range(400):
                seen = await asyncio.to_thread(gauges, server.url)
                if seen[f"vllm:num_requests_running{{{labels}}}"] == 4:
                    break
                await asyncio.sleep(0.01)
            assert seen[f"vllm:num_requests_running{{{labels}}}"] == 4, seen
            assert 0 < seen[f"vllm:kv_cache_usage_perc{{{labels}}}"] < 1
            responses = await asyncio.gather(*tasks)
            assert all(r.status_code == 200 for r in responses)

    asyncio.run(scenario())
