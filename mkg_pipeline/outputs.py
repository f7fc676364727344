"""Document outputs: one document's page records -> document Markdown and content list.

Baseline: the assembly the vlm stage does today (``stages/vlm.py: _assemble_document``), moved here as is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def assemble_document(pages: Sequence[Mapping[str, Any] | None]) -> tuple[str, list[dict[str, Any]]]:
    md_parts: list[str] = []
    content: list[dict[str, Any]] = []
    for index, record in enumerate(pages):
        n = int(record.get("page", index + 1)) if record is not None else index + 1
        if record is not None and "markdown" in record:
            md_parts.append(f"<!-- page {n} -->\n\n{record['markdown']}".rstrip())
            content.extend(record.get("content_list", []))
            continue
        reason = record.get("reason", "not_attempted") if record is not None else "not_attempted"
        md_parts.append(f"<!-- page {n}: not processed yet ({reason}); re-materialize vlm_outputs to retry -->")
    return "\n\n".join(md_parts) + "\n", content
