"""Packaging and registration: a scored checkpoint becomes a complete diffusers SDXL pipeline
directory pinned by sha256, logged as an MLflow pyfunc and registered as a candidate version with
its lineage tags and model card (docs/registry.md)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medisyn import storage, tracking
from medisyn.config import RunConfig
from medisyn.provenance import code_version
from medisyn.registry.card import _card_context, _update_card
from medisyn.registry.names import (
    CARD_CONTEXT,
    MANIFEST_DIGEST_TAG,
    MANIFEST_FILE,
    MODEL_INFO_FILE,
    PIPELINE_ARTIFACT,
    UNET_DIGEST_TAG,
    UNET_WEIGHTS,
    _client,
    _find_version,
    _slug,
    candidates_model,
    identity,
)
from medisyn.results import StageResult

if TYPE_CHECKING:
    from medisyn.evaluate.fid import ScoreResult

log = logging.getLogger("medisyn.registry")

# Files of a Hugging Face model repo that a diffusers pipeline directory does not need.
_SKIP = re.compile(r"(\.fp16\.|\.msgpack$|\.onnx|openvino|\.ckpt$|\.xml$|^\.)")


@dataclass(frozen=True)
class RegisteredModel(StageResult):
    name: str
    version: str
    model_uri: str  # models:/<name>/<version>
    alias_uri: str  # models:/<name>@candidate
    run_id: str
    tags: dict[str, str] = field(default_factory=dict)


def _copy_component(src: Path, dest: Path) -> None:
    """Copy a component folder, leaving out what a PyTorch diffusers load never reads."""
    dest.mkdir(parents=True, exist_ok=True)
    names = {p.name for p in src.iterdir()}
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if p.is_dir() or _SKIP.search(p.name):
            continue
        if p.suffix == ".bin" and any(n.endswith(".safetensors") for n in names):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dest / rel)


def build_pipeline_dir(cfg: RunConfig, checkpoint_uri: str, dest: str | os.PathLike) -> dict[str, Any]:
    """Write a complete diffusers SDXL pipeline directory for a checkpoint; returns the pinned references.

    The U-Net comes from ``<checkpoint>/unet`` cast to ``tracking.package_dtype``; the scheduler is
    Euler (section 4.3); every other component is copied byte for byte from the configured base
    (and the fp16-fix VAE), and its config and weights are pinned by sha256.
    """
    import torch
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    from medisyn.models.sdxl import local_model_dir, model_identity

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    base = local_model_dir(cfg.models.sdxl_base)
    index = json.loads((base / "model_index.json").read_text())
    for comp, spec in index.items():
        frozen = not comp.startswith("_") and isinstance(spec, list) and spec[0] is not None
        if not frozen or comp in ("unet", "vae", "scheduler"):
            continue
        _copy_component(base / comp, dest / comp)
    vae_src = local_model_dir(cfg.models.vae) if cfg.models.vae else base / "vae"
    _copy_component(vae_src, dest / "vae")
    is_unet = storage.exists(storage.join(checkpoint_uri, "config.json"))
    unet_uri = checkpoint_uri if is_unet else storage.join(checkpoint_uri, "unet")
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[cfg.tracking.package_dtype]
    unet = UNet2DConditionModel.from_pretrained(local_model_dir(unet_uri), dtype=dtype)
    unet.save_pretrained(dest / "unet", safe_serialization=True)
    del unet
    EulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler").save_pretrained(dest / "scheduler")
    index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    (dest / "model_index.json").write_text(json.dumps(index, indent=2))

    base_refs: dict[str, Any] = {
        "sdxl_base": storage.normalize(cfg.models.sdxl_base),
        "vae": storage.normalize(cfg.models.vae) if cfg.models.vae else None,
        "model_identity": model_identity(cfg.models),
        "components": {},
    }
    for comp_dir in sorted(p for p in dest.iterdir() if p.is_dir() and p.name not in ("unet", "scheduler")):
        base_refs["components"][comp_dir.name] = {
            str(f.relative_to(comp_dir)): storage.sha256(f) for f in sorted(comp_dir.rglob("*")) if f.is_file()
        }
    info = {
        "format": "medisyn-sdxl-pipeline-v1",
        "checkpoint_uri": storage.normalize(checkpoint_uri),
        "unet_dtype": cfg.tracking.package_dtype,
        "resolution": cfg.sampling_resolution(),
        "batch_size": cfg.sampling.batch_size,
        "sampling": cfg.sampling.model_dump(mode="json"),
        "base_components": base_refs,
    }
    (dest / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
    manifest = {str(f.relative_to(dest)): storage.sha256(f) for f in sorted(dest.rglob("*")) if f.is_file()}
    (dest / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return info


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    reqs = []
    for pkg in ("torch", "diffusers", "transformers", "safetensors", "accelerate", "pillow", "pandas", "mlflow"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except Exception:  # noqa: BLE001 - an optional package absent here is simply not pinned
            reqs.append(pkg)
    return reqs


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    inputs = Schema([
        ColSpec("string", "prompt"),
        ColSpec("long", "num_images", required=False),
        ColSpec("long", "seed", required=False),
        ColSpec("double", "guidance_scale", required=False),
        ColSpec("long", "num_inference_steps", required=False),
    ])
    outputs = Schema([ColSpec("string", "prompt"), ColSpec("long", "seed"), ColSpec("string", "image")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _epoch_of_checkpoint(checkpoint_uri: str) -> int:
    info = storage.join(checkpoint_uri, "checkpoint.json")
    if storage.exists(info):
        return int(storage.read_json(info)["epoch"])
    m = re.search(r"epoch-(\d+)", checkpoint_uri)
    if not m:
        raise ValueError(f"cannot tell the epoch of {checkpoint_uri}: no checkpoint.json, no epoch-NNNN name")
    return int(m.group(1))


def _tag_value(v: Any) -> str:
    return (f"{v:.6g}" if isinstance(v, float) else str(v))[:5000]


def register_candidate(cfg: RunConfig, score: ScoreResult, dataset_uri: str,
                       checkpoint_uri: str | None = None) -> RegisteredModel:
    """Package a scored checkpoint as a new version of ``tracking.model_name`` with alias ``candidate``.

    ``score`` is the scoring stage's result (``ScoreResult.load(scores_uri)``); the checkpoint is its
    best epoch unless ``checkpoint_uri`` names another scored one. Tags: epoch, FID pooled / per
    specialty / interval, FID provenance, dataset hash, config hash, code version, pipeline run id.
    The model card becomes the version's description.
    """
    import mlflow

    tracking.require_tracking(cfg)
    checkpoint_uri = storage.normalize(checkpoint_uri or score.best_checkpoint_uri)
    storage.require_complete(checkpoint_uri)
    epoch = _epoch_of_checkpoint(checkpoint_uri)
    best = epoch == score.best_epoch
    fid_value = score.fid_by_epoch.get(epoch, score.best_fid if best else None)
    if fid_value is None:
        raise ValueError(f"the score has no FID for epoch {epoch} (scored: {sorted(score.fid_by_epoch)})")
    spec_fid = score.fid_by_epoch_specialty.get(epoch) or (score.fid_by_specialty if best else {})
    prov = score.provenance
    manifest_uri = storage.join(dataset_uri, "manifest.json")
    manifest = storage.read_json(manifest_uri) if storage.exists(manifest_uri) else {}
    dhash = manifest.get("dataset_hash") or score.dataset_hash
    pipeline_run_id = tracking.pipeline_run_id(cfg)

    tags: dict[str, str] = {
        "epoch": str(epoch),
        "checkpoint_uri": checkpoint_uri,
        "fid": _tag_value(float(fid_value)),
        "fid.n": str(prov.get("n", score.num_samples)),
        "fid.seed": str(prov.get("seed", score.seed)),
        "fid.implementation": str(prov.get("implementation", "")),
        "fid.weights_sha256": str(prov.get("weights_sha256", "")),
        "fid.resize_filter": str(prov.get("resize_filter", "")),
        "fid.mode": score.mode,
        "scores_uri": score.out_uri,  # where the FID evidence lives (curve, grids): the evaluation report reads it
        "dataset_hash": str(dhash),
        "dataset_uri": storage.normalize(dataset_uri),
        "config_hash": cfg.config_hash(),
        "code_version": code_version(),
        "pipeline_run_id": pipeline_run_id,
    }
    if score.fid_ci and best:
        tags["fid.ci_low"], tags["fid.ci_high"] = (_tag_value(float(x)) for x in score.fid_ci)
    for spec, v in sorted(spec_fid.items()):
        tags[f"fid.specialty.{_slug(spec)}"] = _tag_value(float(v))

    client = _client()
    name = candidates_model(cfg)
    # Idempotent (a retried register step, issue #12): one version per training run and checkpoint.
    existing = _find_version(client, name, {"checkpoint_uri": checkpoint_uri, "pipeline_run_id": pipeline_run_id,
                                            "config_hash": tags["config_hash"]})
    if existing is not None:
        log.info("%s version %s already holds %s (run %s): not registered twice", name, existing.version,
                 checkpoint_uri, pipeline_run_id or "-")
        if not existing.description:  # the attempt that registered it was killed before its card: finish it
            _update_card(cfg, name, str(existing.version))
        client.set_registered_model_alias(name, cfg.tracking.candidate_alias, str(existing.version))
        return RegisteredModel(name=name, version=str(existing.version),
                               model_uri=f"models:/{name}/{existing.version}",
                               alias_uri=f"models:/{name}@{cfg.tracking.candidate_alias}",
                               run_id=str(existing.run_id or ""), tags=dict(existing.tags))
    work = Path(tempfile.mkdtemp(prefix="medisyn-package-"))
    try:
        info = build_pipeline_dir(cfg, checkpoint_uri, work / PIPELINE_ARTIFACT)
        tags["base.model_identity"] = info["base_components"]["model_identity"]
        tags["unet_dtype"] = cfg.tracking.package_dtype
        # The integrity anchors, in the registry rather than beside the files they vouch for.
        tags[MANIFEST_DIGEST_TAG] = storage.sha256(work / PIPELINE_ARTIFACT / MANIFEST_FILE)
        tags[UNET_DIGEST_TAG] = storage.sha256(work / PIPELINE_ARTIFACT / UNET_WEIGHTS)
        tags["medisyn.registered_by"] = identity()
        with tracking.stage_run(cfg, "register", tags={"medisyn.checkpoint_uri": checkpoint_uri}) as run:
            model_info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(__file__).parents[1] / "pyfunc_model.py"),  # medisyn/pyfunc_model.py
                artifacts={PIPELINE_ARTIFACT: str(work / PIPELINE_ARTIFACT)},
                signature=_signature(),
                pip_requirements=_pip_requirements(),
                metadata={"medisyn": {k: v for k, v in tags.items()}},
            )
            run_id = run.info.run_id
            mlflow.log_dict(info, "model/medisyn_model.json")
            # The card's context is stored before the version exists, so a rerun of a register killed
            # between registering and writing the card can finish the card (issue #12).
            context = _card_context(cfg, name, run_id, epoch, checkpoint_uri, info, manifest, score, best,
                                    fid_value, spec_fid, dhash, tags, pipeline_run_id)
            client.log_dict(run_id, context, CARD_CONTEXT)
        mv = mlflow.register_model(model_info.model_uri, name, tags=tags)  # every tag comes with the version
        version = str(mv.version)
        # rendered from the stored (JSON) form, as a rerun that finishes the card renders it
        _update_card(cfg, name, version, {**json.loads(json.dumps(context)), "version": version})
        # @candidate moves last: it never names a version without its card
        client.set_registered_model_alias(name, cfg.tracking.candidate_alias, version)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    log.info("registered %s version %s (epoch %d, FID %.4g) as @%s", name, version, epoch, fid_value,
             cfg.tracking.candidate_alias)
    return RegisteredModel(name=name, version=version, model_uri=f"models:/{name}/{version}",
                           alias_uri=f"models:/{name}@{cfg.tracking.candidate_alias}", run_id=run_id, tags=tags)
