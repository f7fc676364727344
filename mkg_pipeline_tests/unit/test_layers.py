"""The folders are layers (docs/architecture.md, "Layers"): every import, lazy ones included, points down.

Read from the source with ``ast``, so an import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "mkg_pipeline"

#: what each part of the product may import from the product; a part always may import itself.
#: Parts are a top-level module or folder of ``mkg_pipeline``.
#: leaf modules: they import nothing of the product, anything may import them
LEAVES = {"config", "ids", "png", "markdown_table", "progress", "metrics"}
MAY_IMPORT: dict[str, set[str]] = {
    # Dagster's layer: wires the stages to Dagster; may use anything below it
    "orchestration": {"stages", "quality", "audit", "export", "document", "records", "engines", "pdf", "vllm"}
    | {"storage"}
    | LEAVES,
    "healthcheck": {"config", "orchestration"},  # --import-definitions imports the code location
    # the work of each asset, without Dagster
    "stages": {"document", "records", "engines", "pdf", "vllm", "storage"} | LEAVES,
    "quality": {"stages", "records", "storage", "markdown_table", "config", "ids"},  # reads the stages' manifests
    "audit": {"engines", "storage", "config", "ids", "records", "document"},
    "export": {"engines", "storage", "config", "ids", "document"},
    "document": {"engines", "config", "ids"},
    "records": {"engines", "config", "ids"},
    # page image -> Markdown; pdf <-> engines.text_layer is the one sideways pair (the text route)
    "engines": {"vllm", "pdf", "config", "ids", "png", "markdown_table"},
    "pdf": {"engines", "config", "ids", "png"},
    "vllm": {"metrics", "config"},
    "storage": {"config", "ids"},
    "metrics": set(),
    "config": set(),
    "ids": set(),
    "png": set(),
    "markdown_table": set(),
    "progress": set(),
}
#: only the pdf -> engines arrow that exists (render.py's text route); pdf may not import other engines
PDF_MAY_IMPORT_FROM_ENGINES = {"mkg_pipeline.engines.text_layer"}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return found


def _part(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def _product_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_part_is_placed_in_a_layer() -> None:
    parts = {_part(p) for p in _product_files()}
    assert parts == set(MAY_IMPORT), "a new module or folder of mkg_pipeline: give it a layer in MAY_IMPORT"


@pytest.mark.parametrize("path", _product_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path) -> None:
    part = _part(path)
    wrong = []
    for line, module in _imports(path):
        top = module.split(".")[0]
        where = f"{path.relative_to(REPO)}:{line} imports {module}"
        if top == "mkg_devstack":
            wrong.append(f"{where}: the product never imports the dev stack")
        elif top.startswith("dagster") and part != "orchestration":
            wrong.append(f"{where}: only mkg_pipeline/orchestration knows Dagster")
        elif top == "mkg_pipeline" and "." in module:
            target = module.split(".")[1]
            if target != part and target not in MAY_IMPORT[part]:
                wrong.append(f"{where}: {part} may import only {sorted(MAY_IMPORT[part])}")
            elif part == "pdf" and target == "engines" and module not in PDF_MAY_IMPORT_FROM_ENGINES:
                wrong.append(f"{where}: pdf reaches into engines only for the text route")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_lazy_imports() -> None:
    """The rules above would pass vacuously if the parser missed imports inside functions."""
    assert "mkg_pipeline.engines.text_layer" in {module for _, module in _imports(PACKAGE / "pdf" / "render.py")}
    assert "mkg_pipeline.orchestration.definitions" in {module for _, module in _imports(PACKAGE / "__init__.py")}
