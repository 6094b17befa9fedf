"""Pretraining the demo's tiny base models on phantoms, so the demo shows a model that learns.

A real run starts from pretrained weights: SDXL's VAE reconstructs images, the FID Inception network
and BiomedCLIP have learned features. The tiny stand-ins are random unless they are trained, and a
random VAE decodes every latent to coloured noise, whatever the U-Net learns; random FID features give
numbers like 0.0016 that mean nothing. So, when ``models.tiny.pretrain`` is set (the demo config sets
it), ``medisyn build-tiny-models`` trains:

- the tiny VAE, as an autoencoder (L1 reconstruction + a small KL term, as Stable Diffusion's
  VAE is trained, without the adversarial loss), on phantoms drawn with a seed of their own
  (``pretrain.seed``: the demo's landing zone uses another one, so the base models never see the
  demo's training, validation or test images);
- the tiny FID feature extractor, as the trunk of a phantom-class classifier (8 classes), so its
  features separate what a reader would: FID then falls as the U-Net learns.

Both are deterministic in their seeds and cached by a content hash of everything that shapes them
(the tiny model config, the recipe version below), under ``$MEDISYN_CACHE_DIR/tiny-models/<hash>``
(default ``~/.cache/medisyn``): the demo and the test session each pay once per machine.

The phantoms go through the same conversions preprocessing applies (CT: the 100/700 HU window;
X-ray: attenuation shown bright; resize + center crop to the training resolution).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medisyn.config import TinyModelsConfig, TinyPretrainConfig

log = logging.getLogger("medisyn.demo.pretrain")

#: Bump when the pretraining recipe changes what it produces (invalidates cached models).
RECIPE_VERSION = 2

#: The phantom classes, in a fixed order: (source, raw label).
PHANTOM_CLASSES: tuple[tuple[str, str], ...] = (
    ("chest_ct", "pe"), ("chest_ct", "no_pe"),
    ("chest_xray", "cardiomegaly"), ("chest_xray", "pleural_effusion"),
    ("oct", "NORMAL"), ("oct", "DRUSEN"),
    ("dermoscopy", "MEL"), ("dermoscopy", "NV"),
)


def phantom_corpus(n_per_class: int, seed: int, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 N x H x W x 3, class index N)``: ``n_per_class`` phantoms of each class in
    :data:`PHANTOM_CLASSES`, converted as preprocessing converts them, deterministic in ``seed``."""
    from medisyn.data.images import hu_window, resize_center_crop
    from medisyn.demo import phantoms

    rng = np.random.default_rng(seed)
    images: list[np.ndarray] = []
    labels: list[int] = []

    def rgb(grey: np.ndarray) -> np.ndarray:
        return np.repeat(grey[..., None], 3, axis=-1)

    for _ in range(n_per_class):
        for k, (source, label) in enumerate(PHANTOM_CLASSES):
            if source == "chest_ct":
                arr = rgb(hu_window(phantoms.ct_slice_hu(rng, label == "pe").astype(np.float32)))
            elif source == "chest_xray":
                arr = rgb(np.rint(255 * phantoms.xray_attenuation(rng, label)).astype(np.uint8))
            elif source == "oct":
                arr = rgb(phantoms.oct_bscan(rng, label == "DRUSEN"))
            else:
                arr = phantoms.dermoscopy_rgb(rng, label == "MEL")
            images.append(resize_center_crop(arr, resolution))
            labels.append(k)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def cache_key(tiny: TinyModelsConfig) -> str:
    """Content hash of everything that shapes the pretrained tiny models: their config, the recipe
    version, the torch version and the source of the code that draws the phantoms, builds the models
    and trains them."""
    from medisyn.demo import phantoms
    from medisyn.models import sdxl

    sources = hashlib.sha256()
    for path in (phantoms.__file__, sdxl.__file__, __file__):
        sources.update(Path(path or "").read_bytes())
    payload = {"recipe": RECIPE_VERSION, "tiny": tiny.model_dump(mode="json"), "torch": torch.__version__,
               "sources": sources.hexdigest()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("MEDISYN_CACHE_DIR") or Path.home() / ".cache" / "medisyn") / "tiny-models"


def _batches(n: int, batch_size: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(0, n, (batch_size,), generator=g), g


def _progress(name: str, step: int, steps: int, start: float, loss: float) -> None:
    done = step + 1
    rate = done / max(time.monotonic() - start, 1e-9)
    log.info("pretrain %s: step %d/%d  loss %.4f  %.1f steps/s  ETA %.0f s", name, done, steps, loss, rate,
             (steps - done) / rate)


def train_vae(vae: Any, images: np.ndarray, p: TinyPretrainConfig) -> float:
    """Train ``vae`` (diffusers ``AutoencoderKL``) to reconstruct ``images`` and set its
    ``scaling_factor`` to 1 / std of the latents; returns the final mean absolute reconstruction
    error of the posterior mode on a fixed subset, in 0-255 grey levels."""
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    opt = torch.optim.AdamW(vae.parameters(), lr=p.vae_learning_rate, weight_decay=0.0)
    vae.train()
    start = time.monotonic()
    loss = torch.zeros(())
    side = x_all.shape[-1]
    crop = min(p.vae_crop, side)
    for step, (idx, g) in enumerate(_batches(len(x_all), p.batch_size, p.vae_steps, p.seed)):
        # Random crops: the VAE is convolutional, and a 32 px crop costs a quarter of a 64 px image.
        offsets = torch.randint(0, side - crop + 1, (len(idx), 2), generator=g).tolist()
        x = torch.stack([x_all[i, :, oy:oy + crop, ox:ox + crop]
                         for i, (oy, ox) in zip(idx.tolist(), offsets, strict=True)])
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(generator=g)).sample
        loss = (rec - x).abs().mean() + p.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == p.vae_steps:
            _progress("vae", step, p.vae_steps, start, float(loss.detach()))
    vae.eval()
    with torch.no_grad():
        probe = x_all[: min(64, len(x_all))]
        latents = vae.encode(probe).latent_dist.mode()
        rec = vae.decode(latents).sample.clamp(-1, 1)
        # As for Stable Diffusion's VAE: scale latents to unit variance, so the noise schedule the
        # U-Net trains with sees the signal-to-noise ratios it was designed for.
        vae.register_to_config(scaling_factor=round(1.0 / float(latents.std()), 5))
        return float((rec - probe).abs().mean()) * 127.5


def train_feature_extractor(net: Any, images: np.ndarray, labels: np.ndarray,
                            p: TinyPretrainConfig) -> float:
    """Train ``net`` (uint8 N x 3 x H x W -> features) as the trunk of a linear phantom-class classifier;
    returns the final training-batch accuracy. Only the trunk is kept."""
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    y_all = torch.from_numpy(labels)
    n_classes = int(labels.max()) + 1
    head = torch.nn.Linear(net.feature_dim, n_classes)
    opt = torch.optim.AdamW([*net.parameters(), *head.parameters()], lr=p.feature_learning_rate)
    net.train()
    start = time.monotonic()
    acc = 0.0
    for step, (idx, _) in enumerate(_batches(len(x_all), p.batch_size, p.feature_steps, p.seed + 1)):
        logits = head(net(x_all[idx]))
        loss = F.cross_entropy(logits, y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc = float((logits.argmax(1) == y_all[idx]).float().mean())
        if (step + 1) % 50 == 0 or step + 1 == p.feature_steps:
            _progress("fid-features", step, p.feature_steps, start, float(loss.detach()))
    net.eval()
    return acc


def cached_build(tiny: TinyModelsConfig, build: Callable[[Path], dict[str, float]]) -> tuple[Path, dict[str, float]]:
    """Run ``build(dir)`` once per :func:`cache_key` and keep what it wrote in the cache.

    ``build`` writes the models into an empty staging directory; it is moved into place only when
    complete (with ``pretrain.json``), so a killed build is never read as a cached model.
    """
    root = cache_root()
    final = root / cache_key(tiny)
    if (final / "pretrain.json").exists():
        return final, json.loads((final / "pretrain.json").read_text())["metrics"]
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        t0 = time.monotonic()
        metrics = build(staging)
        metrics["seconds"] = round(time.monotonic() - t0, 1)
        (staging / "pretrain.json").write_text(json.dumps(
            {"recipe": RECIPE_VERSION, "tiny": tiny.model_dump(mode="json"), "metrics": metrics}, indent=2))
        try:
            staging.rename(final)
        except OSError:  # another process finished first: theirs is as good as ours
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final, json.loads((final / "pretrain.json").read_text())["metrics"]


__all__ = ["PHANTOM_CLASSES", "RECIPE_VERSION", "cache_key", "cache_root", "cached_build", "phantom_corpus",
           "train_feature_extractor", "train_vae"]
