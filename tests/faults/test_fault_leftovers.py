"""What a killed run leaves behind (staging beside an output, scratch in the temp dir) is cleaned by
the next run; a local publish killed between its two renames is rolled forward (issue #12)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

import pytest

from medisyn import storage

pytestmark = pytest.mark.timeout(120)

KILLED_WRITER = r"""
import sys, time
from medisyn import storage
out = sys.argv[1]
scratch = storage.scratch_dir("preprocess")
(scratch / "bucket-00000.parquet").write_bytes(b"decoded image bytes" * 1000)
with storage.staged_dir(out, {"v": 2}) as d:
    (d / "part-00000.parquet").write_bytes(b"half of the new version")
    print("writing", flush=True)
    time.sleep(3600)
"""


def test_sigkill_leftovers_are_cleaned_by_the_next_run(tmp_path, monkeypatch):
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    out = str(tmp_path / "runs" / "dataset")
    with storage.staged_dir(out, {"v": 1}) as d:
        (d / "part-00000.parquet").write_bytes(b"the previous complete version")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, out], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, TMPDIR=str(scratch_root)))
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    hidden = [p.name for p in (tmp_path / "runs").iterdir() if p.name.startswith(".dataset.staging-")]
    scratch = [p.name for p in scratch_root.iterdir() if p.name.startswith("medisyn-preprocess-")]
    assert len(hidden) == 1 and len(scratch) == 1  # what the issue found: image bytes left in both places
    # the previous version stayed complete and readable throughout
    assert storage.is_complete(out)
    assert (tmp_path / "runs" / "dataset" / "part-00000.parquet").read_bytes() == b"the previous complete version"

    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    assert storage.clean_stale_scratch() == [scratch_root / scratch[0]]
    with storage.staged_dir(out, {"v": 3}) as d:  # the next run of the stage
        (d / "part-00000.parquet").write_bytes(b"v3")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["dataset"]
    assert list(scratch_root.iterdir()) == []


def test_scratch_of_a_live_process_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mine = storage.scratch_dir("stage")
    other_host = tmp_path / "medisyn-stage-otherhost-1-00000000-abcd"
    other_host.mkdir()
    assert storage.clean_stale_scratch() == [] and mine.exists() and other_host.exists()


def test_a_local_publish_killed_between_its_renames_is_rolled_forward(tmp_path, dead_pid):
    """dest moved aside, staging not yet moved in: the next run finds the complete new version."""
    token = f"{storage._HOST}-{dead_pid}-00000000-dead"
    (tmp_path / f".out.old-{token}").mkdir()
    (tmp_path / f".out.old-{token}" / storage.COMPLETE_MARKER).write_text('{"v": 1}')
    staging = tmp_path / f".out.staging-{token}"
    staging.mkdir()
    (staging / "new.bin").write_bytes(b"v2")
    (staging / storage.COMPLETE_MARKER).write_text('{"v": 2}')
    done = storage.recover(str(tmp_path / "out"))
    assert any("rolled forward" in line for line in done)
    assert storage.read_json(str(tmp_path / "out" / storage.COMPLETE_MARKER)) == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
