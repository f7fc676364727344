"""DAGSTER_HOME on a file system that goes read-only (issue 21 row 9): every entry point says "read-only" and
names the directory, never SQLite's "unable to open database file".

A read-only file system is what the campaign had; chmod does not stop root, so the real thing is a tmpfs
remounted read-only, which needs root (CAP_SYS_ADMIN): without it those tests are skipped and the permission
case (a non-root user) is tested instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from mkg_pipeline.orchestration.instance import DagsterHomeUnusable, check_dagster_home
from mkg_pipeline_tests.fixtures.corpus import REPO_ROOT

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def _mount(*args: str) -> bool:
    try:
        return subprocess.run(["mount", *args], capture_output=True).returncode == 0
    except FileNotFoundError:  # no mount(8)
        return False


@pytest.fixture
def tmpfs_home(tmp_path: Path) -> Iterator[Path]:
    """A DAGSTER_HOME on its own 16 MiB tmpfs, with the repository's dagster.yaml and an initialised instance."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    if (
        os.geteuid() != 0
        or shutil.which("mount") is None
        or not _mount("-t", "tmpfs", "-o", "size=16m", "tmpfs", str(home))
    ):
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
        with dg.DagsterInstance.from_config(str(home)):
            pass  # history/runs.db and friends exist, as in a home that has been used
        yield home
    finally:
        subprocess.run(["umount", "-l", str(home)], check=False)


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(REPO_ROOT)}


def test_a_read_only_home_says_read_only_everywhere(tmpfs_home: Path) -> None:
    assert _mount("-o", "remount,ro", str(tmpfs_home))
    commands = {
        "batch_cli": [sys.executable, "-m", "mkg_pipeline.orchestration.batch_cli"],
        "dagster asset materialize": [
            str(BIN / "dagster"),
            "asset",
            "materialize",
            "-m",
            "mkg_pipeline.orchestration.definitions",
            "--select",
            "raw_pdfs",
            "--partition",
            "b-none",
        ],
    }
    for name, argv in commands.items():
        done = subprocess.run(argv, env=_env(tmpfs_home), capture_output=True, text=True, timeout=180)
        output = done.stdout + done.stderr
        assert done.returncode != 0, name
        assert f"DAGSTER_HOME {tmpfs_home} is read-only" in output, f"{name}:\n{output[-3000:]}"
        assert "unable to open database file" not in output, name


def test_check_names_a_read_only_mount(tmpfs_home: Path) -> None:
    check_dagster_home(tmpfs_home)  # writable: fine
    assert _mount("-o", "remount,ro", str(tmpfs_home))
    with pytest.raises(DagsterHomeUnusable, match=f"DAGSTER_HOME {tmpfs_home} is read-only: its file system"):
        check_dagster_home(tmpfs_home)


@pytest.mark.skipif(os.geteuid() == 0, reason="permission bits do not stop root")
def test_check_names_a_home_this_user_cannot_write(tmp_path: Path) -> None:
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(DagsterHomeUnusable, match="is read-only for this user"):
            check_dagster_home(tmp_path)
    finally:
        tmp_path.chmod(0o755)
