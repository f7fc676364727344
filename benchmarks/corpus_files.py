"""The test corpus as the benchmarks read it: where it is, and which of its files a run takes.

Imported by the benchmark scripts from their own folder (``python benchmarks/<name>.py`` puts it on sys.path).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CORPUS = Path(os.environ.get("MKG_CORPUS_DIR", REPO.parent / "shared" / "corpus"))
FILES_HELP = "comma-separated corpus file names (default: every 'ok' file)"


def corpus_manifest() -> dict[str, dict[str, Any]]:
    """The corpus manifest's entries by file name."""
    return {e["file"]: e for e in json.loads((CORPUS / "manifest.json").read_text())}


def chosen_files(files: str) -> list[str]:
    """The files named by ``--files`` (comma-separated), or else every file the corpus expects to convert ("ok")."""
    if files:
        return [n for n in files.split(",") if n]
    return [n for n, e in corpus_manifest().items() if e["expect"] == "ok"]
