"""Typed configuration for the split-container pipeline.

Values come from three layers, later ones winning:

1. the defaults below (the seed's MinerU split-container config),
2. a YAML file (``config/mineru.yaml`` in the repo, or ``MKG_CONFIG_FILE``),
3. environment variables ``MKG_<SECTION>__<FIELD>``, for example
   ``MKG_VLLM__URL=http://vllm:8000`` or ``MKG_HTTP_CLIENT__TIMEOUT_S=120``.

Every numeric field has bounds. A bad value raises :class:`ConfigError`, whose
message names the field, the value and the allowed range, because the person
reading it is usually an operator looking at a crash-looping pod.

This module imports pydantic (and PyYAML lazily) only: it is loaded by every
run pod and must stay cheap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator

ENV_PREFIX = "MKG_"
ENV_NESTED_DELIMITER = "__"
CONFIG_FILE_ENV = "MKG_CONFIG_FILE"
# MKG_* variables that are not configuration fields (read by other parts of the project).
NON_CONFIG_ENV = frozenset({CONFIG_FILE_ENV, "MKG_PUSHGATEWAY_URL", "MKG_CORPUS_DIR"})
_SECRET_MARKERS = ("key", "secret", "password", "token")
DEFAULT_CONFIG_FILE = Path(__file__).resolve().parent.parent / "config" / "mineru.yaml"

EngineName = Literal["mineru", "page_markdown"]


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of bounds."""


class _Section(BaseModel):
    # Unknown keys are errors: a typo in YAML or an env var must not be ignored silently.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class VLLMServerConfig(_Section):
    """Where the OpenAI-compatible VLM server is and how to reach it."""

    url: str = Field("http://127.0.0.1:8000", description="Base URL of the vLLM (or local) server, without /v1.")
    model: str = Field("Qwen/Qwen2.5-VL-7B-Instruct", min_length=1, description="Served model name sent in requests.")
    api_key: SecretStr | None = Field(None, description="Bearer token for /v1/*; never logged.")
    health_check_interval_s: float = Field(30.0, ge=1, le=3600, description="Seconds between health probes.")
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
    """CPU-only worker (run pod) sizing; mirrors the k8s manifests."""

    count: int = Field(8, ge=1, le=1000, description="Worker pods / concurrent runs.")
    backend: Literal["vlm-http-client"] = Field("vlm-http-client", description="MinerU backend the workers use.")
    cpu: float = Field(2.0, gt=0, le=64, description="CPU request per worker (cores).")
    memory_gib: float = Field(4.0, gt=0, le=512, description="Memory request per worker (GiB).")
    batch_size: int = Field(50, ge=1, le=10000, description="Documents per ingestion batch (sensor).")
    timeout_s: float = Field(
        600.0,
        ge=1,
        le=86400,
        description="Wall-clock limit of one document's validation, and of its rendering, seconds.",
    )
    render_processes: int = Field(
        0, ge=0, le=256, description="Processes rendering pages; 0 means one per CPU available to the pod."
    )
    lease_ttl_s: float = Field(
        300.0, ge=1, le=86400, description="How long a run's claim on a batch lasts without being renewed, seconds."
    )


class PDFConfig(_Section):
    """Validation limits and rendering."""

    max_pages: int = Field(2000, ge=1, le=100000, description="Documents with more pages are rejected.")
    max_bytes: int = Field(500 * 1024 * 1024, ge=1024, le=10 * 1024**3, description="Larger files are rejected.")
    dpi: int = Field(150, ge=36, le=600, description="Render resolution for page images.")
    max_render_pixels: int = Field(
        40_000_000, ge=10_000, le=400_000_000, description="Pages larger than this are rendered at a lower DPI."
    )


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
    golden_set: list[str] = Field(
        default_factory=lambda: ["pdflatex-4-pages.pdf", "minimal-document.pdf"],
        description="Source names of the documents the daily baseline job re-checks.",
    )


class AnswersConfig(_Section):
    """What the engines ask of the model, and when an answer is good enough to cache."""

    max_tokens: int = Field(8192, ge=16, le=131072, description="Completion budget of one page-to-Markdown answer.")
    max_reasks: int = Field(
        1,
        ge=0,
        le=5,
        description="Immediate re-asks, with twice the max_tokens, of a page whose answer was cut off.",
    )


class MinerUConfig(_Section):
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


def _field_bounds(model: type[BaseModel], path: tuple[str | int, ...]) -> str:
    """Describe the allowed range of the field at ``path``, for error messages."""
    current: Any = model
    field = None
    for part in path:
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return ""
        field = current.model_fields[part]
        current = field.annotation
    if field is None:
        return ""
    bounds = []
    for meta in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(meta, attr, None)
            if value is not None:
                bounds.append(f"{sign} {value}")
        for attr, sign in (("min_length", "length >="), ("max_length", "length <=")):
            value = getattr(meta, attr, None)
            if value is not None:
                bounds.append(f"{sign} {value}")
    return " and ".join(bounds)


def _shown_value(loc: tuple[str | int, ...], value: Any) -> str:
    """The offending value for an error message, never a secret.

    A whole mapping is reported by its keys only: under a misspelt section it may hold an API key.
    """
    if any(marker in str(part).lower() for part in loc for marker in _SECRET_MARKERS):
        return "<secret>"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: ..." for k in value) + "}"
    return repr(value)


def _format_validation_error(error: ValidationError, sources: dict[str, str]) -> str:
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        dotted = ".".join(str(p) for p in loc)
        shown = _shown_value(loc, item.get("input"))
        bounds = _field_bounds(MinerUConfig, loc)
        allowed = f"; allowed: {bounds}" if bounds else ""
        source = sources.get(dotted, "")
        origin = f" (from {source})" if source else ""
        lines.append(f"{dotted} = {shown}{origin}: {item['msg']}{allowed}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _env_overrides(environ: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Turn ``MKG_SECTION__FIELD=value`` into a nested dict and remember each source."""
    overrides: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in NON_CONFIG_ENV:
            continue
        parts = name[len(ENV_PREFIX) :].lower().split(ENV_NESTED_DELIMITER)
        if not all(parts):
            continue
        target = overrides
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                break
        else:
            value: Any = raw
            if parts[-1] == "golden_set":
                value = [item.strip() for item in raw.split(",") if item.strip()]
            target[parts[-1]] = value
            sources[".".join(parts)] = f"env {name}"
    return overrides, sources


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml  # local import: only loaders need it

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, environ: dict[str, str] | None = None) -> MinerUConfig:
    """Load defaults ← YAML file ← ``MKG_*`` environment variables.

    ``path`` wins over ``MKG_CONFIG_FILE``, which wins over the repo's
    ``config/mineru.yaml``. A missing default file is fine (pure env config
    in containers); a missing explicitly named file is an error.
    """
    environ = dict(os.environ if environ is None else environ)
    explicit = path or environ.get(CONFIG_FILE_ENV)
    file_path = Path(explicit) if explicit else DEFAULT_CONFIG_FILE
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if file_path.exists():
        data = _read_yaml(file_path)
    elif explicit:
        raise ConfigError(f"config file {file_path} does not exist")
    overrides, sources = _env_overrides(environ)
    merged = _deep_merge(data, overrides)
    try:
        return MinerUConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, sources)) from None
