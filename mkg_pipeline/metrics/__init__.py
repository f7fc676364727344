"""The pipeline's Prometheus metrics, in one place.

- :mod:`mkg_pipeline.metrics.client`: the VLM client's metrics and the shared ``REGISTRY``.
- :mod:`mkg_pipeline.metrics.pipeline`: the pipeline's own (documents, pages, batches), pushed to the
  Pushgateway when a step ends.

vLLM's own ``/metrics``, which the limiter reads, is parsed in :mod:`mkg_pipeline.vllm.server_metrics`.
"""
