"""The consumer's side: resolve a reference (refusing a revoked version or one without digests), pull
its files and verify them before anything is loaded: for an approved version, the promoter's signature
over every file (issue #21); for a candidate (the gates, the reader study), the registry's digests."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from medisyn import signing, storage
from medisyn.registry.names import (
    APPROVAL_FILE,
    APPROVAL_SIGNATURE_TAG,
    DOWNLOAD_METADATA_FILES,
    MANIFEST_DIGEST_TAG,
    MANIFEST_FILE,
    PIPELINE_ARTIFACT,
    IntegrityError,
    RegistryError,
    _one_line,
    _slug,
    is_outage,
)

log = logging.getLogger("medisyn.registry")


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


def verify_approval(name: str | None, version: str | None, envelope_json: str | None, model_dir: Path,
                    prefix: str = "") -> dict:
    """The promoter's signature over the files in ``model_dir`` (the version's files below ``prefix``, e.g.
    ``artifacts/pipeline/`` for a pulled pipeline directory), checked against the trust policy
    ($MEDISYN_TRUST_DIR/promoter*.pub) before any of them is loaded; IntegrityError naming what failed
    (no signature: not an approved version; an untrusted key; another version; a changed, added or missing
    file). ``name``/``version`` None: whichever version the signature approves (offline checks). Returns
    the verified statement."""
    label = f"{name} v{version}" if name else str(model_dir)
    if not envelope_json:
        raise IntegrityError(f"{label} carries no promoter signature: not an approved version "
                             "(consumers load approved versions only)")
    try:
        statement = signing.verify_envelope(json.loads(envelope_json), signing.trusted_keys("promoter"),
                                            signing.APPROVAL_PREDICATE)
    except (signing.SignatureError, ValueError) as exc:
        raise IntegrityError(f"{label}: promoter signature refused: {exc}") from None
    approved = statement["predicate"].get("approved")
    if name is not None and approved != f"{name}/{version}":
        raise IntegrityError(f"{label}: the signature approves {approved!r}, not this version")
    signed = {k[len(prefix):]: v for k, v in signing.statement_digests(statement).items() if k.startswith(prefix)}
    try:
        signing.check_subject({"subject": [{"name": k, "digest": {"sha256": v}} for k, v in signed.items()]},
                              signing.directory_digests(model_dir, exclude=[APPROVAL_FILE, *DOWNLOAD_METADATA_FILES]))
    except signing.SignatureError as exc:
        raise IntegrityError(f"{label}: {exc}: refusing a tampered model") from None
    return statement


def verify_pulled(pipeline_dir: str | os.PathLike) -> dict:
    """Offline check of a directory made by ``medisyn pull``: its ``medisyn_approval.dsse.json`` verifies
    against the trust policy and covers exactly its files. No registry is needed, so a revocation after
    the pull is not seen: that is the caller's stated risk (docs/registry.md)."""
    d = Path(pipeline_dir)
    envelope = (d / APPROVAL_FILE).read_text() if (d / APPROVAL_FILE).is_file() else None
    return verify_approval(None, None, envelope, d, prefix=f"artifacts/{PIPELINE_ARTIFACT}/")


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


def pull(model_uri: str, dest: str | os.PathLike, overwrite: bool = False, approved_only: bool = True) -> Path:
    """Download a registered version's diffusers pipeline directory to ``dest``; returns ``dest``.

    ``StableDiffusionXLPipeline.from_pretrained(dest)`` works on the result. The manifest's sha256 must
    equal the digest recorded on the version in the registry, and every file must match the manifest
    (else :class:`IntegrityError`); a revoked version is refused. With ``approved_only`` (consumers: the
    default) the version must also carry the promoter's signature over every file it holds, verified
    before anything is moved into place; ``dest`` then holds ``medisyn_approval.dsse.json`` for offline
    checks (:func:`verify_pulled`). ``dest`` appears only when complete (download beside it, verify,
    rename). Uses the current MLflow tracking URI ($MLFLOW_TRACKING_URI).
    """
    import mlflow

    dest = Path(dest).expanduser().resolve()
    if dest.exists() and any(dest.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{dest} exists and is not empty (pass overwrite=True / --overwrite)")
    digest: str | None = None
    tags: dict[str, str] = {}
    name = version = ""
    if model_uri.startswith("models:/"):
        name, version, tags = resolve_for_consumer(model_uri)
        model_uri, digest = f"models:/{name}/{version}", tags[MANIFEST_DIGEST_TAG]
    elif approved_only:
        raise IntegrityError(f"{model_uri}: consumers pull registered approved versions (models:/...) only")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.pull-", dir=dest.parent))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(tmp)))
        candidates = [local / "artifacts" / PIPELINE_ARTIFACT, local / PIPELINE_ARTIFACT]
        candidates += [p.parent for p in local.rglob("model_index.json")]
        pipeline_dir = next((c for c in candidates if (c / "model_index.json").exists()), None)
        if pipeline_dir is None:
            raise ValueError(f"{model_uri} holds no diffusers pipeline (no model_index.json)")
        if approved_only:  # every file of the version, before any of it is used (issue #21)
            verify_approval(name, version, tags.get(APPROVAL_SIGNATURE_TAG), local)
            (pipeline_dir / APPROVAL_FILE).write_text(tags[APPROVAL_SIGNATURE_TAG])
        _verify_manifest(pipeline_dir, digest)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(pipeline_dir, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("pulled %s -> %s (verified against the registry's digest)", model_uri, dest)
    return dest


def pull_cached(model_uri: str, approved_only: bool = True) -> Path:
    """Like :func:`pull` into the local model cache, keyed by the resolved version (aliases move). A
    cached copy is used only while its manifest still matches the registry's digest (and, for approved
    versions, its promoter signature still covers it)."""
    import mlflow

    from medisyn.models.sdxl import cache_dir

    name, version, tags = resolve_for_consumer(model_uri)
    server = hashlib.sha256(mlflow.get_registry_uri().encode()).hexdigest()[:12]  # versions are per server
    dest = cache_dir() / "registry" / server / f"{_slug(name)}-v{version}"
    if (dest / "model_index.json").exists():
        try:
            _verify_manifest(dest, tags[MANIFEST_DIGEST_TAG])
            if approved_only:
                verify_approval(name, version, tags.get(APPROVAL_SIGNATURE_TAG), dest,
                                prefix=f"artifacts/{PIPELINE_ARTIFACT}/")
            return dest
        except IntegrityError as exc:
            log.warning("cached copy %s fails verification (%s): pulling again", dest, exc)
    return pull(f"models:/{name}/{version}", dest, overwrite=True, approved_only=approved_only)
