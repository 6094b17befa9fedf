"""Gate plumbing: GateResult, the fail-closed runner, the dataset's catalog, sampler checks. (The gates read
the dataset with ``medisyn.data``: tests/test_data_reader.py.)"""

from __future__ import annotations

import dataclasses
import json

import pytest

from medisyn.evaluate.gates import GateResult, failed_result, run_gate, sample_in_batches


def _ok(*args, **kwargs):
    return GateResult(gate="ok", passed=True, metrics={"x": 1.0, "args": list(args), **kwargs}, reasons=("fine",))


def _raise(exc):
    def fn(*args):
        raise exc
    return fn


ERROR_CASES = [
    ("value error", _raise(ValueError("too few images")), "ValueError: too few images"),
    ("file missing", _raise(FileNotFoundError("no dataset")), "FileNotFoundError: no dataset"),
    ("memory", _raise(MemoryError("oom")), "MemoryError: oom"),
    ("import", _raise(ImportError("no module medisyn.generate")), "ImportError"),
    ("wrong return type", lambda *a: {"passed": True}, "not a GateResult"),
    ("None return", lambda *a: None, "not a GateResult"),
]


@pytest.mark.parametrize("name,fn,reason", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_run_gate_fails_closed(name, fn, reason):
    result = run_gate("privacy", fn, "cfg", "model")
    assert isinstance(result, GateResult)
    assert result.passed is False and result.gate == "privacy"
    assert reason in result.reasons[0] and result.error
    assert result.report_uri is None and result.figures == ()


def test_run_gate_passes_through_a_result_and_arguments():
    result = run_gate("ok", _ok, 1, 2, flag=True)
    assert result.passed is True
    assert result.metrics == {"x": 1.0, "args": [1, 2], "flag": True}


def test_run_gate_reraises_keyboard_interrupt():
    with pytest.raises(KeyboardInterrupt):
        run_gate("g", _raise(KeyboardInterrupt()))


def test_a_failure_always_has_a_reason():
    result = run_gate("g", lambda: GateResult(gate="g", passed=False))
    assert result.passed is False and result.reasons == ("gate failed without a stated reason",)


def test_gate_result_is_frozen_and_serialisable():
    r = GateResult(gate="utility", passed=False, metrics={"a": 0.5}, reasons=("r1", "r2"),
                   report_uri="file:///x/report.json", figures=("file:///x/f.png",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.passed = True  # type: ignore[misc]
    d = r.to_dict()
    assert d == {"gate": "utility", "passed": False, "metrics": {"a": 0.5}, "reasons": ["r1", "r2"],
                 "report_uri": "file:///x/report.json", "figures": ["file:///x/f.png"], "error": None}
    assert json.loads(json.dumps(d)) == d
    f = failed_result("privacy", "boom", error="E", n=3)
    assert f.to_dict()["reasons"] == ["boom"] and f.metrics == {"n": 3} and not f.passed


def test_sample_in_batches_checks_the_contract():
    calls = []

    def sampler(prompts, seeds):
        calls.append(len(prompts))
        return [None] * len(prompts)

    out = [im for batch in sample_in_batches(sampler, ["p"] * 7, list(range(7)), 3) for im in batch]
    assert len(out) == 7 and calls == [3, 3, 1]
    with pytest.raises(ValueError, match="seeds"):
        list(sample_in_batches(sampler, ["p"] * 2, [1], 3))
    with pytest.raises(RuntimeError, match="returned 1 images for 2"):
        list(sample_in_batches(lambda p, s: [None], ["p", "q"], [1, 2], 3))


def test_dataset_catalog_prefers_the_copy_inside_the_dataset(tmp_path):
    import yaml

    from medisyn.catalog import builtin_catalog_text
    from medisyn.config import RunConfig
    from medisyn.evaluate.gates import dataset_catalog

    cfg = RunConfig()
    assert dataset_catalog(cfg, str(tmp_path)).origin == "builtin"  # no copy: the paper's catalog
    data = yaml.safe_load(builtin_catalog_text())
    data["privacy_prompts"] = data["privacy_prompts"][:1]
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(data))
    cat = dataset_catalog(cfg, str(tmp_path))
    assert cat.origin.endswith("catalog.yaml") and len(cat.privacy_prompt_specs()) == 2
    # an explicit data.catalog wins over the copy
    explicit = RunConfig.model_validate({"data": {"catalog": str(tmp_path / "catalog.yaml")}})
    assert dataset_catalog(explicit, "/nonexistent").origin == str(tmp_path / "catalog.yaml")
