"""MinerU's own client, unmodified, against the local server: the protocol reference, and the one
place where the MinerU route's OCR quality is asserted.

``mineru_vl_utils.MinerUClient(backend="http-client")`` is what MinerU uses to
talk to a vLLM server. If it completes its two-step extraction (layout
detection, then one recognition request per block) against the local server
and gets the page's text back, with figures as ``image`` blocks and tables as
HTML (from the OTSL the server answers), the server speaks MinerU's protocol.
"""

from __future__ import annotations

import io
import time
from typing import Any

import pytest
from mineru_vl_utils import MinerUClient
from PIL import Image

from mkg_devstack.local_server.blocks import BlockType
from mkg_pipeline.quality.similarity import normalise_text, similarity
from mkg_pipeline_tests.fixtures.local_server import LocalVLMServer, corpus_page_text, render_corpus_page

pytestmark = pytest.mark.integration

ANSWERED_TYPES = {kind.value for kind in BlockType}


def two_step_extract(server: LocalVLMServer, name: str, page: int) -> list[Any]:
    client = MinerUClient(
        backend="http-client",
        server_url=server.url,
        model_name=server.model,  # checked against /v1/models, with the key
        server_headers=server.headers,
        use_tqdm=False,
    )
    image = Image.open(io.BytesIO(render_corpus_page(name, page, dpi=150))).convert("RGB")
    started = time.monotonic()
    blocks = client.two_step_extract(image)
    elapsed = time.monotonic() - started
    print(f"MinerUClient two_step_extract {name} page {page + 1}: {len(blocks)} blocks, {elapsed:.1f}s")
    assert blocks, "no blocks from layout detection"
    assert {block.type for block in blocks} <= ANSWERED_TYPES
    return list(blocks)


@pytest.mark.parametrize(
    ("name", "page"),
    [("pdflatex-4-pages.pdf", 0), ("wang-answer-validation-5p.pdf", 0)],
)
def test_two_step_extract_reads_the_page(local_vlm_server: LocalVLMServer, name: str, page: int) -> None:
    blocks = two_step_extract(local_vlm_server, name, page)
    text = "\n\n".join(block.content for block in blocks if block.content)
    score = similarity(text, corpus_page_text(name, page))
    print(f"  similarity {score:.4f} to the text layer")
    assert score >= 0.90
    assert all(0 <= block.bbox[0] < block.bbox[2] <= 1 and 0 <= block.bbox[1] < block.bbox[3] <= 1 for block in blocks)


def test_a_figure_page_answers_an_image_block(local_vlm_server: LocalVLMServer) -> None:
    # arxiv-0807.3577-physics-15p p7: a plot (Hubble diagram, vector graphics) above two text sections.
    blocks = two_step_extract(local_vlm_server, "arxiv-0807.3577-physics-15p.pdf", 6)
    images = [block for block in blocks if block.type == "image"]
    assert len(images) == 1
    x1, y1, x2, y2 = images[0].bbox
    assert x2 - x1 > 0.3 and y2 - y1 > 0.15  # the plot, not a speck
    text = normalise_text(" ".join(block.content or "" for block in blocks))
    assert "figure 1" in text and "residual hubble diagram" in text  # the caption stays text
    assert "0.5" not in text.split("figure 1")[0]  # the plot's tick labels are the image's, not text


def test_a_table_page_answers_tables_that_mineru_turns_into_html(local_vlm_server: LocalVLMServer) -> None:
    # sci-tables-6p p6: the end of a long ruled table, and two small tables with filled header rows.
    blocks = two_step_extract(local_vlm_server, "sci-tables-6p.pdf", 5)
    tables = [block for block in blocks if block.type == "table"]
    assert len(tables) == 3
    assert all((table.content or "").startswith("<table>") for table in tables)  # OTSL -> HTML by mineru_vl_utils
    tsca = next(table.content for table in tables if "TTBP" in (table.content or ""))
    rows = tsca.split("<tr>")[1:]
    assert len(rows) == 6  # a header and five substances
    assert "<td>68937-41-7</td>" in rows[-1]  # a CAS number in its own cell, in the last row
    assert rows[0].count("<td") == 3  # three columns
