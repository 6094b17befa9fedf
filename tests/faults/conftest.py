"""Fixtures of the fault-injection suite (issue #12): a small tmpfs the test mounts (a disk that
fills up), always unmounted, and a pid that is certainly gone (the owner of a killed run's leftovers)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from faults.disk import mounted_tmpfs


@pytest.fixture()
def small_disk(tmp_path) -> Iterator[Path]:
    """A 600 KiB tmpfs at ``tmp_path/disk``: a scratch or output volume that fills up."""
    with mounted_tmpfs(tmp_path / "disk", "600k") as p:
        yield p


@pytest.fixture()
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
