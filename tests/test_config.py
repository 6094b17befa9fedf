"""The run config: paper defaults, strict validation, batch geometry, fast failure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medisyn.config import ConfigError, RunConfig, TrainConfig, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[1]

PAPER_DEFAULTS = [  # (dotted field, section 4 value)
    ("train.epochs", 15),
    ("train.learning_rate", 1e-5),
    ("train.lr_scheduler", "constant"),
    ("train.effective_batch_size", 128),
    ("train.mixed_precision", "bf16"),
    ("train.empty_prompt_prob", 0.10),
    ("train.prediction_type", "epsilon"),
    ("data.resolution", 512),
    ("data.hu_window_level", 100.0),
    ("data.hu_window_width", 700.0),
    ("data.percentile_low", 0.5),
    ("data.percentile_high", 99.5),
    ("data.split_fractions", (0.8, 0.1, 0.1)),
    ("sampling.guidance_scale", 7.0),
    ("sampling.scheduler", "euler"),
    ("sampling.num_inference_steps", 50),
    ("fid.num_samples", 10_000),
    ("privacy.images_per_prompt", 500),
    ("privacy.patch_size", 128),
    ("privacy.distance_threshold", 0.15),
    ("utility.n_real_full", 2000),
    ("utility.n_real_half", 1000),
    ("utility.n_synthetic", 1000),
    ("utility.epochs", 15),
    ("utility.learning_rate", 1e-4),
    ("utility.bootstrap_resamples", 2000),
]


def _get(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


@pytest.mark.parametrize("field,value", PAPER_DEFAULTS)
def test_defaults_are_the_papers(field, value):
    assert _get(RunConfig(), field) == value


@pytest.mark.parametrize("field,value", PAPER_DEFAULTS)
def test_paper_yaml_states_the_papers_numbers(field, value):
    assert _get(load_config(REPO / "configs" / "paper.yaml"), field) == value


def test_demo_config_is_valid_and_tiny():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.models.tiny is not None
    assert cfg.data.resolution == 64
    assert cfg.train.batch_geometry(1) == (8, 1)


BAD_VALUES = [  # (override, field named in the error)
    ("train.epochs=0", "train.epochs"),
    ("train.learning_rate=-1", "train.learning_rate"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("train.learning_rat=1e-5", "train.learning_rat"),
    ("fid.num_samples=abc", "fid.num_samples"),
    ("privacy.alpha=2", "privacy.alpha"),
    ("sampling.scheduler=ddim", "sampling.scheduler"),
    ("bogus_section.x=1", "bogus_section"),
]


@pytest.mark.parametrize("override,field", BAD_VALUES)
def test_bad_value_names_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(REPO / "configs" / "demo.yaml", [override])


def test_unknown_key_says_unknown(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"train\.epoch: unknown key"):
        load_config(p)


def test_not_a_mapping(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


@pytest.mark.parametrize(
    "per_device,accum,world,expected",
    [
        (None, 1, 4, (32, 1)),      # the paper: 4 GPUs, no accumulation -> 32 per device
        (8, None, 4, (8, 4)),
        (8, None, 1, (8, 16)),
        (16, 2, 4, (16, 2)),
        (None, 2, 2, (32, 2)),
    ],
)
def test_batch_geometry_derives_the_third(per_device, accum, world, expected):
    t = TrainConfig(per_device_batch_size=per_device, gradient_accumulation_steps=accum)
    assert t.batch_geometry(world) == expected
    pd, ga = t.batch_geometry(world)
    assert pd * ga * world == 128


@pytest.mark.parametrize("per_device,accum,world", [(None, 3, 1), (7, None, 2), (16, 2, 3)])
def test_batch_geometry_refuses_what_does_not_divide(per_device, accum, world):
    t = TrainConfig(per_device_batch_size=per_device, gradient_accumulation_steps=accum)
    with pytest.raises(ConfigError, match="effective_batch_size"):
        t.batch_geometry(world)


def test_overrides_parse_yaml_scalars():
    assert parse_overrides(["train.epochs=2", "fid.bootstrap_resamples=0", "models.vae=null"]) == {
        "train": {"epochs": 2}, "fid": {"bootstrap_resamples": 0}, "models": {"vae": None},
    }


# --set values are read as YAML, then resolved against the field's type in the RunConfig schema:
# YAML 1.1 reads no/off/yes/on/n/y/true/false as booleans, which must stay the words a string or
# enum field expects, and stay booleans where the field is a bool.
OVERRIDE_VALUES = [  # (override, (section, field), parsed value, value in the validated RunConfig)
    # an enum (Literal) of strings: the words stay words
    ("train.mixed_precision=no", ("train", "mixed_precision"), "no", "no"),
    ("train.mixed_precision=fp16", ("train", "mixed_precision"), "fp16", "fp16"),
    ("train.mixed_precision='no'", ("train", "mixed_precision"), "no", "no"),
    ("runtime.device=cpu", ("runtime", "device"), "cpu", "cpu"),
    # a bool field: YAML's booleans stay booleans
    ("train.use_ema=true", ("train", "use_ema"), True, True),
    ("train.use_ema=false", ("train", "use_ema"), False, False),
    ("train.use_ema=no", ("train", "use_ema"), False, False),
    ("train.use_ema=yes", ("train", "use_ema"), True, True),
    ("train.gradient_checkpointing=off", ("train", "gradient_checkpointing"), False, False),
    ("train.gradient_checkpointing=on", ("train", "gradient_checkpointing"), True, True),
    ("tracking.proxy_multipart_upload=False", ("tracking", "proxy_multipart_upload"), False, False),
    # plain string fields: the text as written, whatever YAML guessed
    ("tracking.experiment=yes", ("tracking", "experiment"), "yes", "yes"),
    ("tracking.experiment=2024", ("tracking", "experiment"), "2024", "2024"),
    ("tracking.experiment=2024-01-01", ("tracking", "experiment"), "2024-01-01", "2024-01-01"),
    ("storage.s3_endpoint_url=on", ("storage", "s3_endpoint_url"), "on", "on"),
    # numbers are still numbers, null is still null
    ("train.epochs=3", ("train", "epochs"), 3, 3),
    ("train.learning_rate=0.0001", ("train", "learning_rate"), 0.0001, 0.0001),
    ("train.learning_rate=1e-5", ("train", "learning_rate"), "1e-5", 1e-5),  # YAML 1.1: no dot, a string
    ("storage.upload_timeout_s=30", ("storage", "upload_timeout_s"), 30, 30.0),
    ("train.max_grad_norm=null", ("train", "max_grad_norm"), None, None),
    ("models.vae=null", ("models", "vae"), None, None),
    # containers are resolved as a whole
    ("privacy.prompts=[yes, no, Chest X-ray]", ("privacy", "prompts"), ["yes", "no", "Chest X-ray"],
     ["yes", "no", "Chest X-ray"]),
    ("data.split_fractions=[0.8, 0.1, 0.1]", ("data", "split_fractions"), [0.8, 0.1, 0.1], (0.8, 0.1, 0.1)),
]


@pytest.mark.parametrize("override,path,parsed,final", OVERRIDE_VALUES, ids=[o[0] for o in OVERRIDE_VALUES])
def test_override_values_follow_the_field_type(override, path, parsed, final):
    section, field = path
    assert parse_overrides([override]) == {section: {field: parsed}}
    value = getattr(getattr(load_config(None, [override]), section), field)
    assert value == final and type(value) is type(final)


def test_overrides_of_a_nested_section_and_a_list_of_sections_are_resolved():
    overrides = ["models.tiny.unet_block_out_channels=[32, 64]",
                 "utility.tasks=[{name: t, specialty: s, image_type: i, multilabel: yes, classes: [no, yes]}]"]
    assert parse_overrides(overrides) == {
        "models": {"tiny": {"unet_block_out_channels": [32, 64]}},
        "utility": {"tasks": [{"name": "t", "specialty": "s", "image_type": "i", "multilabel": "yes",
                               "classes": ["no", "yes"]}]},
    }
    cfg = load_config(REPO / "configs" / "demo.yaml", overrides)
    assert cfg.utility.tasks is not None
    task = cfg.utility.tasks[0]
    assert task.multilabel is True and task.classes == ["no", "yes"]


def test_the_cli_override_path_gives_an_enum_word(tmp_path):
    """What `medisyn --set` does: the resolved config, dumped, merged with the overrides, validated."""
    from medisyn.config import deep_merge, validate_config

    base = load_config(REPO / "configs" / "demo.yaml").model_dump(mode="json")
    cfg = validate_config(deep_merge(base, parse_overrides(["train.mixed_precision=no", "train.use_ema=on"])))
    assert cfg.train.mixed_precision == "no" and cfg.train.use_ema is True


BAD_OVERRIDES = [  # (override, what the error says): each names the field
    ("train.epochs=yes", r"train\.epochs: .*integer.*'yes'"),  # a YAML bool is never silently the integer 1
    ("train.epochs=true", r"train\.epochs: .*integer.*'true'"),
    ("train.use_ema=maybe", r"train\.use_ema: .*boolean"),
    ("train.mixed_precision=maybe", r"train\.mixed_precision: .*'no', 'bf16' or 'fp16'.*'maybe'"),
    ("train.mixed_precision=null", r"train\.mixed_precision: "),
    ("train.mixed_precisio=no", r"train\.mixed_precisio: unknown key"),
    ("trian.epochs=2", r"trian: unknown key"),
    ("train.epochs.x=2", r"train\.epochs: "),
    ("tracking.experiment=[a", r"override tracking\.experiment: .*not valid YAML"),
    ("train.epochs", r"section\.field=value"),
    ("train..epochs=2", r"section\.field=value"),
]


@pytest.mark.parametrize("override,message", BAD_OVERRIDES, ids=[o[0] for o in BAD_OVERRIDES])
def test_a_bad_override_is_a_clear_error_naming_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_config_hash_is_stable_and_sensitive():
    a, b = RunConfig(), RunConfig()
    assert a.config_hash() == b.config_hash()
    assert load_config(None, ["train.epochs=3"]).config_hash() != a.config_hash()


def test_cli_rejects_bad_config_without_heavy_imports(tmp_path):
    """Issue 2: a bad config fails in under 5 s naming the field. It is fast by construction: the CLI
    validates before importing torch/ray/mlflow, which this asserts (no wall-clock assertion)."""
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  epochs: -3\n")
    probe = (
        "import sys; from medisyn.cli import main; rc = main(['validate-config', '--config', sys.argv[1]]);"
        "heavy = [m for m in ('torch', 'ray', 'mlflow', 'diffusers') if m in sys.modules];"
        "print('HEAVY', heavy, file=sys.stderr); sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", probe, str(p)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "train.epochs" in proc.stderr
    assert "HEAVY []" in proc.stderr


# Issue #12: malformed configs get one clear error each; never the paper's full-scale defaults by accident.
EMPTY_CONFIGS = [("empty file", ""), ("only a comment", "# nothing here\n"), ("null", "null\n"),
                 ("empty mapping", "{}\n")]


@pytest.mark.parametrize("name,text", EMPTY_CONFIGS, ids=[c[0] for c in EMPTY_CONFIGS])
def test_an_empty_config_file_is_an_error_not_the_papers_defaults(tmp_path, name, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=r"is empty: state the run"):
        load_config(p)


@pytest.mark.parametrize("text,message", [("[]", "must be a mapping"), ("null", "is empty"), ("{}", "is empty"),
                                          ("[1, 2]", "must be a mapping"), ('"train"', "must be a mapping"),
                                          ("{bad json", "not valid JSON")])
def test_config_json_must_be_a_non_empty_object(text, message):
    from medisyn.config import config_from_json

    with pytest.raises(ConfigError, match=message):
        config_from_json(text)


STRICT_TYPES = [  # (section, field, value, what the error says)
    ("train", "epochs", True, "a boolean is not accepted here"),
    ("train", "learning_rate", False, "a boolean is not accepted here"),
    ("train", "max_grad_norm", True, "a boolean is not accepted here"),
    ("storage", "retry_attempts", True, "a boolean is not accepted here"),
    ("train", "use_ema", 1, "valid boolean"),
    ("train", "gradient_checkpointing", 0.0, "valid boolean"),
]


@pytest.mark.parametrize("section,field,value,message", STRICT_TYPES, ids=[f"{s[1]}={s[2]!r}" for s in STRICT_TYPES])
def test_booleans_and_numbers_do_not_mix(section, field, value, message):
    with pytest.raises(ConfigError, match=rf"{section}\.{field}: .*{message}"):
        from medisyn.config import validate_config

        validate_config({section: {field: value}})


@pytest.mark.parametrize("argv", [["--set", "train.epochs=true"], ["--set", "train.use_ema=1"]])
def test_cli_refuses_a_bool_for_an_int_with_exit_2(argv, capsys):
    from medisyn.cli import main

    assert main(["validate-config", *argv]) == 2
    assert "train." in capsys.readouterr().err


def test_cli_refuses_an_empty_config_file_with_exit_2(tmp_path, capsys):
    from medisyn.cli import main

    (tmp_path / "empty.yaml").write_text("")
    assert main(["validate-config", "--config", str(tmp_path / "empty.yaml")]) == 2
    assert "is empty" in capsys.readouterr().err


def test_retry_policy_fields_reach_storage():
    from medisyn import storage

    cfg = load_config(None, ["storage.retry_attempts=2", "storage.read_timeout_s=3"])
    policy = storage.RetryPolicy.from_config(cfg.storage)
    assert policy.attempts == 2 and policy.read_timeout_s == 3.0 and policy.wait_s(1) == cfg.storage.retry_backoff_s
