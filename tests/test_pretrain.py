"""The demo's tiny base models learn from phantoms (``medisyn.demo.pretrain``): the corpus, the VAE and
FID-extractor training, and the content-hash cache that makes the demo and the tests pay once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import demo_config
from medisyn.config import TinyModelsConfig, TinyPretrainConfig
from medisyn.demo import pretrain
from medisyn.demo.tiny_models import build_tiny_models

SMALL = ["models.tiny.vae_block_out_channels=[8,16,16]", "models.tiny.unet_block_out_channels=[16,32]",
         "models.tiny.pretrain.images_per_class=2", "models.tiny.pretrain.vae_steps=3",
         "models.tiny.pretrain.feature_steps=3", "models.tiny.pretrain.batch_size=4"]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MEDISYN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tiny-models"


def test_phantom_corpus_is_balanced_deterministic_and_preprocessed():
    images, labels = pretrain.phantom_corpus(3, seed=5, resolution=32)
    assert images.shape == (24, 32, 32, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [3] * len(pretrain.PHANTOM_CLASSES)
    again, _ = pretrain.phantom_corpus(3, seed=5, resolution=32)
    assert np.array_equal(images, again)
    other, _ = pretrain.phantom_corpus(3, seed=6, resolution=32)
    assert not np.array_equal(images, other)
    # greyscale modalities stay grey (CT is windowed 100/700 HU: air is black, contrast is bright)
    ct = images[labels == 0]
    assert np.array_equal(ct[..., 0], ct[..., 2]) and ct.min() == 0 and ct.max() > 200


def test_vae_training_lowers_reconstruction_error_and_sets_the_scaling_factor():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    images, _ = pretrain.phantom_corpus(2, seed=1, resolution=16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=8, sample_size=16)
    untrained = pretrain.train_vae(vae, images, TinyPretrainConfig(vae_steps=1, vae_learning_rate=1e-9, batch_size=8))
    trained = pretrain.train_vae(vae, images, TinyPretrainConfig(vae_steps=40, vae_learning_rate=5e-3, batch_size=8,
                                                                 vae_crop=16))
    assert trained < 0.8 * untrained, (untrained, trained)  # measured: 69.6 -> 47.8 grey levels in 40 steps
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        std = float(vae.encode(x[:16]).latent_dist.mode().std())
    assert vae.config.scaling_factor == pytest.approx(1 / std, rel=0.05)


def test_feature_extractor_learns_the_phantom_classes():
    from medisyn.models.inception import TinyFeatureExtractor

    torch.manual_seed(0)
    images, labels = pretrain.phantom_corpus(4, seed=2, resolution=16)
    net = TinyFeatureExtractor(feature_dim=16, width=4)
    acc = pretrain.train_feature_extractor(net, images, labels, TinyPretrainConfig(feature_steps=60, batch_size=32,
                                                                                   feature_learning_rate=1e-2))
    assert acc > 0.5  # 8 classes: chance is 0.125


def test_cached_build_runs_once_and_never_publishes_a_partial_build(cache):
    tiny = TinyModelsConfig(pretrain=TinyPretrainConfig(vae_steps=7))
    calls = []

    def build(d: Path) -> dict[str, float]:
        calls.append(d)
        (d / "weights.bin").write_bytes(b"x")
        return {"loss": 0.5}

    where, metrics = pretrain.cached_build(tiny, build)
    assert where == cache / pretrain.cache_key(tiny) and (where / "weights.bin").exists()
    recorded = json.loads((where / "pretrain.json").read_text())
    assert metrics["loss"] == 0.5 and recorded["recipe"] == pretrain.RECIPE_VERSION
    assert pretrain.cached_build(tiny, build)[0] == where and len(calls) == 1  # cached

    other = TinyModelsConfig(pretrain=TinyPretrainConfig(vae_steps=8))
    assert pretrain.cache_key(other) != pretrain.cache_key(tiny)

    def killed(d: Path) -> dict[str, float]:
        (d / "weights.bin").write_bytes(b"half")
        raise KeyboardInterrupt  # as a kill mid-build

    with pytest.raises(KeyboardInterrupt):
        pretrain.cached_build(other, killed)
    assert sorted(p.name for p in cache.iterdir()) == [where.name]  # nothing half-written left or published


def test_build_tiny_models_copies_the_pretrained_set_and_rebuilds_when_the_config_changes(cache, tmp_path):
    from diffusers import AutoencoderKL

    cfg = demo_config(tmp_path / "a", SMALL)
    paths = build_tiny_models(cfg)
    vae = AutoencoderKL.from_pretrained(paths["vae"])
    base_vae = AutoencoderKL.from_pretrained(Path(paths["sdxl_base"]) / "vae")
    assert vae.config.scaling_factor == base_vae.config.scaling_factor != 0.13025  # trained, in both places
    stamp = json.loads((Path(paths["sdxl_base"]) / "medisyn_tiny.json").read_text())
    assert stamp["cache_key"] == pretrain.cache_key(cfg.models.tiny)
    assert len(list(cache.iterdir())) == 1
    # the same config elsewhere: copied from the cache, identical bytes
    paths_b = build_tiny_models(demo_config(tmp_path / "b", SMALL))
    assert Path(paths_b["fid_inception_weights"]).read_bytes() == Path(paths["fid_inception_weights"]).read_bytes()
    assert len(list(cache.iterdir())) == 1
    # another pretraining recipe at the same paths: rebuilt, not silently kept
    changed = demo_config(tmp_path / "a", [*SMALL, "models.tiny.pretrain.seed=7"])
    build_tiny_models(changed)
    assert json.loads((Path(paths["sdxl_base"]) / "medisyn_tiny.json").read_text())["cache_key"] == \
        pretrain.cache_key(changed.models.tiny)
    assert len(list(cache.iterdir())) == 2
