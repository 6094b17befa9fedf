"""Gates that raise, hang past their timeout, or get too few samples: the version is not approved and
the reason is on it (issue #12). The verdicts go through the stage runner onto a real model version."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest
from mlflow import MlflowClient

from helpers import class_faithful_sampler, register_tiny_version, write_gate_dataset
from medisyn import stages, storage
from medisyn.evaluate import gates
from medisyn.evaluate.gates import GateResult, run_gate

pytestmark = pytest.mark.timeout(300)


def _hang(*args, **kwargs):
    time.sleep(3600)


def _busy(*args, **kwargs):
    while True:  # a Python loop that never ends (a stuck retry loop, say)
        pass


def test_a_hanging_gate_is_interrupted_and_fails_closed():
    result = run_gate("privacy", _hang, timeout_s=0.5)
    assert not result.passed and result.error and result.error.startswith("GateTimeout")
    assert "timed out" in result.reasons[0] and "0.5s" in result.reasons[0]


def test_a_gate_that_swallows_exceptions_is_still_interrupted():
    def stubborn(*args):
        while True:
            try:
                time.sleep(3600)
            except Exception:  # noqa: BLE001, S110 - what a careless gate does; GateTimeout is no Exception
                pass

    assert "timed out" in run_gate("utility", stubborn, timeout_s=0.5).reasons[0]


def test_a_gate_in_a_worker_thread_is_interrupted_too():
    out: list[GateResult] = []
    t = threading.Thread(target=lambda: out.append(run_gate("utility", _busy, timeout_s=0.5)))
    t.start()
    t.join(30)
    assert not t.is_alive() and not out[0].passed and "timed out" in out[0].reasons[0]


def test_an_outer_timer_survives_a_gate_deadline():
    """pytest-timeout (and any caller) may hold the one SIGALRM timer: it stays armed afterwards."""
    fired = []
    old = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    signal.setitimer(signal.ITIMER_REAL, 30)
    try:
        assert run_gate("g", lambda: GateResult(gate="g", passed=True), timeout_s=5).passed
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 20 < remaining <= 30
        assert "timed out" in run_gate("g", _hang, timeout_s=0.3).reasons[0]
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 20 and fired == []
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------------------------------------
# Through the runner, onto a registered version
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def version(tmp_path_factory):
    from medisyn.models.biomedclip import build_tiny_biomedclip

    root = tmp_path_factory.mktemp("gate-faults")
    cfg, model_uri = register_tiny_version(root, [
        "privacy.timeout_s=1", "privacy.patch_size=16", "privacy.batch_size=8", "privacy.images_per_prompt=2",
        "privacy.prompts=[Dermoscopy image showing melanoma.]", "utility.timeout_s=1", "runtime.device=cpu"])
    build_tiny_biomedclip(cfg.models.tiny, storage.local_path(cfg.models.biomedclip))
    dataset = write_gate_dataset(str(root / "dataset"), n_train=3, n_eval=2)
    return cfg, model_uri, dataset, root


def _tags(cfg, model_uri: str) -> dict[str, str]:
    name, number = model_uri.removeprefix("models:/").split("/")
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri, registry_uri=cfg.tracking.tracking_uri)
    return dict(client.get_model_version(name, number).tags)


def _gate_stage(monkeypatch, stage: str, fn) -> None:
    spec = stages.STAGES[stage]
    monkeypatch.setitem(stages.STAGES, stage, stages.Stage(spec.name, fn, output=spec.output, gate=spec.gate))


def _raise(cfg, model, dataset, out):
    raise RuntimeError("the classifier's weights are missing")


def _hang_gate(cfg, model, dataset, out):
    _hang()


CASES = [("raises", _raise, "gate errored: RuntimeError: the classifier's weights are missing"),
         ("hangs", _hang_gate, "gate timed out")]


@pytest.mark.parametrize("case,fn,reason", CASES, ids=[c[0] for c in CASES])
def test_a_broken_gate_leaves_the_version_unapproved_with_the_reason_on_it(version, monkeypatch, case, fn, reason):
    cfg, model_uri, dataset, root = version
    _gate_stage(monkeypatch, "privacy-gate", fn)
    result = stages.run("privacy-gate", cfg, model=model_uri, dataset=dataset, out=str(root / case / "privacy"))
    assert not result.passed and reason in result.reasons[0]
    tags = _tags(cfg, model_uri)
    assert tags["gate.privacy"] == "failed" and reason in json.loads(tags["gate.privacy.details"])["reasons"][0]
    assert not storage.exists(str(root / case / "privacy" / storage.COMPLETE_MARKER))  # no report published
    promoted = stages.run("promote", cfg, model=model_uri, out=str(root / case / "promote"))
    assert not promoted.approved


def test_too_few_samples_is_a_failed_verdict_with_the_reason(version, monkeypatch):
    """The real privacy gate (fake generator), 2 synthetic images: no evidence, no approval."""
    from medisyn.evaluate.privacy import privacy_gate

    cfg, model_uri, dataset, root = version
    cfg = cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={"timeout_s": 300.0})})
    def with_fake_generator(cfg, model, dataset, out):
        return privacy_gate(cfg, model, dataset, out, sampler=class_faithful_sampler(64))

    _gate_stage(monkeypatch, "privacy-gate", with_fake_generator)
    result = stages.run("privacy-gate", cfg, model=model_uri, dataset=dataset, out=str(root / "few" / "privacy"))
    assert not result.passed and result.metrics["n_pairs"] == 2
    assert "too few samples: 2 synthetic-real pairs < privacy.min_pairs=5" in result.reasons
    tags = _tags(cfg, model_uri)
    assert tags["gate.privacy"] == "failed" and "too few samples" in tags["gate.privacy.details"]
    assert not stages.run("promote", cfg, model=model_uri, out=str(root / "few" / "promote")).approved


def test_gate_timeouts_come_from_the_config(version):
    cfg = version[0]
    assert gates.gate_timeout_s(cfg, "privacy") == 1 and gates.gate_timeout_s(cfg, "utility") == 1
    assert gates.gate_timeout_s(cfg, "human") == cfg.study.human_gate.timeout_s
