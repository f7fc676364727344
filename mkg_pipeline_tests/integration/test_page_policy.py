"""Issue 19 item 4 through the real local server: an invalid answer is re-asked up the temperature schedule.

The server's fault injection makes every answer invalid; the request bodies are read off the real
HTTP transport on their way out (what the server got), not from a scripted stand-in.
"""

from __future__ import annotations

import json

import httpx
import pytest

from mkg_pipeline.config import AnswersConfig, CircuitBreakerConfig, HTTPClientConfig, MinerUConfig, VLLMServerConfig
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
    settings = MinerUConfig(answers=AnswersConfig(max_reasks=3))
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
