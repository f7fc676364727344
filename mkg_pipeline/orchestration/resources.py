"""Dagster resources: the process's settings, the configured VLM client/engine and the S3 storage.

The Dagster layer reads settings one way: from the resource it is given (``pipeline_config()`` of any
resource here). Every resource starts from the process's settings (defaults <- the config file <-
``MKG_*`` environment variables, loaded once per process by :func:`mkg_pipeline.config.get_settings`,
called only here in this layer); fields set on a resource override them for that run, checked
against the same bounds, so a Dagster UI launchpad or a test can point one run at another server or
bucket without touching the environment. The stages below take the settings they need as parameters.

Secrets are Dagster secrets: give ``api_key`` / ``secret_access_key`` as ``dg.EnvVar(...)`` (see
:func:`pipeline_resources`), never as a literal, which Dagster would store in its run storage.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import dagster as dg
from pydantic import Field

from mkg_pipeline.config import PipelineConfig, StorageConfig, get_settings, with_overrides

if TYPE_CHECKING:
    from mkg_pipeline.engines.base import PageEngine
    from mkg_pipeline.storage import Storage
    from mkg_pipeline.vllm.client import VLLMClient

_SECRET = "A secret: pass dg.EnvVar(...), never a literal (Dagster stores literal config in its run storage)."


class PipelineSettingsResource(dg.ConfigurableResource):
    """The pipeline's settings as a resource: the one path by which assets, checks and sensors read them.

    The resources below extend it with their own fields, which override the matching settings; an asset
    reads the settings from a resource it is given (``s3.pipeline_config().workers``), never from the
    process directly, so whatever a run's resources say is what the whole run uses.
    """

    def _overrides(self) -> Mapping[str, Any]:
        """Dotted setting name -> this resource's value (None keeps the setting)."""
        return {}

    def pipeline_config(self) -> PipelineConfig:
        """The settings with this resource's fields applied: what this run's steps use."""
        # The resource key in pipeline_resources(), so an error names what to fix: "(from resource vllm)".
        return with_overrides(get_settings(), self._overrides(), f"resource {self._origin()}")

    def _origin(self) -> str:
        return "settings"


class VLLMResource(PipelineSettingsResource):
    """The GPU server as the pipeline sees it: a breaker-guarded client and a page engine.

    One client per step process (httpx pool, retries, the adaptive limiter); one circuit breaker per
    server URL per process, shared by every client to that URL.
    """

    url: str | None = None
    model: str | None = None
    api_key: str | None = Field(None, description=_SECRET)
    engine: str | None = None

    def _overrides(self) -> Mapping[str, Any]:
        return {"vllm.url": self.url, "vllm.model": self.model, "vllm.api_key": self.api_key, "engine": self.engine}

    def _origin(self) -> str:
        return "vllm"

    @asynccontextmanager
    async def open_engine(self) -> AsyncIterator[tuple[VLLMClient, PageEngine]]:
        """A client bound to the running event loop and the configured engine on top of it."""
        from mkg_pipeline.engines import build_engine
        from mkg_pipeline.vllm.client import VLLMClient

        config = self.pipeline_config()
        async with VLLMClient.from_config(config) as client:
            yield client, build_engine(config.engine, client, config)


class S3StorageResource(PipelineSettingsResource):
    """The bucket every artefact lives in (MinIO in deploy, moto locally)."""

    endpoint_url: str | None = None
    bucket: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = Field(None, description=_SECRET)

    def _overrides(self) -> Mapping[str, Any]:
        fields = ("endpoint_url", "bucket", "access_key_id", "secret_access_key")
        return {f"storage.{name}": getattr(self, name) for name in fields}

    def _origin(self) -> str:
        return "s3"

    def storage_config(self) -> StorageConfig:
        return self.pipeline_config().storage

    def storage(self) -> Storage:
        from mkg_pipeline.storage import Storage

        return Storage.from_config(self.storage_config())


def _secret_from_env(name: str) -> dg.EnvVar | None:
    # Optional: a key that is not set stays unset (a server without auth) instead of failing the run.
    return dg.EnvVar(name) if os.environ.get(name) else None


def pipeline_resources() -> dict[str, dg.ConfigurableResource]:
    """The code location's resources: secrets read from the environment at run time, by name."""
    return {
        "s3": S3StorageResource(secret_access_key=_secret_from_env("MKG_STORAGE__SECRET_ACCESS_KEY")),
        "vllm": VLLMResource(api_key=_secret_from_env("MKG_VLLM__API_KEY")),
    }
