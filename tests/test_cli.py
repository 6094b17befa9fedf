"""The CLI: every stage is a subcommand; config problems are exit code 2 with the field named."""

from __future__ import annotations

import json

import pytest

from medisyn.cli import build_parser, main
from medisyn.stages import STAGES as RUNNER_STAGES

STAGES = ["validate-config", *RUNNER_STAGES]  # every stage of the runner is a command (CLI parity)


def test_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for stage in STAGES:
        assert stage in out


@pytest.mark.parametrize("stage", STAGES)
def test_every_flag_has_help(stage):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[stage]
    for action in sub._actions:
        if action.dest != "help":
            assert action.help, f"{stage} {action.option_strings or action.dest} has no help"


def test_validate_config_prints_hash(capsys):
    assert main(["validate-config", "--config", "configs/demo.yaml", "--set", "train.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 2" in out
    assert len(json.loads(out[out.rindex("{"):])["config_hash"]) == 64


def test_config_from_a_file_uri_with_overrides(capsys, tmp_path):
    from medisyn.config import load_config

    stored = tmp_path / "config.yaml"
    stored.write_text(load_config("configs/demo.yaml").to_yaml())
    assert main(["validate-config", "--config", f"file://{stored}", "--set", "fid.num_samples=7"]) == 0
    assert "num_samples: 7" in capsys.readouterr().out


def test_plan_stores_the_resolved_config_that_later_steps_read(capsys, tmp_path):
    assert main(["plan", "--config", "configs/demo.yaml", "--set", "train.epochs=2", "--root", str(tmp_path),
                 "--run-tag", "r1"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["config_uri"] == f"file://{tmp_path}/r1/config.yaml"
    assert plan["dataset_uri"] == f"file://{tmp_path}/r1/dataset"
    assert main(["validate-config", "--config", plan["config_uri"]]) == 0
    assert "epochs: 2" in capsys.readouterr().out
    assert json.loads((tmp_path / "r1" / "result.json").read_text())["kind"] == "medisyn.RunPlan"


def test_yaml_no_stays_a_string_for_an_enum_field(capsys):
    # YAML 1.1 reads a bare `no` as False: a user's first override must still work
    assert main(["validate-config", "--config", "configs/demo.yaml", "--set", "train.mixed_precision=no"]) == 0
    assert "mixed_precision: 'no'" in capsys.readouterr().out


def test_a_failed_verdict_is_exit_status_3():
    from medisyn.cli import EXIT_NOT_PASSED, _exit_status
    from medisyn.evaluate.gates import GateResult
    from medisyn.registry import PromoteResult

    assert _exit_status(GateResult(gate="privacy", passed=False, reasons=("x",))) == EXIT_NOT_PASSED
    assert _exit_status(GateResult(gate="privacy", passed=True)) == 0
    assert _exit_status(PromoteResult("m", "1", False, None, {}, "no")) == EXIT_NOT_PASSED
    assert _exit_status(PromoteResult("m", "1", True, "approved", {}, "ok")) == 0


def test_bad_override_exit_code_2(capsys):
    assert main(["validate-config", "--config", "configs/demo.yaml", "--set", "train.epochs=zero"]) == 2
    assert "train.epochs" in capsys.readouterr().err


def test_missing_config_file(capsys):
    assert main(["validate-config", "--config", "does/not/exist.yaml"]) == 2
    assert "cannot read config" in capsys.readouterr().err
