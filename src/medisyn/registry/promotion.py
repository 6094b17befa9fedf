"""Promotion and revocation: a candidate whose gate runs prove a pass is copied into the approved
model with its digests and an approval record, and alias ``approved`` moves to it; ``revoke``
withdraws an approval with a reason (mlflow/REGISTRY.md, issue #10)."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medisyn import signing, tracking
from medisyn.config import RunConfig
from medisyn.registry.attestation import verify_gate_attestation, version_digests
from medisyn.registry.names import (
    APPROVAL_SIGNATURE_TAG,
    CANDIDATE_TAG,
    GATE_PASSED,
    MANIFEST_DIGEST_TAG,
    MANIFEST_FILE,
    PIPELINE_ARTIFACT,
    UNET_DIGEST_TAG,
    IntegrityError,
    RegistryError,
    _client,
    _find_model,
    _find_version,
    _one_line,
    _sha256_bytes,
    approved_model,
    candidates_model,
    identity,
    is_outage,
    parse_model_uri,
    resolve_version,
)
from medisyn.registry.verdicts import verified_gates
from medisyn.results import StageResult
from medisyn.signing import SignatureError

log = logging.getLogger("medisyn.registry")


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
        if approved:
            approved, reason = _verify_attestations(name, ver, names, statuses, evidence)
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
        # signed before the alias moves: consumers load only what the promoter signed (issue #21)
        client.set_model_version_tag(target, av, APPROVAL_SIGNATURE_TAG,
                                     _sign_approval(target, av, record, evidence))
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


def _verify_attestations(name: str, ver: str, gates: Sequence[str], statuses: dict[str, str],
                         evidence: dict) -> tuple[bool, str]:
    """Every gate's signed verdict verifies against the trust policy and its subject is exactly the
    candidate's files as the registry serves them now (downloaded here, once). Updates ``statuses`` and
    ``evidence`` in place; returns (approved, reason)."""
    digests = version_digests(name, ver)
    refused = {}
    for gate in gates:
        try:
            evidence[gate] = dict(evidence.get(gate) or {}) | verify_gate_attestation(
                gate, evidence[gate]["run_id"], name, ver, digests)
        except SignatureError as exc:
            statuses[gate] = f"unverified (signature: {exc})"
            refused[gate] = statuses[gate]
    if refused:
        return False, f"gates not passed: {refused}"
    return True, "every gate passed (signed verdicts verified against the trust policy and the candidate's files)"


def _sign_approval(target: str, av: str, record: dict, evidence: dict) -> str:
    """The promoter's DSSE envelope (JSON) over every file of the approved version ``target``/``av`` as the
    registry serves it, which must be the very files the gates signed; IntegrityError otherwise, or when
    no promoter key is mounted here ($MEDISYN_SIGNING_KEYS_DIR/promoter, a Secret of the promote step)."""
    key = signing.signing_key("promoter")
    if key is None:
        raise IntegrityError(f"no promoter signing key under ${signing.KEYS_DIR_ENV}/promoter: approvals are signed, "
                             "and consumers load nothing unsigned")
    digests = version_digests(target, av)
    signed_by_gates = {e.get("subject_sha256") for e in evidence.values()}
    if signed_by_gates != {signing.subject_digest(digests)}:
        raise IntegrityError(f"{target} v{av}: its files are not the ones the gates signed (changed since the "
                             "verdicts were checked?)")
    predicate = {"approved": f"{target}/{av}", "candidate": record["candidate"], "by": record["by"],
                 "at": record["at"], "gates": {g: {k: e.get(k) for k in ("attestation_keyid", "subject_sha256")}
                                               for g, e in evidence.items()}}
    envelope = signing.sign_statement(signing.make_statement(digests, signing.APPROVAL_PREDICATE, predicate), key)
    return json.dumps(envelope, sort_keys=True)


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
