"""The outcome of one pipeline run, recorded where people look (issue #13).

The pipeline's exit handler runs the ``record-outcome`` stage whatever happened inside the run: it
writes the run's status, the step that failed and why onto the run's parent MLflow run (tags
``medisyn.outcome.*``; the run is then ended FINISHED, FAILED or KILLED) and, when the run got as far
as registering a version, onto that model version (tags ``pipeline.status``, ``pipeline.failed_step``,
``pipeline.failure_reason``). A failed run no longer leaves a parent run RUNNING with nothing on it.

An exit handler sees only the pipeline's parameters and its final status, not the steps' outputs,
so the run is found from its layout: ``<root or storage.root>/<run tag>`` holds the plan's
``result.json`` (the RunPlan), which names the stored config (with the parent run's id) and every
step's output prefix. The failed step is the first one whose MLflow run ended FAILED, else the
first step in pipeline order whose output has no ``result.json``; the reason is that run's
``medisyn.job.failure_reason`` or ``medisyn.error`` tag (written by the launcher and the stage
runner), else the orchestrator's error message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from medisyn import storage, tracking
from medisyn.config import RunConfig, load_config
from medisyn.results import ResultError, StageResult
from medisyn.run_plan import RunPlan

log = logging.getLogger("medisyn.outcome")

SUCCEEDED, FAILED, CANCELLED = "SUCCEEDED", "FAILED", "CANCELLED"
_END_STATUS = {SUCCEEDED: "FINISHED", FAILED: "FAILED", CANCELLED: "KILLED"}  # MLflow run statuses

#: Steps in pipeline order with the RunPlan field naming their output prefix.
STEP_OUTPUTS: tuple[tuple[str, str], ...] = (
    ("preprocess", "dataset_uri"), ("encode", "cache_uri"), ("train", "checkpoints_uri"),
    ("score", "scores_uri"), ("register", "register_uri"), ("privacy-gate", "privacy_uri"),
    ("utility-gate", "utility_uri"), ("promote", "promote_uri"),
)


@dataclass(frozen=True)
class PipelineOutcome(StageResult):
    pipeline_run_id: str
    status: str  # SUCCEEDED | FAILED | CANCELLED (the orchestrator's final status)
    failed_step: str  # "" when the run succeeded
    reason: str  # why it failed ("" when it succeeded)
    parent_run_id: str  # the MLflow run the outcome was recorded on ("" when tracking is off)
    model_version: str  # "<name>/<version>" the outcome was recorded on ("" when none was registered)


def _plan(run_uri: str) -> RunPlan | None:
    try:
        return RunPlan.load(run_uri)
    except ResultError:
        return None


def _failed_stage_run(client: Any, parent_run_id: str) -> tuple[str, str] | None:
    """(stage, reason) of the first nested stage run that ended FAILED."""
    run = client.get_run(parent_run_id)
    runs = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              order_by=["attributes.start_time ASC"], max_results=200)
    for r in runs:
        if r.info.status == "FAILED":
            tags = r.data.tags
            reason = tags.get("medisyn.job.failure_reason") or tags.get("medisyn.error") or ""
            return tags.get("medisyn.stage", r.info.run_name or "?"), reason
    return None


def _registered(register_uri: str) -> tuple[str, str] | None:
    """(name, version) from register's result.json (its ``models:/<name>/<version>``), None before register."""
    uri = storage.join(register_uri, "result.json")
    if not storage.exists(uri):
        return None
    model_uri = str((storage.read_json(uri).get("result") or {}).get("model_uri", ""))
    name, _, version = model_uri.removeprefix("models:/").rpartition("/")
    return (name, version) if name and version.isdigit() else None


def _first_missing_output(plan: RunPlan) -> str:
    for step, field_name in STEP_OUTPUTS:
        if not storage.exists(storage.join(getattr(plan, field_name), "result.json")):
            return step
    return ""


def record_outcome(cfg: RunConfig, root: str = "", run_tag: str = "", pipeline_run_id: str = "",
                   status: str = FAILED, error: str = "") -> PipelineOutcome:
    """Record ``status`` (and, when not SUCCEEDED, the failed step and the reason) on the run's parent
    MLflow run and its registered version; see the module docstring."""
    status = status.upper() if status.upper() in _END_STATUS else FAILED
    tag = run_tag or pipeline_run_id
    if not tag:
        raise ValueError("record-outcome needs the run tag or the pipeline run id (it names the run's folder)")
    run_uri = storage.join(storage.normalize(root or cfg.storage.root), tag)
    plan = _plan(run_uri)
    if plan is not None:
        cfg = load_config(plan.config_uri)  # the stored config carries the parent run's id
    parent = tracking.parent_run_id(cfg) if plan is not None else ""
    pipeline_run_id = pipeline_run_id or tracking.pipeline_run_id(cfg) or tag
    failed_step, reason, version = "", "", ""
    registered: tuple[str, str] | None = None
    tracked = tracking.configure(cfg)
    client = None
    if tracked:
        from mlflow import MlflowClient

        client = MlflowClient()
    if status != SUCCEEDED:
        found = _failed_stage_run(client, parent) if client is not None and parent else None
        if plan is None:
            failed_step = "plan"
        elif found is not None:
            failed_step, reason = found
        else:
            failed_step = _first_missing_output(plan) or "?"
        reason = reason or error or f"the {failed_step} step did not complete"
    if plan is not None:
        registered = _registered(plan.register_uri)
        version = "/".join(registered) if registered else ""
    outcome = PipelineOutcome(pipeline_run_id=pipeline_run_id, status=status, failed_step=failed_step,
                              reason=reason[:5000], parent_run_id=parent, model_version=version)
    log.info("pipeline run %s: %s%s", pipeline_run_id, status,
             f" at {failed_step}: {reason}" if failed_step else "")
    if client is None:
        return outcome
    tags = {"status": status, "failed_step": failed_step, "reason": outcome.reason}
    if parent:
        for key, value in tags.items():
            client.set_tag(parent, f"medisyn.outcome.{key}", value)
        client.set_terminated(parent, status=_END_STATUS[status])
    if registered is not None:
        for key, value in (("status", status), ("failed_step", failed_step), ("failure_reason", outcome.reason)):
            client.set_model_version_tag(registered[0], registered[1], f"pipeline.{key}", value)
    return outcome
