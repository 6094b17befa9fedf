"""Model factory: load every pretrained model from the path/URI in the config, or build tiny
random-init stand-ins from config and save them in the same on-disk format (tests, demo)."""

from __future__ import annotations

from medisyn.config import RunConfig


def build_tiny_models(cfg: RunConfig, overwrite: bool = False) -> dict[str, str]:
    """Build every tiny model at the paths named in ``cfg.models``; returns {name: path}.

    Existing models are kept unless ``overwrite``; requires ``cfg.models.tiny``.
    """
    from medisyn import storage
    from medisyn.models import biomedclip, inception, resnet, sdxl

    tiny = cfg.models.tiny
    if tiny is None:
        raise ValueError("models.tiny is not set: tiny models are built only for test/demo configs")
    m = cfg.models
    built: dict[str, str] = {}
    base = storage.local_path(m.sdxl_base)
    if overwrite or not (base / "model_index.json").exists():
        sdxl.build_tiny_sdxl(tiny, base, storage.local_path(m.vae) if m.vae else None)
    built["sdxl_base"] = str(base)
    if m.vae:
        built["vae"] = str(storage.local_path(m.vae))
    clip_dir = storage.local_path(m.biomedclip)
    if overwrite or not (clip_dir / "open_clip_config.json").exists():
        biomedclip.build_tiny_biomedclip(tiny, clip_dir)
    built["biomedclip"] = str(clip_dir)
    fid_path = storage.local_path(m.fid_inception_weights)
    if overwrite or not fid_path.exists():
        inception.build_tiny_feature_extractor(tiny, fid_path)
    built["fid_inception_weights"] = str(fid_path)
    rn = storage.local_path(m.resnet50_weights)
    if overwrite or not rn.exists():
        resnet.build_tiny_resnet(tiny, rn)
    built["resnet50_weights"] = str(rn)
    return built
