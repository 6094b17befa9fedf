"""Tiny on-disk inputs for the FID / generation / registry tests, in the documented formats
(docs/stages.md): a dataset prefix (Parquet with PNG bytes) and epoch checkpoints (``unet/`` +
``checkpoint.json`` + ``_COMPLETE``). Built here so these tests do not wait on the data and
training stages."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from medisyn import storage

SPECIALTIES = {
    "dermatology": ("dermoscopy", "Dermoscopy image showing {}.", ["melanoma", "melanocytic nevi"]),
    "ophthalmology": ("oct", "Optical coherence tomography image showing {}.", ["drusen", "normal findings"]),
}


def write_dataset(uri: str, n_per_specialty: int = 12, resolution: int = 64, seed: int = 0) -> str:
    """A complete dataset prefix with a train split of phantom images, two specialties."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    rows = []
    for spec, (itype, template, labels) in SPECIALTIES.items():
        for i in range(n_per_specialty):
            label = labels[i % len(labels)]
            base = 60 if spec == "dermatology" else 160
            arr = np.clip(rng.normal(base, 40, (resolution, resolution, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            rows.append(dict(
                image=buf.getvalue(), caption=template.format(label), specialty=spec, image_type=itype,
                label=label, source="phantom", split="train", patient_hash=f"p{len(rows)}",
                image_hash=f"i{len(rows)}", pixel_hash=f"x{len(rows)}", width=resolution, height=resolution,
            ))
    with storage.staged_dir(uri) as d:
        (d / "train").mkdir()
        half = len(rows) // 2
        for k, chunk in enumerate((rows[:half], rows[half:])):
            pq.write_table(pa.Table.from_pylist(chunk), d / "train" / f"part-{k:05d}.parquet")
        (d / "manifest.json").write_text(json.dumps({
            "dataset_hash": f"phantom-{seed}-{n_per_specialty}-{resolution}",
            "counts": {"train": {s: n_per_specialty for s in SPECIALTIES}},
        }))
    return storage.normalize(uri)


def write_checkpoints(cfg, uri: str, epochs: int = 2, incomplete_epoch: int | None = None) -> list[str]:
    """Epoch checkpoints of the tiny base U-Net, each perturbed differently (so their FIDs differ)."""
    import torch

    from medisyn.models.sdxl import load_unet

    out = []
    for epoch in range(1, epochs + 1):
        unet = load_unet(cfg.models)
        torch.manual_seed(epoch)
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(torch.randn_like(p) * 0.02 * epoch)
        ck = storage.join(uri, f"epoch-{epoch:04d}")
        d = Path(storage.local_path(ck)) if not storage.is_remote(ck) else None
        import tempfile

        tmp = Path(tempfile.mkdtemp())
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        (tmp / "checkpoint.json").write_text(json.dumps({"epoch": epoch, "global_step": 10 * epoch, "kind": "epoch"}))
        if epoch == incomplete_epoch:  # a checkpoint being written: no _COMPLETE, must be ignored
            import shutil

            assert d is not None
            shutil.copytree(tmp, d)
        else:
            storage.publish_dir(tmp, ck)
            out.append(storage.normalize(ck))
    return out


_BUILT: dict[str, object] = {}


def model_env(tmp_root: Path, overrides: list[str] | None = None):
    """(cfg, root): the demo config under ``tmp_root`` with the tiny SDXL and tiny FID extractor built once
    per process (not the shared ``tiny_cfg``: these tests need only these two models)."""
    from conftest import demo_config

    from medisyn.models import inception, sdxl

    if "root" not in _BUILT:
        root = Path(tmp_root)
        cfg = demo_config(root)
        sdxl.build_tiny_sdxl(cfg.models.tiny, storage.local_path(cfg.models.sdxl_base), storage.local_path(cfg.models.vae))
        inception.build_tiny_feature_extractor(cfg.models.tiny, cfg.models.fid_inception_weights)
        _BUILT["root"] = root
    root = _BUILT["root"]
    fast = ["sampling.num_inference_steps=2", "fid.num_samples=16", "fid.bootstrap_resamples=20", "fid.batch_size=8"]
    return demo_config(root, fast + list(overrides or [])), root
