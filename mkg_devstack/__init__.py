"""The development stack: the local OpenAI-compatible VLM server (CPU OCR model), the launcher that
starts it with a local S3 stand-in (moto), and the demo that runs the pipeline end to end on them.

Kept apart from :mod:`mkg_pipeline`, the product: the run-pod image does not carry this package, and
nothing in ``mkg_pipeline`` imports it. Entry points: ``python -m mkg_devstack.demo`` (``make demo``)
and ``python -m mkg_devstack.local_server``.
"""
