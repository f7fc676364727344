"""Fixtures of the deploy tests: each overlay rendered once per session."""

from __future__ import annotations

from typing import Any

import pytest

from mkg_pipeline_tests.deploy.helpers import K8S, OVERLAYS, render


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """{"base"|"dev"|"prod": [objects]} from `kubectl kustomize`."""
    out = {"base": render(K8S / "base")}
    for overlay in OVERLAYS:
        out[overlay] = render(K8S / "overlays" / overlay)
    return out


@pytest.fixture(scope="session", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest, rendered: dict[str, list[dict[str, Any]]]) -> tuple[str, list[dict]]:
    """(overlay name, its objects), parametrized over dev and prod."""
    return request.param, rendered[request.param]
