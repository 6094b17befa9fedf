"""The pipeline's exit handler (``record-outcome``, medisyn.outcome): the run's status, the failed step and
the reason land on the parent MLflow run and on the registered version, through the stage runner,
against a real MLflow store (SQLite)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from medisyn import stages, tracking
from medisyn.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[1]
RUN = "kfp-run-0c1d"


@pytest.fixture
def cfg(tmp_path, monkeypatch) -> RunConfig:
    monkeypatch.delenv(tracking.PARENT_RUN_ENV, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    yield load_config(REPO / "configs" / "demo.yaml", [f"tracking.tracking_uri={store}",
                                                       f"storage.root={(tmp_path / 'runs').as_uri()}"])
    import mlflow

    mlflow.set_tracking_uri(None)
    tracking._CONFIGURED = None


def _client(cfg: RunConfig):
    from mlflow import MlflowClient

    return MlflowClient(cfg.tracking.tracking_uri, cfg.tracking.tracking_uri)


def test_a_failed_run_records_the_failed_step_and_its_reason_on_the_parent_run(cfg):
    from medisyn.provenance import code_version
    from medisyn.results import ResultError

    plan = stages.run("plan", cfg, run_tag=RUN, pipeline_run_id=RUN, pipeline_version="medisyn-retrain-v7")
    # a retried plan step reuses the parent run its first attempt opened
    assert stages.run("plan", cfg, run_tag=RUN, pipeline_run_id=RUN).parent_run_id == plan.parent_run_id
    with pytest.raises(ResultError):  # register before score wrote anything: its stage run ends FAILED
        stages.run("register", plan.config_uri, scores=plan.scores_uri, dataset=plan.dataset_uri,
                   out=plan.register_uri)
    outcome = stages.run("record-outcome", cfg, run_tag=RUN, pipeline_run_id=RUN, status="FAILED",
                         error="Task register failed.")
    assert (outcome.status, outcome.failed_step) == ("FAILED", "register")
    assert "ResultError" in outcome.reason and "result.json" in outcome.reason
    parent = _client(cfg).get_run(plan.parent_run_id)
    assert parent.info.status == "FAILED"
    tags = parent.data.tags
    assert tags["medisyn.outcome.status"] == "FAILED" and tags["medisyn.outcome.failed_step"] == "register"
    assert tags["medisyn.outcome.reason"] == outcome.reason
    # lineage on the parent: the KFP run id, the pipeline version, the code version
    assert tags["medisyn.pipeline_run_id"] == RUN and tags["medisyn.pipeline_version"] == "medisyn-retrain-v7"
    assert tags["medisyn.code_version"] == code_version()


def test_a_run_that_stopped_in_an_untracked_step_names_it_from_the_missing_outputs(cfg):
    plan = stages.run("plan", cfg, run_tag=RUN, pipeline_run_id=RUN)
    outcome = stages.run("record-outcome", cfg, run_tag=RUN, status="FAILED")
    assert outcome.failed_step == "preprocess" and outcome.reason == "the preprocess step did not complete"
    assert outcome.pipeline_run_id == RUN and outcome.parent_run_id == plan.parent_run_id


def test_a_succeeded_run_is_recorded_on_the_parent_and_the_version(cfg):
    from medisyn import cli
    from medisyn.registry import RegisteredModel

    plan = stages.run("plan", cfg, run_tag=RUN, pipeline_run_id=RUN)
    client = _client(cfg)
    name = cfg.tracking.model_name
    client.create_registered_model(name)
    mv = client.create_model_version(name, source=(Path(plan.run_uri.removeprefix("file://")) / "m").as_uri())
    RegisteredModel(name=name, version=str(mv.version), model_uri=f"models:/{name}/{mv.version}",
                    alias_uri=f"models:/{name}@candidate", run_id="", tags={}).save(plan.register_uri)
    # through the CLI, as the by-hand run does (`medisyn record-outcome`), reading the run's stored config
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["record-outcome", "--config", plan.config_uri, "--run-tag", RUN, "--status", "SUCCEEDED"]) == 0
    outcome = json.loads(out.getvalue())
    assert (outcome["status"], outcome["failed_step"], outcome["reason"]) == ("SUCCEEDED", "", "")
    assert outcome["model_version"] == f"{name}/{mv.version}" and outcome["pipeline_run_id"] == RUN
    assert client.get_run(plan.parent_run_id).info.status == "FINISHED"
    tags = client.get_model_version(name, str(mv.version)).tags
    assert tags["pipeline.status"] == "SUCCEEDED" and tags["pipeline.failed_step"] == ""


def test_without_tracking_the_outcome_is_still_computed(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"storage.root={(tmp_path / 'runs').as_uri()}"])
    outcome = stages.run("record-outcome", cfg, run_tag="never-planned", status="CANCELLED")
    assert (outcome.status, outcome.failed_step, outcome.parent_run_id) == ("CANCELLED", "plan", "")
