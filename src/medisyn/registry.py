"""The MLflow model registry side of MediSyn: package, register, tag, promote, pull.

Conventions (docs/registry.md):

* Two registered models (mlflow/REGISTRY.md, issue #10): candidates in ``<tracking.model_name>-candidates``,
  which the pipeline identity may edit (alias ``candidate``); approved versions in ``tracking.model_name``,
  which only the promoting identity may edit (alias ``approved``). MLflow's permissions cannot let an
  identity create versions without also letting it set aliases, so the split is what stops the
  pipeline (or anyone else) from approving: approval is enforced by the server, not by convention.
* A verdict is the gate's MLflow run, not a tag: the run records (as immutable params) the gate, the
  candidate version it judged, the model's manifest digest, the sha256 of its verdict and report
  artifacts and the identity that wrote it; ``promote`` re-reads and re-hashes all of it. A hand-set
  ``gate.<name>`` tag is display only. Every approval records who, when and that evidence on the
  approved version; ``revoke`` withdraws one with a reason.
* Integrity: the sha256 of the packaged manifest and of the U-Net weights are recorded on the version
  when it is registered (and copied onto the approved version and its approval record); every
  consumer path (``pull``, ``generate``, ``pyfunc.load_model``) verifies them.
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
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medisyn import model_card, storage, tracking
from medisyn.config import RunConfig
from medisyn.provenance import code_version
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
CANDIDATES_SUFFIX = "-candidates"  # the candidates' registered model: <tracking.model_name>-candidates
VERDICT_ARTIFACT = "gate/verdict.json"  # in the gate's run: the verdict whose sha256 the run's params pin
# Version tags written at registration (pipeline) and copied at approval (promoter): the integrity anchors.
MANIFEST_DIGEST_TAG, UNET_DIGEST_TAG = "medisyn.manifest_sha256", "medisyn.unet_sha256"
CANDIDATE_TAG = "medisyn.candidate"  # on an approved version: <candidates model>/<version> it was copied from
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
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
    name: str  # the candidates' registered model
    version: str  # the candidate version judged
    approved: bool
    alias: str | None  # the alias set (approved) or None
    gates: dict[str, str]  # gate -> passed | failed | missing | unverified (...)
    reason: str
    approved_uri: str | None = None  # models:/<tracking.model_name>/<version> when approved
    approved_by: str | None = None  # the promoting identity


@dataclass(frozen=True)
class RevokeResult(StageResult):
    name: str  # the approved registered model
    version: str  # the approved version withdrawn
    reason: str
    revoked_by: str
    approved_now: str | None  # the version @approved points at afterwards (the previous approval), or None


class RegistryError(RuntimeError):
    """The registry or the artifact store could not be reached or refused the platform's identity: not a
    verdict. The CLI exits non-zero with this one-line reason (never a successful "not approved")."""


class IntegrityError(ValueError):
    """A model's files do not match the digests recorded in the registry: refused, never loaded."""


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def candidates_model(cfg: RunConfig) -> str:
    """The registered model holding candidates (pipeline identity: EDIT)."""
    name = cfg.tracking.candidate_model_name or cfg.tracking.model_name + CANDIDATES_SUFFIX
    if name == cfg.tracking.model_name:
        raise ValueError("tracking.candidate_model_name must differ from tracking.model_name (the approved model)")
    return name


def approved_model(cfg: RunConfig) -> str:
    """The registered model holding approved versions (promoter: EDIT; everyone else: READ)."""
    return cfg.tracking.model_name


def identity() -> str:
    """The MLflow identity this process acts as ($MLFLOW_TRACKING_USERNAME; "anonymous" without auth)."""
    return os.environ.get("MLFLOW_TRACKING_USERNAME") or "anonymous"


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` means the registry/artifact store is unreachable, failing or refusing our
    credentials (a platform fault), as opposed to a missing or unacceptable record (a verdict)."""
    import requests

    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError,
                        TimeoutError)):
        return True
    text = str(exc)
    code = getattr(exc, "error_code", "")
    return (code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "PERMISSION_DENIED", "UNAUTHENTICATED")
            or "failed with exception" in text or "Max retries exceeded" in text
            or any(f"error code {c}" in text for c in (401, 403, 500, 502, 503, 504)))


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_model_uri(cfg: RunConfig, ref: str | int) -> tuple[str, str | None, str | None]:
    """(name, version, alias) of ``models:/n/3``, ``models:/n@alias``, ``3`` (a candidate) or ``@alias``."""
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
    if ref.startswith("@"):  # @approved names the approved model; any other alias a candidate
        alias = ref[1:]
        return (approved_model(cfg) if alias == cfg.tracking.approved_alias else candidates_model(cfg)), None, alias
    if ref.isdigit():  # a bare number is a candidate version (what register printed)
        return candidates_model(cfg), ref, None
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
                python_model=str(Path(__file__).with_name("pyfunc_model.py")),
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


def _card_context(cfg: RunConfig, name: str, run_id: str, epoch: int, checkpoint_uri: str, info: dict[str, Any],
                  manifest: dict[str, Any], score: ScoreResult, best: bool, fid_value: float,
                  spec_fid: dict[str, float], dhash: str, tags: dict[str, str],
                  pipeline_run_id: str) -> dict[str, Any]:
    """What the model card says about a registered checkpoint (its version is filled in when rendered)."""
    prov = score.provenance
    return {
        "name": name, "run_id": run_id, "epoch": epoch, "checkpoint_uri": checkpoint_uri,
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


def _find_model(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException as exc:
        if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


def _find_version(client, name: str, match: dict[str, str]):
    """The newest version of ``name`` whose tags include all of ``match`` (None if none or no such model)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as exc:
        if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    hits = [mv for mv in versions if all(mv.tags.get(k) == v for k, v in match.items())]
    return max(hits, key=lambda mv: int(mv.version)) if hits else None


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
        try:  # stored before the version existed: the version is filled in here
            context = {**mlflow.artifacts.load_dict(f"runs:/{mv.run_id}/{CARD_CONTEXT}"), "version": version}
        except Exception as exc:  # noqa: BLE001 - a card without context still shows the gates
            log.warning("model card context of %s v%s unavailable: %s", name, version, exc)
            context = {"name": name, "version": version}
    card = model_card.render(context, _gates_from_tags(dict(mv.tags)))
    client.update_model_version(name, version, description=card)
    if mv.run_id:
        client.log_text(mv.run_id, card, CARD_FILE)
    return card


def _gate_run(cfg: RunConfig, run_id: str | None):
    """(run id, created): the gate's MLflow run that records the verdict (the active stage run under
    the stage runner; otherwise a run of its own in the experiment, ended after recording)."""
    import mlflow

    if run_id:
        return run_id, False
    active = mlflow.active_run()
    if active is not None:
        return active.info.run_id, False
    experiment = mlflow.set_experiment(cfg.tracking.experiment)
    run = _client().create_run(experiment.experiment_id, tags={"medisyn.stage": "gate-verdict",
                                                               "medisyn.run_name": cfg.name})
    return run.info.run_id, True


def _report_hashes(report_uri: str | None) -> dict[str, str]:
    """sha256 of the files directly under a gate's report prefix (its report.json, figures)."""
    if not report_uri:
        return {}
    out: dict[str, str] = {}
    try:
        for child in storage.listdir(report_uri):
            name = child.rstrip("/").rsplit("/", 1)[-1]
            if name in ("result.json", storage.COMPLETE_MARKER) or "." not in name:
                continue  # result.json is written after the verdict; directories have no suffix
            out[name] = storage.sha256(child)
    except (OSError, ValueError) as exc:  # an unreadable report is recorded as such, never a pass by default
        out["<error>"] = f"{type(exc).__name__}: {exc}"[:200]
    return out


def set_gate_result(cfg: RunConfig, model_uri_or_version: str | int, gate: str, passed: bool, details: dict,
                    run_id: str | None = None) -> str:
    """Record a gate's verdict: in the gate's MLflow run (the evidence), then on the candidate version.

    The run gets the artifact ``gate/verdict.json`` (gate, verdict, the judged version and its manifest
    digest, the sha256 of every report file, the details, the writing identity) and immutable params
    pinning it (``medisyn.gate.*``, its sha256 included). The version gets ``gate.<gate>.run_id`` and,
    for people, ``gate.<gate>`` = passed|failed, ``.details``, ``.at``. ``promote`` trusts only the run.
    Called by the stage runner for every gate it runs; returns the run id.
    """
    tracking.require_tracking(cfg)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", gate):
        raise ValueError(f"gate name {gate!r} must be letters, digits, '-' or '_'")
    name, version = resolve_version(cfg, model_uri_or_version)
    client = _client()
    mv = client.get_model_version(name, version)
    run_id, created = _gate_run(cfg, run_id)
    verdict = {
        "gate": gate, "passed": bool(passed), "model": f"{name}/{version}",
        "manifest_sha256": mv.tags.get(MANIFEST_DIGEST_TAG, ""), "identity": identity(),
        "at": _dt.datetime.now(_dt.UTC).isoformat(), "report_sha256": _report_hashes(details.get("report_uri")),
        "details": details,
    }
    blob = json.dumps(verdict, sort_keys=True, default=str)
    client.log_text(run_id, blob, VERDICT_ARTIFACT)
    from mlflow.entities import Param

    # Params are immutable in MLflow: a second, different verdict in the same run is refused by the server.
    client.log_batch(run_id, params=[
        Param("medisyn.gate", gate), Param("medisyn.gate.model", f"{name}/{version}"),
        Param("medisyn.gate.verdict", GATE_PASSED if passed else GATE_FAILED),
        Param("medisyn.gate.verdict_sha256", _sha256_bytes(blob.encode())),
        Param("medisyn.gate.manifest_sha256", verdict["manifest_sha256"] or "-"),
        Param("medisyn.gate.identity", verdict["identity"]),
    ])
    if created:
        client.set_terminated(run_id)
    client.set_model_version_tag(name, version, f"gate.{gate}.details",
                                 json.dumps(details, sort_keys=True, default=str)[:4900])
    client.set_model_version_tag(name, version, f"gate.{gate}.at", verdict["at"])
    if details.get("report_uri"):  # untruncated (the details tag is cut at 4.9 kB): the evaluation report reads it
        client.set_model_version_tag(name, version, f"gate.{gate}.report_uri", str(details["report_uri"]))
    client.set_model_version_tag(name, version, f"gate.{gate}.run_id", run_id)
    # The verdict is written last: a reader never sees "passed" without its details.
    client.set_model_version_tag(name, version, f"gate.{gate}", GATE_PASSED if bool(passed) else GATE_FAILED)
    try:
        _update_card(cfg, name, version)
    except Exception as exc:  # noqa: BLE001 - the tag is the record; a card failure must not hide it
        log.warning("could not update the model card of %s v%s: %s", name, version, exc)
    return run_id


def gate_statuses(cfg: RunConfig, model: str | int, gates: Sequence[str]) -> dict[str, str]:
    """``{gate: passed | failed | missing}`` as displayed on a version's tags (aliases resolved now).
    Display only: :func:`verified_gates` is what promote believes."""
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


def _download_text(artifact_uri: str) -> bytes:
    import mlflow

    with tempfile.TemporaryDirectory(prefix="medisyn-verify-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=tmp))
        return local.read_bytes()


def _verify_gate_run(cfg: RunConfig, client, name: str, version: str, tags: dict[str, str],
                     gate: str) -> tuple[str, dict[str, Any]]:
    """("passed", evidence) when the gate's own run proves a pass for this very version, else
    (why not, {}). Registry outages propagate (they are not verdicts)."""
    from mlflow.exceptions import MlflowException

    run_id = tags.get(f"gate.{gate}.run_id")
    if not run_id:
        if f"gate.{gate}" not in tags:
            return "missing", {}
        return "unverified (no gate run recorded: a tag is not a verdict)", {}
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if is_outage(exc):
            raise
        return f"unverified (gate run {run_id} not found)", {}
    params = run.data.params
    expected = {"medisyn.gate": gate, "medisyn.gate.model": f"{name}/{version}"}
    for key, value in expected.items():
        if params.get(key) != value:
            return f"unverified (run {run_id} records {key}={params.get(key)!r}, not {value!r})", {}
    if params.get("medisyn.gate.verdict") != GATE_PASSED:
        return GATE_FAILED, {}
    if run.info.status != "FINISHED":
        return f"unverified (gate run {run_id} is {run.info.status}, not FINISHED)", {}
    who = params.get("medisyn.gate.identity", "")
    allowed = set(cfg.tracking.gate_identities)
    if who not in allowed and not (who == "anonymous" and identity() == "anonymous"):
        return f"unverified (gate run written by {who!r}, not a platform identity {sorted(allowed)})", {}
    try:
        blob = _download_text(f"runs:/{run_id}/{VERDICT_ARTIFACT}")
    except Exception as exc:  # noqa: BLE001 - sorted below
        if is_outage(exc):
            raise
        return f"unverified (verdict artifact of run {run_id} unreadable: {exc})", {}
    if _sha256_bytes(blob) != params.get("medisyn.gate.verdict_sha256"):
        return f"unverified (verdict artifact of run {run_id} does not match its recorded sha256)", {}
    verdict = json.loads(blob)
    if verdict.get("passed") is not True or verdict.get("model") != f"{name}/{version}":
        return f"unverified (verdict artifact of run {run_id} does not say passed for {name}/{version})", {}
    digest = tags.get(MANIFEST_DIGEST_TAG, "")
    if not digest or verdict.get("manifest_sha256") != digest:
        return (f"unverified (run {run_id} judged manifest {verdict.get('manifest_sha256')!r}, "
                f"the version has {digest!r})"), {}
    if "<error>" in (verdict.get("report_sha256") or {}):
        return f"unverified (run {run_id} could not hash its report)", {}
    return GATE_PASSED, {"run_id": run_id, "verdict_sha256": params["medisyn.gate.verdict_sha256"],
                         "identity": who, "at": verdict.get("at"), "report_sha256": verdict.get("report_sha256")}


def verified_gates(cfg: RunConfig, model: str | int, gates: Sequence[str]) -> tuple[dict[str, str], dict[str, Any]]:
    """({gate: passed | failed | missing | unverified (...)}, {gate: evidence}) for a candidate version."""
    name, version = resolve_version(cfg, model)
    client = _client()
    tags = dict(client.get_model_version(name, version).tags)
    statuses, evidence = {}, {}
    for g in gates:
        statuses[g], ev = _verify_gate_run(cfg, client, name, version, tags, g)
        if ev:
            evidence[g] = ev
    return statuses, evidence


def _verify_stored_manifest(name: str, version: str, digest: str) -> None:
    """The manifest in the artifact store is the one registered (sha256 on the version): else IntegrityError."""
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

    with tempfile.TemporaryDirectory(prefix="medisyn-verify-") as tmp:
        repo = ModelsArtifactRepository(f"models:/{name}/{version}")
        blob = Path(repo.download_artifacts(f"artifacts/{PIPELINE_ARTIFACT}/{MANIFEST_FILE}", tmp)).read_bytes()
    if _sha256_bytes(blob) != digest:
        raise IntegrityError(f"{name} v{version}: the stored {MANIFEST_FILE} does not match the sha256 recorded "
                             "at registration (tampered artifact store?)")


def promote(cfg: RunConfig, model: str | int, gates: Sequence[str]) -> PromoteResult:
    """Approve a candidate iff every named gate's own run proves it passed; fails closed.

    ``model`` is a candidate (``models:/<name>-candidates/<version>``, ``@candidate`` or a number). The
    verdicts are verified (:func:`verified_gates`), then the candidate is copied into the approved model
    (``tracking.model_name``, idempotent: one approved version per candidate) with its digests and an
    approval record (who, when, the gate runs and hashes), and alias ``approved`` moves to it. This needs
    EDIT on the approved model: only the promoting identity has it. A failed or unverifiable gate = not
    approved (an approval of this candidate is withdrawn). A registry outage raises :class:`RegistryError`.
    """
    from mlflow.exceptions import MlflowException

    tracking.require_tracking(cfg)
    names = list(gates)
    statuses: dict[str, str] = {g: "missing" for g in names}
    try:
        name, ver = resolve_version(cfg, model)
    except MlflowException as exc:
        if is_outage(exc):
            raise RegistryError(f"registry unavailable while resolving {model}: {_one_line(exc)}") from exc
        return PromoteResult(candidates_model(cfg), str(model), False, None, statuses, f"cannot resolve version: {exc}")
    except ValueError as exc:
        return PromoteResult(candidates_model(cfg), str(model), False, None, statuses, f"cannot resolve version: {exc}")
    if name != candidates_model(cfg):
        return PromoteResult(name, ver, False, None, statuses,
                             f"{name} is not the candidates' model {candidates_model(cfg)}: promote judges candidates")
    client = _client()
    target = approved_model(cfg)
    try:
        statuses, evidence = verified_gates(cfg, f"models:/{name}/{ver}", names)
        if not names:
            approved, reason = False, "no gates named: nothing can approve a model without gates"
        elif all(statuses[g] == GATE_PASSED for g in names):
            approved, reason = True, "every gate passed (verified from the gate runs)"
        else:
            approved, reason = False, f"gates not passed: { {g: s for g, s in statuses.items() if s != GATE_PASSED} }"
        if not approved:
            _withdraw_candidate(cfg, client, f"{name}/{ver}", f"re-evaluation: {reason}")
            log.info("promote %s v%s: NOT approved (%s)", name, ver, reason)
            return PromoteResult(name, ver, False, None, statuses, reason)
        tags = dict(client.get_model_version(name, ver).tags)
        _verify_stored_manifest(name, ver, tags[MANIFEST_DIGEST_TAG])
        record = {"candidate": f"{name}/{ver}", "by": identity(), "at": _dt.datetime.now(_dt.UTC).isoformat(),
                  "gates": evidence, "manifest_sha256": tags[MANIFEST_DIGEST_TAG],
                  "unet_sha256": tags.get(UNET_DIGEST_TAG, "")}
        mv = _find_version(client, target, {CANDIDATE_TAG: f"{name}/{ver}"})
        if mv is None and not _find_model(client, target):  # no auth (a laptop): nobody bootstrapped it
            client.create_registered_model(target)
        approval = {"approval.by": record["by"], "approval.at": record["at"],
                    "approval.record": json.dumps(record, sort_keys=True)[:5000]}
        if mv is None:
            keep = {k: v for k, v in tags.items() if not k.startswith(("gate.", "approval.", "revoked"))}
            # The approval record comes with the copy, in one call: a promote killed right after it never
            # leaves a version of the approved model without its record (issue #12).
            mv = client.create_model_version(target, f"models:/{name}/{ver}",
                                             tags={**keep, CANDIDATE_TAG: f"{name}/{ver}", **approval},
                                             description=client.get_model_version(name, ver).description)
        av = str(mv.version)
        for key, value in approval.items():  # a re-approval of an existing copy: the new record
            client.set_model_version_tag(target, av, key, value)
        client.delete_model_version_tag(target, av, "revoked") if "revoked" in mv.tags else None
        client.set_registered_model_alias(target, cfg.tracking.approved_alias, av)
    except IntegrityError as exc:
        return PromoteResult(name, ver, False, None, statuses, f"not approved: {exc}")
    except Exception as exc:  # noqa: BLE001 - classified: an outage is not a verdict
        if is_outage(exc):
            raise RegistryError(f"registry unavailable while promoting {name} v{ver}: {_one_line(exc)}") from exc
        return PromoteResult(name, ver, False, None, statuses, f"error while promoting (not approved): {exc}")
    log.info("promote %s v%s: approved as %s v%s by %s", name, ver, target, av, record["by"])
    return PromoteResult(name, ver, True, cfg.tracking.approved_alias, statuses, reason,
                         approved_uri=f"models:/{target}/{av}", approved_by=record["by"])


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _withdraw_candidate(cfg: RunConfig, client, candidate: str, reason: str) -> None:
    """If ``approved`` points at the approved copy of ``candidate``, revoke it (a failed re-evaluation)."""
    from mlflow.exceptions import MlflowException

    try:
        held = client.get_model_version_by_alias(approved_model(cfg), cfg.tracking.approved_alias)
    except MlflowException as exc:
        if is_outage(exc):
            raise
        return  # alias not set (or no approved model yet)
    if held.tags.get(CANDIDATE_TAG) == candidate:
        revoke(cfg, f"models:/{approved_model(cfg)}/{held.version}", reason)


def revoke(cfg: RunConfig, model: str | int, reason: str) -> RevokeResult:
    """Withdraw an approval: the approved version gets ``revoked`` (who, when, why); if ``approved``
    pointed at it, the alias moves back to the previous approval still standing, or is removed. Consumers
    pulling ``@approved`` then get that version, or a clear error. Needs the promoting identity."""
    tracking.require_tracking(cfg)
    if not reason.strip():
        raise ValueError("revoke needs a reason (it is recorded on the version)")
    ref = str(model)
    name, version, alias = parse_model_uri(cfg, ref if not ref.isdigit() else f"models:/{approved_model(cfg)}/{ref}")
    if name != approved_model(cfg):
        raise ValueError(f"{ref}: revoke withdraws approved versions of {approved_model(cfg)}, not {name}")
    client = _client()
    if alias is not None:
        version = str(client.get_model_version_by_alias(name, alias).version)
    assert version is not None
    now = _dt.datetime.now(_dt.UTC).isoformat()
    client.set_model_version_tag(name, version, "revoked", json.dumps(
        {"by": identity(), "at": now, "reason": reason}, sort_keys=True)[:5000])
    try:
        held = str(client.get_model_version_by_alias(name, cfg.tracking.approved_alias).version)
    except Exception as exc:  # noqa: BLE001 - no alias set
        if is_outage(exc):
            raise
        held = None
    now_approved = held
    if held == version:
        standing = [mv for mv in client.search_model_versions(f"name='{name}'")
                    if "approval.at" in mv.tags and "revoked" not in mv.tags and str(mv.version) != version]
        previous = max(standing, key=lambda mv: int(mv.version)) if standing else None
        if previous is not None:
            client.set_registered_model_alias(name, cfg.tracking.approved_alias, str(previous.version))
            now_approved = str(previous.version)
        else:
            client.delete_registered_model_alias(name, cfg.tracking.approved_alias)
            now_approved = None
    log.warning("revoked %s v%s (%s); @%s -> %s", name, version, reason, cfg.tracking.approved_alias,
                now_approved or "none")
    return RevokeResult(name=name, version=version, reason=reason, revoked_by=identity(), approved_now=now_approved)


# ----------------------------------------------------------------------------------------------
# Pull
# ----------------------------------------------------------------------------------------------
def _verify_manifest(pipeline_dir: Path, manifest_sha256: str | None = None) -> None:
    """Every file matches the manifest, and (given) the manifest matches the registry's digest."""
    manifest_path = pipeline_dir / MANIFEST_FILE
    if not manifest_path.exists():
        raise IntegrityError(f"{pipeline_dir} has no {MANIFEST_FILE}: not a MediSyn pipeline artifact")
    if manifest_sha256 is not None and storage.sha256(manifest_path) != manifest_sha256:
        raise IntegrityError(f"{MANIFEST_FILE} does not match the sha256 recorded in the registry: refusing a "
                             "tampered model")
    for rel, digest in json.loads(manifest_path.read_text()).items():
        f = pipeline_dir / rel
        if not f.exists() or storage.sha256(f) != digest:
            raise IntegrityError(f"pulled file {rel} is missing or corrupt (sha256 mismatch): "
                                 "refusing a tampered model")


def resolve_for_consumer(model_uri: str) -> tuple[str, str, dict[str, str]]:
    """(name, version, tags) of a registry reference a consumer pulls, refusing a revoked version or
    one without recorded digests; a missing ``@alias`` names the last revocation, if any."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    body = model_uri[len("models:/"):].strip("/")
    client = MlflowClient()
    if "@" in body:
        name, alias = body.split("@", 1)
        try:
            mv = client.get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            if is_outage(exc):
                raise RegistryError(f"registry unavailable: {_one_line(exc)}") from exc
            revoked = [m for m in client.search_model_versions(f"name='{name}'") if "revoked" in m.tags]
            why = ""
            if revoked:
                last = max(revoked, key=lambda m: int(m.version))
                why = f" (version {last.version} was revoked: {json.loads(last.tags['revoked']).get('reason')})"
            raise LookupError(f"{name} has no version with alias @{alias}{why}") from exc
    else:
        name, _, version = body.rpartition("/")
        mv = client.get_model_version(name, version)
    tags = dict(mv.tags)
    if "revoked" in tags:
        raise LookupError(f"{name} v{mv.version} was revoked: {json.loads(tags['revoked']).get('reason')}")
    if not tags.get(MANIFEST_DIGEST_TAG):
        raise IntegrityError(f"{name} v{mv.version} has no {MANIFEST_DIGEST_TAG} tag: nothing to verify it against")
    return name, str(mv.version), tags


def pull(model_uri: str, dest: str | os.PathLike, overwrite: bool = False) -> Path:
    """Download a registered version's diffusers pipeline directory to ``dest``; returns ``dest``.

    ``StableDiffusionXLPipeline.from_pretrained(dest)`` works on the result. The manifest's sha256 must
    equal the digest recorded on the version in the registry, and every file must match the manifest
    (else :class:`IntegrityError`); a revoked version is refused. ``dest`` appears only when complete
    (download beside it, verify, rename). Uses the current MLflow tracking URI ($MLFLOW_TRACKING_URI).
    """
    import mlflow

    dest = Path(dest).expanduser().resolve()
    if dest.exists() and any(dest.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{dest} exists and is not empty (pass overwrite=True / --overwrite)")
    digest: str | None = None
    if model_uri.startswith("models:/"):
        name, version, tags = resolve_for_consumer(model_uri)
        model_uri, digest = f"models:/{name}/{version}", tags[MANIFEST_DIGEST_TAG]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.pull-", dir=dest.parent))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(tmp)))
        candidates = [local / "artifacts" / PIPELINE_ARTIFACT, local / PIPELINE_ARTIFACT]
        candidates += [p.parent for p in local.rglob("model_index.json")]
        pipeline_dir = next((c for c in candidates if (c / "model_index.json").exists()), None)
        if pipeline_dir is None:
            raise ValueError(f"{model_uri} holds no diffusers pipeline (no model_index.json)")
        _verify_manifest(pipeline_dir, digest)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(pipeline_dir, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("pulled %s -> %s (verified against the registry's digest)", model_uri, dest)
    return dest


def pull_cached(model_uri: str) -> Path:
    """Like :func:`pull` into the local model cache, keyed by the resolved version (aliases move). A
    cached copy is used only while its manifest still matches the registry's digest."""
    import mlflow

    from medisyn.models.sdxl import cache_dir

    name, version, tags = resolve_for_consumer(model_uri)
    server = hashlib.sha256(mlflow.get_registry_uri().encode()).hexdigest()[:12]  # versions are per server
    dest = cache_dir() / "registry" / server / f"{_slug(name)}-v{version}"
    if (dest / "model_index.json").exists():
        try:
            _verify_manifest(dest, tags[MANIFEST_DIGEST_TAG])
            return dest
        except IntegrityError as exc:
            log.warning("cached copy %s fails verification (%s): pulling again", dest, exc)
    return pull(f"models:/{name}/{version}", dest, overwrite=True)
