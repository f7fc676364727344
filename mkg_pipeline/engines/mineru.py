"""MinerU's own two-step protocol (layout detection, then per-block recognition).

We drive ``mineru_vl_utils.MinerUClient(backend="http-client")`` — MinerU's
reference implementation of its ``vlm-http-client`` protocol — but replace its
HTTP client by a subclass whose ``aio_predict`` sends the body MinerU built
through our :class:`~mkg_pipeline.vllm.client.VLLMClient`. MinerU's own retry
transport is disabled (``max_retries=0``) so that retries, the circuit breaker,
the in-flight bound and the metrics live in exactly one place.

``mineru_vl_utils`` (and PIL) are imported only when the engine is built:
importing the code location must stay cheap.
"""

from __future__ import annotations

import contextvars
import io
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mkg_pipeline.engines.base import Block, PageInput, PageResult, blocks_to_markdown, engine_identity
from mkg_pipeline.vllm.errors import VLLMResponseError

if TYPE_CHECKING:
    from mkg_pipeline.vllm.client import VLLMClient

ENGINE_NAME = "mineru"


@dataclass
class _PageCall:
    label: str
    requests: int = 0
    steps: list[str] = field(default_factory=list)


# The page being extracted, visible to the routed client's aio_predict (MinerU's API has no per-call context).
_current_page: contextvars.ContextVar[_PageCall | None] = contextvars.ContextVar("mineru_page_call", default=None)


def _step_name(prompt: str) -> str:
    text = prompt.strip().rstrip(":").lower()
    return text.replace(" ", "_") or "predict"


def _build_routed_client_class() -> type:
    from mineru_vl_utils.vlm_client.http_client import HttpVlmClient
    from mineru_vl_utils.vlm_client.utils import aio_image_to_bytes_list_and_format

    class RoutedHttpVlmClient(HttpVlmClient):  # type: ignore[misc]
        """MinerU's HTTP client with every request sent through our guarded VLLMClient."""

        def __init__(self, vllm_client: VLLMClient, *, system_prompt: str) -> None:
            self._vllm = vllm_client
            super().__init__(
                model_name=vllm_client.model,
                server_url=vllm_client.server_url,
                system_prompt=system_prompt,
                allow_truncated_content=True,  # as MinerUClient configures its own client
                skip_model_name_checking=True,  # no network I/O at construction
                max_retries=0,  # retries happen once, in VLLMClient
                use_tqdm=False,
            )

        async def aio_predict(
            self, image: Any, prompt: str = "", sampling_params: Any = None, priority: int | None = None
        ) -> str:
            images, image_format = await aio_image_to_bytes_list_and_format(image)
            body = self.build_request_body(
                system_prompt=self.system_prompt,
                image=images,
                prompt=prompt,
                sampling_params=sampling_params,
                image_format=image_format,
                priority=priority,
            )
            call = _current_page.get()
            step = _step_name(prompt or self.prompt)
            label = f"{call.label} step={step}" if call else f"step={step}"
            if call is not None:
                call.requests += 1
                call.steps.append(step)
            data = await self._vllm.post_chat_completion(body, label=label)
            try:
                return str(self.get_response_content(data))
            except Exception as exc:  # MinerU's RequestError/ServerError on a body it cannot use
                raise VLLMResponseError(
                    f"unusable MinerU answer: {exc}", server=self._vllm.server_url, label=label
                ) from exc

        def predict(self, *args: Any, **kwargs: Any) -> str:
            raise RuntimeError("synchronous predict would bypass the guarded client; use the async API")

        def stream_predict(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("streaming would bypass the guarded client; use the async API")

    return RoutedHttpVlmClient


class MinerUEngine:
    name = ENGINE_NAME

    def __init__(self, client: VLLMClient, prompt_version: str, max_concurrency: int = 16) -> None:
        from loguru import logger as loguru_logger
        from mineru_vl_utils import MinerUClient

        if not os.environ.get("MINERU_VL_DEBUG_ENABLE"):
            # MinerU logs every raw layout answer at DEBUG through loguru's stderr sink: in a Dagster
            # step that is megabytes of compute log per batch. Its own switch turns it back on.
            loguru_logger.disable("mineru_vl_utils")
        self._client = client
        self._prompt_version = prompt_version
        self._mineru = MinerUClient(
            backend="http-client",
            server_url=client.server_url,
            model_name=client.model,
            skip_model_name_checking=True,
            max_retries=0,
            max_concurrency=max_concurrency,
            use_tqdm=False,
        )
        original = self._mineru.client
        self._mineru.client = _build_routed_client_class()(client, system_prompt=original.system_prompt)
        original._client.close()  # the unused sync pool MinerU opened

    @property
    def identity(self) -> str:
        return engine_identity(self.name, self._client.model, self._prompt_version)

    async def extract(self, page: PageInput) -> PageResult:
        from PIL import Image

        with Image.open(io.BytesIO(page.png)) as opened:
            image = opened.convert("RGB")
        call = _PageCall(label=page.label)
        token = _current_page.set(call)
        try:
            extracted = await self._mineru.aio_two_step_extract(image)
        finally:
            _current_page.reset(token)
        blocks = tuple(
            Block(
                type=str(block.type),
                text=str(block.content or ""),
                bbox=tuple(float(v) for v in block.bbox) if block.bbox else None,  # type: ignore[arg-type]
                angle=block.angle,
            )
            for block in extracted
        )
        return PageResult(
            markdown=blocks_to_markdown(blocks),
            content_list=[b.to_content_item(page.page_idx) for b in blocks],
            requests=call.requests,
        )

    async def aclose(self) -> None:
        # Our routed client never opened an async pool; MinerU's aclose would try to close one.
        return None
