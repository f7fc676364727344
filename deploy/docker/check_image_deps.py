"""Fail the worker image build if a GPU stack or the dev stack got installed.

Run inside the image after ``pip install`` (see ``Dockerfile.worker``)::

    python deploy/docker/check_image_deps.py

The workers are CPU-only HTTP clients of the vLLM server: a ``torch`` or
``nvidia-*`` wheel in their environment means a dependency (or an extra such
as ``mineru-vl-utils[transformers]``) dragged in gigabytes the pods never use.
Exit 1 and name the offenders (and who required them) if any is found.

The dev stack is no more welcome: the local VLM server, the local stack launcher and the demo
live in ``mkg_devstack`` (a sibling package the image neither copies nor installs), and the local
server's CPU OCR model is a wheel of the ``local-server`` extra (``rapidocr-onnxruntime``, which
ships its ONNX models inside). Exit 1 too if ``mkg_devstack`` is importable, if any installed
distribution lists files under ``mkg_devstack/``, or if an OCR wheel is installed.

Some CPU inference runtimes are not errors but are reported, because
docs/architecture.md keeps them out of the core: they usually come from a dependency's
new major version (``pymupdf`` 2.x requires ``onnxruntime``).

Standard library only: it runs in the bare image before anything else works.
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import re
import sys
from collections.abc import Iterable

#: distribution names (normalised, PEP 503) that must never be in the worker image
FORBIDDEN = re.compile(
    r"^(torch|torchvision|torchaudio|triton|pytorch-triton.*|nvidia-.+|cupy.*|jax|jaxlib|jax-cuda.+|"
    r"tensorflow.*|onnxruntime-gpu|vllm|xformers|flash-attn|bitsandbytes)$"
)
#: the local server's OCR model wheels (the ``local-server`` extra): dev stack, never in the image
OCR_WHEELS = re.compile(r"^(rapidocr|rapidocr-.+)$")
#: the dev stack's package (local VLM server, local stack, demo)
DEV_PACKAGE = "mkg_devstack"
#: present is allowed but reported on the build log
REPORTED = re.compile(r"^(onnxruntime|onnxruntime-.+|transformers|accelerate|mineru)$")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def classify(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split distribution names into (forbidden, reported), normalised and sorted."""
    normalised = sorted({normalise(n) for n in names})
    forbidden = [n for n in normalised if FORBIDDEN.match(n) or OCR_WHEELS.match(n)]
    reported = [n for n in normalised if n not in forbidden and REPORTED.match(n)]
    return forbidden, reported


def _required_by(target: str) -> list[str]:
    """Installed distributions whose requirements name ``target`` (for the error message)."""
    parents = []
    for dist in metadata.distributions():
        for req in dist.requires or ():
            if normalise(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0]) == target:
                parents.append(normalise(dist.metadata["Name"]))
    return sorted(set(parents))


def dev_stack_found() -> list[str]:
    """Where the dev stack package shows up: importable from ``sys.path``, or files of an installed distribution."""
    found = []
    spec = importlib.util.find_spec(DEV_PACKAGE)  # finds, never imports (a top-level name has no parent to run)
    if spec is not None:
        where = spec.origin or ", ".join(spec.submodule_search_locations or ()) or "a meta path finder"
        found.append(f"{DEV_PACKAGE} is importable ({where})")
    for dist in metadata.distributions():
        files = [f for f in dist.files or () if f.parts and f.parts[0] == DEV_PACKAGE]
        if files:
            name = normalise(dist.metadata["Name"] or "?")
            found.append(f"{name} installed {len(files)} file(s) under {DEV_PACKAGE}/")
    return found


def main() -> int:
    names = [dist.metadata["Name"] for dist in metadata.distributions() if dist.metadata["Name"]]
    forbidden, reported = classify(names)
    dev_stack = dev_stack_found()
    for name in reported:
        sys.stderr.write(f"note: {name} is installed (required by {', '.join(_required_by(name)) or '?'})\n")
    for where in dev_stack:
        sys.stderr.write(f"error: the dev stack must not be in the image: {where}\n")
    if forbidden or dev_stack:
        for name in forbidden:
            sys.stderr.write(
                f"error: {name} must not be in the CPU worker image (required by "
                f"{', '.join(_required_by(name)) or '?'})\n"
            )
        return 1
    sys.stdout.write(f"ok: {len(set(names))} distributions, no GPU stack, no dev stack\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
