"""Prompts sent to the VLM. Changing any text here requires bumping
``PipelineConfig.prompt_version``: it is part of every page's cache key."""

from __future__ import annotations

# One request per page, for general instruction VLMs such as Qwen2.5-VL-7B-Instruct.
PAGE_MARKDOWN_SYSTEM_PROMPT = "You are a precise document transcription engine."
PAGE_MARKDOWN_PROMPT = (
    "Convert this document page to Markdown. Transcribe all text exactly in natural reading order. "
    "Use '#' headings for titles and section headings, Markdown tables for tables and LaTeX for formulas. "
    "Do not describe images, do not add commentary, and output only the Markdown."
)

# MinerU's own two-step protocol prompts live in mineru_vl_utils (DEFAULT_PROMPTS):
# "\nLayout Detection:", "\nText Recognition:", "\nTable Recognition:", "\nFormula Recognition:",
# "\nImage Analysis:". We use them unchanged so that a MinerU VLM served by vLLM answers as trained.

# olmOCR-2 (allenai/olmOCR-2-7B-1025): the prompt it was fine-tuned on, word for word, since a
# fine-tuned model answers best to its training prompt. Source: allenai/olmocr,
# olmocr/prompts/prompts.py, build_no_anchoring_v4_yaml_prompt (used by olmocr/pipeline.py,
# build_page_query). The answer is YAML front matter then the page text (engines/olmocr.py).
OLMOCR_PROMPT = (
    "Attached is one page of a document that you must process. "
    "Just return the plain text representation of this document as if you were reading it naturally. "
    "Convert equations to LateX and tables to HTML.\n"
    "If there are any figures or charts, label them with the following markdown syntax "
    "![Alt text describing the contents of the figure](page_startx_starty_width_height.png)\n"
    "Return your output as markdown, with a front matter section on top specifying values for the "
    "primary_language, is_rotation_valid, rotation_correction, is_table, and is_diagram parameters."
)
