"""Typed configuration for the split-container pipeline.

Values come from three layers (pydantic-settings sources), later ones winning:

1. the defaults below (the seed's MinerU split-container config),
2. a YAML file: an explicit path, else ``MKG_CONFIG_FILE``, else the repo's ``config/mineru.yaml``,
3. environment variables ``MKG_<SECTION>__<FIELD>`` (``MKG_VLLM__URL=http://vllm:8000``) and
   ``MKG_<FIELD>`` for top-level fields (``MKG_ENGINE``, ``MKG_PROMPT_VERSION``).

Only variables that name a section or a top-level field are read. Any other ``MKG_*`` variable is
ignored: Kubernetes injects ``MKG_CODE_LOCATION_SERVICE_HOST`` and friends for our
``mkg-code-location`` Service, and ``MKG_PUSHGATEWAY_URL``, ``MKG_CORPUS_DIR``, ``MKG_CONFIG_FILE``
are read elsewhere. An unknown field under a known section (``MKG_VLLM__URLL``) is an error naming
the closest field, as is an unknown key in the YAML file.

A process reads its settings once, :func:`get_settings`; :func:`load_config` loads afresh (tests,
tools). A bad value raises :class:`ConfigError`, whose message names the field, the value (never a
secret), where it came from and the allowed range, because the person reading it is usually an
operator looking at a crash-looping pod.

This module imports pydantic and pydantic-settings (and PyYAML when a file is read) only: it is
loaded by every run pod and must stay cheap.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    YamlConfigSettingsSource,
)

ENV_PREFIX = "MKG_"
ENV_NESTED_DELIMITER = "__"
CONFIG_FILE_ENV = "MKG_CONFIG_FILE"
_SECRET_MARKERS = ("key", "secret", "password", "token")
_BOUND_SIGNS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "length >=", "max_length": "length <="}
DEFAULT_CONFIG_FILE = Path(__file__).resolve().parent.parent / "config" / "mineru.yaml"

EngineName = Literal["mineru", "page_markdown", "olmocr"]


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of bounds."""


class _Section(BaseModel):
    # Unknown keys are errors: a typo in YAML or an env var must not be ignored silently.
    # Frozen: one process shares its settings (get_settings); change them with with_overrides.
    model_config = ConfigDict(extra="forbid", frozen=True)


class VLLMServerConfig(_Section):
    """Where the OpenAI-compatible VLM server is and how to reach it."""

    url: str = Field("http://127.0.0.1:8000", description="Base URL of the vLLM (or local) server, without /v1.")
    model: str = Field("Qwen/Qwen2.5-VL-7B-Instruct", min_length=1, description="Served model name sent in requests.")
    # NoDecode: from the environment a comma-separated list (a,b), not JSON.
    served_model_aliases: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Other model names the server may answer with (e.g. vLLM's --served-model-name); "
            "an answer from any other model is a failure (model_mismatch)."
        ),
    )
    api_key: SecretStr | None = Field(None, description="Bearer token for /v1/*; never logged.")
    connection_timeout_s: float = Field(10.0, ge=0.1, le=300, description="TCP connect timeout in seconds.")
    max_in_flight: int = Field(
        256,
        ge=1,
        le=4096,
        description="Hard ceiling on requests one process has outstanding; the adaptive limiter stays below it.",
    )
    min_in_flight: int = Field(
        2, ge=1, le=1024, description="Floor of the adaptive limiter: it never backs off below this many requests."
    )
    adaptive: bool = Field(
        True, description="Find the server's capacity by itself (true) or always allow max_in_flight (false)."
    )

    @field_validator("min_in_flight")
    @classmethod
    def _floor_below_ceiling(cls, value: int, info: ValidationInfo) -> int:
        ceiling = info.data.get("max_in_flight")
        if ceiling is not None and value > ceiling:
            raise ValueError(f"must be <= vllm.max_in_flight ({ceiling})")
        return value

    @field_validator("served_model_aliases", mode="before")
    @classmethod
    def _aliases_comma_separated(cls, value: Any) -> Any:
        return [item.strip() for item in value.split(",") if item.strip()] if isinstance(value, str) else value

    @field_validator("served_model_aliases")
    @classmethod
    def _aliases_are_names(cls, value: list[str]) -> list[str]:
        # Compared exactly with the answer's model field: a blank or padded name could never match.
        for name in value:
            if not name or name != name.strip():
                raise ValueError(f"model names must be non-empty, without surrounding spaces: {name!r}")
        return value

    @field_validator("url")
    @classmethod
    def _url_is_http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: Any) -> Any:
        return None if value in ("", None) else value


class HTTPClientConfig(_Section):
    """The shared httpx pool and the retry policy."""

    keepalive: int = Field(5, ge=0, le=1000, description="Idle keep-alive connections kept in the pool.")
    timeout_s: float = Field(300.0, ge=1, le=3600, description="Read/write timeout for one request, seconds.")
    max_attempts: int = Field(3, ge=1, le=10, description="Attempts per request, the first one included.")
    backoff_initial_s: float = Field(1.0, ge=0, le=60, description="First retry delay before jitter, seconds.")
    backoff_max_s: float = Field(30.0, ge=0, le=600, description="Upper bound of one retry delay, seconds.")
    backoff_multiplier: float = Field(2.0, ge=1, le=10, description="Exponential growth of the retry delay.")
    retry_after_max_s: float = Field(
        60.0, ge=0, le=3600, description="Longest server-requested Retry-After honoured on 429, seconds."
    )
    max_response_bytes: int = Field(
        32 * 1024 * 1024,
        ge=64 * 1024,
        le=1024**3,
        description="Largest answer body read from the server when the request sets no max_tokens, bytes.",
    )


class CircuitBreakerConfig(_Section):
    """Fail fast while the server is down instead of queueing timeouts."""

    failure_threshold: int = Field(5, ge=1, le=1000, description="Consecutive failures that open the breaker.")
    recovery_timeout_s: float = Field(60.0, ge=0.01, le=3600, description="Seconds OPEN before probing.")
    success_threshold: int = Field(2, ge=1, le=100, description="HALF_OPEN successes needed to close again.")
    half_open_max_calls: int = Field(2, ge=1, le=100, description="Concurrent probe requests allowed in HALF_OPEN.")


class WorkersConfig(_Section):
    """What one run does with its batch: batch size, per-document limits, rendering, its claim."""

    batch_size: int = Field(50, ge=1, le=10000, description="Documents per ingestion batch (sensor).")
    timeout_s: float = Field(
        600.0,
        ge=1,
        le=86400,
        description=(
            "CPU seconds one document's validation, and its rendering, may use; a worker waiting 3x as long "
            "in wall clock without using them is stopped as stalled and retried next time."
        ),
    )
    render_processes: int = Field(
        0, ge=0, le=256, description="Processes rendering pages; 0 means one per CPU available to the pod."
    )
    lease_ttl_s: float = Field(
        300.0, ge=1, le=86400, description="How long a run's claim on a batch lasts without being renewed, seconds."
    )
    vlm_page_memory_mb: int = Field(
        1536,
        ge=16,
        le=65536,
        description="MiB the vlm step may hold in pages in flight (PNG, its base64 request body, the answer); "
        "pages are admitted by these bytes as well as by the limiter. The default leaves the rest of the run "
        "pod's 4 Gi request (8 Gi limit, deploy/k8s) to the process itself and to a rendering step beside it.",
    )


class PDFConfig(_Section):
    """Validation limits and rendering."""

    max_pages: int = Field(2000, ge=1, le=100000, description="Documents with more pages are rejected.")
    max_bytes: int = Field(500 * 1024 * 1024, ge=1024, le=10 * 1024**3, description="Larger files are rejected.")
    dpi: int = Field(
        150,
        ge=36,
        le=600,
        description="Legacy: page images are sized per engine by page_images; kept so existing configs load.",
    )
    max_render_pixels: int = Field(
        40_000_000, ge=10_000, le=400_000_000, description="Pages larger than this are rendered at a lower DPI."
    )


RoutingMode = Literal["auto", "vlm", "text"]


class RoutingConfig(_Section):
    """Which pages reach the VLM (docs/architecture.md, "Page routes"): decided per page at render time."""

    mode: RoutingMode = Field(
        "auto",
        description="'auto': pages with a trustworthy text layer take the text route (no GPU), the rest the VLM; "
        "'vlm': every page to the VLM engine; 'text': every page from its text layer.",
    )
    overrides: dict[str, RoutingMode] = Field(
        default_factory=dict, description="Per-document mode, doc_id -> auto|vlm|text, for a user who knows better."
    )

    def mode_for(self, doc_id: str) -> str:
        return self.overrides.get(doc_id, self.mode)


class ImageSizeConfig(_Section):
    """The page image one engine is sent: its longest side, and a hard cap on its pixels (which wins)."""

    longest_side_px: int = Field(1540, ge=64, le=20000, description="Target longest side of the page image, pixels.")
    max_pixels: int = Field(
        1280 * 28 * 28, ge=4096, le=400_000_000, description="Hard cap on the page image's pixels (wins)."
    )


class OlmOCRImageSize(ImageSizeConfig):
    longest_side_px: int = Field(1288, ge=64, le=20000, description="olmOCR's --target_longest_image_dim.")
    max_pixels: int = Field(1288 * 1288, ge=4096, le=400_000_000, description="Hard cap on the page image's pixels.")


class MinerUImageSize(ImageSizeConfig):
    longest_side_px: int = Field(2200, ge=64, le=20000, description="A letter page at MinerU's 200 dpi.")
    max_pixels: int = Field(1700 * 2200, ge=4096, le=400_000_000, description="Hard cap on the page image's pixels.")


class PageImagesConfig(_Section):
    """Page image size per engine: set by what the engine's model sees, not by a DPI (issue 19 item 5).

    - page_markdown (Qwen2.5-VL): capped at 1280 x 28 x 28 = 1,003,520 pixels, the ``max_pixels`` Qwen's
      model card recommends for its processor (README, "min_pixels = 256*28*28, max_pixels = 1280*28*28"):
      at most 1,280 vision tokens of 28-px patches; the checkpoint's own preprocessor_config.json allows
      12,845,056, far more than a page needs. A letter page is then 880 x 1,139 px (about 104 dpi).
    - olmocr: 1,288 px on the longest side (olmocr/pipeline.py ``--target_longest_image_dim``).
    - mineru: mineru_vl_utils resizes the layout image to 1,036 x 1,036 whatever it gets
      (``MinerUClient(layout_image_size=(1036, 1036))``) and crops blocks from the page image as given
      (``resize_by_need`` only pads thin crops and enlarges ones under 28 px); MinerU renders that page
      image at 200 dpi (mineru ``load_images_from_pdf(dpi=200)``): 2,200 px on a letter page's long side.
    """

    page_markdown: ImageSizeConfig = Field(default_factory=ImageSizeConfig)
    olmocr: OlmOCRImageSize = Field(default_factory=lambda: OlmOCRImageSize())
    mineru: MinerUImageSize = Field(default_factory=lambda: MinerUImageSize())

    def for_engine(self, engine: str) -> ImageSizeConfig:
        return getattr(self, engine)  # type: ignore[no-any-return]


class StorageConfig(_Section):
    """The object store (MinIO in deploy, moto locally)."""

    endpoint_url: str | None = Field(None, description="S3 endpoint; None means AWS S3.")
    bucket: str = Field("mkg-pipeline", min_length=3, max_length=63, description="Bucket holding every artefact.")
    access_key_id: str | None = Field(None, description="S3 access key; falls back to the AWS credential chain.")
    secret_access_key: SecretStr | None = Field(None, description="S3 secret key.")
    region: str = Field("us-east-1", description="S3 region.")

    @field_validator("secret_access_key", mode="before")
    @classmethod
    def _empty_secret_is_none(cls, value: Any) -> Any:
        return None if value in ("", None) else value


class QualityConfig(_Section):
    """Quality thresholds for the baseline asset checks."""

    min_baseline_similarity: float = Field(0.95, ge=0, le=1, description="Mean similarity vs golden baseline.")
    min_text_layer_similarity: float = Field(
        0.80, ge=0, le=1, description="Mean similarity vs the PDF text layer, where one exists."
    )
    max_failed_page_rate: float = Field(
        0.004,
        ge=0,
        le=1,
        description="Share of a batch's pages that may fail before the run fails (olmOCR's 0.4 %).",
    )
    # NoDecode: from the environment a comma-separated list (a,b), not JSON.
    golden_set: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["pdflatex-4-pages.pdf", "minimal-document.pdf"],
        description="Source names of the documents the daily baseline job re-checks.",
    )

    @field_validator("golden_set", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return [item.strip() for item in value.split(",") if item.strip()] if isinstance(value, str) else value


class AnswersConfig(_Section):
    """What the engines ask of the model, and when an answer is good enough to cache."""

    max_tokens: int = Field(8192, ge=16, le=131072, description="Completion budget of one page-to-Markdown answer.")
    max_reasks: int = Field(
        1,
        ge=0,
        le=5,
        description=(
            "Immediate re-asks of a page whose answer is invalid (cut off, not finished with 'stop', another "
            "model's, empty, a loop): max_tokens doubled after a cut-off, and re-ask n sent at olmOCR's "
            "temperature for attempt n (0.1, 0.2, 0.3, 0.5, 0.8, 0.9, 1.0; engines/schedule.py)."
        ),
    )
    text_fallback: bool = Field(
        False,
        description=(
            "A VLM page whose answers are still invalid after its re-asks takes its Markdown from the text layer "
            "(the text engine, reading the page again from raw/), flagged 'fallback' with the reason in its page "
            "record, status.json (fallback_pages) and run metadata, never cached: the next run asks the VLM "
            "again. Off by default: unlike olmOCR, which runs once and must finish, this pipeline records a "
            "failed page and asks again on the next run, and a page whose text layer could be trusted took "
            "the text route already, so the fallback mostly serves a text layer the routing judged doubtful. "
            "Turn it on when a document must be whole now. Only pages with a text layer fall back."
        ),
    )
    max_fallback_share: float = Field(
        0.004,
        ge=0.0,
        le=1.0,
        description=(
            "With text_fallback: the most fallback pages a document may have, as a share of its pages; above it "
            "the document fails visibly (state 'failed', failure_reason 'fallback_budget', its fallback pages "
            "listed as failed). 0.004 is olmOCR's --max_page_error_rate: it drops a document with more than 1 "
            "in 250 fallback pages, so a document under 250 pages may have none."
        ),
    )


class PipelineConfig(_Section):
    """Root of the configuration tree."""

    engine: EngineName = Field("page_markdown", description="Page engine: 'mineru' two-step or 'page_markdown'.")
    prompt_version: str = Field("v1", min_length=1, description="Bumped whenever a prompt changes (cache key).")
    vllm: VLLMServerConfig = Field(default_factory=VLLMServerConfig)
    http_client: HTTPClientConfig = Field(default_factory=HTTPClientConfig)
    circuit_breaker: CircuitBreakerConfig = Field(default_factory=CircuitBreakerConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    pdf: PDFConfig = Field(default_factory=PDFConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    answers: AnswersConfig = Field(default_factory=AnswersConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    page_images: PageImagesConfig = Field(default_factory=PageImagesConfig)


# -- error messages ---------------------------------------------------------------------------


def _section_at(path: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The model of the section at ``path`` (``()``: the root), None if there is none."""
    model: Any = PipelineConfig
    for part in path:
        field = model.model_fields.get(part)
        model = field.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
    return model


def _field_bounds(path: tuple[str | int, ...]) -> str:
    """Describe the allowed range of the field at ``path``, for error messages."""
    section = _section_at(path[:-1])
    field = section.model_fields.get(path[-1]) if section is not None else None
    if field is None:
        return ""
    bounds = [
        f"{sign} {getattr(meta, attr)}"
        for meta in field.metadata
        for attr, sign in _BOUND_SIGNS.items()
        if getattr(meta, attr, None) is not None
    ]
    return " and ".join(bounds)


def _closest_field(path: tuple[str | int, ...]) -> str | None:
    """The field of the section at ``path[:-1]`` closest to the unknown key ``path[-1]``, if any."""
    section = _section_at(path[:-1])
    close = difflib.get_close_matches(str(path[-1]), list(section.model_fields), n=1) if section else []
    return close[0] if close else None


def _shown_value(names: tuple[str | int, ...], value: Any) -> str:
    """The offending value for an error message, never a secret (judged by every name in ``names``).

    A whole mapping is reported by its keys only: under a misspelt section it may hold an API key.
    """
    if any(marker in str(name).lower() for name in names for marker in _SECRET_MARKERS):
        return "<secret>"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: ..." for k in value) + "}"
    return repr(value)


def _origin(loc: tuple[str | int, ...], environ: Mapping[str, str], file: Path) -> str:
    """Where the value at ``loc`` came from: the variable naming it (or its section), else the file."""
    names = {name.upper() for name in environ}
    for end in range(len(loc), 0, -1):
        name = ENV_PREFIX + ENV_NESTED_DELIMITER.join(str(p) for p in loc[:end]).upper()
        if name in names:
            return f"env {name}"
    return str(file) if file.is_file() else ""


def _format_validation_error(error: ValidationError, origin: Callable[[tuple[str | int, ...]], str]) -> str:
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        dotted = ".".join(str(p) for p in loc)
        bounds = _field_bounds(loc)
        allowed = f"; allowed: {bounds}" if bounds else ""
        # An unknown key: name the field it probably meant, and hide its value if that one is a secret.
        close = _closest_field(loc) if item["type"] == "extra_forbidden" else None
        hint = f"; did you mean {'.'.join(map(str, (*loc[:-1], close)))}?" if close else ""
        shown = _shown_value((*loc, close or ""), item.get("input"))
        source = origin(loc)
        where = f" (from {source})" if source else ""
        lines.append(f"{dotted} = {shown}{where}: {item['msg']}{allowed}{hint}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


# -- loading ------------------------------------------------------------------------------------


def _inputs(path: str | Path | None, environ: Mapping[str, str] | None) -> tuple[Path, Mapping[str, str]]:
    """(YAML file, environment) to load from: ``path``, else ``MKG_CONFIG_FILE``, else the repo's file."""
    environ = os.environ if environ is None else environ
    explicit = path or environ.get(CONFIG_FILE_ENV)
    if explicit and not Path(explicit).is_file():
        raise ConfigError(f"config file {explicit} does not exist")
    return (Path(explicit) if explicit else DEFAULT_CONFIG_FILE), environ


# The inputs of the load_config() call in progress: pydantic-settings builds its sources in a
# classmethod, so per-call arguments reach it through this variable.
_LOADING: ContextVar[tuple[Path, Mapping[str, str]] | None] = ContextVar("mkg_config_loading", default=None)


class EnvironmentSource(EnvSettingsSource):
    """``MKG_*`` variables of a given mapping (``os.environ`` unless a test passes its own)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name.lower(): value for name, value in self._environ.items()}


class YamlFileSource(YamlConfigSettingsSource):
    """The YAML file; a file that is not YAML or not a mapping is a :class:`ConfigError` naming it."""

    def _read_file(self, file_path: Path) -> dict[str, Any]:  # type: ignore[override]
        import yaml

        try:
            data = super()._read_file(file_path)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {file_path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"config file {file_path} must hold a mapping at the top level, got {type(data).__name__}"
            )
        return data


class Settings(BaseSettings, PipelineConfig):
    """:class:`PipelineConfig` read from its sources: environment over YAML file over defaults."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_NESTED_DELIMITER, extra="forbid")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        file, environ = _LOADING.get() or _inputs(None, None)
        return init_settings, EnvironmentSource(settings_cls, environ), YamlFileSource(settings_cls, yaml_file=file)


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> PipelineConfig:
    """Load defaults ← YAML file ← ``MKG_*`` environment variables, afresh (tests and tools).

    ``path`` wins over ``MKG_CONFIG_FILE``, which wins over the repo's ``config/mineru.yaml``. A
    missing default file is fine (pure env config in containers); a missing named file is an error.
    """
    file, environ = _inputs(path, environ)
    token = _LOADING.set((file, environ))
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, lambda loc: _origin(loc, environ, file))) from None
    except SettingsError as exc:  # a section given whole as JSON that is not: MKG_VLLM='{...'
        raise ConfigError(f"invalid configuration: {exc}") from None
    finally:
        _LOADING.reset(token)


@cache
def get_settings() -> PipelineConfig:
    """This process's settings, loaded on first use and then shared.

    Tests that change the environment call ``get_settings.cache_clear()`` to load again.
    """
    return load_config()


def with_overrides(config: PipelineConfig, values: Mapping[str, Any], origin: str) -> PipelineConfig:
    """``config`` with some fields replaced (dotted name -> value; ``None`` keeps the field), checked
    against the same bounds as the file and the environment. ``origin`` names them in errors."""
    data = config.model_dump()  # SecretStr values stay SecretStr
    changed = False
    for dotted, value in values.items():
        if value is not None:
            *sections, name = dotted.split(".")
            target = data
            for section in sections:
                target = target[section]
            target[name] = value
            changed = True
    if not changed:
        return config
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, lambda loc: origin)) from None
