"""bf16 wherever the hardware has it, CPUs included (#14): training learns in bf16, bf16 and float32
checkpoints load into pipelines of either precision, and a precision the hardware lacks is a clear
ConfigError rather than a silent float32 run."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import build_sdxl_and_cache, train_config
from medisyn import storage
from medisyn.config import ConfigError
from medisyn.generate import load_model, sample
from medisyn.models import sdxl
from medisyn.train.trainer import resolve_mixed_precision, train

CPU_BF16 = sdxl.cpu_bf16_support()
needs_cpu_bf16 = pytest.mark.skipif(
    CPU_BF16 is None, reason="this CPU has no native bf16 (neither avx512_bf16 nor amx_bf16 in /proc/cpuinfo)"
)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bf16")


@pytest.fixture(scope="module")
def cache_uri(root) -> str:
    return build_sdxl_and_cache(root)


# -- capability, not device type ---------------------------------------------------------------
@pytest.mark.parametrize(
    "requested, support, expected",
    [("no", None, "no"), ("bf16", "amx_bf16", "bf16"), ("bf16", "avx512_bf16", "bf16"),
     ("bf16", None, ConfigError), ("fp16", "amx_bf16", ConfigError)],
    ids=["float32", "amx", "avx512-bf16", "bf16-without-support", "fp16-on-cpu"],
)
def test_cpu_mixed_precision_is_decided_by_capability(monkeypatch, requested, support, expected):
    monkeypatch.setattr(sdxl, "cpu_bf16_support", lambda: support)
    if expected is ConfigError:
        with pytest.raises(ConfigError, match=f"train.mixed_precision={requested}"):
            resolve_mixed_precision(requested, torch.device("cpu"))
    else:
        assert resolve_mixed_precision(requested, torch.device("cpu")) == expected


@pytest.mark.parametrize(
    "dtype, support, expected",
    [("float32", None, torch.float32), ("bfloat16", "amx_bf16", torch.bfloat16), ("bfloat16", None, ConfigError),
     ("float16", "amx_bf16", ConfigError)],
    ids=["float32", "bf16", "bf16-without-support", "fp16-on-cpu"],
)
def test_cpu_inference_dtype_is_decided_by_capability(monkeypatch, root, dtype, support, expected):
    monkeypatch.setattr(sdxl, "cpu_bf16_support", lambda: support)
    cfg = train_config(root, [f"runtime.dtype={dtype}"])
    if expected is ConfigError:
        with pytest.raises(ConfigError, match=f"runtime.dtype={dtype}"):
            sdxl.resolve_dtype(cfg.runtime, torch.device("cpu"))
    else:
        assert sdxl.resolve_dtype(cfg.runtime, torch.device("cpu")) == expected


def test_bf16_training_refused_on_a_cpu_without_bf16(monkeypatch, root, cache_uri, tmp_path):
    monkeypatch.setattr(sdxl, "cpu_bf16_support", lambda: None)
    cfg = train_config(root, ["train.epochs=1", "train.mixed_precision=bf16", "train.resume=null"])
    with pytest.raises(ConfigError, match="no native bf16"):
        train(cfg, cache_uri, str(tmp_path / "ckpt"))
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


# -- bf16 on this CPU ----------------------------------------------------------------------------
@needs_cpu_bf16
def test_bf16_training_on_cpu_runs_and_learns(root, cache_uri, tmp_path, caplog):
    """8 samples, batch 8: every step (one per epoch) sees the same fixed batch, with fresh noise and
    timesteps; the loss the trainer logs falls in bf16 autocast."""
    cfg = train_config(root, ["train.epochs=1", "train.mixed_precision=bf16", "train.resume=null",
                              "train.learning_rate=1e-3", "train.log_every_steps=6"])
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 30})})
    cache8 = _cache_of(root, cache_uri, 8, tmp_path)
    with caplog.at_level(logging.INFO, logger="medisyn.train"):
        result = train(cfg, cache8, str(tmp_path / "ckpt"))
    assert result.mixed_precision == "bf16" and result.global_step == 30
    losses = [float(m.group(1)) for r in caplog.records
              if (m := re.search(r"step \d+/\d+ epoch \d+ loss ([0-9.]+)", r.getMessage()))]
    assert len(losses) == 30 and all(np.isfinite(losses))  # one step per epoch: logged every step
    assert np.mean(losses[-6:]) < 0.7 * np.mean(losses[:6]), losses
    # Master weights stay float32: the checkpoint is a float32 U-Net whatever the autocast precision.
    unet = sdxl.load_unet(cfg.models, storage.local_path(result.checkpoints[-1]) / "unet")
    assert {p.dtype for p in unet.parameters()} == {torch.float32}


def _cache_of(root: Path, cache_uri: str, n: int, tmp_path: Path) -> str:
    """A latent cache of the first ``n`` tiny-dataset images (same models as ``cache_uri``)."""
    from helpers import write_tiny_dataset
    from medisyn.train.encode import encode

    cfg = train_config(root, ["train.cache_dtype=float32"])
    dataset = write_tiny_dataset(tmp_path / f"dataset-{n}", n=n)
    return encode(cfg, dataset, str(tmp_path / f"cache-{n}")).cache_uri


@needs_cpu_bf16
def test_bf16_and_float32_checkpoints_load_interchangeably(root, cache_uri, tmp_path):
    """Train in bf16 and in float32; each checkpoint samples in a float32 and in a bf16 pipeline, and a
    float32 run resumes in bf16 (the optimizer state is float32 either way)."""
    ckpts = {}
    for precision in ("bf16", "no"):
        cfg = train_config(root, ["train.epochs=1", f"train.mixed_precision={precision}", "train.resume=null"])
        ckpts[precision] = train(cfg, cache_uri, str(tmp_path / f"ckpt-{precision}")).checkpoints[-1]
    prompts, seeds = ["Dermoscopy image showing melanoma.", "x"], [3, 4]
    images = {}
    for precision, ckpt in ckpts.items():
        for dtype in ("float32", "bfloat16"):
            cfg = train_config(root, [f"runtime.dtype={dtype}"])
            pipe = load_model(cfg, ckpt)
            assert pipe.unet.dtype == (torch.bfloat16 if dtype == "bfloat16" else torch.float32)
            out = sample(pipe, prompts, seeds, cfg.sampling.model_copy(update={"num_inference_steps": 3}), 64)
            assert len(out) == 2 and all(im.size == (64, 64) and im.mode == "RGB" for im in out)
            images[precision, dtype] = np.stack([np.asarray(im, dtype=np.int16) for im in out])
    for precision in ckpts:  # bf16 sampling is close to float32 sampling of the same weights
        assert np.abs(images[precision, "bfloat16"] - images[precision, "float32"]).mean() < 12
    # A float32 checkpoint resumes in bf16 autocast and trains on.
    cfg = train_config(root, ["train.epochs=2", "train.mixed_precision=bf16"])
    resumed = train(cfg, cache_uri, str(tmp_path / "ckpt-no"))
    assert resumed.resumed_from == ckpts["no"] and resumed.epochs == 2 and np.isfinite(resumed.final_loss)


def test_compiled_sampling_pads_the_short_last_batch_and_keeps_per_image_seeds(monkeypatch):
    """With ``sampling.torch_compile`` every pipeline call gets the full batch (no recompilation for
    the remainder); the padding images are dropped and each image keeps its own seed."""
    from types import SimpleNamespace

    from PIL import Image

    from medisyn import generate
    from medisyn.config import SamplingConfig

    calls = []

    def pipe(prompt, generator, **kwargs):
        calls.append(len(prompt))
        vals = [int(g.initial_seed()) % 256 for g in generator]
        return SimpleNamespace(images=[Image.new("RGB", (4, 4), (v, v, v)) for v in vals])

    compiled = []
    monkeypatch.setattr(generate, "compile_for_sampling", lambda p: compiled.append(p))
    seeds = [10, 11, 12, 13, 14]
    images = generate.sample(pipe, [f"p{i}" for i in seeds], seeds, SamplingConfig(batch_size=2, torch_compile=True), 4)
    assert calls == [2, 2, 2] and compiled == [pipe]
    assert [im.getpixel((0, 0))[0] for im in images] == seeds
    calls.clear()
    generate.sample(pipe, ["a", "b", "c"], [1, 2, 3], SamplingConfig(batch_size=2), 4)
    assert calls == [2, 1]  # uncompiled: no padding
