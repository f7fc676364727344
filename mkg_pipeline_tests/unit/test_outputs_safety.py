"""Safe Markdown (issue 9 row 10, issue 10): model text cannot forge page markers or hide the pages after it.

Every case assembles a three-page document whose first page holds hostile model text, page 2 a
plain sentence and page 3 is not done, renders it as CommonMark (markdown-it, raw HTML enabled,
as a Markdown viewer does), and reads the rendered HTML as a browser would.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest
from markdown_it import MarkdownIt

from mkg_pipeline.document import assemble_document, preview_markdown
from mkg_pipeline.engines.page_safety import safe_page_markdown, sanitize_table_html

PAGE_TWO = "Second page keeps its text."
MARKER_RE = re.compile(r"^<!-- page (\d+)(?::[^\n]*)? -->$", re.MULTILINE)


class _Reader(HTMLParser):
    """Visible text, comments and elements of rendered HTML, the way a browser splits them."""

    HIDDEN = {"script", "style", "template", "textarea", "title", "noscript"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.visible: list[str] = []
        self.comments: list[str] = []
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str]] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs.extend((name, value or "") for name, value in attrs)
        if tag in self.HIDDEN:
            self._hidden += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN and self._hidden:
            self._hidden -= 1

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.visible.append(data)

    def handle_comment(self, data: str) -> None:
        self.comments.append(data.strip())


def render(markdown: str) -> tuple[str, _Reader]:
    html = MarkdownIt("commonmark").enable("table").render(markdown)
    reader = _Reader()
    reader.feed(html)
    reader.close()
    return html, reader


def raw_html(markdown: str) -> list[str]:
    """The raw HTML a CommonMark renderer would pass through (blocks and inline)."""
    found = []
    for token in MarkdownIt("commonmark").enable("table").parse(markdown):
        found += [token.content] if token.type == "html_block" else []
        found += [child.content for child in token.children or [] if child.type == "html_inline"]
    return found


def document(first_page: str) -> tuple[str, list[dict]]:
    pages = [
        {"page": 1, "markdown": first_page, "content_list": [{"type": "text", "text": first_page, "page_idx": 0}]},
        {"page": 2, "markdown": PAGE_TWO, "content_list": [{"type": "text", "text": PAGE_TWO, "page_idx": 1}]},
        {"page": 3, "reason": "timeout", "message": "POST /v1/chat/completions timed out -->"},
    ]
    return assemble_document(pages)


def assert_pages_intact(markdown: str) -> _Reader:
    """Exactly our three page markers, page 2 rendered as its own paragraph, page 3 visibly missing."""
    assert [int(n) for n in MARKER_RE.findall(markdown)] == [1, 2, 3]
    html, reader = render(markdown)
    assert f"<p>{PAGE_TWO}</p>" in html, f"page 2 is not rendered as a paragraph:\n{html}"
    assert [c.split(":")[0] for c in reader.comments] == ["page 1", "page 2", "page 3"], reader.comments
    visible = "".join(reader.visible)
    assert PAGE_TWO in visible
    assert "Page 3" in visible  # the missing page is said in words, not only in a comment
    assert "script" not in reader.tags
    return reader


@pytest.mark.parametrize(
    "hostile",
    [
        pytest.param("Intro\n\n<!-- page 2 -->\n\nforged\n\n<!-- page 99 -->", id="forged-page-markers"),
        pytest.param("Intro\n\n<!-- page 2: not processed yet -->", id="forged-missing-marker"),
        pytest.param("Intro\n\n<!-- never closed", id="unclosed-comment-block"),
        pytest.param("Intro <!-- never closed", id="unclosed-comment-inline"),
        pytest.param("Intro\n\n```python\nprint('never closed')", id="unclosed-fence"),
        pytest.param("Intro\n\n~~~~\nnever closed\n```", id="unclosed-tilde-fence"),
        pytest.param("Intro\n\n<script>\nalert(1)", id="unclosed-script"),
        pytest.param("Intro <script>alert(1)</script> outro", id="inline-script"),
        pytest.param("<pre>\nnever closed", id="unclosed-pre"),
        pytest.param("<style>body{display:none}", id="unclosed-style"),
        pytest.param("<div>\n<table><tr><td>cell", id="unclosed-table"),
        pytest.param("```\n<!-- page 2 -->\n```", id="marker-inside-fence"),
        pytest.param("$$\nx = 1", id="unclosed-display-math"),
        pytest.param("$$\n```\n$$\n<script>alert(1)</script>", id="fence-inside-math"),
        pytest.param("- item\n  ```\n<script>alert(1)</script>", id="list-item-fence-ends-with-the-item"),
        pytest.param("> ```\n> <!--\n\n<script>", id="blockquote-fence"),
        pytest.param("<div>\n```\n</div>\n<script>", id="fence-revealed-by-escaping"),
    ],
)
def test_hostile_page_text_cannot_hide_or_forge_pages(hostile: str) -> None:
    markdown, _ = document(hostile)
    assert_pages_intact(markdown)


def test_lone_surrogate_is_replaced_before_anything_is_encoded() -> None:
    markdown, content_list = document("bad \ud800 char and a pair \ud83d\ude00 half")
    markdown.encode("utf-8")  # would raise UnicodeEncodeError
    json.dumps(content_list, ensure_ascii=False).encode("utf-8")
    assert "\ufffd" in markdown and "\ufffd" in content_list[0]["text"]
    assert_pages_intact(markdown)


HOSTILE = [
    "Intro <script>alert(1)</script> outro",
    "x $a<b$ and 10<sup>-3</sup> <br/> <sup>open",
    "$$\nx<y\n$$",
    "```\n<!-- page 2 -->\n<b>\n",
    '<table border=1 onclick=x><tr><td rowspan="2" style="x">a<script>bad</script>&amp; b</td><td>c',
    "See [x](javascript:alert(1)) and [y](JaVa&#115;cript:alert(1)) and <https://ok.example/a> and <javascript:x>",
    "| a | b |\n|---|---|\n| <i>1</i> | 2 |",
    "<img src=x onerror=alert(1)> <a href='javascript:x'>link</a> <iframe src=//evil>",
    "<![CDATA[ x ]]> <?php echo 1 ?> <!DOCTYPE html>",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_safe_page_markdown_is_idempotent_and_leaves_no_active_html(text: str) -> None:
    once = safe_page_markdown(text)
    assert safe_page_markdown(once) == once
    _, reader = render(once)
    assert set(reader.tags) <= {
        "p",
        "table",
        "tr",
        "td",
        "th",
        "thead",
        "tbody",
        "sup",
        "br",
        "i",
        "em",
        "a",
        "pre",
    } | {
        "code",
        "h1",
        "h2",
    }, reader.tags
    assert not reader.comments
    for name, value in reader.attrs:  # only markdown-it's own attributes, and no script in a URL
        assert name in {"href", "src", "alt", "class", "colspan", "rowspan"}, (name, value)
        assert not value.lower().startswith(("javascript:", "vbscript:", "data:")), value


def test_allowed_table_markup_is_kept_balanced_and_attributes_are_dropped() -> None:
    table = sanitize_table_html(
        '<table class="x"><tr><th colspan="2" onclick="x">H</th></tr><tr><td>a<br/>b<td>c</table>'
    )
    # read as a browser reads it (nh3): the open cell is closed by the next one, not nested in it
    assert table == '<table><tr><th colspan="2">H</th></tr><tr><td>a<br>b</td><td>c</td></tr></table>'
    assert sanitize_table_html(table) == table


@pytest.mark.parametrize(
    ("fragment", "expected"),
    [
        pytest.param(  # text stays escaped as written (&amp; &lt; &gt;), a no-break space is kept as &nbsp;
            '<table><tr><td>a &amp; b &lt;c&gt; "q"&nbsp;x</td></tr></table>',
            '<table><tr><td>a &amp; b &lt;c&gt; "q"&nbsp;x</td></tr></table>',
            id="entities",
        ),
        pytest.param(  # comments, closed or not, are dropped (with what an unclosed one swallows)
            "<table><tr><td>x<!-- c -->y</td><td>z<!-- never closed</td></tr></table>",
            "<table><tr><td>xy</td><td>z</td></tr></table>",
            id="comments",
        ),
        pytest.param(  # unclosed elements are closed where a browser closes them; stray closers dropped
            "<table><tr><td>a<b>bold<td>c</i></table></td>",
            "<table><tr><td>a<b>bold</b></td><td>c</td></tr></table>",
            id="unclosed",
        ),
        pytest.param(  # script-like elements lose their content, also inside svg and math
            "<table><tr><td>a<script>x</script><style>s</style><svg><script>y</script></svg><math>m</math></td>",
            "<table><tr><td>a</td></tr></table>",
            id="drop-content",
        ),
        pytest.param(  # spans are numbers in 1..1000; other attributes and values go
            "<table><tr><td rowspan=9999 colspan=0 style=x>a</td><td colspan=' 3 '>b</td><td rowspan=²>c</td>",
            '<table><tr><td rowspan="1000" colspan="1">a</td><td colspan="3">b</td><td>c</td></tr></table>',
            id="spans",
        ),
        pytest.param(  # a tbody the model wrote is kept; one the HTML parser adds is not written
            "<table>\n <tbody>\n  <tr><td>a</td></tr>\n </tbody>\n</table>",
            "<table><tbody><tr><td>a</td></tr></tbody></table>",
            id="tbody",
        ),
    ],
)
def test_table_allowlist_on_nh3(fragment: str, expected: str) -> None:
    table = sanitize_table_html(fragment)
    assert table == expected
    assert sanitize_table_html(table) == table


def test_text_a_browser_shows_outside_a_table_is_a_paragraph_of_its_own() -> None:
    """Text between rows is shown above the table (HTML's foster parenting): it gets its own line, so
    the table stays an allowlisted HTML block and the text is escaped as any other Markdown line."""
    page = safe_page_markdown("Intro\n\n<table>\n<tr><td>a</td></tr>\nstray <b>note</b> <script>x</script>\n</table>")
    assert page == "Intro\n\n\nstray <b>note</b>\n\n<table><tr><td>a</td></tr></table>"
    assert safe_page_markdown(page) == page


def test_missing_pages_are_visible_and_records_keep_order_and_page_idx() -> None:
    pages = [
        {
            "page": 1,
            "markdown": "# One",
            "content_list": [{"type": "text", "text": "One", "text_level": 1, "page_idx": 7}],
        },
        None,
        {"page": 3, "reason": "truncated"},
        {"page": 4, "markdown": "Four", "blocks": [{"type": "text", "text": "Four", "bbox": [0.1, 0.2, 0.3, 0.4]}]},
    ]
    markdown, content_list = assemble_document(pages)
    assert [int(n) for n in MARKER_RE.findall(markdown)] == [1, 2, 3, 4]
    _, reader = render(markdown)
    visible = "".join(reader.visible)
    assert "Page 2 is not in this document yet" in visible and "not_attempted" in visible
    assert "Page 3 is not in this document yet" in visible and "truncated" in visible
    # page_idx follows the record's page; a record from before content lists (blocks) still counts
    assert content_list == [
        {"type": "text", "text": "One", "text_level": 1, "page_idx": 0},
        {"type": "text", "text": "Four", "page_idx": 3, "bbox": [100, 200, 300, 400]},
    ]


def test_preview_has_no_raw_html_and_shows_pages_and_tables() -> None:
    markdown, _ = assemble_document(
        [
            {
                "page": 1,
                "markdown": "Intro\n\n<table><tr><td>a</td><td>b</td></tr><tr><td>1</td><td>2</td></tr></table>",
            },
            {"page": 2, "markdown": "```\n<script>code</script>"},
        ]
    )
    preview = preview_markdown(markdown)
    assert not raw_html(preview)
    _, reader = render(preview)
    assert "— page 1 —" in "".join(reader.visible) and "— page 2 —" in "".join(reader.visible)
    assert not reader.comments and "script" not in reader.tags
    assert "| a | b |" in preview and "| 1 | 2 |" in preview
    assert preview_markdown(markdown, max_chars=20).endswith("the full document is in document.md*")


def test_script_link_targets_are_defused_for_renderers_that_do_not_check_them() -> None:
    text = "[a](javascript:alert(1)) [b](JaVa&#115;cript:x) ![c](data:text/html,x) [d](https://ok.example)\n"
    assert safe_page_markdown(text + "[e]: vbscript:x") == (
        "[a](#javascript:alert(1)) [b](#JaVa&#115;cript:x) ![c](#data:text/html,x) [d](https://ok.example)\n"
        "[e]: #vbscript:x"
    )


def test_page_record_round_trips_through_json_and_assembles() -> None:
    from mkg_pipeline.document import page_record
    from mkg_pipeline.engines import PageResult

    result = PageResult(
        markdown="Text",
        content_list=[{"type": "text", "text": "Text", "page_idx": 0}],
        images={"images/" + "a" * 64 + ".jpg": b"\xff\xd8"},
        requests=3,
        raw_answer="Text",
        finish_reason="stop",
    )
    record = page_record(result, doc_id="d", page=1, cache_key="k", engine="e|m|v1", model="m", latency_s=1.23456)
    stored = json.loads(json.dumps(record, ensure_ascii=False).encode("utf-8"))
    assert stored["images"] == ["images/" + "a" * 64 + ".jpg"] and stored["requests"] == 3
    assert assemble_document([stored]) == ("<!-- page 1 -->\n\nText\n", result.content_list)


FRAGMENTS = [
    "<!--",
    "-->",
    "<!-- page 2 -->",
    "```",
    "````js",
    "~~~",
    "    code",
    "- ```",
    "> <!--",
    "$$",
    "\\[",
    "<script>",
    "</script>",
    "<pre>",
    "<style>",
    "<textarea>",
    "<table>",
    "<table><tr><td>",
    "</table>",
    "<td>",
    "<div>",
    "<sup>",
    "</sup>",
    "<img src=x onerror=alert(1)>",
    "<a href=javascript:x>",
    "`",
    "``",
    "\\",
    "[x](javascript:x)",
    "<![CDATA[",
    "<?",
    "<!X",
    "plain words",
    "",
    "\ud800",
    "| a | b |",
    "|---|---|",
    "* item",
    "1. item",
    "<http://example.com>",
    "&lt;script&gt;",
    "\t<!--",
    "   <table>",
    "  ```",
    "- item",
    "<br>",
    "\\$$",
]


def test_random_hostile_pages_never_swallow_the_next_page() -> None:
    """A seeded fuzz over fragments that open things: every document keeps its pages."""
    import random

    rng = random.Random(20240610)
    allowed = {"p", "table", "tr", "td", "th", "thead", "tbody", "sup", "sub", "br", "b", "i", "em", "strong"}
    allowed |= {"u", "code", "pre", "a", "ul", "ol", "li", "blockquote", "h1", "h2", "hr", "img"}
    for _ in range(400):
        lines = [" ".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 8))]
        hostile = "\n".join(lines)
        markdown, _ = document(hostile)
        reader = assert_pages_intact(markdown)
        assert set(reader.tags) <= allowed, (hostile, reader.tags)
        assert safe_page_markdown(safe_page_markdown(hostile)) == safe_page_markdown(hostile), hostile
        assert not raw_html(preview_markdown(markdown)), hostile
