"""Shared fixtures: one fixture module per real component (see fixtures/)."""

from collections.abc import Iterator

import pytest

pytest_plugins = [
    "mkg_pipeline_tests.fixtures.corpus",
    "mkg_pipeline_tests.fixtures.local_server",
    "mkg_pipeline_tests.fixtures.s3",
]


@pytest.fixture(autouse=True)
def _settings_from_this_tests_environment() -> Iterator[None]:
    """get_settings() loads once per process; each test gets the settings of its own environment."""
    from mkg_pipeline.config import get_settings

    get_settings.cache_clear()
    yield
    get_settings.cache_clear()
