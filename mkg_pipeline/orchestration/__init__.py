"""The Dagster layer: assets, resources, jobs, schedules, sensors, asset checks and the instance class.

The only part of :mod:`mkg_pipeline` that imports Dagster; the stages and everything under them never do.
The code location is :mod:`mkg_pipeline.orchestration.definitions`.
"""
