"""Prompts sent to the VLM. Changing any text here requires bumping
``MinerUConfig.prompt_version``: it is part of every page's cache key."""

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
