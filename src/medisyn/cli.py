"""``medisyn <stage>``: parse arguments, load and validate the config, call one stage function.

The config is validated before anything heavy is imported, so a bad value fails in about a second
with a message naming the field. Every stage prints its result as JSON on stdout (last line), so
scripts and pipeline steps can read it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from medisyn.config import ConfigError, RunConfig, config_from_json, load_config  # noqa: E402

log = logging.getLogger("medisyn")


def _config(args: argparse.Namespace) -> RunConfig:
    if getattr(args, "config_json", None):
        cfg = config_from_json(args.config_json)
        if args.set:
            from medisyn.config import deep_merge, parse_overrides, validate_config

            cfg = validate_config(deep_merge(cfg.model_dump(mode="json"), parse_overrides(args.set)), "<json>")
    else:
        cfg = load_config(args.config, args.set)
    from medisyn import storage

    storage.configure(cfg.storage.s3_endpoint_url)
    return cfg


def _emit(result: Any) -> None:
    data = result.to_dict() if hasattr(result, "to_dict") else result
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


# ----------------------------------------------------------------------------------------------
# Stage commands: each is a thin call into src/medisyn (the same function KFP and tests call).
# ----------------------------------------------------------------------------------------------
def cmd_validate_config(args, cfg: RunConfig):
    print(cfg.to_yaml())
    return {"config_hash": cfg.config_hash()}


def cmd_build_tiny_models(args, cfg: RunConfig):
    from medisyn.models import build_tiny_models

    return build_tiny_models(cfg, overwrite=args.overwrite)


def cmd_demo_data(args, cfg: RunConfig):
    from medisyn.data.demo import write_landing_zone

    return write_landing_zone(args.out, n_per_class=args.n_per_class, seed=args.seed)


def cmd_preprocess(args, cfg: RunConfig):
    from medisyn.data.preprocess import preprocess

    return preprocess(cfg, args.raw, args.out)


def cmd_encode(args, cfg: RunConfig):
    from medisyn.train.encode import encode

    return encode(cfg, args.dataset, args.cache)


def cmd_train(args, cfg: RunConfig):
    from medisyn.train.launch import launch

    return launch(cfg, args.cache, args.checkpoints, nproc=args.nproc)


def cmd_score(args, cfg: RunConfig):
    from medisyn.evaluate.fid import score_checkpoints

    return score_checkpoints(cfg, args.dataset, args.checkpoints, args.out)


def cmd_register(args, cfg: RunConfig):
    from medisyn import registry, storage

    score = storage.read_json(args.score) if not args.score.lstrip().startswith("{") else json.loads(args.score)
    return registry.register_candidate(cfg, args.checkpoint, score, args.dataset)


def cmd_privacy_gate(args, cfg: RunConfig):
    from medisyn.evaluate.gates import run_gate
    from medisyn.evaluate.privacy import privacy_gate

    return run_gate("privacy", privacy_gate, cfg, args.model, args.dataset, args.out)


def cmd_utility_gate(args, cfg: RunConfig):
    from medisyn.evaluate.gates import run_gate
    from medisyn.evaluate.utility import utility_gate

    return run_gate("utility", utility_gate, cfg, args.model, args.dataset, args.out)


def cmd_promote(args, cfg: RunConfig):
    from medisyn import registry

    return registry.promote(cfg, args.version, [g.strip() for g in args.gates.split(",") if g.strip()])


def cmd_generate(args, cfg: RunConfig):
    from medisyn.generate import generate

    return generate(cfg, args.model, args.prompt, args.n, args.out, seed=args.seed)


def cmd_pull(args, cfg: RunConfig):
    from medisyn import registry

    return {"path": str(registry.pull(args.model, args.dest))}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medisyn", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="<stage>")

    def add(name: str, fn: Callable, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        sp.add_argument("--config", default=None, help="run config YAML (default: the paper's full-scale defaults)")
        sp.add_argument("--config-json", default=None, help="the resolved run config as JSON (KFP components)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.epochs=2 (repeatable)")
        return sp

    add("validate-config", cmd_validate_config, "validate a config and print it resolved, with its hash")
    sp = add("build-tiny-models", cmd_build_tiny_models, "build tiny random-init models at the config's model paths")
    sp.add_argument("--overwrite", action="store_true", help="rebuild even if present")
    sp = add("demo-data", cmd_demo_data, "write a phantom raw landing zone (procedurally generated, not patient data)")
    sp.add_argument("--out", required=True, help="destination URI (file:// path or s3://)")
    sp.add_argument("--n-per-class", type=int, default=24, help="images per class")
    sp.add_argument("--seed", type=int, default=0, help="random seed")
    sp = add("preprocess", cmd_preprocess, "raw images -> normalized, captioned, split Parquet shards (Ray Data)")
    sp.add_argument("--raw", required=True, help="landing zone URI")
    sp.add_argument("--out", required=True, help="dataset output URI")
    sp = add("encode", cmd_encode, "cache VAE latents and text embeddings of the training split")
    sp.add_argument("--dataset", required=True, help="dataset URI (output of preprocess)")
    sp.add_argument("--cache", required=True, help="latent cache URI")
    sp = add("train", cmd_train, "fine-tune the SDXL U-Net from the latent cache; one checkpoint per epoch")
    sp.add_argument("--cache", required=True, help="latent cache URI (output of encode)")
    sp.add_argument("--checkpoints", required=True, help="checkpoints URI")
    sp.add_argument("--nproc", type=int, default=1, help="local processes (torchrun); cluster runs use a PyTorchJob")
    sp = add("score", cmd_score, "FID of every epoch checkpoint; picks the best")
    sp.add_argument("--dataset", required=True, help="dataset URI")
    sp.add_argument("--checkpoints", required=True, help="checkpoints URI")
    sp.add_argument("--out", required=True, help="score report URI")
    sp = add("register", cmd_register, "register a checkpoint as a new model version with alias 'candidate'")
    sp.add_argument("--checkpoint", required=True, help="checkpoint URI (best epoch)")
    sp.add_argument("--score", required=True, help="score report JSON (URI or inline)")
    sp.add_argument("--dataset", required=True, help="dataset URI")
    for name, fn, what in (("privacy-gate", cmd_privacy_gate, "memorization test (BiomedCLIP NN + patch distance + Wilcoxon)"),
                           ("utility-gate", cmd_utility_gate, "classifier utility (2000 real vs 1000 real vs 1000+1000 synthetic)")):
        sp = add(name, fn, what)
        sp.add_argument("--model", required=True, help="models:/<name>/<version>, models:/<name>@<alias> or a directory")
        sp.add_argument("--dataset", required=True, help="dataset URI")
        sp.add_argument("--out", required=True, help="report URI")
    sp = add("promote", cmd_promote, "set alias 'approved' iff every named gate passed (fails closed)")
    sp.add_argument("--version", required=True, help="model version number")
    sp.add_argument("--gates", default="privacy,utility", help="comma-separated gate names that must have passed")
    sp = add("generate", cmd_generate, "generate PNG images from a registered model or a local pipeline directory")
    sp.add_argument("--model", required=True, help="models:/<name>@<alias>, models:/<name>/<version> or a directory")
    sp.add_argument("--prompt", action="append", required=True, help="text prompt (repeatable)")
    sp.add_argument("-n", type=int, default=4, help="images per prompt")
    sp.add_argument("--out", required=True, help="output directory or URI")
    sp.add_argument("--seed", type=int, default=0, help="first seed; image i uses seed + i")
    sp = add("pull", cmd_pull, "download a registered model as a ready-to-use diffusers pipeline directory")
    sp.add_argument("model", help="models:/<name>@<alias> or models:/<name>/<version>")
    sp.add_argument("--dest", required=True, help="destination directory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        cfg = _config(args)
        if args.command != "validate-config":
            log.info("config %s (hash %s)", args.config or "<json/defaults>", cfg.config_hash()[:12])
        result = args.fn(args, cfg)
    except ConfigError as exc:
        print(f"medisyn: {exc}", file=sys.stderr)
        return 2
    _emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
