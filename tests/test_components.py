"""KFP components: thin, self-contained, one per stage; and the gate wiring run for real with kfp.local.

The kfp.local runs replace the stage functions with fakes (a ``sitecustomize`` on the subprocesses'
PYTHONPATH), so these tests check the pipeline's plumbing - data passing, the demo/launcher
branches, gate verdicts recorded either way, promotion only when both gates passed, an erroring gate
failing closed - in seconds, independent of the real stages (the slow e2e test runs those).
"""

from __future__ import annotations

import inspect
import json
import os
import textwrap
from pathlib import Path

import pytest

from medisyn.pipeline import components
from medisyn.pipeline.components.image import DEFAULT_IMAGE, MEDISYN_IMAGE

REPO = Path(__file__).resolve().parents[1]

# component -> the stage it runs through medisyn.stages.run (docs/stages.md)
STAGE_CALLS = [
    ("plan_run", "plan"), ("build_tiny_models", "build-tiny-models"), ("demo_data", "demo-data"),
    ("check_landing_zone", "check-landing-zone"), ("preprocess", "preprocess"),
    ("preprocess_rayjob", "preprocess-rayjob"), ("encode", "encode"), ("train", "train"),
    ("train_job", "train-job"), ("score", "score"), ("register", "register"),
    ("privacy_gate", "privacy-gate"), ("utility_gate", "utility-gate"), ("promote", "promote"),
    ("report", "report"), ("record_outcome", "record-outcome"),
]


def _source(name: str) -> str:
    return inspect.getsource(components.ALL_COMPONENTS[name].python_func)


def test_every_component_is_listed():
    assert sorted(components.ALL_COMPONENTS) == sorted(n for n, _ in STAGE_CALLS)


@pytest.mark.parametrize("name,stage", STAGE_CALLS)
def test_component_runs_its_stage_through_the_runner(name, stage):
    from medisyn.stages import STAGES

    src = _source(name)
    assert stage in STAGES
    assert f'stages.run("{stage}", ' in src, f"{name} should call stages.run({stage!r}, ...)"
    body = src.split("\n    from medisyn", 1)[1]  # after the signature and its output spec
    assert len([ln for ln in body.splitlines() if ln.strip()]) <= 6, f"{name}: a component holds no logic"
    for twin in ("storage.configure", "config_from_json(config_json)", "json.loads", "render_"):
        if name not in ("plan_run", "record_outcome"):  # these two take the pipeline's config_json
            assert twin not in src, f"{name} should not do the runner's work ({twin})"


@pytest.mark.parametrize("name", sorted(components.ALL_COMPONENTS))
def test_component_runs_in_project_image_without_installing_kfp(name):
    spec = components.ALL_COMPONENTS[name].component_spec
    container = spec.implementation.container
    assert container.image == MEDISYN_IMAGE
    assert not any("pip install" in part for part in (container.command or []) + (container.args or []))


def _signature_lines(src: str) -> list[str]:
    lines = src.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("def "))
    end = next(i for i, ln in enumerate(lines) if ln.startswith(") ->"))
    return lines[start + 1:end + 1]


@pytest.mark.parametrize("name", sorted(components.ALL_COMPONENTS))
def test_component_is_self_contained_and_commented(name):
    src = _source(name)
    # imports live inside the function (KFP ships only its source to the pod)
    assert "\n    from medisyn" in src
    # every input and the output carry a one-line comment
    sig = _signature_lines(src)
    params = [ln for ln in sig if ln.strip() and not ln.strip().startswith(("(", "]", "#"))]
    assert len(params) >= 2, name
    for line in params:
        if line.startswith(") ->") or line.startswith("    ") and ":" in line and not line.strip().startswith('("'):
            assert "#" in line, f"{name}: uncommented input/output line {line.strip()!r}"


def test_components_have_no_module_level_state_in_their_source():
    # Names defined at module level would be undefined in the pod: each body may only use its imports.
    for name in components.ALL_COMPONENTS:
        src = _source(name)
        for forbidden in ("MEDISYN_IMAGE", "RunPlan(", "Dataset(", "Trained(", "Score(", "Registered("):
            assert forbidden not in src.split("\n", 1)[1], f"{name} uses module-level {forbidden}"


def test_default_image_is_the_trainer_image():
    assert DEFAULT_IMAGE.startswith("ghcr.io/medisyn/medisyn-trainer:")
    assert ":" in DEFAULT_IMAGE and not DEFAULT_IMAGE.endswith(":latest")


# ----------------------------------------------------------------------------------------------
# The gate wiring, run with kfp.local over fake stage functions (the real runner, the real results)
# ----------------------------------------------------------------------------------------------
FAKES = textwrap.dedent('''
    """Fake MediSyn stage functions for tests/test_components.py (installed into each KFP step).

    The stage table's functions are replaced by fakes with the same signatures, and the registry
    by a file-backed fake; medisyn.stages.run itself is real, so result.json files, gate ordering,
    fail-closed verdicts and their recording are the runner's own.
    """
    import dataclasses, json, os, sys, types

    if os.environ.get("MEDISYN_FAKE_STATE"):
        STATE = os.environ["MEDISYN_FAKE_STATE"]
        TAGS = STATE + ".tags.json"

        def note(**event):
            with open(STATE, "a") as f:
                f.write(json.dumps(event, sort_keys=True) + "\\n")

        def tags():
            return json.load(open(TAGS)) if os.path.exists(TAGS) else {}

        from medisyn import stages, storage
        from medisyn.evaluate.gates import GateResult
        from medisyn.results import StageResult

        @dataclasses.dataclass(frozen=True)
        class Fake(StageResult):
            data: dict
            def __getattr__(self, key):
                try:
                    return self.__dict__["data"][key]
                except KeyError:
                    raise AttributeError(key)

        def complete(uri):
            storage.write_bytes(storage.join(uri, "_COMPLETE"), b"")

        def build_tiny_models(cfg, overwrite=False):
            note(stage="build_tiny_models")
            return Fake({"paths": {}})

        def demo_data(cfg, out, n_per_class=24, seed=0):
            note(stage="demo_data", out=out)
            complete(out)
            return Fake({"uri": storage.normalize(out)})

        def preprocess(cfg, raw, out):
            storage.require_complete(raw) if os.environ.get("MEDISYN_FAKE_DEMO") else None
            note(stage="preprocess", raw=raw, out=out)
            complete(out)
            return Fake({"dataset_uri": storage.normalize(out)})

        def encode(cfg, dataset, cache):
            storage.require_complete(dataset)
            note(stage="encode")
            complete(cache)
            return Fake({"cache_uri": storage.normalize(cache)})

        def train(cfg, cache, checkpoints, nproc=1):
            storage.require_complete(cache)
            note(stage="train", nproc=nproc)
            complete(checkpoints + "/epoch-0001")
            return Fake({"epochs": 1})

        def score(cfg, dataset, checkpoints, out):
            note(stage="score")
            complete(out)
            return Fake({"out_uri": storage.normalize(out), "best_checkpoint_uri": checkpoints + "/epoch-0001"})

        def register(cfg, scores, dataset, out=""):
            assert Fake.load(scores).best_checkpoint_uri.endswith("/epoch-0001")  # read back from result.json
            note(stage="register", out=out)
            return Fake({"model_uri": "models:/fake/7", "version": "7"})

        def gate_fn(name):
            def gate(cfg, model, dataset, out):
                mode = os.environ.get("MEDISYN_FAKE_" + name.upper(), "pass")
                note(stage=name + "_gate", mode=mode)
                if mode == "raise":
                    raise RuntimeError(name + " evaluation crashed")
                return GateResult(gate=name, passed=mode == "pass", reasons=() if mode == "pass" else ("too close",))
            return gate

        def set_gate_result(cfg, model_uri, gate, passed, details):
            note(stage="set_gate_result", model=model_uri, gate=gate, passed=passed, details=details)
            t = tags()
            t[gate] = "passed" if passed else "failed"
            json.dump(t, open(TAGS, "w"))

        def gates_not_passed(cfg, model, gates):
            return {g: tags().get(g, "missing") for g in gates if tags().get(g) != "passed"}

        def promote(cfg, model, gates):
            approved = all(tags().get(g) == "passed" for g in gates)
            note(stage="promote", model=model, gates=list(gates), approved=approved)
            return Fake({"approved": approved})

        def report(cfg, model, out):
            note(stage="report", model=model, out=out)
            return Fake({"report_uri": storage.join(storage.normalize(out), "report.html")})

        fakes = {"build-tiny-models": build_tiny_models, "demo-data": demo_data, "preprocess": preprocess,
                 "encode": encode, "train": train, "score": score, "register": register,
                 "privacy-gate": gate_fn("privacy"), "utility-gate": gate_fn("utility"), "report": report}
        for name, fn in fakes.items():
            stages.STAGES[name] = dataclasses.replace(stages.STAGES[name], fn=fn)
        import medisyn
        fake_registry = types.ModuleType("medisyn.registry")
        fake_registry.__dict__.update(set_gate_result=set_gate_result, gates_not_passed=gates_not_passed,
                                      promote=promote)
        sys.modules["medisyn.registry"] = medisyn.registry = fake_registry
''')


@pytest.fixture()
def fake_stages(tmp_path, monkeypatch):
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    (fakes / "sitecustomize.py").write_text(FAKES)
    state = tmp_path / "events.jsonl"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fakes), str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MEDISYN_FAKE_STATE", str(state))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def events() -> list[dict]:
        return [json.loads(line) for line in state.read_text().splitlines()] if state.exists() else []

    return events


def _run(tmp_path, **kw):
    from medisyn.pipeline.local import run_pipeline_locally

    cfg_path = REPO / "configs" / "demo.yaml"
    return run_pipeline_locally(cfg_path, raw_uri=str(tmp_path / "raw"), root_uri=str(tmp_path / "runs"),
                                run_tag="t1", pipeline_root=tmp_path / "kfp", **kw)


def _gate_events(events):
    return {e["gate"]: e for e in events if e["stage"] == "set_gate_result"}


def test_local_run_promotes_when_both_gates_pass(tmp_path, fake_stages, monkeypatch):
    monkeypatch.setenv("MEDISYN_FAKE_DEMO", "1")
    result = _run(tmp_path, demo=True)
    events = fake_stages()
    stages = [e["stage"] for e in events]
    assert stages[:2] == ["build_tiny_models", "demo_data"]  # tiny models before anything reads them
    assert stages.index("preprocess") < stages.index("encode") < stages.index("train") < stages.index("score")
    assert next(e for e in events if e["stage"] == "train")["nproc"] == "auto"
    gates = _gate_events(events)
    assert gates["privacy"]["passed"] is True and gates["utility"]["passed"] is True
    assert gates["privacy"]["model"] == "models:/fake/7"
    promote = [e for e in events if e["stage"] == "promote"]
    assert promote == [{"stage": "promote", "model": "models:/fake/7", "gates": ["privacy", "utility"],
                        "approved": True}]
    assert result["model_uri"] == "models:/fake/7"
    assert result["verdicts"]["privacy"]["passed"] is True
    # outputs land under <root>/<run_tag>/, the resolved config beside them, results with them
    run = tmp_path / "runs" / "t1"
    preprocess = next(e for e in events if e["stage"] == "preprocess")
    assert preprocess["out"] == "file://" + str((run / "dataset").resolve())
    assert (run / "config.yaml").exists()
    for prefix in ("dataset", "latent-cache", "checkpoints", "scores", "gates/privacy", "gates/utility",
                   "registry/candidate", "registry/promote", "report"):
        assert json.loads((run / prefix / "result.json").read_text())["version"] == 1, prefix


def test_local_run_records_both_verdicts_and_keeps_candidate_when_privacy_fails(tmp_path, fake_stages, monkeypatch):
    monkeypatch.setenv("MEDISYN_FAKE_PRIVACY", "fail")
    (tmp_path / "raw").mkdir()  # production inputs: the landing zone must exist
    result = _run(tmp_path, demo=False)
    events = fake_stages()
    stages = [e["stage"] for e in events]
    assert "build_tiny_models" not in stages and "demo_data" not in stages
    assert "utility_gate" not in stages  # the utility gate never evaluated...
    gates = _gate_events(events)
    assert gates["privacy"]["passed"] is False
    assert gates["utility"]["passed"] is False  # ...and is recorded as a failure that says why
    assert "privacy" in " ".join(gates["utility"]["details"]["reasons"])
    assert [e["approved"] for e in events if e["stage"] == "promote"] == [False]
    assert result["verdicts"]["utility"]["passed"] is False
    # the evaluation report is written whatever the verdicts, after promote
    assert stages.index("report") > stages.index("promote")


def test_local_run_fails_closed_when_a_gate_raises(tmp_path, fake_stages, monkeypatch):
    monkeypatch.setenv("MEDISYN_FAKE_UTILITY", "raise")
    _run(tmp_path, demo=True)  # the pipeline itself succeeds: the crash became a verdict
    events = fake_stages()
    gates = _gate_events(events)
    assert gates["privacy"]["passed"] is True
    assert gates["utility"]["passed"] is False
    assert "crashed" in gates["utility"]["details"]["error"]
    assert [e["approved"] for e in events if e["stage"] == "promote"] == [False]


def test_local_run_refuses_cluster_launchers(tmp_path):
    from medisyn.pipeline.local import run_pipeline_locally

    with pytest.raises(ValueError, match="needs a cluster"):
        run_pipeline_locally(REPO / "configs" / "demo.yaml", train_launcher="trainjob")


# ----------------------------------------------------------------------------------------------
# The cluster launchers' bodies, called in-process with the submission faked
# ----------------------------------------------------------------------------------------------
def test_train_job_submits_a_valid_job_and_reads_its_result(tmp_path, monkeypatch):
    from medisyn import launch, storage
    from medisyn.config import load_config
    from medisyn.stages import plan_run
    from medisyn.train.trainer import TrainResult

    cfg = load_config(REPO / "configs" / "demo.yaml")
    plan = plan_run(cfg, str(tmp_path / "runs"), "abc123")
    ckpt = storage.normalize(tmp_path / "ckpt")
    submitted = []
    stored = TrainResult(checkpoints=[ckpt + "/epoch-0001"], epochs=1, global_step=3, final_loss=0.5, world_size=24,
                         per_device_batch_size=1, gradient_accumulation_steps=1, effective_batch_size=24,
                         steps_per_epoch=3, resumed_from=None, mixed_precision="bf16", flops_per_sample=1.0,
                         images_per_s=1.0, mfu=None, dataset_hash="d", cache_key="k")

    def fake_run_job(manifest, timeout_s, **kw):
        launch.validate_against_crd(manifest)
        submitted.append((manifest, timeout_s))
        stored.save(ckpt)  # what the job's own runner writes on its node 0
        return manifest

    monkeypatch.setattr(launch, "run_job", fake_run_job)
    monkeypatch.setattr(launch, "api_client", lambda: None)  # the job itself runs over HTTP in test_launch_cluster.py
    uri = components.train_job.python_func(
        config_uri=plan.config_uri, cache_uri="s3://b/cache", checkpoints_uri=ckpt,
        cluster_json=json.dumps({"namespace": "ml", "num_nodes": 3, "gpus_per_node": 8}), image="reg/img:1",
        run_tag=plan.run_tag, timeout_s=3600, launcher="pytorchjob")
    manifest, timeout = submitted[0]
    assert uri == ckpt and timeout == 3600
    assert manifest["metadata"]["name"] == "demo-train-abc123"
    assert manifest["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    container = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert container["image"] == "reg/img:1"
    assert plan.config_uri in container["command"] + container.get("args", [])  # one config transport


def test_train_job_fails_when_the_job_wrote_no_result(tmp_path, monkeypatch):
    from medisyn import launch
    from medisyn.config import load_config
    from medisyn.stages import plan_run

    plan = plan_run(load_config(REPO / "configs" / "demo.yaml"), str(tmp_path / "runs"), "r")
    monkeypatch.setattr(launch, "run_job", lambda manifest, timeout_s, **kw: manifest)
    monkeypatch.setattr(launch, "api_client", lambda: None)
    with pytest.raises(RuntimeError, match="TrainJob .* succeeded but .*result"):
        components.train_job.python_func(
            config_uri=plan.config_uri, cache_uri="s3://b/c", checkpoints_uri=str(tmp_path / "k"),
            cluster_json="{}", image="", run_tag="r", timeout_s=10, launcher="trainjob")
