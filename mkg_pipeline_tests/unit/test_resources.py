"""The Dagster layer reads settings one way: from the resource a step, check or sensor is given."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mkg_pipeline.orchestration
from mkg_pipeline.config import ConfigError
from mkg_pipeline.orchestration.resources import PipelineSettingsResource, S3StorageResource, VLLMResource

ORCHESTRATION = Path(mkg_pipeline.orchestration.__file__).parent


def test_settings_come_from_the_environment_and_the_config_file_through_every_resource(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text("workers:\n  lease_ttl_s: 120\n  batch_size: 7\n")
    monkeypatch.setenv("MKG_CONFIG_FILE", str(config_file))
    monkeypatch.setenv("MKG_WORKERS__BATCH_SIZE", "9")  # the environment wins over the file, as everywhere
    for resource in (PipelineSettingsResource(), S3StorageResource(), VLLMResource()):
        settings = resource.pipeline_config()
        assert (settings.workers.lease_ttl_s, settings.workers.batch_size) == (120, 9), type(resource).__name__


def test_a_resources_fields_override_the_settings_for_its_run_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MKG_STORAGE__BUCKET", "from-env")
    monkeypatch.setenv("MKG_VLLM__URL", "http://env-gpu:8000")
    s3 = S3StorageResource(bucket="from-launchpad")
    vllm = VLLMResource(url="http://launchpad-gpu:9000", engine="mineru")
    assert s3.pipeline_config().storage.bucket == "from-launchpad"
    assert s3.storage_config().bucket == "from-launchpad"
    assert vllm.pipeline_config().vllm.url == "http://launchpad-gpu:9000"
    assert vllm.pipeline_config().engine == "mineru"
    # the other resource, and the rest of the settings, keep what the environment says
    assert vllm.pipeline_config().storage.bucket == "from-env"
    assert s3.pipeline_config().vllm.url == "http://env-gpu:8000"


def test_a_resource_field_out_of_bounds_names_the_resource() -> None:
    with pytest.raises(ConfigError, match=r"vllm.url = 'ftp://gpu' \(from resource vllm\)"):
        VLLMResource(url="ftp://gpu").pipeline_config()
    with pytest.raises(ConfigError, match=r"storage.bucket = 'ab' \(from resource s3\)"):
        S3StorageResource(bucket="ab").pipeline_config()


def _calls_get_settings(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(), str(path))
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Name | ast.Attribute)
        and (node.id if isinstance(node, ast.Name) else node.attr) in {"get_settings", "load_config"}
    ]


def test_only_the_resources_module_reads_the_process_settings() -> None:
    """Assets, checks, sensors and jobs take settings from their resources, never from the process."""
    readers = {
        str(path.relative_to(ORCHESTRATION)): lines
        for path in sorted(ORCHESTRATION.rglob("*.py"))
        if path.name != "resources.py" and (lines := _calls_get_settings(path))
    }
    assert readers == {}
