"""Tiny stand-ins for every pretrained model, built from config and saved in the same on-disk formats
as the real ones (``medisyn build-tiny-models``; the demo and the tests). With ``models.tiny.pretrain``
the tiny VAE and FID feature extractor are trained on phantoms (:mod:`medisyn.demo.pretrain`, cached
per machine by content hash). Moved here from ``medisyn.models`` (issue #22)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from medisyn.config import RunConfig, TinyModelsConfig

# Layout of one complete set of tiny models, in the pretraining cache.
_SDXL, _VAE, _CLIP, _FID, _RESNET = "sdxl", "vae", "biomedclip", "fid-features.pth", "resnet.pth"


def build_tiny_models(cfg: RunConfig, overwrite: bool = False) -> dict[str, str]:
    """Build every tiny model at the paths named in ``cfg.models``; returns {name: path}.

    Existing models are kept unless ``overwrite``; requires ``cfg.models.tiny``.
    """
    from medisyn import storage

    tiny = cfg.models.tiny
    if tiny is None:
        raise ValueError("models.tiny is not set: tiny models are built only for test/demo configs")
    m = cfg.models
    base = storage.local_path(m.sdxl_base)
    vae = storage.local_path(m.vae) if m.vae else None
    clip, fid = storage.local_path(m.biomedclip), storage.local_path(m.fid_inception_weights)
    rn = storage.local_path(m.resnet50_weights)
    targets: dict[str, Path | None] = {"sdxl_base": base, "vae": vae, "biomedclip": clip,
                                       "fid_inception_weights": fid, "resnet50_weights": rn}
    present = {
        "sdxl_base": (base / "model_index.json").exists(),
        "vae": vae is None or (vae / "config.json").exists(),
        "biomedclip": (clip / "open_clip_config.json").exists(),
        "fid_inception_weights": fid.exists(),
        "resnet50_weights": rn.exists(),
    }
    if tiny.pretrain is not None:
        # The pretrained set is keyed by content: a set built from another tiny config is replaced.
        from medisyn.demo.pretrain import cache_key

        stamp = base / "medisyn_tiny.json"
        current = stamp.exists() and json.loads(stamp.read_text()).get("cache_key") == cache_key(tiny)
        if overwrite or not all(present.values()) or not current:
            _copy_from_cache(_pretrained_set(tiny), targets)
            stamp.write_text(json.dumps({"cache_key": cache_key(tiny)}))
    else:
        _build_random(tiny, targets, {k: overwrite or not v for k, v in present.items()})
    return {k: str(v) for k, v in targets.items() if v is not None}


def _build_random(tiny: TinyModelsConfig, targets: dict[str, Path | None], todo: dict[str, bool]) -> None:
    from medisyn.models import biomedclip, inception, resnet, sdxl

    def at(key: str) -> Path:
        path = targets[key]
        assert path is not None, key
        return path

    if todo["sdxl_base"] or todo["vae"]:
        sdxl.build_tiny_sdxl(tiny, at("sdxl_base"), targets["vae"])
    if todo["biomedclip"]:
        biomedclip.build_tiny_biomedclip(tiny, at("biomedclip"))
    if todo["fid_inception_weights"]:
        inception.build_tiny_feature_extractor(tiny, at("fid_inception_weights"))
    if todo["resnet50_weights"]:
        resnet.build_tiny_resnet(tiny, at("resnet50_weights"))


def _pretrained_set(tiny: TinyModelsConfig) -> Path:
    """The cache directory holding a complete set of tiny models with the VAE and FID extractor
    trained on phantoms (built on first use)."""
    import logging

    from medisyn.demo import pretrain

    def build(d: Path) -> dict[str, float]:
        import torch
        from diffusers import AutoencoderKL

        from medisyn.models import inception

        p = tiny.pretrain
        assert p is not None
        _build_random(tiny, {"sdxl_base": d / _SDXL, "vae": d / _VAE, "biomedclip": d / _CLIP,
                             "fid_inception_weights": d / _FID, "resnet50_weights": d / _RESNET},
                      dict.fromkeys(("sdxl_base", "vae", "biomedclip", "fid_inception_weights",
                                     "resnet50_weights"), True))
        images, labels = pretrain.phantom_corpus(p.images_per_class, p.seed, tiny.resolution)
        torch.manual_seed(p.seed)
        vae = AutoencoderKL.from_pretrained(d / _VAE)
        mae = pretrain.train_vae(vae, images, p)
        for where in (d / _VAE, d / _SDXL / "vae"):  # the base's own VAE too, as in SDXL's layout
            shutil.rmtree(where)
            vae.save_pretrained(where, safe_serialization=True)
        torch.manual_seed(p.seed)
        extractor = inception.TinyFeatureExtractor(feature_dim=tiny.fid_feature_dim)
        acc = pretrain.train_feature_extractor(extractor, images, labels, p)
        inception.build_tiny_feature_extractor(tiny, d / _FID, model=extractor)
        return {"n_images": float(len(images)), "vae_reconstruction_mae": round(mae, 3),
                "fid_features_train_accuracy": round(acc, 4)}

    where, metrics = pretrain.cached_build(tiny, build)
    logging.getLogger("medisyn.demo.tiny_models").info("pretrained tiny models at %s: %s", where, metrics)
    return where


def _copy_from_cache(src: Path, targets: dict[str, Path | None]) -> None:
    pairs = {"sdxl_base": _SDXL, "vae": _VAE, "biomedclip": _CLIP, "fid_inception_weights": _FID,
             "resnet50_weights": _RESNET}
    for key, name in pairs.items():
        dst = targets[key]
        if dst is None:
            continue
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        if (src / name).is_dir():
            shutil.copytree(src / name, tmp)
        else:
            shutil.copy2(src / name, tmp)
        tmp.rename(dst)
