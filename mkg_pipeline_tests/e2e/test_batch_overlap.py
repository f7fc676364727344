"""The shipped local dagster.yaml keeps the next batch rendered while the vllm pool is full (issue 18, section 3).

When every run the queue admits is in its vlm step, the next batch can only start (ingest, render) once one of
them ends, so the server empties while it renders: the idle GPU at batch boundaries that
``benchmarks/batch_boundaries.py`` measures. With more run slots than ``vllm`` pool slots, a run is admitted
while the pool is full, does its CPU steps, and its vlm step waits for a slot: when a vlm step ends, the next
batch's takes its slot with its pages already rendered.

A real daemon on a temp DAGSTER_HOME with the repository's dagster.yaml, its run and pool limits unchanged (only
the dequeue and monitoring intervals shortened); the code location is ``daemon_location.py``'s ``batch_job``:
``rendered`` (no pool) then ``vlm_holder`` (pool ``vllm``, held until the test releases it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import yaml

from mkg_pipeline_tests.e2e.test_daemon_guards import DaemonStack, _daemon_stack
from mkg_pipeline_tests.fixtures.corpus import REPO_ROOT

pytestmark = pytest.mark.e2e


def _shipped_limits_yaml() -> tuple[str, int, int]:
    """The repository's dagster.yaml with its intervals shortened; (yaml, max_concurrent_runs, vllm pool limit)."""
    config = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())
    config.setdefault("run_coordinator", {}).setdefault("config", {})["dequeue_interval_seconds"] = 1
    monitoring = config.get("run_monitoring") or {}
    for key in ("poll_interval_seconds", "free_slots_after_run_end_seconds"):
        if key in monitoring:
            monitoring[key] = 1
    concurrency = config["concurrency"]
    return yaml.safe_dump(config), concurrency["runs"]["max_concurrent_runs"], concurrency["pools"]["default_limit"]


@pytest.fixture(scope="module")
def shipped_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonStack, int, int]]:
    root = tmp_path_factory.mktemp("overlap")
    home = root / "home"
    home.mkdir()
    instance_yaml, max_runs, pool_limit = _shipped_limits_yaml()
    with _daemon_stack(root, home, instance_yaml) as stack:
        yield stack, max_runs, pool_limit


def _rendered(stack: DaemonStack, partition: str, run_id: str) -> bool:
    return (stack.guard / f"rendered-{partition}-{run_id}").exists()


def test_the_next_batch_renders_while_the_vllm_pool_is_full(
    shipped_stack: tuple[DaemonStack, int, int], tmp_path: Path
) -> None:
    stack, max_runs, pool_limit = shipped_stack
    assert pool_limit < max_runs, (
        f"dagster.yaml: the vllm pool ({pool_limit}) must be smaller than max_concurrent_runs ({max_runs}), or "
        "runs in their vlm step take every run slot and the next batch renders only once one of them ends"
    )
    holders = [f"p{i}" for i in range(1, pool_limit + 1)]
    runs = {p: stack.launch(p, job="batch_job") for p in holders}
    stack.wait_for(
        lambda: all(stack.started_pid(p, runs[p]) is not None for p in holders),
        f"{pool_limit} runs hold every vllm pool slot in their vlm step",
        runs,
    )

    nxt = f"p{pool_limit + 1}"
    runs[nxt] = stack.launch(nxt, job="batch_job")
    stack.wait_for(lambda: _rendered(stack, nxt, runs[nxt]), "the next batch rendered while the pool is full", runs)
    assert stack.started_pid(nxt, runs[nxt]) is None, "a vlm step started beyond the vllm pool's limit"

    stack.release(holders[0])  # one batch's vlm step ends: the rendered batch's vlm step takes its slot
    stack.wait_for(
        lambda: stack.started_pid(nxt, runs[nxt]) is not None, "the rendered batch's vlm step took the slot", runs
    )
    for partition in [*holders[1:], nxt]:
        stack.release(partition)
    stack.wait_for(
        lambda: all(stack.status(r) == dg.DagsterRunStatus.SUCCESS for r in runs.values()), "every run ended", runs
    )
