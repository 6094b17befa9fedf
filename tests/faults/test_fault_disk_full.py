"""Disk full (a small tmpfs the test mounts) during preprocess and during checkpointing: one clear
error, nothing published, nothing left on the full volume (issue #12)."""

from __future__ import annotations

import errno
import tempfile

import pytest

from faults.disk import mounted_tmpfs
from helpers import build_sdxl_and_cache, demo_config, train_config
from medisyn import stages, storage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _leftovers(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_scratch_disk_full_during_preprocess(tmp_path, monkeypatch):
    from medisyn.demo.phantoms import write_landing_zone

    monkeypatch.setenv("MEDISYN_ID_SALT", "fault-suite-salt")
    zone = str(tmp_path / "raw")
    write_landing_zone(zone, n_per_class=4, seed=0)
    cfg = demo_config(tmp_path, ["data.ray_num_cpus=1"])
    out = tmp_path / "dataset"
    with mounted_tmpfs(tmp_path / "disk", "64k") as small_disk:
        monkeypatch.setattr(tempfile, "tempdir", str(small_disk))  # the preprocess scratch lives on the small disk
        with pytest.raises(OSError, match="no space left on device") as info:
            stages.run("preprocess", cfg, raw=zone, out=str(out))
        monkeypatch.undo()
        assert _leftovers(small_disk) == []  # the partial scratch was removed
    assert info.value.errno == errno.ENOSPC and "Nothing was published" in str(info.value)
    assert not out.exists() and not storage.is_complete(str(out))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dataset.")] == []


def test_output_disk_full_during_checkpointing(tmp_path, small_disk):
    cache = build_sdxl_and_cache(tmp_path)
    cfg = train_config(tmp_path, ["train.epochs=1"])
    checkpoints = small_disk / "checkpoints"  # a tiny U-Net checkpoint is several MiB: the disk is 600 KiB
    with pytest.raises(OSError, match="no space left on device") as info:
        stages.run("train", cfg, cache=cache, checkpoints=str(checkpoints))
    assert info.value.errno == errno.ENOSPC
    assert storage.listdir(str(checkpoints)) == []  # no checkpoint, complete or not, is visible
    assert [p for p in _leftovers(small_disk) if p not in ("checkpoints",)] == []  # no staging left either
