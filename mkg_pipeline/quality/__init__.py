"""Output quality, in one place.

- :mod:`mkg_pipeline.quality.similarity`: normalised text compared with rapidfuzz.
- :mod:`mkg_pipeline.quality.baseline`: promoting a batch's outputs to the golden baseline.
- :mod:`mkg_pipeline.quality.diff`: a batch's outputs compared with that baseline.

No Dagster here; the quality assets are in :mod:`mkg_pipeline.orchestration.assets.quality`.
"""
