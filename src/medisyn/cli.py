"""``medisyn <stage>``: parse arguments, then run one stage through the stage runner.

Every step of the pipeline is a command here, and each goes through ``medisyn.stages.run``, the
same runner the Kubeflow components and cluster jobs use, so running the steps by hand ends with
the same outputs, MLflow runs and registry state as the pipeline (docs/stages.md, "By hand").

The config is validated before anything heavy is imported, so a bad value fails in about a second
with a message naming the field. Every stage prints its result as JSON on stdout. Exit status: 0
done, 2 bad config or arguments, 3 a gate failed or promote did not approve, 4 the registry or the
artifact store was unreachable or refused our identity (never reported as "not approved"), 1 any other error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from medisyn.config import ConfigError, RunConfig, load_config  # noqa: E402
from medisyn.results import StageResult  # noqa: E402

log = logging.getLogger("medisyn")

EXIT_BAD_INPUT = 2
EXIT_NOT_PASSED = 3
EXIT_REGISTRY_UNAVAILABLE = 4
EXIT_MODEL_REFUSED = 5  # a consumer refused a model: revoked, unsigned (not approved) or not the signed files

# command -> function(args) -> the stage's inputs (medisyn.stages.STAGES[command].fn's parameters)
InputsFn = Callable[[argparse.Namespace], dict[str, Any]]


def _gates(text: str) -> list[str]:
    return [g.strip() for g in text.split(",") if g.strip()]


def _nproc(text: str) -> int | str:
    return text if text == "auto" else int(text)


def _job_inputs(keys: tuple[str, ...]) -> InputsFn:
    """Inputs of a cluster launcher: its URIs, the job's settings, and a config its pods can read."""

    def inputs(a: argparse.Namespace) -> dict[str, Any]:
        launcher = {"launcher": a.launcher} if hasattr(a, "launcher") else {}
        return {"job_config": a.job_config or a.config, **{k: getattr(a, k) for k in keys},
                "cluster_json": a.cluster, "image": a.image, "run_tag": a.run_tag, "timeout_s": a.timeout_s,
                **launcher}

    return inputs


# adds one stage's subcommand with --config and --set: add(name, help, inputs) -> its parser
AddStage = Callable[[str, str, InputsFn | None], argparse.ArgumentParser]


def build_parser() -> argparse.ArgumentParser:
    from medisyn.study.cli import add_parser as add_study_parser

    p = argparse.ArgumentParser(prog="medisyn", description=(__doc__ or "").splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="<stage>")

    def add(name: str, help: str, inputs: InputsFn | None) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(inputs=inputs)
        _config_args(sp, "train.epochs=2")
        return sp

    sub.add_parser("pipeline", add_help=False,
                   help="compile | run | schedule | runs: the KFP pipeline (medisyn pipeline --help)")
    sub.add_parser("keygen", add_help=False,
                   help="make a signing key pair for a role (gate | promoter): medisyn keygen --help")
    sub.add_parser("verify-pulled", add_help=False,
                   help="check a directory made by `medisyn pull` against the promoter's signature, offline")
    _add_run_commands(add)
    _add_data_and_training_commands(add)
    _add_model_commands(add)
    _add_consumer_commands(add)
    # medisyn study create|add-reader|serve|close|report (docs/study.md)
    add_study_parser(sub, lambda sp: _config_args(sp, "study.images_per_class=5"))
    return p


def _config_args(sp: argparse.ArgumentParser, example: str) -> None:
    sp.add_argument("--config", default=None,
                    help="run config YAML: a path, file:// or s3:// URI (default: the paper's full-scale defaults)")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help=f"override a config field, e.g. --set {example} (repeatable)")


def _add_run_commands(add: AddStage) -> None:
    """validate-config, plan, record-outcome, build-tiny-models, demo-data: a run's frame."""
    add("validate-config", "validate a config and print it resolved, with its hash", None)
    sp = add("plan", "lay out a run's output URIs under <root>/<run tag> and store its resolved config there",
             lambda a: {"root": a.root, "run_tag": a.run_tag, "raw": a.raw, "pipeline_run_id": a.pipeline_run_id,
                        "pipeline_version": a.pipeline_version})
    sp.add_argument("--root", default="", help="base URI of runs (default: the config's storage.root)")
    sp.add_argument("--run-tag", required=True, help="this run's folder name under the root")
    sp.add_argument("--raw", default="", help="landing zone URI (default: <run>/raw, where demo-data writes)")
    sp.add_argument("--pipeline-run-id", default="",
                    help="the orchestrator's run id, tagged on every stage run and version (default: the run tag)")
    sp.add_argument("--pipeline-version", default="", help="the pipeline version that runs (tag on the parent run)")
    sp = add("record-outcome", "record a pipeline run's status, failed step and reason on its parent MLflow run "
             "and its model version (the pipeline's exit handler)",
             lambda a: {"root": a.root, "run_tag": a.run_tag, "pipeline_run_id": a.pipeline_run_id,
                        "status": a.status, "error": a.error})
    sp.add_argument("--root", default="", help="base URI of runs (default: the config's storage.root)")
    sp.add_argument("--run-tag", default="", help="the run's folder name (default: --pipeline-run-id)")
    sp.add_argument("--pipeline-run-id", default="", help="the orchestrator's run id")
    sp.add_argument("--status", default="FAILED", choices=("SUCCEEDED", "FAILED", "CANCELLED"),
                    help="the run's final status")
    sp.add_argument("--error", default="", help="the orchestrator's error message, if any")
    sp = add("build-tiny-models", "build the tiny models at the config's model paths (random init, or with"
             " models.tiny.pretrain a VAE and FID extractor trained on phantoms)",
             lambda a: {"overwrite": a.overwrite})
    sp.add_argument("--overwrite", action="store_true", help="rebuild even if present")
    sp = add("demo-data", "write a phantom raw landing zone (procedurally generated, not patient data)",
             lambda a: {"out": a.out, "n_per_class": a.n_per_class, "seed": a.seed})
    sp.add_argument("--out", required=True, help="destination URI (file:// path or s3://)")
    sp.add_argument("--n-per-class", type=int, default=0,
                    help="images per class (default: the config's demo.images_per_class)")
    sp.add_argument("--seed", type=int, default=0, help="random seed")


def _add_data_and_training_commands(add: AddStage) -> None:
    """check-landing-zone, preprocess, encode, train and their cluster jobs."""
    sp = add("check-landing-zone", "fail fast when a landing zone does not exist", lambda a: {"raw": a.raw})
    sp.add_argument("--raw", required=True, help="landing zone URI")
    sp = add("preprocess", "raw images -> normalized, captioned, split Parquet shards (Ray Data)",
             lambda a: {"raw": a.raw, "out": a.out})
    sp.add_argument("--raw", required=True, help="landing zone URI")
    sp.add_argument("--out", required=True, help="dataset output URI")
    sp = add("encode", "cache VAE latents and text embeddings of the training split",
             lambda a: {"dataset": a.dataset, "cache": a.cache})
    sp.add_argument("--dataset", required=True, help="dataset URI (output of preprocess)")
    sp.add_argument("--cache", required=True, help="latent cache URI")
    sp = add("train", "fine-tune the SDXL U-Net from the latent cache; one checkpoint per epoch",
             lambda a: {"cache": a.cache, "checkpoints": a.checkpoints, "nproc": a.nproc})
    sp.add_argument("--cache", required=True, help="latent cache URI (output of encode)")
    sp.add_argument("--checkpoints", required=True, help="checkpoints URI")
    sp.add_argument("--nproc", type=_nproc, default=1,
                    help="processes on this node (torchrun for more than 1); 'auto' = one per visible GPU")
    for name, what, io in (
        ("preprocess-rayjob", "run preprocess as a KubeRay RayJob and wait for it",
         (("raw", "landing zone URI"), ("out", "dataset output URI"))),
        ("train-job", "run train as a multi-node TrainJob (Kubeflow Trainer v2) or PyTorchJob and wait for it",
         (("cache", "latent cache URI"), ("checkpoints", "checkpoints URI"))),
    ):
        sp = add(name, what, _job_inputs(tuple(k for k, _ in io)))
        for key, text in io:
            sp.add_argument(f"--{key}", required=True, help=text)
        sp.add_argument("--job-config", default=None,
                        help="the run config at a URI the job's pods can read (default: --config)")
        sp.add_argument("--cluster", default="{}", help="medisyn.launch.ClusterSettings as JSON (nodes, GPUs...)")
        sp.add_argument("--image", default="", help="image of the job's pods (default: the project image)")
        sp.add_argument("--run-tag", default="", help="makes the job name unique (default: the config's name)")
        sp.add_argument("--timeout-s", type=float, default=7 * 24 * 3600, help="give up after this many seconds")
        if name == "train-job":
            sp.add_argument("--launcher", choices=("auto", "trainjob", "pytorchjob"), default="auto",
                            help="TrainJob or PyTorchJob; auto = TrainJob where the cluster serves Kubeflow Trainer v2")


def _add_model_commands(add: AddStage) -> None:
    """score, register, the gates, promote, revoke: from checkpoints to an approved version."""
    from medisyn.stages import GATE_ORDER

    sp = add("score", "FID of every epoch checkpoint; picks the best",
             lambda a: {"dataset": a.dataset, "checkpoints": a.checkpoints, "out": a.out})
    sp.add_argument("--dataset", required=True, help="dataset URI")
    sp.add_argument("--checkpoints", required=True, help="checkpoints URI")
    sp.add_argument("--out", required=True, help="score report URI")
    sp = add("register", "register the best scored checkpoint as a new model version with alias 'candidate'",
             lambda a: {"scores": a.scores, "dataset": a.dataset, "out": a.out})
    sp.add_argument("--scores", required=True, help="score report URI (output of score)")
    sp.add_argument("--dataset", required=True, help="dataset URI (lineage)")
    sp.add_argument("--out", default="", help="where to store the RegisteredModel result.json (optional)")
    for name, what in (("privacy-gate", "memorization test (BiomedCLIP NN + patch distance + Wilcoxon)"),
                       ("utility-gate", "classifier utility (2000 real vs 1000 real vs 1000+1000 synthetic)")):
        sp = add(name, what + "; the verdict is recorded on the model version",
                 lambda a: {"model": a.model, "dataset": a.dataset, "out": a.out})
        sp.add_argument("--model", required=True,
                        help="models:/<name>/<version>, models:/<name>@<alias> or a directory")
        sp.add_argument("--dataset", required=True, help="dataset URI")
        sp.add_argument("--out", required=True, help="report URI")
    sp = add("human-gate", "reader-study gate: a closed study whose synthetic accuracy is within "
             "study.human_gate.margin of the real accuracy; the verdict is recorded on the model version",
             lambda a: {"model": a.model, "out": a.out, "study": a.study})
    sp.add_argument("--model", required=True, help="models:/<name>/<version>, models:/<name>@<alias> or a version")
    sp.add_argument("--out", required=True, help="report URI")
    sp.add_argument("--study", default="", help="study id (default: the version's most recently closed study)")
    sp = add("promote", "set alias 'approved' iff every named gate passed on the version (fails closed)",
             lambda a: {"model": a.model, "gates": _gates(a.gates), "out": a.out})
    sp.add_argument("--model", required=True,
                    help="models:/<name>/<version>, models:/<name>@<alias> or a version number")
    sp.add_argument("--gates", default=",".join(GATE_ORDER), help="comma-separated gates that must have passed")
    sp.add_argument("--out", default="", help="where to store the PromoteResult result.json (optional)")
    sp = add("revoke", "withdraw an approval with a reason (promoter identity); @approved falls back to the "
             "previous standing approval, or is removed", lambda a: {"model": a.model, "reason": a.reason})
    sp.add_argument("--model", required=True, help="models:/<name>/<version> or models:/<name>@approved")
    sp.add_argument("--reason", required=True, help="why (recorded on the version, shown to consumers)")


def _add_consumer_commands(add: AddStage) -> None:
    """generate, pull, report: what a consumer of a version runs."""
    sp = add("generate", "generate PNG images from a registered model or a local pipeline directory",
             lambda a: {"model": a.model, "prompts": a.prompt, "n": a.n, "out": a.out, "seed": a.seed,
                        "guidance_scale": a.guidance_scale, "num_inference_steps": a.steps})
    sp.add_argument("--model", required=True, help="models:/<name>@<alias>, models:/<name>/<version> or a directory")
    sp.add_argument("--prompt", action="append", required=True, help="text prompt (repeatable)")
    sp.add_argument("-n", type=int, default=4, help="images per prompt")
    sp.add_argument("--out", required=True, help="output directory or URI")
    sp.add_argument("--seed", type=int, default=0, help="first seed; image i uses seed + i")
    sp.add_argument("--guidance-scale", type=float, default=None,
                    help="override the model's gated CFG scale (warned; generation.json records gated: false)")
    sp.add_argument("--steps", type=int, default=None,
                    help="override the model's gated sampler steps (warned; recorded as not gated)")
    sp = add("pull", "download a registered model as a ready-to-use diffusers pipeline directory",
             lambda a: {"model": a.model, "dest": a.dest, "overwrite": a.overwrite})
    sp.add_argument("model", help="models:/<name>@<alias> or models:/<name>/<version>")
    sp.add_argument("--dest", required=True, help="destination directory")
    sp.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")
    sp = add("report", "write a model version's evaluation report (one self-contained HTML page, docs/report.md) "
             "to OUT/report.html and log it to MLflow on the version", lambda a: {"model": a.model, "out": a.out})
    sp.add_argument("model", help="models:/<name>@<alias> or models:/<name>/<version>")
    sp.add_argument("--out", required=True, help="directory (path, file:// or s3:// URI) that receives report.html")


def _exit_status(result: StageResult | None) -> int:
    """3 when the result is a verdict that did not pass (a failed gate, promote not approved)."""
    from medisyn.evaluate.gates import GateResult
    from medisyn.registry import PromoteResult

    if isinstance(result, GateResult) and not result.passed:
        return EXIT_NOT_PASSED
    if isinstance(result, PromoteResult) and not result.approved:
        return EXIT_NOT_PASSED
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pipeline"]:  # the KFP pipeline itself, not a stage (medisyn.pipeline.cli)
        from medisyn.pipeline.cli import main as pipeline_main

        return pipeline_main(argv[1:])
    if argv[:1] == ["keygen"]:
        return keygen(argv[1:])
    if argv[:1] == ["verify-pulled"]:
        return verify_pulled_dir(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        cfg: RunConfig = load_config(args.config, args.set)
    except ConfigError as exc:
        print(f"medisyn: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.command == "study":
        from medisyn.study.cli import run as run_study

        return run_study(args, cfg)
    if args.inputs is None:  # validate-config
        print(cfg.to_yaml())
        print(json.dumps({"config_hash": cfg.config_hash()}))
        return 0
    log.info("config %s (hash %s)", args.config or "<defaults>", cfg.config_hash()[:12])
    from medisyn import stages
    from medisyn.preflight import PreflightError
    from medisyn.registry import IntegrityError, RegistryError, is_outage

    try:
        result = stages.run(args.command, cfg, **args.inputs(args))
    except ConfigError as exc:  # e.g. the patient-ID salt missing outside a demo: before any work
        print(f"medisyn: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (IntegrityError, LookupError) as exc:  # a refused model (issue #21): one line, never a traceback
        print(f"medisyn: model refused: {' '.join(str(exc).split())[:400]}", file=sys.stderr)
        return EXIT_MODEL_REFUSED
    except (RegistryError, PreflightError) as exc:  # an outage is a failure with its reason, never a verdict
        print(f"medisyn: registry or storage unavailable: {' '.join(str(exc).split())[:400]}", file=sys.stderr)
        return EXIT_REGISTRY_UNAVAILABLE
    except Exception as exc:
        if not is_outage(exc):
            raise
        reason = " ".join(str(exc).split())[:300]
        print(f"medisyn: registry or storage unavailable: {type(exc).__name__}: {reason}", file=sys.stderr)
        return EXIT_REGISTRY_UNAVAILABLE
    if result is not None:
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True, default=str))
    return _exit_status(result)


def keygen(argv: list[str]) -> int:
    """``medisyn keygen --role gate|promoter --out DIR``: a new Ed25519 key pair for one signing role
    (issue #21): ``DIR/<role>/key.pem`` (mode 0600, for the role's Secret) and ``DIR/<role>.pub`` (for the
    chart's ``signing.trust.<role>``). Refuses to overwrite an existing key."""
    from medisyn import signing

    p = argparse.ArgumentParser(prog="medisyn keygen", description="a signing key pair for one role (issue #21)")
    p.add_argument("--role", required=True, choices=signing.ROLES, help="whose key: the gate steps' or the promoter's")
    p.add_argument("--out", required=True, help="directory for <role>/key.pem and <role>.pub")
    args = p.parse_args(argv)
    out = Path(args.out)
    if (out / args.role / "key.pem").exists():
        print(f"medisyn keygen: {out / args.role / 'key.pem'} exists: not overwriting a key", file=sys.stderr)
        return EXIT_BAD_INPUT
    key, pub = signing.write_key_pair(out / args.role, "key")
    key.rename(key.with_name("key.pem"))
    pub.replace(out / f"{args.role}.pub")
    print(json.dumps({"private_key": str(out / args.role / "key.pem"), "public_key": str(out / f"{args.role}.pub"),
                      "keyid": signing.key_id((out / f"{args.role}.pub").read_bytes())}, indent=2))
    return 0


def verify_pulled_dir(argv: list[str]) -> int:
    """``medisyn verify-pulled DIR``: the promoter's signature in DIR covers exactly DIR's files, checked
    against $MEDISYN_TRUST_DIR with no registry (a revocation after the pull is not seen)."""
    p = argparse.ArgumentParser(prog="medisyn verify-pulled", description="offline check of a pulled model")
    p.add_argument("dir", help="a directory made by medisyn pull")
    args = p.parse_args(argv)
    from medisyn.registry import IntegrityError
    from medisyn.registry.consumer import verify_pulled

    try:
        statement = verify_pulled(args.dir)
    except IntegrityError as exc:
        print(f"medisyn: model refused: {' '.join(str(exc).split())[:400]}", file=sys.stderr)
        return EXIT_MODEL_REFUSED
    print(json.dumps({"verified": True, "approved": statement["predicate"].get("approved"),
                      "by": statement["predicate"].get("by"), "keyid": statement["_signed_by"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
