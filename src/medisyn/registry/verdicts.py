"""Gate verdicts: recorded as the gate's own MLflow run (artifact and immutable params pinning it),
mirrored on the candidate version's tags for people, and verified from the run, never from a tag
(docs/gates.md)."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medisyn import storage, tracking
from medisyn.config import RunConfig
from medisyn.registry.attestation import attest_gate
from medisyn.registry.card import _update_card
from medisyn.registry.names import (
    GATE_FAILED,
    GATE_PASSED,
    MANIFEST_DIGEST_TAG,
    VERDICT_ARTIFACT,
    _client,
    _sha256_bytes,
    identity,
    is_outage,
    resolve_version,
)

log = logging.getLogger("medisyn.registry")


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
        "config_sha256": cfg.config_hash(), "details": details,
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
    # The proof (issue #21): the verdict signed with the gate key, about every file of the version.
    attestation = attest_gate(run_id, name, version, verdict)
    if created:
        client.set_terminated(run_id)
    client.set_model_version_tag(name, version, f"gate.{gate}.attestation_sha256", attestation or "unsigned")
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
