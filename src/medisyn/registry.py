"""The MLflow model registry side of MediSyn: package, register, tag, promote, pull.

Conventions (docs/registry.md):

* One registered model (``tracking.model_name``); each retraining's best epoch is a new version with
  alias ``candidate``; ``promote`` moves alias ``approved`` only when every named gate's version tag
  says ``passed`` (fail closed: a missing tag, another value or any error means not approved).
* A version is an MLflow pyfunc logged from code (``medisyn/pyfunc_model.py``) whose artifact
  ``pipeline`` is a complete diffusers SDXL directory: the fine-tuned U-Net (safetensors, in
  ``tracking.package_dtype``, bf16 by default) plus byte-identical copies of the frozen base
  components (text encoders, tokenizers, the fp16-fix VAE), pinned by sha256 in
  ``medisyn_model.json``. Self-contained on purpose: a consumer needs only the registry.
* Version tags carry the lineage: epoch, FID (pooled, per specialty, interval), FID provenance,
  dataset hash, config hash, code version, pipeline run id; ``gate.<name>`` = passed|failed.
* The model card (markdown) is the version's description and a run artifact, rebuilt on each gate.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medisyn import model_card, storage, tracking
from medisyn.config import RunConfig
from medisyn.results import StageResult

if TYPE_CHECKING:
    from medisyn.evaluate.fid import ScoreResult

log = logging.getLogger("medisyn.registry")

PIPELINE_ARTIFACT = "pipeline"
MODEL_INFO_FILE = "medisyn_model.json"
MANIFEST_FILE = "medisyn_manifest.json"
CARD_CONTEXT = "model_card/context.json"
CARD_FILE = "model_card/model_card.md"
GATE_PASSED, GATE_FAILED = "passed", "failed"
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


@dataclass(frozen=True)
class PromoteResult(StageResult):
    name: str
    version: str
    approved: bool
    alias: str | None  # the alias set (approved) or None
    gates: dict[str, str]  # gate -> passed | failed | missing
    reason: str


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def code_version() -> str:
    """Git sha of the code (``+dirty`` with local changes), else $MEDISYN_CODE_VERSION, else the package version."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode == 0 and sha.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=30)
            return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    import medisyn

    return os.environ.get("MEDISYN_CODE_VERSION") or f"medisyn-{medisyn.__version__}"


def parse_model_uri(cfg: RunConfig, ref: str | int) -> tuple[str, str | None, str | None]:
    """(name, version, alias) of ``models:/n/3``, ``models:/n@alias``, ``3`` or ``@alias`` (cfg's model name)."""
    ref = str(ref).strip()
    if ref.startswith("models:/"):
        body = ref[len("models:/"):].strip("/")
        if "@" in body:
            name, alias = body.split("@", 1)
            return name, None, alias
        name, _, version = body.rpartition("/")
        if not name or not version.isdigit():
            raise ValueError(f"model URI {ref!r} must be models:/<name>/<version> or models:/<name>@<alias>")
        return name, version, None
    if ref.startswith("@"):
        return cfg.tracking.model_name, None, ref[1:]
    if ref.isdigit():
        return cfg.tracking.model_name, ref, None
    raise ValueError(f"{ref!r} is not a model version: use models:/<name>/<version>, models:/<name>@<alias> "
                     "or a number")


def resolve_version(cfg: RunConfig, ref: str | int) -> tuple[str, str]:
    """(name, version) of a model reference; aliases are resolved now (they move)."""
    name, version, alias = parse_model_uri(cfg, ref)
    if alias is not None:
        version = str(_client().get_model_version_by_alias(name, alias).version)
    return name, str(version)


def _epoch_of_checkpoint(checkpoint_uri: str) -> int:
    info = storage.join(checkpoint_uri, "checkpoint.json")
    if storage.exists(info):
        return int(storage.read_json(info)["epoch"])
    m = re.search(r"epoch-(\d+)", checkpoint_uri)
    if not m:
        raise ValueError(f"cannot tell the epoch of {checkpoint_uri}: no checkpoint.json, no epoch-NNNN name")
    return int(m.group(1))


# ----------------------------------------------------------------------------------------------
# Packaging
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Register, gates, promote
# ----------------------------------------------------------------------------------------------
def _tag_value(v: Any) -> str:
    return (f"{v:.6g}" if isinstance(v, float) else str(v))[:5000]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "unknown"


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
    name = cfg.tracking.model_name
    work = Path(tempfile.mkdtemp(prefix="medisyn-package-"))
    try:
        info = build_pipeline_dir(cfg, checkpoint_uri, work / PIPELINE_ARTIFACT)
        tags["base.model_identity"] = info["base_components"]["model_identity"]
        tags["unet_dtype"] = cfg.tracking.package_dtype
        with tracking.stage_run(cfg, "register", tags={"medisyn.checkpoint_uri": checkpoint_uri}) as run:
            model_info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                artifacts={PIPELINE_ARTIFACT: str(work / PIPELINE_ARTIFACT)},
                signature=_signature(),
                pip_requirements=_pip_requirements(),
                metadata={"medisyn": {k: v for k, v in tags.items()}},
            )
            run_id = run.info.run_id
            mlflow.log_dict(info, "model/medisyn_model.json")
        mv = mlflow.register_model(model_info.model_uri, name, tags=tags)
        version = str(mv.version)
        client.set_registered_model_alias(name, cfg.tracking.candidate_alias, version)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    context = {
        "name": name, "version": version, "run_id": run_id, "epoch": epoch, "checkpoint_uri": checkpoint_uri,
        "package_dtype": cfg.tracking.package_dtype,
        "base_components_summary": f"{info['base_components']['sdxl_base']} + VAE {info['base_components']['vae']} "
                                   f"(identity {info['base_components']['model_identity']}, "
                                   f"sha256 per file in {MODEL_INFO_FILE})",
        "sampling": info["sampling"], "manifest": manifest, "train": cfg.train.model_dump(mode="json"),
        "score": {"fid": fid_value, "fid_ci": score.fid_ci if best else None,
                  "num_samples": score.num_samples, "mode": score.mode,
                  "provenance": {k: v for k, v in prov.items() if not isinstance(v, dict)},
                  "fid_by_specialty": spec_fid, "fid_by_epoch": score.fid_by_epoch},
        "dataset_hash": dhash, "config_hash": tags["config_hash"], "code_version": tags["code_version"],
        "pipeline_run_id": pipeline_run_id,
    }
    client.log_dict(run_id, context, CARD_CONTEXT)
    _update_card(cfg, name, version, context)
    log.info("registered %s version %s (epoch %d, FID %.4g) as @%s", name, version, epoch, fid_value,
             cfg.tracking.candidate_alias)
    return RegisteredModel(name=name, version=version, model_uri=f"models:/{name}/{version}",
                           alias_uri=f"models:/{name}@{cfg.tracking.candidate_alias}", run_id=run_id, tags=tags)


def _gates_from_tags(tags: dict[str, str]) -> dict[str, dict[str, Any]]:
    gates: dict[str, dict[str, Any]] = {}
    for key, value in tags.items():
        m = re.fullmatch(r"gate\.([^.]+)", key)
        if m:
            g = m.group(1)
            details = tags.get(f"gate.{g}.details", "{}")
            try:
                details = json.loads(details)
            except json.JSONDecodeError:
                pass
            gates[g] = {"status": value, "at": tags.get(f"gate.{g}.at", ""), "details": details}
    return gates


gates_from_tags = _gates_from_tags  # public: {gate: {status, at, details}} of a version's tags (the report)


def _update_card(cfg: RunConfig, name: str, version: str, context: dict | None = None) -> str:
    """Re-render the card from its stored context and the version's current gate tags."""
    import mlflow

    client = _client()
    mv = client.get_model_version(name, version)
    if context is None:
        try:
            context = mlflow.artifacts.load_dict(f"runs:/{mv.run_id}/{CARD_CONTEXT}")
        except Exception as exc:  # noqa: BLE001 - a card without context still shows the gates
            log.warning("model card context of %s v%s unavailable: %s", name, version, exc)
            context = {"name": name, "version": version}
    card = model_card.render(context, _gates_from_tags(dict(mv.tags)))
    client.update_model_version(name, version, description=card)
    if mv.run_id:
        client.log_text(mv.run_id, card, CARD_FILE)
    return card


def set_gate_result(cfg: RunConfig, model_uri_or_version: str | int, gate: str, passed: bool, details: dict) -> None:
    """Record a gate's verdict on a version: tags ``gate.<gate>`` = passed|failed, ``.details``, ``.at``.

    The model card is re-rendered. Called by the stage runner for every gate it runs.
    """
    tracking.require_tracking(cfg)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", gate):
        raise ValueError(f"gate name {gate!r} must be letters, digits, '-' or '_'")
    name, version = resolve_version(cfg, model_uri_or_version)
    client = _client()
    client.set_model_version_tag(name, version, f"gate.{gate}.details",
                                 json.dumps(details, sort_keys=True, default=str)[:4900])
    client.set_model_version_tag(name, version, f"gate.{gate}.at", _dt.datetime.now(_dt.UTC).isoformat())
    if details.get("report_uri"):  # untruncated (the details tag is cut at 4.9 kB): the evaluation report reads it
        client.set_model_version_tag(name, version, f"gate.{gate}.report_uri", str(details["report_uri"]))
    # The verdict is written last: a reader never sees "passed" without its details.
    client.set_model_version_tag(name, version, f"gate.{gate}", GATE_PASSED if bool(passed) else GATE_FAILED)
    try:
        _update_card(cfg, name, version)
    except Exception as exc:  # noqa: BLE001 - the tag is the record; a card failure must not hide it
        log.warning("could not update the model card of %s v%s: %s", name, version, exc)


def gate_statuses(cfg: RunConfig, model: str | int, gates: Sequence[str]) -> dict[str, str]:
    """``{gate: passed | failed | missing}`` as recorded on a version (aliases resolved now)."""
    name, version = resolve_version(cfg, model)
    tags = dict(_client().get_model_version(name, version).tags)
    return {g: tags.get(f"gate.{g}", "missing") for g in gates}


def gates_not_passed(cfg: RunConfig, model: str | int, gates: Sequence[str]) -> dict[str, str]:
    """The gates among ``gates`` whose recorded verdict is not ``passed``; an error counts as not passed."""
    try:
        statuses = gate_statuses(cfg, model, gates)
    except Exception as exc:  # noqa: BLE001 - fail closed: an unreadable verdict is not a pass
        return {g: f"unreadable ({exc})" for g in gates}
    return {g: s for g, s in statuses.items() if s != GATE_PASSED}


def promote(cfg: RunConfig, model: str | int, gates: Sequence[str]) -> PromoteResult:
    """Alias ``approved`` -> the version of ``model`` iff every named gate's tag is ``passed``. Fails closed.

    ``model`` is ``models:/<name>/<version>``, ``models:/<name>@<alias>`` or a version number of
    ``tracking.model_name``. No gates named, a missing tag, any other value, or an error reading the
    registry: not approved (and if this version held ``approved``, the alias is removed). Never
    raises for a failed gate.
    """
    tracking.require_tracking(cfg)
    alias = cfg.tracking.approved_alias
    names = list(gates)
    statuses: dict[str, str] = {g: "missing" for g in names}
    try:
        name, ver = resolve_version(cfg, model)
    except Exception as exc:  # noqa: BLE001 - fail closed
        return PromoteResult(cfg.tracking.model_name, str(model), False, None, statuses,
                             f"cannot resolve version: {exc}")
    client = _client()
    try:
        statuses = gate_statuses(cfg, f"models:/{name}/{ver}", names)
        if not names:
            approved, reason = False, "no gates named: nothing can approve a model without gates"
        elif all(statuses[g] == GATE_PASSED for g in names):
            approved, reason = True, "every gate passed"
        else:
            bad = {g: s for g, s in statuses.items() if s != GATE_PASSED}
            approved, reason = False, f"gates not passed: {bad}"
        if approved:
            client.set_registered_model_alias(name, alias, ver)
            client.set_model_version_tag(name, ver, "approved_at", _dt.datetime.now(_dt.UTC).isoformat())
        else:
            _drop_alias_if_held(client, name, alias, ver)
    except Exception as exc:  # noqa: BLE001 - fail closed
        try:
            _drop_alias_if_held(client, name, alias, ver)
        except Exception:  # noqa: BLE001
            pass
        return PromoteResult(name, ver, False, None, statuses, f"error while promoting (not approved): {exc}")
    log.info("promote %s v%s: %s (%s)", name, ver, "approved" if approved else "NOT approved", reason)
    return PromoteResult(name, ver, approved, alias if approved else None, statuses, reason)


def _drop_alias_if_held(client, name: str, alias: str, version: str) -> None:
    try:
        held = str(client.get_model_version_by_alias(name, alias).version)
    except Exception:  # noqa: BLE001 - alias not set
        return
    if held == version:
        client.delete_registered_model_alias(name, alias)


# ----------------------------------------------------------------------------------------------
# Pull
# ----------------------------------------------------------------------------------------------
def _verify_manifest(pipeline_dir: Path) -> None:
    manifest_path = pipeline_dir / MANIFEST_FILE
    if not manifest_path.exists():
        raise ValueError(f"{pipeline_dir} has no {MANIFEST_FILE}: not a MediSyn pipeline artifact")
    for rel, digest in json.loads(manifest_path.read_text()).items():
        f = pipeline_dir / rel
        if not f.exists() or storage.sha256(f) != digest:
            raise ValueError(f"pulled file {rel} is missing or corrupt (sha256 mismatch)")


def pull(model_uri: str, dest: str | os.PathLike, overwrite: bool = False) -> Path:
    """Download a registered version's diffusers pipeline directory to ``dest``; returns ``dest``.

    ``StableDiffusionXLPipeline.from_pretrained(dest)`` works on the result. Every file is checked
    against the packaged sha256 manifest; ``dest`` appears only when complete (download beside it,
    verify, rename). Uses the current MLflow tracking URI ($MLFLOW_TRACKING_URI).
    """
    import mlflow

    dest = Path(dest).expanduser().resolve()
    if dest.exists() and any(dest.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{dest} exists and is not empty (pass overwrite=True / --overwrite)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.pull-", dir=dest.parent))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(tmp)))
        candidates = [local / "artifacts" / PIPELINE_ARTIFACT, local / PIPELINE_ARTIFACT]
        candidates += [p.parent for p in local.rglob("model_index.json")]
        pipeline_dir = next((c for c in candidates if (c / "model_index.json").exists()), None)
        if pipeline_dir is None:
            raise ValueError(f"{model_uri} holds no diffusers pipeline (no model_index.json)")
        _verify_manifest(pipeline_dir)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(pipeline_dir, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("pulled %s -> %s", model_uri, dest)
    return dest


def pull_cached(model_uri: str) -> Path:
    """Like :func:`pull` into the local model cache, keyed by the resolved version (aliases move)."""
    from mlflow import MlflowClient

    from medisyn.models.sdxl import cache_dir

    body = model_uri[len("models:/"):].strip("/")
    client = MlflowClient()
    if "@" in body:
        name, alias = body.split("@", 1)
        version = str(client.get_model_version_by_alias(name, alias).version)
    else:
        name, _, version = body.rpartition("/")
    import mlflow

    server = hashlib.sha256(mlflow.get_registry_uri().encode()).hexdigest()[:12]  # versions are per server
    dest = cache_dir() / "registry" / server / f"{_slug(name)}-v{version}"
    if (dest / "model_index.json").exists():
        return dest
    return pull(f"models:/{name}/{version}", dest, overwrite=True)
