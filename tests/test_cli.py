"""The CLI: every stage is a subcommand; config problems are exit code 2 with the field named."""

from __future__ import annotations

import json

import pytest

from medisyn.cli import build_parser, main

STAGES = ["validate-config", "build-tiny-models", "demo-data", "preprocess", "encode", "train", "score",
          "register", "privacy-gate", "utility-gate", "promote", "generate", "pull"]


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


def test_config_json_roundtrip_with_overrides(capsys):
    from medisyn.config import load_config

    cfg = load_config("configs/demo.yaml")
    assert main(["validate-config", "--config-json", cfg.model_dump_json(), "--set", "fid.num_samples=7"]) == 0
    assert "num_samples: 7" in capsys.readouterr().out


def test_bad_override_exit_code_2(capsys):
    assert main(["validate-config", "--config", "configs/demo.yaml", "--set", "train.epochs=zero"]) == 2
    assert "train.epochs" in capsys.readouterr().err


def test_missing_config_file(capsys):
    assert main(["validate-config", "--config", "does/not/exist.yaml"]) == 2
    assert "cannot read config" in capsys.readouterr().err
