"""MinerU's own two-step protocol (layout detection, then per-block recognition).

We drive ``mineru_vl_utils.MinerUClient(backend="http-client")`` — MinerU's reference
implementation of its ``vlm-http-client`` protocol — but replace its HTTP client by a subclass
whose ``aio_predict`` sends the body MinerU built through our
:class:`~mkg_pipeline.vllm.client.VLLMClient`. MinerU's own retry transport is disabled
(``max_retries=0``) so that retries, the circuit breaker, the adaptive limiter and the metrics live
in exactly one place.

Concurrency: ``MinerUClient.aio_two_step_extract`` makes an ``asyncio.Semaphore(max_concurrency)``
per page. We set ``max_concurrency`` to ``vllm.max_in_flight``, the hard ceiling of our client's
adaptive limiter, so it can never bind before the limiter does: the limiter alone decides how many
requests are in flight, across all pages of the process.

The page PNG is decoded once (PIL, in a worker thread); MinerU resizes that image for layout
detection and crops it for recognition, and we crop the same image for figures and tables.

Image encoding: MinerU's helper PNG-encodes the layout image and every crop at zlib's level 6 (PIL's
default) when its backend is ``http-client``; with any other backend name it hands over the PIL image
instead. We give the helper another name (``HELPER_BACKEND``) and encode each image once, in a worker
thread, with unfiltered rows at zlib level 1 (:func:`png_bytes`): the same pixels (PNG is lossless), at
about a third of the CPU of MinerU's encoding, and smaller bodies on document images. Encoding was the
largest part of the client's CPU per request, and on a two-core worker the client's CPU is what bounds
how busy it keeps the server.

Validated answers, per request and per page:

- every request carries ``max_tokens`` (``answers.max_tokens`` when MinerU's sampling params set
  none), so a runaway answer is cut off rather than read without bound;
- a request answered by another model than the configured one or its aliases (``model_mismatch``),
  with any ``finish_reason`` but ``"stop"`` (``truncated`` for ``length``, ``finish_<reason>``
  otherwise) or with a runaway repetition (``repetition``, see :mod:`mkg_pipeline.engines.validation`)
  is re-asked at once, up to ``answers.max_reasks`` times, with ``max_tokens`` doubled after a
  truncation and re-ask *n* sent at olmOCR's temperature for attempt *n* (the first ask keeps
  MinerU's own sampling parameters, :mod:`mkg_pipeline.engines.schedule`); if it stays bad the whole
  page is rejected with that reason: a page with a cut-off block, or a block read by another model,
  is not a finished page;
- an empty *block* answer is accepted (MinerU's own ``[Non-Text]`` and blank crops are normal), but a
  page whose text layer has text and whose blocks yield no content-list item at all is ``empty``:
  the whole page (layout and recognition) is asked again, up to ``answers.max_reasks`` times, its
  requests that many steps up the temperature schedule;
- every request, re-asks and cancelled siblings included, counts in ``requests``.

``mineru_vl_utils`` (and PIL) are imported only when the engine is built: importing the code
location must stay cheap.
"""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mkg_pipeline import png
from mkg_pipeline.engines.base import AnswerRejected, PageInput, PageResult, engine_identity
from mkg_pipeline.engines.content_list import CROPPED_TYPES, blocks_to_page
from mkg_pipeline.engines.figures import crop_jpeg, decode_page, image_name
from mkg_pipeline.engines.page_safety import clean_text
from mkg_pipeline.engines.schedule import reask_temperature
from mkg_pipeline.engines.validation import (
    answer_problem,
    finish_problem,
    log_rejected,
    model_problem,
    next_max_tokens,
)
from mkg_pipeline.vllm.errors import VLLMResponseError

if TYPE_CHECKING:
    from PIL import Image

    from mkg_pipeline.config import PipelineConfig
    from mkg_pipeline.vllm.client import VLLMClient

log = logging.getLogger(__name__)

ENGINE_NAME = "mineru"

#: MinerU's helper returns PIL images (not PNG bytes) for any backend but "http-client" (module docstring)
HELPER_BACKEND = "mkg-routed-http-client"
#: zlib level of the PNGs sent: level 1 took half the CPU of PIL's default (6) on corpus pages, and its
#: files were smaller there too
PNG_COMPRESS_LEVEL = 1
#: PIL modes :func:`png_bytes` writes without Pillow (8 bits a sample, ``len(mode)`` samples a pixel)
_UNFILTERED_MODES = frozenset({"L", "RGB", "RGBA"})


@dataclass
class _Answer:
    step: str
    text: str = ""
    finish_reason: str | None = None
    model: str | None = None


@dataclass
class _PageCall:
    label: str
    requests: int = 0
    #: re-asks of the whole page before this one (an ``empty`` page): its requests start that far up the schedule
    page_reasks: int = 0
    #: accepted answers in the order their requests started: layout first, then blocks in reading order
    answers: list[_Answer] = field(default_factory=list)


# The page being extracted, visible to the routed client's aio_predict (MinerU's API has no per-call context).
_current_page: contextvars.ContextVar[_PageCall | None] = contextvars.ContextVar("mineru_page_call", default=None)


def _content_of(choice: Any) -> str:
    """The text of an answer's choice, for the detail of a rejection ("" if it has none)."""
    message = choice.get("message") if isinstance(choice, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else ""


def _step_name(prompt: str) -> str:
    text = prompt.strip().rstrip(":").lower()
    return text.replace(" ", "_") or "predict"


def png_bytes(image: Image.Image) -> bytes:
    """``image`` as a PNG, rows unfiltered, at :data:`PNG_COMPRESS_LEVEL` (:mod:`mkg_pipeline.png`).

    Not Pillow's encoder: it tries all five row filters on every row, and on a 1036 x 1036 layout image
    that cost more than the deflate itself (20 ms at level 1, and still 12 ms at level 0, against 8-12 ms
    for unfiltered rows at level 1, whose file was smaller too: 308 against 343 KB). Modes other than L,
    RGB and RGBA go to Pillow.
    """
    channels = len(image.mode) if image.mode in _UNFILTERED_MODES else 0
    width, height = image.size
    if not channels or not width or not height:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        return buffer.getvalue()
    return png.encode(image.tobytes(), width, height, channels, width * channels, PNG_COMPRESS_LEVEL)


def _build_routed_client_class() -> type:
    from mineru_vl_utils.vlm_client.http_client import HttpVlmClient

    from mkg_pipeline.vllm.client import answer_model

    class RoutedHttpVlmClient(HttpVlmClient):  # type: ignore[misc]
        """MinerU's HTTP client with every request sent through our guarded VLLMClient, answers validated."""

        def __init__(
            self,
            vllm_client: VLLMClient,
            *,
            system_prompt: str,
            max_tokens: int,
            max_reasks: int,
            max_concurrency: int,
        ) -> None:
            self._vllm = vllm_client
            self._max_tokens = max_tokens
            self._max_reasks = max_reasks
            super().__init__(
                model_name=vllm_client.model,
                server_url=vllm_client.server_url,
                system_prompt=system_prompt,
                allow_truncated_content=True,  # we judge finish_reason ourselves
                max_concurrency=max_concurrency,  # its own semaphore, if MinerU ever passes none
                skip_model_name_checking=True,  # no network I/O at construction
                max_retries=0,  # retries happen once, in VLLMClient
                use_tqdm=False,
            )
            self._client.close()  # the sync pool HttpVlmClient opens; never used

        async def aio_predict(
            self, image: Any, prompt: str = "", sampling_params: Any = None, priority: int | None = None
        ) -> str:
            call = _current_page.get() or _PageCall(label="")
            step = _step_name(prompt or self.prompt)
            answer = _Answer(step)
            call.answers.append(answer)  # before any await: answers keep the order requests start in
            # MinerU's two-step extraction sends one PIL image per request, unencoded (module docstring):
            # encoded here, off the event loop.
            png = await asyncio.to_thread(png_bytes, image)
            body = self.build_request_body(
                system_prompt=self.system_prompt,
                image=[png],
                prompt=prompt,
                sampling_params=sampling_params,
                image_format="png",
                priority=priority,
            )
            body.setdefault("max_tokens", self._max_tokens)
            base_label = f"{call.label} step={step}".strip()
            reason, detail = "", ""
            # MinerU's own sampling parameters for the step's first ask; re-asks climb olmOCR's schedule.
            first_temperature = float(body.get("temperature") or 0.0)
            for ask in range(1, self._max_reasks + 2):
                label = base_label if ask == 1 else f"{base_label} ask={ask}"
                body["temperature"] = reask_temperature(call.page_reasks + ask, first_temperature)
                call.requests += 1
                data = await self._vllm.post_chat_completion(body, label=label)
                choice = data["choices"][0]
                finish_reason = choice.get("finish_reason") if isinstance(choice, dict) else None
                model = answer_model(data)
                # Who answered and how it ended are judged before MinerU reads the answer: its reader
                # refuses every finish_reason but stop/length with an error of its own, not a re-ask.
                problem = model_problem(model, self._vllm.accepted_models) or finish_problem(
                    finish_reason, _content_of(choice)
                )
                if problem is None:
                    try:
                        text = clean_text(str(self.get_response_content(data)))
                    except Exception as exc:  # MinerU's RequestError/ServerError on a body it cannot use
                        raise VLLMResponseError(
                            f"unusable MinerU answer: {exc}", server=self._vllm.server_url, label=label
                        ) from exc
                    # One block may well read empty (a rule, a blank cell); "empty" is judged on the whole page.
                    problem = answer_problem(
                        text,
                        finish_reason,
                        model=model,
                        accepted_models=self._vllm.accepted_models,
                        require_text=False,
                    )
                if problem is None:
                    answer.text, answer.finish_reason, answer.model = text, finish_reason, model
                    return text
                reason, detail = problem
                log_rejected(label, reason, detail, ask=ask, max_reasks=self._max_reasks)
                body["max_tokens"] = next_max_tokens(int(body["max_tokens"]), reason)
                if "max_completion_tokens" in body:
                    body["max_completion_tokens"] = body["max_tokens"]
            raise AnswerRejected(
                reason, call.requests, f"{base_label}: {reason} answer ({detail}) after {self._max_reasks + 1} asks"
            )

        def predict(self, *args: Any, **kwargs: Any) -> str:
            raise RuntimeError("synchronous predict would bypass the guarded client; use the async API")

        def stream_predict(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("streaming would bypass the guarded client; use the async API")

    return RoutedHttpVlmClient


class MinerUEngine:
    name = ENGINE_NAME

    def __init__(self, client: VLLMClient, settings: PipelineConfig) -> None:
        from loguru import logger as loguru_logger
        from mineru_vl_utils import MinerUClient

        if not os.environ.get("MINERU_VL_DEBUG_ENABLE"):
            # MinerU logs every raw layout answer at DEBUG through loguru's stderr sink: in a Dagster
            # step that is megabytes of compute log per batch. Its own switch turns it back on.
            loguru_logger.disable("mineru_vl_utils")
        from mkg_pipeline.pdf.pool import available_cpus

        self._client = client
        self._prompt_version = settings.prompt_version
        self._max_reasks = settings.answers.max_reasks
        #: the answer policy, also read by the vlm stage (the text-layer fallback and its budget)
        self.answers = settings.answers
        # Pages are decoded a core's worth at a time. The stage starts a whole wave of pages at once, and the
        # default thread pool is first-in first-out: without this gate every page of the wave is decoded
        # before the first page's layout image is resized and encoded, and no request leaves for a second
        # or two (measured: 1.8 s of an idle server at the start of a 12-s run of 128 pages).
        self._decoding = asyncio.Semaphore(available_cpus())
        self._mineru = MinerUClient(
            backend="http-client",
            server_url=client.server_url,
            model_name=client.model,
            skip_model_name_checking=True,
            max_retries=0,
            # MinerU's per-page semaphore at the limiter's hard ceiling never binds first (module docstring).
            max_concurrency=settings.vllm.max_in_flight,
            use_tqdm=False,
        )
        original = self._mineru.client
        self._mineru.client = _build_routed_client_class()(
            client,
            system_prompt=original.system_prompt,
            max_tokens=settings.answers.max_tokens,
            max_reasks=settings.answers.max_reasks,
            max_concurrency=settings.vllm.max_in_flight,
        )
        original._client.close()  # the unused sync pool MinerU opened; its async pools are never created
        self._mineru.helper.backend = HELPER_BACKEND  # images reach aio_predict unencoded (module docstring)

    @property
    def identity(self) -> str:
        return engine_identity(self.name, self._client.model, self._prompt_version)

    async def extract(self, page: PageInput) -> PageResult:
        async with self._decoding:
            image = await asyncio.to_thread(decode_page, page.png)
        requests = 0
        for ask in range(1, self._max_reasks + 2):
            call = _PageCall(label=page.label, page_reasks=ask - 1)
            token = _current_page.set(call)
            try:
                blocks = await self._mineru.aio_two_step_extract(image)
            except AnswerRejected as exc:
                # call.requests is final here: MinerU waits for the cancelled sibling requests.
                raise AnswerRejected(exc.reason, requests + call.requests, str(exc)) from None
            finally:
                _current_page.reset(token)
            requests += call.requests
            markdown, content_list, images = await asyncio.to_thread(_page_outputs, image, blocks, page.page_idx)
            if content_list or page.text_layer_chars <= 0:
                # Every answer was checked (model and finish_reason) before MinerU saw it.
                models = sorted({a.model for a in call.answers if a.model})
                return PageResult(
                    markdown=markdown,
                    content_list=content_list,
                    images=images,
                    requests=requests,
                    raw_answer=json.dumps(
                        [
                            {"step": a.step, "finish_reason": a.finish_reason, "model": a.model, "answer": a.text}
                            for a in call.answers
                        ],
                        ensure_ascii=False,
                    ),
                    finish_reason="stop",
                    # One name, unless a balancer spread the page's requests over several accepted aliases.
                    model=", ".join(models) or self._client.model,
                )
            log.warning(
                "%s: no content on a page with a %d-character text layer (%d blocks); %s",
                page.label,
                page.text_layer_chars,
                len(blocks),
                "asking again" if ask <= self._max_reasks else "giving up",
            )
        raise AnswerRejected(
            "empty",
            requests,
            f"{page.label}: no content found on a page whose text layer has {page.text_layer_chars} characters "
            f"after {self._max_reasks + 1} asks",
        )


def _page_outputs(
    image: Image.Image, blocks: list[Any], page_idx: int
) -> tuple[str, list[dict[str, Any]], dict[str, bytes]]:
    """Crops (figures and tables, from the one decoded image), then Markdown and content list."""
    crops: dict[int, str] = {}
    jpegs: dict[str, bytes] = {}
    for index, block in enumerate(blocks):
        if block.get("type") in CROPPED_TYPES and block.get("bbox"):
            jpeg = crop_jpeg(image, block["bbox"])
            if jpeg is not None:
                crops[index] = image_name(jpeg)
                jpegs[crops[index]] = jpeg
    markdown, content_list = blocks_to_page(blocks, page_idx, crops)
    used = {item["img_path"] for item in content_list if "img_path" in item}
    return markdown, content_list, {name: data for name, data in jpegs.items() if name in used}


ENGINE_CLASS = MinerUEngine
