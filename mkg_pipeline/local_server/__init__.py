"""The local OpenAI-compatible VLM server: a CPU OCR stand-in for vLLM.

Run it with ``python -m mkg_pipeline.local_server --host 127.0.0.1 --port 8000``.
It answers vLLM's HTTP protocol (``/health``, ``/v1/models``,
``/v1/chat/completions``, ``/metrics``) from RapidOCR's ONNX models, so that
the pipeline, MinerU's client and the tests talk to it exactly as to vLLM.

Modules:

- ``settings``: command line (vLLM's flag names) and settings dataclasses.
- ``protocol``: pure functions: request parsing, prompt routing, reading
  order, Markdown assembly and MinerU's layout format. No model, no numpy.
- ``ocr``: image decoding and the RapidOCR wrapper (the model is imported
  lazily, when the server starts, never on import of this package).
- ``metrics``: vLLM's Prometheus metric names on a private registry.
- ``faults``: fault injection, active only with ``--enable-fault-injection``.
- ``app``: the ASGI application factory (FastAPI).

Importing this package imports nothing heavy: no onnxruntime, no rapidocr.
"""
