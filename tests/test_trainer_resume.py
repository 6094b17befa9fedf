"""Pre-emption: SIGKILL a training run mid-epoch, resume with ``latest``, get bitwise the same U-Net."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import build_sdxl_and_cache, train_config
from medisyn import storage
from medisyn.train import latest_checkpoint, list_checkpoints

pytestmark = pytest.mark.slow


def _worker(config: Path, cache_uri: str, checkpoints: Path, result: Path) -> list[str]:
    return [sys.executable, "-m", "medisyn.train", "--config", str(config), "--cache", cache_uri,
            "--checkpoints", str(checkpoints), "--result-json", str(result)]


def _env() -> dict:
    # Same thread count for every run: CPU kernels are bitwise reproducible at a fixed thread count.
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _unet(checkpoint: str) -> dict:
    return load_file(str(storage.local_path(checkpoint) / "unet" / "diffusion_pytorch_model.safetensors"))


def test_sigkill_mid_epoch_then_resume_latest_equals_uninterrupted_run(tmp_path):
    cache_uri = build_sdxl_and_cache(tmp_path)
    # 3 epochs x 5 steps, a step checkpoint every 2 steps (resume: latest is the default).
    cfg = train_config(tmp_path, ["train.epochs=3", "train.checkpoint_every_steps=2",
                                  "train.checkpoints_total_limit=2"])
    config = tmp_path / "run.yaml"
    config.write_text(cfg.to_yaml())

    reference = tmp_path / "ckpt-reference"
    subprocess.run(_worker(config, cache_uri, reference, tmp_path / "ref.json"), check=True, env=_env(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)

    interrupted = tmp_path / "ckpt-interrupted"
    proc = subprocess.Popen(_worker(config, cache_uri, interrupted, tmp_path / "killed.json"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not list_checkpoints(str(interrupted), kind="step"):  # first mid-epoch checkpoint (global step 2)
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = latest_checkpoint(str(interrupted))
    assert killed_at is not None and not storage.is_complete(str(interrupted / "epoch-0003"))
    assert not (tmp_path / "killed.json").exists()

    # What a kill during publishing leaves on object storage: a newer checkpoint without _COMPLETE.
    partial = interrupted / "step-00000013"
    (partial / "unet").mkdir(parents=True)
    (partial / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"half an upload")
    (partial / "checkpoint.json").write_text(json.dumps({"epoch": 3, "global_step": 13, "kind": "step"}))
    assert str(partial) not in {storage.local_path(u).as_posix() for u in list_checkpoints(str(interrupted), kind=None)}
    assert latest_checkpoint(str(interrupted)) == killed_at

    subprocess.run(_worker(config, cache_uri, interrupted, tmp_path / "resumed.json"), check=True, env=_env(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    ref = json.loads((tmp_path / "ref.json").read_text())
    assert resumed["resumed_from"] == killed_at
    assert resumed["global_step"] == ref["global_step"] == 15
    assert not partial.exists()  # the partial checkpoint was cleaned up, never loaded

    names = [u.rsplit("/", 1)[-1] for u in list_checkpoints(str(interrupted))]
    assert names == [u.rsplit("/", 1)[-1] for u in list_checkpoints(str(reference))] == \
        ["epoch-0001", "epoch-0002", "epoch-0003"]
    for name in names:  # every epoch checkpoint, not only the last, is bitwise the uninterrupted one
        a, b = _unet(str(reference / name)), _unet(str(interrupted / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs"
    assert resumed["unet_sha256_per_rank"] == ref["unet_sha256_per_rank"]
    assert resumed["final_loss"] == ref["final_loss"]
