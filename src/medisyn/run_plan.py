"""The layout of one pipeline run (:class:`RunPlan`), shared by the stage runner and the outcome.

``medisyn.stages.plan_run`` lays a run out and returns it (stored as the plan's ``result.json``);
``medisyn.outcome`` reads it back to find the run's config and the step that did not finish. It
lives below both so that neither imports the other for it (issue #22).
"""

from __future__ import annotations

from dataclasses import dataclass

from medisyn.results import StageResult


@dataclass(frozen=True)
class RunPlan(StageResult):
    """Where every output of one pipeline run lives (all under ``run_uri``)."""

    run_uri: str
    run_tag: str  # the run's folder name (unique per run: also names its cluster jobs)
    config_uri: str  # the resolved run config every later step reads
    config_hash: str
    raw_uri: str  # landing zone (the demo writes its phantom zone here)
    dataset_uri: str
    cache_uri: str
    checkpoints_uri: str
    scores_uri: str
    register_uri: str  # RegisteredModel result
    privacy_uri: str
    utility_uri: str
    promote_uri: str  # PromoteResult
    pipeline_run_id: str  # the orchestrator's run id (the KFP run id; by hand: the run tag)
    parent_run_id: str  # the MLflow run the stage runs nest under ("" when tracking is off)
    report_uri: str = ""  # the version's evaluation report (report.html), written after promote
