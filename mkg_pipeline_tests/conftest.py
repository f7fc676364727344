"""Shared fixtures: one fixture module per real component (see fixtures/)."""

pytest_plugins = [
    "mkg_pipeline_tests.fixtures.corpus",
    "mkg_pipeline_tests.fixtures.local_server",
    "mkg_pipeline_tests.fixtures.proxy",
    "mkg_pipeline_tests.fixtures.s3",
]
