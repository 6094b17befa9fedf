"""The training worker: ``python -m medisyn.train --config C --cache URI --checkpoints URI``.

Runs :func:`medisyn.train.trainer.train` in this process. torchrun starts one of these per device
(:func:`medisyn.train.torchrun.launch` builds that command); run directly it is a 1-process run. The
main process (global rank 0) prints the :class:`TrainResult` as JSON and writes it to
``--result-json`` when given, which is how the launcher gets the result back.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    description = __doc__.splitlines()[0] if __doc__ else None
    p = argparse.ArgumentParser(prog="python -m medisyn.train", description=description)
    p.add_argument("--config", required=True, help="run config YAML (see configs/paper.yaml)")
    p.add_argument("--cache", required=True, help="latent cache prefix written by `medisyn encode` (file:// or s3://)")
    p.add_argument("--checkpoints", required=True, help="checkpoints prefix to write (and resume from)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="config override, repeatable (e.g. --set train.epochs=2)")
    p.add_argument("--result-json", default=None, help="where the main process writes the TrainResult as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from medisyn.config import load_config
    from medisyn.train.trainer import train

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    result = train(cfg, args.cache, args.checkpoints)
    if int(os.environ.get("RANK", "0")) == 0:
        text = json.dumps(result.to_dict(), indent=2, default=str)
        if args.result_json:
            from medisyn import storage

            storage.write_text(args.result_json, text + "\n")
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
