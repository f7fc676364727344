"""Dagster resources: the configured VLM client/engine and the S3 storage.

Both read the project configuration (``config/mineru.yaml`` + ``MKG_*`` env);
fields set on the resource override it, so a Dagster UI launchpad or a test can
point one run at another server or bucket without touching the environment.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import dagster as dg

from mkg_pipeline.config import MinerUConfig, load_config

if TYPE_CHECKING:
    from mkg_pipeline.engines.base import PageEngine
    from mkg_pipeline.storage import Storage
    from mkg_pipeline.vllm.client import VLLMClient


def _with_overrides(config: MinerUConfig, section: str | None, overrides: dict[str, Any]) -> MinerUConfig:
    values = {k: v for k, v in overrides.items() if v is not None}
    if not values:
        return config
    data = config.model_dump()
    target = data[section] if section else data
    target.update(values)
    # Re-validate so that an override gets the same bounds checks as the file and env.
    # (model_dump keeps SecretStr values as they are, so secrets survive the round trip.)
    return MinerUConfig.model_validate(data)


class VLLMResource(dg.ConfigurableResource):
    """The GPU server as the pipeline sees it: a breaker-guarded client and a page engine.

    One client per step process (httpx pool, retries, semaphore); one circuit
    breaker per server URL per process, shared by every client to that URL.
    """

    url: str | None = None
    model: str | None = None
    api_key: str | None = None
    engine: str | None = None
    config_file: str | None = None

    def pipeline_config(self) -> MinerUConfig:
        config = load_config(self.config_file)
        config = _with_overrides(config, "vllm", {"url": self.url, "model": self.model, "api_key": self.api_key})
        return _with_overrides(config, None, {"engine": self.engine})

    @asynccontextmanager
    async def open_engine(self) -> AsyncIterator[tuple[VLLMClient, PageEngine]]:
        """A client bound to the running event loop and the configured engine on top of it."""
        from mkg_pipeline.engines import build_engine
        from mkg_pipeline.vllm.client import VLLMClient

        config = self.pipeline_config()
        async with VLLMClient.from_config(config) as client:
            yield client, build_engine(config.engine, client, config.prompt_version)


class S3StorageResource(dg.ConfigurableResource):
    """The bucket every artefact lives in (MinIO in deploy, moto locally)."""

    endpoint_url: str | None = None
    bucket: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    config_file: str | None = None

    def pipeline_config(self) -> MinerUConfig:
        return _with_overrides(
            load_config(self.config_file),
            "storage",
            {
                "endpoint_url": self.endpoint_url,
                "bucket": self.bucket,
                "access_key_id": self.access_key_id,
                "secret_access_key": self.secret_access_key,
            },
        )

    def storage(self) -> Storage:
        from mkg_pipeline.storage import Storage

        return Storage.from_config(self.pipeline_config().storage)
