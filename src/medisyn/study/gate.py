"""The optional human gate (issue #15): approval waits for a closed reader study of the version whose
synthetic accuracy is not below its real accuracy by more than ``study.human_gate.margin``.

Fail closed, like every gate: no closed study of this version, fewer than
``study.human_gate.min_readers`` readers who answered every image, or any error is a failed
verdict with its reason. Run through the stage runner (``medisyn human-gate``), which records the
verdict on the version (``gate.human``); with ``study.human_gate.enabled`` promote requires it.
"""

from __future__ import annotations

from sqlalchemy import select

from medisyn import registry
from medisyn.config import RunConfig
from medisyn.evaluate.gates import GateResult, failed_result
from medisyn.study import db
from medisyn.study.report import compute_stats

GATE = "human"


def closed_study_of(engine, model_name: str, version: str, study_id: str = "") -> str | None:
    """The study to judge: ``study_id`` if it is a closed study of this version, else the most recently
    closed study of the version; None when there is none."""
    with db.session(engine) as s:
        q = select(db.Study).where(db.Study.model_name == model_name, db.Study.model_version == version,
                                   db.Study.closed_at.is_not(None))
        if study_id:
            q = q.where(db.Study.id == study_id)
        study = s.scalars(q.order_by(db.Study.closed_at.desc()).limit(1)).first()
        return study.id if study is not None else None


def human_gate(cfg: RunConfig, model: str, out: str = "", study: str = "", db_url: str | None = None) -> GateResult:
    """Judge the version of ``model`` on its closed reader study (pooled over complete readers)."""
    gate_cfg = cfg.study.human_gate
    name, version = registry.resolve_version(cfg, model)
    engine = db.open_db(db_url or cfg.study.db_url)
    study_id = closed_study_of(engine, name, version, study)
    if study_id is None:
        which = f"study {study}" if study else "reader study"
        return failed_result(GATE, f"no closed {which} of {name} version {version}: create one (medisyn study "
                             "create), let the readers finish, close it (medisyn study close), then rerun this gate",
                             model_name=name, model_version=version)
    stats = compute_stats(engine, study_id)
    complete = [r for r in stats.readers if r.complete]
    metrics: dict = {"study_id": study_id, "model_name": name, "model_version": version,
                     "readers": len(stats.readers), "complete_readers": len(complete),
                     "margin": gate_cfg.margin, "min_readers": gate_cfg.min_readers,
                     "fleiss_kappa": stats.fleiss_kappa.get("all")}
    if len(complete) < gate_cfg.min_readers:
        return failed_result(GATE, f"study {study_id} has {len(complete)} readers who answered every image; the "
                             f"gate needs {gate_cfg.min_readers} (study.human_gate.min_readers)", **metrics)
    acc = {}
    for origin in db.ORIGINS:
        n = sum(getattr(r, origin).n for r in complete)
        k = sum(getattr(r, origin).correct for r in complete)
        acc[origin] = k / n if n else 0.0
        metrics[f"{origin}_accuracy"], metrics[f"{origin}_answers"] = acc[origin], n
    gap = acc["real"] - acc["synthetic"]
    metrics["accuracy_gap"] = gap
    passed = gap <= gate_cfg.margin + 1e-12
    reason = (f"synthetic accuracy {100 * acc['synthetic']:.2f} % vs real {100 * acc['real']:.2f} % "
              f"({len(complete)} readers, study {study_id}): {'within' if passed else 'beyond'} the margin of "
              f"{100 * gate_cfg.margin:.2f} points")
    return GateResult(gate=GATE, passed=passed, metrics=metrics, reasons=(reason,))
