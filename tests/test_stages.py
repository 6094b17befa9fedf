"""The stage runner: typed results stored with their outputs, one MLflow run per stage, gates that
fail closed, run in order and have their verdicts recorded on the version by the runner itself."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from helpers import fake_candidate
from medisyn import stages, storage
from medisyn.evaluate.gates import GateResult
from medisyn.registry import candidates_model
from medisyn.results import ResultError, StageResult

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Counted(StageResult):
    out_uri: str
    by_epoch: dict[int, float]
    interval: tuple[float, float] | None


def _fake(monkeypatch, name: str, fn) -> None:
    monkeypatch.setitem(stages.STAGES, name, dataclasses.replace(stages.STAGES[name], fn=fn))


@pytest.fixture()
def cfg(tmp_path, monkeypatch):
    from helpers import demo_config

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return demo_config(tmp_path)


def test_result_round_trip_restores_types(tmp_path):
    r = Counted(out_uri="x", by_epoch={1: 2.5, 12: 1.0}, interval=(0.5, 1.5))
    r.save(str(tmp_path))
    stored = json.loads((tmp_path / "result.json").read_text())
    assert stored["kind"] == "medisyn.Counted" and stored["version"] == 1
    assert Counted.load(str(tmp_path)) == r  # int keys and the tuple come back


def test_load_refuses_missing_foreign_or_other_version(tmp_path):
    with pytest.raises(ResultError, match="did not finish"):
        Counted.load(str(tmp_path))
    GateResult(gate="privacy", passed=True).save(str(tmp_path))
    with pytest.raises(ResultError, match="not a 'medisyn.Counted'"):
        Counted.load(str(tmp_path))
    data = json.loads((tmp_path / "result.json").read_text())
    data["version"] = 99
    (tmp_path / "result.json").write_text(json.dumps(data))
    with pytest.raises(ResultError, match="version 99"):
        GateResult.load(str(tmp_path))


def test_runner_writes_the_result_into_the_output_prefix(cfg, tmp_path, monkeypatch):
    seen = {}

    def encode(c, dataset, cache):
        seen["cfg"] = c
        storage.write_bytes(storage.join(cache, "_COMPLETE"), b"")
        return Counted(out_uri=cache, by_epoch={3: 1.0}, interval=None)

    _fake(monkeypatch, "encode", encode)
    out = str(tmp_path / "cache")
    result = stages.run("encode", cfg, dataset="unused", cache=out)
    assert Counted.load(out) == result
    assert seen["cfg"] is cfg


def test_runner_reads_the_config_from_a_uri(cfg, tmp_path, monkeypatch):
    plan = stages.run("plan", cfg, root=str(tmp_path / "runs"), run_tag="r1")
    assert isinstance(plan, stages.RunPlan)
    assert stages.RunPlan.load(plan.run_uri) == plan
    got = {}

    def check(c, raw):
        got["cfg"] = c
        return stages.LandingZoneCheck(uri=raw)

    _fake(monkeypatch, "check-landing-zone", check)
    stages.run("check-landing-zone", plan.config_uri, raw="file:///x")
    # the stored, resolved config is the same config, plus the run's identity (outside its hash)
    assert got["cfg"].config_hash() == cfg.config_hash()
    assert got["cfg"].tracking.pipeline_run_id == "r1" and plan.pipeline_run_id == "r1"
    assert got["cfg"].tracking.parent_run_id is None and plan.parent_run_id == ""  # tracking is off here


def test_runner_refuses_unknown_stage_and_inputs(cfg):
    with pytest.raises(KeyError, match="unknown stage"):
        stages.run("train-harder", cfg)
    with pytest.raises(TypeError, match="unknown: dataset_uri"):
        stages.run("encode", cfg, dataset_uri="x", cache="y")
    with pytest.raises(TypeError, match="missing: cache"):
        stages.run("encode", cfg, dataset="x")


def test_every_stage_takes_the_config_first():
    import inspect

    for name, spec in stages.STAGES.items():
        first = next(iter(inspect.signature(spec.fn).parameters))
        assert first in ("cfg", "c"), name
        if spec.output is not None and spec.name != "plan":
            assert spec.output in {p.name for p in stages.stage_inputs(name)}, name


# ----------------------------------------------------------------------------------------------
# Gates through the runner, against a real MLflow registry (SQLite, no server)
# ----------------------------------------------------------------------------------------------
@pytest.fixture()
def registry_cfg(cfg, tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"tracking_uri": uri})})
    monkeypatch.setattr("medisyn.tracking._CONFIGURED", None)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    fake_candidate(client, cfg, tmp_path)  # version 1 of the candidates' model (mlflow/REGISTRY.md)
    yield cfg, client
    mlflow.set_tracking_uri(None)


def _gate(name: str, outcome: str, calls: list[str]):
    def gate(c, model, dataset, out):
        calls.append(name)
        if outcome == "raise":
            raise RuntimeError(f"{name} evaluation crashed")
        return GateResult(gate=name, passed=outcome == "pass", reasons=() if outcome == "pass" else ("too close",))
    return gate


@pytest.mark.mlflow
@pytest.mark.parametrize("privacy,utility,approved", [
    ("pass", "pass", True),
    ("fail", "pass", False),   # utility is then skipped, and recorded as failed
    ("pass", "raise", False),  # an error is a failed verdict, never an exception through the step
])
def test_gates_record_verdicts_in_order_and_promote_fails_closed(registry_cfg, tmp_path, monkeypatch,
                                                                  privacy, utility, approved):
    cfg, client = registry_cfg
    calls: list[str] = []
    _fake(monkeypatch, "privacy-gate", _gate("privacy", privacy, calls))
    _fake(monkeypatch, "utility-gate", _gate("utility", utility, calls))
    model = f"models:/{candidates_model(cfg)}/1"
    for gate in stages.GATE_ORDER:
        result = stages.run(f"{gate}-gate", cfg, model=model, dataset="d", out=str(tmp_path / gate))
        assert GateResult.load(str(tmp_path / gate)) == result
    promoted = stages.run("promote", cfg, model=model, out=str(tmp_path / "promote"))
    tags = client.get_model_version(candidates_model(cfg), "1").tags
    assert tags["gate.privacy"] == ("passed" if privacy == "pass" else "failed")
    assert tags["gate.utility"] == ("passed" if approved else "failed")
    assert promoted.approved is approved
    approved_model = {m.name: m for m in client.search_registered_models()}.get(cfg.tracking.model_name)
    assert ("approved" in (approved_model.aliases if approved_model else {})) is approved  # the approved model
    if privacy == "fail":
        assert calls == ["privacy"]  # the utility gate never evaluated
        assert "skipped" in json.loads(tags["gate.utility.details"])["reasons"][0]
    if utility == "raise":
        assert "crashed" in json.loads(tags["gate.utility.details"])["error"]


@pytest.mark.mlflow
def test_runner_opens_one_mlflow_run_that_the_stage_reuses(registry_cfg, tmp_path, monkeypatch):
    import mlflow

    from medisyn import tracking

    cfg, client = registry_cfg
    run_ids = []

    def preprocess(c, raw, out):
        with tracking.stage_run(c, "preprocess", tags={"medisyn.extra": "1"}) as run:  # as the real stages do
            run_ids.append(run.info.run_id)
        return Counted(out_uri=out, by_epoch={}, interval=None)

    _fake(monkeypatch, "preprocess", preprocess)
    stages.run("preprocess", cfg, raw="r", out=str(tmp_path / "dataset"))
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")
    assert [r.info.run_id for r in runs] == run_ids
    assert runs[0].data.tags["medisyn.stage"] == "preprocess" and runs[0].data.tags["medisyn.extra"] == "1"
    artifacts = {a.path for a in client.list_artifacts(run_ids[0])}
    assert "result.json" in artifacts


@pytest.mark.mlflow
def test_plan_opens_the_parent_run_that_stage_runs_nest_under(registry_cfg, tmp_path, monkeypatch):
    import mlflow

    cfg, client = registry_cfg
    plan = stages.run("plan", cfg, root=str(tmp_path / "runs"), run_tag="r7", pipeline_run_id="kfp-run-42")
    assert plan.parent_run_id and plan.pipeline_run_id == "kfp-run-42"
    _fake(monkeypatch, "preprocess", lambda c, raw, out: Counted(out_uri=out, by_epoch={}, interval=None))
    stages.run("preprocess", plan.config_uri, raw="r", out=str(tmp_path / "dataset"))
    runs = {r.data.tags["medisyn.stage"]: r for r in
            mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")}
    assert runs["pipeline"].info.run_id == plan.parent_run_id
    assert runs["preprocess"].data.tags["mlflow.parentRunId"] == plan.parent_run_id
    assert runs["preprocess"].data.tags["medisyn.pipeline_run_id"] == "kfp-run-42"
    stages.run("promote", plan.config_uri, model=f"models:/{candidates_model(cfg)}/1")  # the last step
    assert client.get_run(plan.parent_run_id).info.status == "FINISHED"
