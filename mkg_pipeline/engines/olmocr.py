"""olmOCR-2 (``allenai/olmOCR-2-7B-1025`` served by vLLM): one request per page, answered with YAML
front matter and the page's text.

What olmOCR's own pipeline does, and this engine does the same way (our code; the behaviour follows
allenai/olmocr at the paths cited):

- **Prompt and message.** Its fine-tuning prompt (``engines.prompts.OLMOCR_PROMPT``, from
  olmocr/prompts/prompts.py ``build_no_anchoring_v4_yaml_prompt``), no system prompt, the text part
  *before* the image (olmocr/pipeline.py ``build_page_query``; the v0.3 training configs set
  ``prompt_first: true``). Our ``VLLMClient.chat_completion`` puts images first, so the body is built
  here and sent with ``post_chat_completion``.
- **Image size.** The page at most ``OLMOCR_LONGEST_SIDE`` (1,288) pixels on its longest side
  (olmocr/pipeline.py ``--target_longest_image_dim``). The engine gets the stage's PNG and shrinks it
  when it is larger; a smaller one is sent as it is (enlarging adds no detail).
- **The answer.** ``---`` YAML front matter with exactly ``primary_language``, ``is_rotation_valid``,
  ``rotation_correction`` (0/90/180/270), ``is_table``, ``is_diagram``; then ``---`` and the page text
  (olmocr/prompts/prompts.py ``PageResponse``, olmocr/train/front_matter.py ``FrontMatterParser``).
  :func:`parse_answer` reads it; anything else (no front matter, bad YAML, a missing, unknown or
  ill-typed field) is an invalid answer (reason ``front_matter``), re-asked like any other.
- **Which answers count.** Only ``finish_reason == "stop"`` (olmocr/pipeline.py ``try_single_page``),
  and, as for every engine here, only the configured model's answer, not empty on a page with a text
  layer, not a loop (``engines.validation``).
- **Re-asks.** Attempt *n* (0-based) is sent at ``OLMOCR_TEMPERATURES[n]`` (0.1, 0.1, 0.2, 0.3, 0.5,
  0.8, 0.9, 1.0: olmocr/pipeline.py ``TEMPERATURE_BY_ATTEMPT``), up to ``OLMOCR_MAX_ATTEMPTS`` (8,
  its ``--max_page_retries``) but at most ``answers.max_reasks + 1`` asks, our bound on what one page
  may cost. A truncated answer is re-asked with the same ``max_tokens`` and a higher temperature, as
  olmOCR does: the model's context is 16k tokens, so doubling the budget (what page_markdown does)
  would overflow it, and a cut-off olmOCR answer is usually a loop that a higher temperature breaks.
- **Rotation.** An answer saying ``is_rotation_valid: false`` is not the page: the image is turned by
  ``rotation_correction`` degrees (PIL ``transpose(ROTATE_<n>)``, counter-clockwise, the way olmOCR
  turns it in ``build_page_query`` and trains it in olmocr/train/dataloader.py ``RotationAugmentation``),
  corrections add up across asks, and the page is asked again. The accepted answer is the one read
  from the upright image. If the attempts run out while the model still asks for a rotation, the last
  answer that passed every other check is kept (olmOCR's ``process_page`` does the same: its text is
  the page's text, only the image it came from was on its side), and a warning is logged.

The result's Markdown is the answer's text made safe (``page_safety.safe_page_markdown``) and its content
list is parsed from it as page_markdown's is. Figures that olmOCR labels
``![alt](page_<x>_<y>_<w>_<h>.png)`` (pixels of the image it saw) are cropped from that image into
``images/<sha256>.jpg`` and become ``image`` items with a ``bbox``; a label whose box is not on the
image stays as the model wrote it (its link made inert by the safe-Markdown pass).
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mkg_pipeline.engines.base import AnswerRejected, PageInput, PageResult, engine_identity
from mkg_pipeline.engines.content_list import text_math_to_dollars
from mkg_pipeline.engines.page_markdown import markdown_to_content_list, outside_code, strip_markdown_fence
from mkg_pipeline.engines.page_safety import ParsedPage, bbox_1000, clean_text, parse_page, safe_page_markdown
from mkg_pipeline.engines.prompts import OLMOCR_PROMPT
from mkg_pipeline.engines.schedule import OLMOCR_TEMPERATURES, temperature_for
from mkg_pipeline.engines.validation import answer_problem, finish_problem, log_rejected, model_problem

if TYPE_CHECKING:
    from PIL import Image

    from mkg_pipeline.config import PipelineConfig
    from mkg_pipeline.vllm.client import VLLMClient

log = logging.getLogger(__name__)

ENGINE_NAME = "olmocr"

#: olmocr/pipeline.py --max_page_retries default
OLMOCR_MAX_ATTEMPTS = 8
#: olmocr/pipeline.py --target_longest_image_dim default
OLMOCR_LONGEST_SIDE = 1288
ROTATIONS = (0, 90, 180, 270)
FRONT_MATTER_FIELDS = ("primary_language", "is_rotation_valid", "rotation_correction", "is_table", "is_diagram")
#: a real front matter is about 120 bytes; a "front matter" this long is the page text gone wrong
MAX_FRONT_MATTER_CHARS = 4096
FRONT_MATTER_REASON = "front_matter"

# Part of the cache key: whatever shapes the answer besides the model (prompt, image size, schedule).
_PROMPT_DIGEST = hashlib.sha256(
    f"{OLMOCR_PROMPT}\n{OLMOCR_LONGEST_SIDE}\n{OLMOCR_TEMPERATURES}\n{OLMOCR_MAX_ATTEMPTS}".encode()
).hexdigest()[:12]

# "---" alone on a line opens and closes the front matter; the opener must start the answer.
_FRONT_MATTER_RE = re.compile(r"\A---[ \t]*\n(?P<yaml>.*?)\n?^---[ \t]*$\n?(?P<text>.*)\Z", re.DOTALL | re.MULTILINE)
_LANGUAGE_LINE_RE = re.compile(r"^primary_language:[ \t]*(?P<value>[A-Za-z]{1,8})[ \t]*$", re.MULTILINE)
# ![alt](page_<x>_<y>_<w>_<h>.png): olmOCR's figure label, in pixels of the image it was sent.
_FIGURE_RE = re.compile(
    r"!\[(?P<alt>[^\]\n]*)\]\(\s*page_(?P<x>\d+(?:\.\d+)?)_(?P<y>\d+(?:\.\d+)?)_(?P<w>\d+(?:\.\d+)?)_"
    r"(?P<h>\d+(?:\.\d+)?)\.png\s*\)"
)
_IMAGE_ONLY_RE = re.compile(r"^!\[(?P<alt>[^\]\n]*)\]\((?P<path>images/[0-9a-f]{64}\.jpg)\)$")


class PageImageError(ValueError):
    """The page PNG handed to the engine cannot be decoded (a rendering fault, not the model's)."""


class FrontMatterError(ValueError):
    """An answer that is not olmOCR's format: no front matter, bad YAML, a missing or ill-typed field."""


@dataclass(frozen=True)
class FrontMatter:
    """olmOCR's page metadata (olmocr/prompts/prompts.py ``PageResponse``, without the text)."""

    primary_language: str | None
    is_rotation_valid: bool
    #: degrees the image must be turned (PIL's counter-clockwise ``ROTATE_<n>``) to be upright
    rotation_correction: int
    is_table: bool
    is_diagram: bool


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    # olmOCR's parser also takes the strings; a YAML 1.1 "yes"/"no" is already a bool here.
    if isinstance(value, str) and value.strip().lower() in {"true", "false"}:
        return value.strip().lower() == "true"
    raise FrontMatterError(f"{name} is {value!r}, not true or false")


def _as_rotation(value: Any) -> int:
    number: Any = value
    if isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    if isinstance(number, bool) or not isinstance(number, int) or number not in ROTATIONS:
        raise FrontMatterError(f"rotation_correction is {value!r}, not one of 0, 90, 180, 270")
    return number


def _as_language(value: Any, yaml_text: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip() or None
    # YAML 1.1 reads a few codes as booleans ("no", Norwegian, is False): the language is what was
    # written, so take it from the line itself.
    match = _LANGUAGE_LINE_RE.search(yaml_text) if isinstance(value, bool) else None
    if match is not None:
        return match.group("value")
    raise FrontMatterError(f"primary_language is {value!r}, not a language code or null")


def parse_answer(answer: str) -> tuple[FrontMatter, str]:
    """(front matter, page text) of an olmOCR answer; :class:`FrontMatterError` if it is not one.

    Lenient where a model's output varies harmlessly (CRLF line ends, blank lines or a ```` ``` ````
    fence around the whole answer, spaces after ``---``, ``True``/``"true"``, ``"90"``); strict on what
    the answer means: all five fields, nothing else, each of its type (olmOCR's own parser refuses
    missing and unknown fields too).
    """
    import yaml

    text = strip_markdown_fence(answer.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff").strip())
    match = _FRONT_MATTER_RE.match(text.lstrip("\n"))
    if match is None:
        raise FrontMatterError("the answer does not start with a '---' front matter closed by '---'")
    yaml_text = match.group("yaml")
    if len(yaml_text) > MAX_FRONT_MATTER_CHARS:
        raise FrontMatterError(f"front matter of {len(yaml_text)} characters (a real one is ~120)")
    try:
        data = yaml.safe_load(yaml_text)
    except yaml.YAMLError as exc:
        raise FrontMatterError(f"front matter is not YAML: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(data, dict):
        raise FrontMatterError(f"front matter is a YAML {type(data).__name__}, not a mapping")
    missing = [name for name in FRONT_MATTER_FIELDS if name not in data]
    unknown = sorted(str(key) for key in data if key not in FRONT_MATTER_FIELDS)
    if missing or unknown:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unknown {', '.join(unknown)}"] if unknown else []
        )
        raise FrontMatterError(f"front matter fields: {'; '.join(parts)}")
    front = FrontMatter(
        primary_language=_as_language(data["primary_language"], yaml_text),
        is_rotation_valid=_as_bool("is_rotation_valid", data["is_rotation_valid"]),
        rotation_correction=_as_rotation(data["rotation_correction"]),
        is_table=_as_bool("is_table", data["is_table"]),
        is_diagram=_as_bool("is_diagram", data["is_diagram"]),
    )
    return front, match.group("text").strip()


# --------------------------------------------------------------------------- images


def _open_png(png: bytes) -> Image.Image:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as opened:
        opened.load()
        return opened if opened.mode in {"RGB", "L"} else opened.convert("RGB")


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def fit_longest_side(png: bytes, longest: int = OLMOCR_LONGEST_SIDE) -> bytes:
    """``png`` shrunk (Lanczos) to ``longest`` pixels on its longest side; unchanged when not larger."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as header:  # reads the header only: most pages need no resize
        if max(header.size) <= longest:
            return png
    image = _open_png(png)
    scale = longest / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return _png_bytes(image.resize(size, Image.Resampling.LANCZOS))


def rotate_png(png: bytes, degrees: int) -> bytes:
    """``png`` turned ``degrees`` counter-clockwise (PIL ``ROTATE_<n>``, as olmOCR turns its pages)."""
    from PIL import Image

    if degrees % 360 == 0:
        return png
    transpose = {
        90: Image.Transpose.ROTATE_90,
        180: Image.Transpose.ROTATE_180,
        270: Image.Transpose.ROTATE_270,
    }[degrees % 360]
    return _png_bytes(_open_png(png).transpose(transpose))


def _crop_figures(markdown: str, png: bytes) -> tuple[str, dict[str, bytes], dict[str, list[int]]]:
    """(Markdown with olmOCR's figure labels pointing at crops, crops by name, 0..1000 bbox by name)."""
    if "](page_" not in markdown:
        return markdown, {}, {}
    from mkg_pipeline.engines.figures import crop_jpeg, image_name

    image = _open_png(png).convert("RGB")
    width, height = image.size
    images: dict[str, bytes] = {}
    boxes: dict[str, list[int]] = {}

    def crop(match: re.Match[str]) -> str:
        x, y, w, h = (float(match.group(k)) for k in ("x", "y", "w", "h"))
        if w <= 0 or h <= 0 or x >= width or y >= height:
            return match.group(0)
        bbox = (x / width, y / height, min(1.0, (x + w) / width), min(1.0, (y + h) / height))
        jpeg = crop_jpeg(image, bbox)
        if jpeg is None:
            return match.group(0)
        name = image_name(jpeg)
        images[name] = jpeg
        boxes[name] = bbox_1000(bbox) or [0, 0, 0, 0]
        alt = " ".join(match.group("alt").replace("[", "(").replace("]", ")").split())
        # A block of its own, as MinerU places figures: every crop becomes an image item.
        return f"\n\n![{alt}]({name})\n\n"

    cropped = _FIGURE_RE.sub(crop, markdown)
    return (re.sub(r"\n{3,}", "\n\n", cropped).strip("\n") if images else markdown), images, boxes


def _content_list(markdown: ParsedPage, page_idx: int, boxes: dict[str, list[int]]) -> list[dict[str, Any]]:
    """page_markdown's content list, with a paragraph that is only a cropped figure as an ``image`` item."""
    items = []
    for item in markdown_to_content_list(markdown, page_idx):
        figure = _IMAGE_ONLY_RE.match(item.get("text", "").strip()) if item["type"] == "text" else None
        if figure is not None and figure.group("path") in boxes:
            path = figure.group("path")
            item = {
                "type": "image",
                "img_path": path,
                "image_caption": [],
                "image_footnote": [],
                "bbox": boxes[path],
                "page_idx": page_idx,
            }
        items.append(item)
    return items


# --------------------------------------------------------------------------- the engine


def _answer_parts(data: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """(content, finish_reason, model) of a chat answer; a non-string content reads as ""."""
    from mkg_pipeline.vllm.client import answer_model

    choice = data["choices"][0] if isinstance(data["choices"][0], dict) else {}
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    content = message.get("content")
    finish = choice.get("finish_reason")
    return (
        content if isinstance(content, str) else "",
        finish if isinstance(finish, str) else None,
        answer_model(data),
    )


class _Invalid(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class _Accepted:
    front: FrontMatter
    text: str
    raw: str
    finish_reason: str
    model: str
    png: bytes


class OlmOcrEngine:
    name = ENGINE_NAME

    def __init__(self, client: VLLMClient, settings: PipelineConfig, *, max_attempts: int | None = None) -> None:
        self._client = client
        self._prompt_version = settings.prompt_version
        self._max_tokens = settings.answers.max_tokens
        #: the answer policy, also read by the vlm stage (the text-layer fallback and its budget)
        self.answers = settings.answers
        bound = settings.answers.max_reasks + 1 if max_attempts is None else max_attempts
        #: asks per page: olmOCR's 8, bounded by ours (``answers.max_reasks`` + 1, or ``max_attempts``)
        self.max_attempts = max(1, min(OLMOCR_MAX_ATTEMPTS, bound))

    @property
    def identity(self) -> str:
        # The olmOCR prompt, image size and schedule are in the digest: changing them misses the cache.
        return engine_identity(self.name, self._client.model, f"{self._prompt_version}+olmocr-{_PROMPT_DIGEST}")

    def request_body(self, png: bytes, temperature: float) -> dict[str, Any]:
        """The chat body of one ask: prompt first, then the image, as olmOCR sends it."""
        import base64

        url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        return {
            "model": self._client.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": OLMOCR_PROMPT},
                        {"type": "image_url", "image_url": {"url": url}},
                    ],
                }
            ],
            "max_tokens": self._max_tokens,
            "temperature": temperature,
        }

    def _check(self, page: PageInput, raw: str, finish: str | None, model: str | None) -> tuple[FrontMatter, str]:
        """(front matter, page text) of a good answer; raises ``_Invalid(reason, detail)`` otherwise.

        Model and finish_reason first (another model's or a cut-off answer's format says nothing),
        then the format, then the text's own checks (empty, loop).
        """
        problem = model_problem(model, self._client.accepted_models) or finish_problem(finish, raw)
        if problem is not None:
            raise _Invalid(*problem)
        try:
            front, text = parse_answer(raw)
        except FrontMatterError as exc:
            raise _Invalid(FRONT_MATTER_REASON, str(exc)) from None
        problem = answer_problem(
            text,
            finish,
            model=model,
            accepted_models=self._client.accepted_models,
            require_text=page.text_layer_chars > 0,
        )
        if problem is not None:
            raise _Invalid(*problem)
        return front, text

    async def extract(self, page: PageInput) -> PageResult:
        import asyncio

        try:
            upright = await asyncio.to_thread(fit_longest_side, page.png)
        except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
            raise PageImageError(f"{page.label}: the page image cannot be decoded: {exc}") from exc
        rotation = 0
        sent = upright
        requests = 0
        reason, detail = "", ""
        kept: _Accepted | None = None  # the last good answer whose image the model still wanted turned
        for attempt in range(self.max_attempts):
            ask = attempt + 1
            label = page.label if ask == 1 else f"{page.label} ask={ask}"
            if rotation:
                label += f" rotation={rotation}"
            data = await self._client.post_chat_completion(
                self.request_body(sent, temperature_for(attempt)), label=label
            )
            requests += 1
            text, finish, model = _answer_parts(data)
            raw = clean_text(text)
            try:
                front, text = self._check(page, raw, finish, model)
            except _Invalid as invalid:
                reason, detail = invalid.reason, invalid.detail
                log_rejected(label, reason, detail, ask=ask, max_reasks=self.max_attempts - 1)
                continue
            accepted = _Accepted(front, text, raw, finish or "", model or self._client.model, sent)
            if front.is_rotation_valid:
                return await asyncio.to_thread(self._result, page, accepted, requests)
            kept = accepted
            rotation = (rotation + front.rotation_correction) % 360
            log.info(
                "%s: the model says the image needs turning %d°; asking again with the page turned %d°",
                label,
                front.rotation_correction,
                rotation,
            )
            sent = await asyncio.to_thread(rotate_png, upright, rotation)
        if kept is not None:
            log.warning(
                "%s: the model still asked for a rotation after %d asks; keeping its last valid answer",
                page.label,
                requests,
            )
            return await asyncio.to_thread(self._result, page, kept, requests)
        raise AnswerRejected(reason, requests, f"{page.label}: {reason} answer ({detail}) after {requests} asks")

    def _result(self, page: PageInput, accepted: _Accepted, requests: int) -> PageResult:
        markdown = outside_code(accepted.text, text_math_to_dollars)
        markdown, images, boxes = _crop_figures(markdown, accepted.png)
        parsed = parse_page(markdown)  # one parse for the safe Markdown and the content list
        return PageResult(
            markdown=safe_page_markdown(parsed),
            content_list=_content_list(parsed, page.page_idx, boxes),
            images=images,
            requests=requests,
            raw_answer=accepted.raw,
            finish_reason=accepted.finish_reason,
            model=accepted.model,
        )


ENGINE_CLASS = OlmOcrEngine
