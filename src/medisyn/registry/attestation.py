"""Signed gate verdicts (issue #21): what a gate attests, and what ``promote`` checks before it approves.

A gate run, its params and its ``gate/verdict.json`` can all be written by whoever holds the pipeline
identity's credentials, so none of them proves a verdict. The proof is a DSSE envelope signed with the
gate key (a Secret mounted into the gate steps only, :data:`medisyn.signing.KEYS_DIR_ENV`):

* subject: every file of the judged candidate version (weights, ``MLmodel``, the pyfunc's loader code,
  the environment files), by path and sha256, as downloaded from the registry;
* predicate (:data:`medisyn.signing.GATE_PREDICATE`): the gate, the verdict, the version it judged,
  its manifest digest, the sha256 of every file of the gate's report, the run config's hash and the
  time.

The envelope is stored as the gate run's artifact ``gate/attestation.dsse.json``: the run is only where
it is kept. ``promote`` downloads the candidate's files itself and accepts a gate only when an envelope
verifies against the trust policy (:data:`medisyn.signing.TRUST_DIR_ENV`), says passed for this very
version and gate, and its subject is exactly the files now in the registry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medisyn import signing
from medisyn.registry.names import DOWNLOAD_METADATA_FILES
from medisyn.signing import SignatureError

log = logging.getLogger("medisyn.registry")

ATTESTATION_ARTIFACT = "gate/attestation.dsse.json"


def download_version(name: str, version: str, dst: str | Path) -> Path:
    """Every file of a registered version, downloaded from the registry's artifact store into ``dst``."""
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dst)))


def version_digests(name: str, version: str) -> dict[str, str]:
    """{path: sha256} of every file of a registered version, as the registry serves it now."""
    with tempfile.TemporaryDirectory(prefix="medisyn-attest-") as tmp:
        return signing.directory_digests(download_version(name, version, tmp), exclude=DOWNLOAD_METADATA_FILES)


def attest_gate(run_id: str, name: str, version: str, verdict: Mapping[str, Any]) -> str | None:
    """Sign the gate's verdict about every file of ``name``/``version`` with this process's gate key and
    store the envelope in the gate run; returns the envelope's sha256, or None when no gate key is
    mounted here (the verdict then stays unsigned, and ``promote`` will not accept it)."""
    from mlflow import MlflowClient

    key = signing.signing_key("gate")
    if key is None:
        log.warning("no gate signing key under $%s: the %s verdict on %s v%s is unsigned and cannot approve",
                    signing.KEYS_DIR_ENV, verdict.get("gate"), name, version)
        return None
    predicate = {k: verdict.get(k) for k in ("gate", "passed", "model", "manifest_sha256", "report_sha256",
                                            "config_sha256", "at")}
    envelope = signing.sign_statement(signing.make_statement(version_digests(name, version),
                                                             signing.GATE_PREDICATE, predicate), key)
    blob = json.dumps(envelope, sort_keys=True)
    MlflowClient().log_text(run_id, blob, ATTESTATION_ARTIFACT)
    return hashlib.sha256(blob.encode()).hexdigest()


def _download_attestation(run_id: str) -> dict:
    import mlflow

    with tempfile.TemporaryDirectory(prefix="medisyn-attest-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run_id}/{ATTESTATION_ARTIFACT}",
                                                    dst_path=tmp)
        return signing.read_envelope(local)


def verify_gate_attestation(gate: str, run_id: str, name: str, version: str, digests: Mapping[str, str]) -> dict:
    """The verified predicate of ``gate``'s signed verdict on ``name``/``version`` (stored in ``run_id``),
    or :class:`SignatureError` naming what failed: no envelope, a signature by an untrusted key, another
    gate or version, not passed, or a subject that is not exactly ``digests`` (the candidate's files now)."""
    from mlflow.exceptions import MlflowException

    try:
        envelope = _download_attestation(run_id)
    except (MlflowException, OSError, SignatureError) as exc:
        from medisyn.registry.names import is_outage

        if is_outage(exc):
            raise
        raise SignatureError(f"no signed attestation in gate run {run_id} ({type(exc).__name__})") from None
    statement = signing.verify_envelope(envelope, signing.trusted_keys("gate"), signing.GATE_PREDICATE)
    predicate = statement.get("predicate") or {}
    if predicate.get("gate") != gate:
        raise SignatureError(f"the attestation is about gate {predicate.get('gate')!r}, not {gate!r}")
    if predicate.get("model") != f"{name}/{version}":
        raise SignatureError(f"the attestation judged {predicate.get('model')!r}, not {name}/{version}")
    if predicate.get("passed") is not True:
        raise SignatureError("the signed verdict is not passed")
    signing.check_subject(statement, digests)
    return {"attestation_keyid": statement["_signed_by"], "attested_at": predicate.get("at"),
            "subject_sha256": signing.subject_digest(digests)}
