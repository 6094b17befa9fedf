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
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import components  # noqa: E402
from components.image import DEFAULT_IMAGE, MEDISYN_IMAGE  # noqa: E402

# component -> the stage function (docs/stages.md) its body must call
STAGE_CALLS = [
    ("build_tiny_models", "medisyn.models import build_tiny_models"),
    ("demo_data", "medisyn.data.demo import write_landing_zone"),
    ("preprocess", "medisyn.data.preprocess import preprocess"),
    ("encode", "medisyn.train.encode import encode"),
    ("train", "medisyn.train.launch import launch"),  # trainer.train in-process, torchrun per GPU
    ("score", "medisyn.evaluate.fid import score_checkpoints"),
    ("register", "registry.register_candidate("),
    ("privacy_gate", "medisyn.evaluate.privacy import privacy_gate"),
    ("utility_gate", "medisyn.evaluate.utility import utility_gate"),
    ("record_gate_result", "registry.set_gate_result("),
    ("promote", "registry.promote("),
    ("preprocess_rayjob", "launch.render_rayjob("),
    ("train_pytorchjob", "launch.render_pytorchjob("),
]


def _source(name: str) -> str:
    return inspect.getsource(components.ALL_COMPONENTS[name].python_func)


@pytest.mark.parametrize("name,call", STAGE_CALLS)
def test_component_calls_its_stage_function(name, call):
    src = _source(name)
    assert call in src, f"{name} should call {call}"
    if name not in ("demo_data",):
        assert "config_from_json(config_json)" in src, f"{name} should validate the config JSON"


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
    for name, comp in components.ALL_COMPONENTS.items():
        src = _source(name)
        for forbidden in ("MEDISYN_IMAGE", "RunPlan(", "Dataset(", "Trained(", "Score(", "Registered("):
            assert forbidden not in src.split("\n", 1)[1], f"{name} uses module-level {forbidden}"


def test_default_image_is_the_trainer_image():
    assert DEFAULT_IMAGE.startswith("ghcr.io/medisyn/medisyn-trainer:")
    assert ":" in DEFAULT_IMAGE and not DEFAULT_IMAGE.endswith(":latest")


# ----------------------------------------------------------------------------------------------
# The gate wiring, run with kfp.local over fake stage functions
# ----------------------------------------------------------------------------------------------
FAKES = textwrap.dedent('''
    """Fake MediSyn stage functions for tests/test_components.py (installed into each KFP step)."""
    import json, os, sys, types
    from dataclasses import dataclass, field

    if os.environ.get("MEDISYN_FAKE_STATE"):
        STATE = os.environ["MEDISYN_FAKE_STATE"]

        def note(**event):
            with open(STATE, "a") as f:
                f.write(json.dumps(event, sort_keys=True) + "\\n")

        @dataclass
        class Result:
            data: dict = field(default_factory=dict)
            def to_dict(self):
                return dict(self.data)
            def __getattr__(self, key):
                try:
                    return self.__dict__["data"][key]
                except KeyError:
                    raise AttributeError(key)

        def local(uri):
            return uri[len("file://"):] if uri.startswith("file://") else uri

        def complete(uri):
            os.makedirs(local(uri), exist_ok=True)
            open(os.path.join(local(uri), "_COMPLETE"), "w").close()

        def module(name, **attrs):
            m = types.ModuleType(name)
            m.__dict__.update(attrs)
            sys.modules[name] = m
            return m

        def build_tiny_models(cfg, overwrite=False):
            note(stage="build_tiny_models")
            return {"sdxl_base": "tiny"}

        def write_landing_zone(out_uri, n_per_class=24, seed=0):
            note(stage="demo_data", out=out_uri)
            complete(out_uri)
            return Result({"uri": out_uri})

        def preprocess(cfg, raw_uri, out_uri):
            assert os.path.exists(local(raw_uri)), raw_uri
            note(stage="preprocess", raw=raw_uri, out=out_uri)
            complete(out_uri)
            return Result({"dataset_hash": "d" * 64})

        def encode(cfg, dataset_uri, cache_uri):
            assert os.path.exists(os.path.join(local(dataset_uri), "_COMPLETE"))
            note(stage="encode")
            complete(cache_uri)
            return Result({"cache_uri": cache_uri})

        def launch(cfg, cache_uri, checkpoints_uri, nproc=1):
            assert os.path.exists(os.path.join(local(cache_uri), "_COMPLETE"))
            note(stage="train", nproc=nproc)
            complete(checkpoints_uri + "/epoch-0001")
            return Result({"epochs": 1})

        def score_checkpoints(cfg, dataset_uri, checkpoints_uri, out_uri):
            note(stage="score")
            return Result({"best_checkpoint_uri": checkpoints_uri + "/epoch-0001", "best_fid": 12.5})

        def register_candidate(cfg, checkpoint_uri, score, dataset_uri):
            assert score["best_fid"] == 12.5
            note(stage="register", checkpoint=checkpoint_uri)
            return Result({"model_uri": "models:/fake/7", "version": 7})

        def set_gate_result(cfg, model_uri, gate, passed, details):
            note(stage="set_gate_result", model=model_uri, gate=gate, passed=passed, details=details)

        def promote(cfg, version, gates):
            note(stage="promote", version=version, gates=list(gates))
            return Result({"approved": True, "version": version})

        def gate_fn(name):
            def gate(cfg, model_uri, dataset_uri, out_uri):
                from medisyn.evaluate.gates import GateResult
                mode = os.environ.get("MEDISYN_FAKE_" + name.upper(), "pass")
                note(stage=name + "_gate", mode=mode)
                if mode == "raise":
                    raise RuntimeError(name + " evaluation crashed")
                return GateResult(gate=name, passed=mode == "pass", reasons=() if mode == "pass" else ("too close",))
            return gate

        import medisyn, medisyn.models
        medisyn.models.build_tiny_models = build_tiny_models
        module("medisyn.data.demo", write_landing_zone=write_landing_zone)
        module("medisyn.data.preprocess", preprocess=preprocess)
        module("medisyn.train.encode", encode=encode)
        module("medisyn.train.launch", launch=launch)
        module("medisyn.evaluate.fid", score_checkpoints=score_checkpoints)
        module("medisyn.evaluate.privacy", privacy_gate=gate_fn("privacy"))
        module("medisyn.evaluate.utility", utility_gate=gate_fn("utility"))
        medisyn.registry = module("medisyn.registry", register_candidate=register_candidate,
                                  set_gate_result=set_gate_result, promote=promote)
''')


@pytest.fixture()
def fake_stages(tmp_path, monkeypatch):
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    (fakes / "sitecustomize.py").write_text(FAKES)
    state = tmp_path / "events.jsonl"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fakes), str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MEDISYN_FAKE_STATE", str(state))

    def events() -> list[dict]:
        return [json.loads(line) for line in state.read_text().splitlines()] if state.exists() else []

    return events


def _run(tmp_path, tiny_cfg_path=None, **kw):
    from pipelines.run_local import run_pipeline_locally

    cfg_path = REPO / "configs" / "demo.yaml"
    return run_pipeline_locally(cfg_path, raw_uri=str(tmp_path / "raw"), root_uri=str(tmp_path / "runs"),
                                run_tag="t1", pipeline_root=tmp_path / "kfp", **kw)


def _gate_events(events):
    return {e["gate"]: e for e in events if e["stage"] == "set_gate_result"}


def test_local_run_promotes_when_both_gates_pass(tmp_path, fake_stages, monkeypatch):
    result = _run(tmp_path, demo=True)
    events = fake_stages()
    stages = [e["stage"] for e in events]
    assert stages[:2] == ["build_tiny_models", "demo_data"]  # tiny models before anything reads them
    assert stages.index("preprocess") < stages.index("encode") < stages.index("train") < stages.index("score")
    import torch

    assert next(e for e in events if e["stage"] == "train")["nproc"] == (torch.cuda.device_count() or 1)
    gates = _gate_events(events)
    assert gates["privacy"]["passed"] is True and gates["utility"]["passed"] is True
    assert gates["privacy"]["model"] == "models:/fake/7"
    promote = [e for e in events if e["stage"] == "promote"]
    assert promote == [{"stage": "promote", "version": "7", "gates": ["privacy", "utility"]}]
    assert result["model_uri"] == "models:/fake/7"
    assert result["verdicts"]["privacy"]["passed"] is True
    # outputs land under <root>/<run_tag>/
    preprocess = next(e for e in events if e["stage"] == "preprocess")
    assert preprocess["out"] == "file://" + str((tmp_path / "runs" / "t1" / "dataset").resolve())


def test_local_run_records_both_verdicts_and_keeps_candidate_when_privacy_fails(tmp_path, fake_stages, monkeypatch):
    monkeypatch.setenv("MEDISYN_FAKE_PRIVACY", "fail")
    (tmp_path / "raw").mkdir()  # production inputs: the landing zone must exist
    _run(tmp_path, demo=False)
    events = fake_stages()
    stages = [e["stage"] for e in events]
    assert "build_tiny_models" not in stages and "demo_data" not in stages
    assert "utility_gate" not in stages  # the utility gate never ran...
    gates = _gate_events(events)
    assert gates["privacy"]["passed"] is False
    assert gates["utility"]["passed"] is False  # ...and is recorded as a failure that says why
    assert "privacy" in " ".join(gates["utility"]["details"]["reasons"])
    assert "promote" not in stages


def test_local_run_fails_closed_when_a_gate_raises(tmp_path, fake_stages, monkeypatch):
    monkeypatch.setenv("MEDISYN_FAKE_UTILITY", "raise")
    _run(tmp_path, demo=True)  # the pipeline itself succeeds: the crash became a verdict
    events = fake_stages()
    gates = _gate_events(events)
    assert gates["privacy"]["passed"] is True
    assert gates["utility"]["passed"] is False
    assert "crashed" in gates["utility"]["details"]["error"]
    assert "promote" not in [e["stage"] for e in events]


def test_local_run_refuses_cluster_launchers(tmp_path):
    from pipelines.run_local import run_pipeline_locally

    with pytest.raises(ValueError, match="needs a cluster"):
        run_pipeline_locally(REPO / "configs" / "demo.yaml", train_launcher="pytorchjob")


# ----------------------------------------------------------------------------------------------
# The cluster launchers' bodies, called in-process with the submission faked
# ----------------------------------------------------------------------------------------------
def test_train_pytorchjob_submits_a_valid_job_and_returns_the_result(tmp_path, monkeypatch):
    from medisyn import launch, storage
    from medisyn.config import load_config

    cfg = load_config(REPO / "configs" / "demo.yaml")
    run_uri = storage.normalize(tmp_path / "runs" / "abc123")
    submitted = []

    def fake_run_job(manifest, timeout_s, **kw):
        launch.validate_against_crd(manifest)
        submitted.append((manifest, timeout_s))
        storage.write_json(storage.join(run_uri, "train-result.json"), {"epochs": 3})
        return manifest

    monkeypatch.setattr(launch, "run_job", fake_run_job)
    uri, summary = components.train_pytorchjob.python_func(
        config_json=json.dumps(cfg.model_dump(mode="json")), cache_uri="s3://b/cache", checkpoints_uri="s3://b/ckpt",
        cluster_json=json.dumps({"namespace": "ml", "num_nodes": 3, "gpus_per_node": 8}), image="reg/img:1",
        run_uri=run_uri, timeout_s=3600)
    manifest, timeout = submitted[0]
    assert uri == "s3://b/ckpt" and timeout == 3600
    assert json.loads(summary) == {"job": "demo-train-abc123", "result": {"epochs": 3}}
    assert manifest["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    assert manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["image"] == "reg/img:1"


def test_train_pytorchjob_fails_when_the_job_wrote_no_result(tmp_path, monkeypatch):
    from medisyn import launch, storage
    from medisyn.config import load_config

    cfg = load_config(REPO / "configs" / "demo.yaml")
    monkeypatch.setattr(launch, "run_job", lambda manifest, timeout_s, **kw: manifest)
    with pytest.raises(RuntimeError, match="wrote no"):
        components.train_pytorchjob.python_func(
            config_json=json.dumps(cfg.model_dump(mode="json")), cache_uri="s3://b/c", checkpoints_uri="s3://b/k",
            cluster_json="{}", image="", run_uri=storage.normalize(tmp_path / "r"), timeout_s=10)


def test_preprocess_rayjob_reads_the_published_manifest(tmp_path, monkeypatch):
    from medisyn import launch, storage
    from medisyn.config import load_config

    cfg = load_config(REPO / "configs" / "demo.yaml")
    dataset = storage.normalize(tmp_path / "dataset")
    submitted = []

    def fake_run_job(manifest, timeout_s, **kw):
        launch.validate_against_crd(manifest)
        submitted.append(manifest)
        storage.write_json(storage.join(dataset, "manifest.json"), {"dataset_hash": "h" * 64})
        storage.write_bytes(storage.join(dataset, storage.COMPLETE_MARKER), b"")
        return manifest

    monkeypatch.setattr(launch, "run_job", fake_run_job)
    uri, dhash, summary = components.preprocess_rayjob.python_func(
        config_json=json.dumps(cfg.model_dump(mode="json")), raw_uri="s3://b/raw", dataset_uri=dataset,
        cluster_json=json.dumps({"namespace": "ml", "ray_workers": 5}), image="reg/img:1",
        run_uri="s3://b/runs/run-42", timeout_s=60)
    assert (uri, dhash) == (dataset, "h" * 64)
    (manifest,) = submitted
    assert manifest["kind"] == "RayJob" and manifest["metadata"]["name"] == "demo-preprocess-run-42"
    assert manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 5
