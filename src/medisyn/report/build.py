"""Collect the evidence of one model version, render its report, write it and log it.

Everything is read back from where the stages persisted it, so a report can be rebuilt at any time
from the registry and storage alone:

* MLflow: the version (aliases, tags: lineage, gate verdicts and ``gate.<name>.report_uri``,
  ``scores_uri``), its description (the model card) and the card's context on the version's run;
* storage: the score prefix (``ScoreResult``: FID per epoch, N, extractor provenance; ``grids/``),
  the privacy gate's prefix (``report.json`` with Table 1 per specialty and the calibrated reference,
  ``pairs.jsonl``, ``reference.jsonl``, ``samples/``, ``pairs/``) and the utility gate's prefix
  (``report.json`` with per-class AUROCs, CIs and recognisability, ``roc_<task>.npz``);
* the reader study, when ``medisyn.study`` is installed and the version has one.

Missing evidence never stops the report: the section says what is missing and why (an older
version, a gate that errored or was skipped), and :class:`ReportResult` lists it.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from medisyn import storage, tracking
from medisyn.config import RunConfig
from medisyn.report.evidence import Evidence, PrivacyEvidence, UtilityEvidence
from medisyn.results import StageResult

log = logging.getLogger("medisyn.report")

REPORT_FILE = "report.html"
ARTIFACT_PATH = "report"  # on the version's run: report/report.html
REPORT_TAG = "report"  # version tag: runs:/<run id>/report/report.html
REPORT_URI_TAG = "report.uri"  # version tag: where report.html was written on storage


@dataclass(frozen=True)
class ReportResult(StageResult):
    model: str  # the reference as given (an alias is resolved at run time)
    name: str
    version: str
    report_uri: str  # <out>/report.html
    artifact_uri: str  # runs:/<run id>/report/report.html ("" when the version has no run)
    sections: tuple[str, ...]  # the page's section ids, in order
    missing: tuple[str, ...] = ()  # evidence that was not found, in words


# ----------------------------------------------------------------------------------------------
# Collecting
# ----------------------------------------------------------------------------------------------
def _read_jsonl(uri: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


def _gate_prefix(tags: dict[str, str], gates: dict[str, dict[str, Any]], gate: str) -> str | None:
    """The output prefix of a gate's last run on the version: its ``gate.<name>.report_uri`` tag, else
    the report URI inside the (possibly truncated) details tag."""
    uri = tags.get(f"gate.{gate}.report_uri")
    details = gates.get(gate, {}).get("details")
    if not uri and isinstance(details, dict):
        uri = details.get("report_uri")
    return str(uri).rsplit("/", 1)[0] if uri else None


def _privacy_evidence(prefix: str) -> PrivacyEvidence:
    report = storage.read_json(storage.join(prefix, "report.json"))
    ref_uri = storage.join(prefix, "reference.jsonl")
    samples: list[dict[str, Any]] = []
    if storage.exists(storage.join(prefix, "samples.json")):
        for row in storage.read_json(storage.join(prefix, "samples.json")):
            samples.append(row | {"png": storage.read_bytes(storage.join(prefix, row["file"]))})
    pair_images: list[dict[str, Any]] = []
    if storage.exists(storage.join(prefix, "pair_images.json")):
        for row in storage.read_json(storage.join(prefix, "pair_images.json")):
            pair_images.append(row | {"synthetic_png": storage.read_bytes(storage.join(prefix, row["synthetic_file"])),
                                      "real_png": storage.read_bytes(storage.join(prefix, row["real_file"]))})
    return PrivacyEvidence(
        prefix=prefix, report=report, pairs=_read_jsonl(storage.join(prefix, "pairs.jsonl")),
        reference=_read_jsonl(ref_uri) if storage.exists(ref_uri) else [], samples=samples, pair_images=pair_images)


def _utility_evidence(prefix: str) -> UtilityEvidence:
    report = storage.read_json(storage.join(prefix, "report.json"))
    roc: dict[str, dict[str, np.ndarray]] = {}
    for task in report.get("tasks", []):
        uri = storage.join(prefix, task.get("roc_file") or f"roc_{task['task']['name']}.npz")
        if storage.exists(uri):
            with np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False) as z:
                roc[task["task"]["name"]] = {k: z[k] for k in z.files}
    return UtilityEvidence(prefix=prefix, report=report, roc=roc)


def _study(model_uri: str) -> tuple[Any | None, str]:
    """The reader-study hook (issue #15): the version's closed study, when medisyn.study exists and has one."""
    try:
        from medisyn.study.report import load_study_report
    except ImportError:
        return None, "the reader-study package (medisyn.study) is not installed here"
    try:
        return load_study_report(model_uri), ""
    except Exception as exc:  # noqa: BLE001 - optional evidence: say why it is absent, never fail the report
        return None, f"no reader study recorded for this version ({type(exc).__name__}: {exc})"


def _iso(ms: int | None) -> str:
    import datetime as _dt

    return _dt.datetime.fromtimestamp(ms / 1000, _dt.UTC).isoformat(timespec="seconds") if ms else ""


def collect_evidence(cfg: RunConfig, model: str) -> Evidence:
    """Everything the report shows for the version ``model`` (``models:/name/version`` or ``@alias``)."""
    import mlflow

    from medisyn import registry
    from medisyn.evaluate.fid import ScoreResult

    tracking.require_tracking(cfg)
    name, version = registry.resolve_version(cfg, model)
    client = mlflow.MlflowClient()
    mv = client.get_model_version(name, version)
    aliases = sorted(a for a, v in (client.get_registered_model(name).aliases or {}).items() if str(v) == version)
    tags = dict(mv.tags)
    ev = Evidence(model=str(model), name=name, version=version, aliases=aliases, tags=tags, run_id=mv.run_id or "",
                  created=_iso(mv.creation_timestamp), card_markdown=mv.description or "", card_context={},
                  gates=registry.gates_from_tags(tags))
    if ev.run_id:
        try:
            ev.card_context = mlflow.artifacts.load_dict(f"runs:/{ev.run_id}/{registry.CARD_CONTEXT}")
        except Exception as exc:  # noqa: BLE001 - the tags still carry the lineage
            ev.notes["model-card"] = f"model card context unavailable: {exc}"

    scores_uri = tags.get("scores_uri")
    if scores_uri:
        try:
            ev.score = ScoreResult.load(scores_uri)
            for uri in storage.listdir(storage.join(scores_uri, "grids")):
                if uri.endswith(".png"):
                    ev.fid_grids[uri.rsplit("/", 1)[1][:-4]] = storage.read_bytes(uri)
        except Exception as exc:  # noqa: BLE001
            ev.notes["fid"] = f"FID evidence at {scores_uri} unreadable: {exc}"
    else:
        ev.notes["fid"] = "the version has no scores_uri tag (registered before the report existed): FID from the card"

    for gate, attr in (("privacy", "privacy"), ("utility", "utility")):
        prefix = _gate_prefix(tags, ev.gates, gate)
        status = ev.gates.get(gate, {}).get("status", "not recorded")
        if not prefix:
            ev.notes[gate] = f"the {gate} gate left no report (verdict: {status})"
            continue
        try:
            loader = _privacy_evidence if gate == "privacy" else _utility_evidence
            setattr(ev, attr, loader(prefix))
        except Exception as exc:  # noqa: BLE001
            ev.notes[gate] = f"the {gate} gate's outputs at {prefix} are unreadable: {exc}"
    ev.approval = _approval_of(cfg, client, name, version, aliases, tags)
    ev.study, why = _study(f"models:/{name}/{version}")
    if why:
        ev.notes["reader-study"] = why
    return ev


def _approval_of(cfg: RunConfig, client: Any, name: str, version: str, aliases: list[str],
                 tags: dict[str, str]) -> dict[str, Any] | None:
    """Whether this version was approved. Candidates are never aliased ``approved`` themselves: the
    promoter copies an approved candidate into ``<model_name>`` (issue #10), tagged with its origin."""
    from medisyn import registry

    if name != registry.candidates_model(cfg):  # the approved model's own version
        return {"name": name, "version": version, "aliases": aliases, "tags": tags} if "approved" in aliases or \
            registry.CANDIDATE_TAG in tags else None
    target = registry.approved_model(cfg)
    origin = f"{name}/{version}"
    try:
        copies = [mv for mv in client.search_model_versions(f"name='{target}'")
                  if mv.tags.get(registry.CANDIDATE_TAG) == origin]
        if not copies:
            return None
        mv = max(copies, key=lambda m: int(m.version))
        held = sorted(a for a, v in (client.get_registered_model(target).aliases or {}).items()
                      if str(v) == str(mv.version))
    except Exception:  # noqa: BLE001 - a reader without access to the approved model sees the candidate only
        return None
    return {"name": target, "version": str(mv.version), "aliases": held, "tags": dict(mv.tags)}


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------
def write_report(cfg: RunConfig, model: str, out: str) -> ReportResult:
    """Write the evaluation report of ``model`` to ``<out>/report.html`` (atomically), log it to the
    version's MLflow run as ``report/report.html`` and tag the version (``report``, ``report.uri``)."""
    import mlflow

    from medisyn.report.html import render

    ev = collect_evidence(cfg, model)
    page = render(ev)
    report_uri = storage.join(storage.normalize(out), REPORT_FILE)
    storage.write_text(report_uri, page.html)  # temp name + rename (one PUT on S3): never half a page
    client = mlflow.MlflowClient()
    artifact = ""
    if ev.run_id:
        client.log_text(ev.run_id, page.html, f"{ARTIFACT_PATH}/{REPORT_FILE}")
        artifact = f"runs:/{ev.run_id}/{ARTIFACT_PATH}/{REPORT_FILE}"
        client.set_model_version_tag(ev.name, ev.version, REPORT_TAG, artifact)
    client.set_model_version_tag(ev.name, ev.version, REPORT_URI_TAG, report_uri)
    log.info("evaluation report of %s v%s: %s (%d sections%s)", ev.name, ev.version, report_uri, len(page.sections),
             f"; missing: {'; '.join(ev.notes.values())}" if ev.notes else "")
    return ReportResult(model=str(model), name=ev.name, version=ev.version, report_uri=report_uri,
                        artifact_uri=artifact, sections=tuple(page.sections),
                        missing=tuple(v for k, v in ev.notes.items() if k != "reader-study"))  # the study is optional
