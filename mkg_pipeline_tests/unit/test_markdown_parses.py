"""One markdown-it parse per page answer (issue 22): the page_markdown engine reads an answer once, for
its safe Markdown and its content list alike, and assembling a document from current page records
parses nothing (they were made safe when they were stored); only older records are made safe again.

The counter wraps ``MarkdownIt.parse`` and calls through, so every parse still happens as it would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from markdown_it import MarkdownIt

from mkg_pipeline.config import AnswersConfig, PipelineConfig
from mkg_pipeline.document import PAGE_RECORD_VERSION, assemble_document, page_record
from mkg_pipeline.engines import PageInput, build_engine
from mkg_pipeline.engines.page_safety import safe_page_markdown
from mkg_pipeline_tests.unit.scripted_vlm import ScriptedVLM

# An answer that takes the paths of the safety pass a model's page takes: a heading, running text with an
# inline tag, a "<" and a script link, a Markdown table, a model-written HTML table over several lines
# (re-serialised on one line), display math, and a code fence the model never closed.
ANSWER = """# Dosing of drug X

Patients with x < 3 got 10<sup>-3</sup> mg, see [notes](javascript:alert(1)).

| Dose | Effect |
|---|---|
| 10 mg | none |

<table>
  <tr><td colspan="2" onclick="x">HTML table</td></tr>
  <tr><td>a</td><td>b</td></tr>
</table>

$$
E = m c^2
$$

```python
print("never closed")"""


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """How many markdown-it parses ran, as a one-element list (read it after the code under test)."""
    count = [0]
    original = MarkdownIt.parse

    def counting(self: MarkdownIt, src: str, env: object = None) -> list:
        count[0] += 1
        return original(self, src, env)

    monkeypatch.setattr(MarkdownIt, "parse", counting)
    yield count


async def _handle(answer: str) -> dict:
    """The stored page record of ``answer``, as the vlm stage writes and reads it back."""
    server = ScriptedVLM(lambda body: answer)
    settings = PipelineConfig(answers=AnswersConfig(max_tokens=4096, max_reasks=0))
    async with server.client() as client:
        result = await build_engine("page_markdown", client, settings).extract(
            PageInput(png=b"\x89PNG", page_idx=0, text_layer_chars=100, label="doc=d0 page=1")
        )
    record = page_record(result, doc_id="d0", page=1, cache_key="k", engine="e", model="m", latency_s=0.1)
    return json.loads(json.dumps(record))


async def test_one_parse_per_page_answer_and_none_to_assemble_current_records(parses: list[int]) -> None:
    record = await _handle(ANSWER)
    assert parses[0] == 1, f"{parses[0]} markdown-it parses for one page answer"
    # the answer was made safe and its content list read from the same tokens
    assert "#javascript:" in record["markdown"]
    assert record["markdown"].endswith('```python\nprint("never closed")\n```')
    assert '<table><tr><td colspan="2">HTML table</td></tr><tr><td>a</td><td>b</td></tr></table>' in record["markdown"]
    types = [item["type"] for item in record["content_list"]]
    assert types == ["text", "text", "table", "table", "equation", "code"], types

    parses[0] = 0
    markdown, content_list = assemble_document([record, {**record, "page": 2}])
    assert parses[0] == 0, f"{parses[0]} markdown-it parses to assemble two current page records"
    assert markdown.count("<!-- page ") == 2 and len(content_list) == 2 * len(types)


async def test_an_escaped_html_block_is_read_again_since_it_becomes_markdown(parses: list[int]) -> None:
    """An HTML block other than a table is escaped, and its lines are Markdown then (a fence inside it
    opens a code block): that answer alone is read a second time."""
    record = await _handle("Intro\n\n<!-- page 2 -->\n\n<div>\n```\n</div>\n<script>alert(1)</script>")
    assert parses[0] == 2
    assert record["markdown"] == (
        "Intro\n\n&lt;!-- page 2 -->\n\n&lt;div>\n```\n&lt;/div>\n&lt;script>alert(1)&lt;/script>\n```"
    )


async def test_records_older_than_the_current_version_are_made_safe_again(parses: list[int]) -> None:
    record = await _handle("Plain words.")
    hostile = "Intro\n\n<!-- page 2 -->\n\n```\nnever closed"
    older = {**record, "version": PAGE_RECORD_VERSION - 1, "markdown": hostile}
    unversioned = {key: value for key, value in older.items() if key != "version"}
    for stale in (older, unversioned):
        parses[0] = 0
        markdown, _ = assemble_document([stale])
        assert parses[0] >= 1
        assert markdown == f"<!-- page 1 -->\n\n{safe_page_markdown(hostile)}\n"
        assert markdown.count("<!-- page ") == 1


PIECES = [
    "<table>",
    "  <tr><td>a</td>",
    "<td rowspan=2>b</td></tr>",
    "</table>",
    "   <table><tr><td>x",
    "<TABLE class=x>",
    "",
    "",
    "text",
    "- item",
    "  ```",
    "```",
    "~~~",
    "    indented",
    "> quote",
    "| a | b |",
    "|---|---|",
    "$$",
    "<div>",
    "<!--",
    "-->",
    "<b>bold</b> x < y",
    "<tablex>hello",
    "<table>```<tr><td>a</td></tr>",
    "</td> said <table>",
]


def test_the_tokens_one_parse_gives_say_what_a_fresh_parse_of_the_safe_text_says() -> None:
    """A seeded fuzz of the shortcuts that replace a second parse: re-serialised tables move the tokens
    of the blocks after them (no parse), and the fence left open is read off the tokens (no probe)."""
    import random

    from mkg_pipeline.engines.page_safety import _defuse_html_blocks, _literal_lines, _open_fence, _parse

    rng = random.Random(22)
    for _ in range(600):
        text = "\n".join(rng.choice(PIECES) for _ in range(rng.randint(1, 12)))
        defused, tokens = _defuse_html_blocks(text, _parse(text))
        fresh = _parse(defused)
        lines = defused.split("\n")
        # A blank line set before a table may join a fence in a list item just before it; blank lines
        # come out the same, code or not, so only the others are compared.
        shown = [{i for i in found if lines[i].strip()} for found in _literal_lines(tokens, lines)]
        assert shown == [{i for i in found if lines[i].strip()} for found in _literal_lines(fresh, lines)], text
        assert _open_fence(tokens, defused) == _open_fence(fresh, defused), text
        # and the open fence is the one that would swallow a paragraph after the page
        probe = _parse(defused + "\n\nprobe")
        own_paragraph = len(probe) >= 2 and probe[-2].type == "inline" and probe[-2].content == "probe"
        swallowed_by_fence = not own_paragraph and probe[-1].type == "fence" and probe[-1].level == 0
        assert (_open_fence(fresh, defused) is not None) == swallowed_by_fence, text
        assert own_paragraph or swallowed_by_fence, text  # nothing else runs past the page
