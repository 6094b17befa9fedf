"""The registry's vocabulary: the two registered models, references to their versions, the tag and
artifact names every part relies on, and the errors (docs/registry.md; the conventions are in
:mod:`medisyn.registry`). The bottom of the package: packaging, verdicts, promotion and pulling import it.
"""

from __future__ import annotations

import hashlib
import os
import re

from medisyn.config import RunConfig

PIPELINE_ARTIFACT = "pipeline"
MODEL_INFO_FILE = "medisyn_model.json"
MANIFEST_FILE = "medisyn_manifest.json"
#: The promoter's DSSE envelope over every file of an approved version (issue #21): a version tag of the
#: approved model (which only the promoter may edit), and the file a consumer writes beside what it pulled.
APPROVAL_SIGNATURE_TAG = "approval.signature"
APPROVAL_FILE = "medisyn_approval.dsse.json"
#: Written by MLflow into every download of a registered version (its name and version, so it differs
#: between a candidate and its approved copy): not part of the model, never signed or checked.
DOWNLOAD_METADATA_FILES = ("registered_model_meta",)
CARD_CONTEXT = "model_card/context.json"
CARD_FILE = "model_card/model_card.md"
GATE_PASSED, GATE_FAILED = "passed", "failed"
CANDIDATES_SUFFIX = "-candidates"  # the candidates' registered model: <tracking.model_name>-candidates
VERDICT_ARTIFACT = "gate/verdict.json"  # in the gate's run: the verdict whose sha256 the run's params pin
# Version tags written at registration (pipeline) and copied at approval (promoter): the integrity anchors.
MANIFEST_DIGEST_TAG, UNET_DIGEST_TAG = "medisyn.manifest_sha256", "medisyn.unet_sha256"
CANDIDATE_TAG = "medisyn.candidate"  # on an approved version: <candidates model>/<version> it was copied from
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


class RegistryError(RuntimeError):
    """The registry or the artifact store could not be reached or refused the platform's identity: not a
    verdict. The CLI exits non-zero with this one-line reason (never a successful "not approved")."""


class IntegrityError(ValueError):
    """A model's files do not match the digests recorded in the registry: refused, never loaded."""


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


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "unknown"


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
