"""The local OpenAI-compatible VLM server: a CPU OCR stand-in for vLLM.

Run it with ``VLLM_API_KEY=... python -m mkg_devstack.local_server --host 127.0.0.1 --port 8000``.
It answers vLLM's HTTP protocol (``/health``, ``/v1/models``,
``/v1/chat/completions``, ``/metrics``) from RapidOCR's ONNX models, so that
the pipeline, MinerU's client and the tests talk to it exactly as to vLLM.

Modules, one job each:

- ``settings``: command line (vLLM's flag names) and settings dataclasses.
- ``protocol``: the request model (pydantic, as vLLM's ``protocol.py``),
  routing by prompt, data URLs, token estimates.
- ``geometry``: OCR lines, rows, column gutters, page furniture zones and the
  reading order; hyphenation at row ends.
- ``blocks``: paragraphs, titles, furniture, figures and tables as MinerU 2.x
  block types; the page's Markdown and a crop's plain text.
- ``tables``: a table's cell grid from its lines and rules; OTSL and Markdown.
- ``mineru_format``: MinerU's layout answer (boxes, types, rotation) and table answer.
- ``olmocr_format``: olmOCR-2's answer (YAML front matter, then Markdown with HTML tables).
- ``regions``: figures, ruled tables and rules found on the page image (numpy, OpenCV).
- ``ocr``: image decoding and the RapidOCR wrapper (the model is imported
  lazily, when the server starts, never on import of this package).
- ``answers``: the glue: one image to one answer, per route.
- ``responses``: vLLM's JSON body and server-sent events, and the hostile bodies.
- ``metrics``: vLLM's Prometheus metric names on a private registry.
- ``faults``: fault injection, active only with ``--enable-fault-injection``.
- (``mkg_devstack.slots``: ``--max-num-seqs`` slots with a FIFO queue, shared with the simulated GPU server.)
- ``app``: the ASGI application factory (FastAPI).

Importing this package, or its pure modules (settings, protocol, geometry,
blocks, tables, mineru_format, olmocr_format, faults), imports nothing heavy: no numpy, no
onnxruntime, no rapidocr, no OpenCV.
"""
