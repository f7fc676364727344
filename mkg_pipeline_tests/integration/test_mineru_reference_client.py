"""MinerU's own client, unmodified, against the local server: the protocol reference.

``mineru_vl_utils.MinerUClient(backend="http-client")`` is what MinerU uses to
talk to a vLLM server. If it completes its two-step extraction (layout
detection, then one recognition request per block) against the local server
and gets the page's text back, the server speaks MinerU's protocol.
"""

from __future__ import annotations

import io
import time

import pytest
from mineru_vl_utils import MinerUClient
from PIL import Image

from mkg_pipeline.quality import similarity
from mkg_pipeline_tests.fixtures.local_server import LocalVLMServer, corpus_page_text, render_corpus_page

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("name", "page"),
    [("pdflatex-4-pages.pdf", 0), ("wang-answer-validation-5p.pdf", 0)],
)
def test_two_step_extract_reads_the_page(local_vlm_server: LocalVLMServer, name: str, page: int) -> None:
    client = MinerUClient(
        backend="http-client",
        server_url=local_vlm_server.url,
        model_name=local_vlm_server.model,  # checked against /v1/models, with the key
        server_headers=local_vlm_server.headers,
        use_tqdm=False,
    )
    image = Image.open(io.BytesIO(render_corpus_page(name, page, dpi=150))).convert("RGB")
    started = time.monotonic()
    blocks = client.two_step_extract(image)
    elapsed = time.monotonic() - started

    assert blocks, "no blocks from layout detection"
    assert all(block.type in {"text", "title", "page_number"} for block in blocks)
    text = "\n\n".join(block.content for block in blocks if block.content)
    score = similarity(text, corpus_page_text(name, page))
    print(
        f"MinerUClient two_step_extract {name} page {page + 1}: {len(blocks)} blocks, "
        f"similarity {score:.4f}, {elapsed:.1f}s"
    )
    assert score >= 0.90
