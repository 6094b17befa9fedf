"""Start training on 1 process (in this process) or N local/multi-node processes (torchrun).

The lead's CLI calls :func:`launch` (``medisyn train ... --nproc N``). A cluster container runs
``python -m medisyn.train.launch ...``, which reads the PyTorchJob environment and execs torchrun
with a static rendezvous on the master pod; see docs/training.md for the exact command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from medisyn.config import RunConfig, load_config

log = logging.getLogger("medisyn.train.launch")


def torchrun_command(config_path: str, cache_uri: str, checkpoints_uri: str, nproc_per_node: int, nnodes: int = 1,
                     node_rank: int = 0, master_addr: str | None = None, master_port: int | None = None,
                     result_json: str | None = None, overrides: list[str] | None = None) -> list[str]:
    """The torchrun command line that starts ``nproc_per_node`` training workers on this node."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}"]
    if nnodes == 1 and master_addr is None:
        cmd.append("--standalone")  # a local rendezvous on a free port (ENVIRONMENT.md)
    else:
        if not master_addr or not master_port:
            raise ValueError("a multi-node launch needs master_addr and master_port (PyTorchJob sets them)")
        # Static rendezvous on the master pod, as PyTorchJob's master/worker replicas expect. Restarts
        # are the pod's job (restartPolicy: OnFailure): the restarted job resumes from `latest`.
        cmd += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--master_addr={master_addr}",
                f"--master_port={master_port}", "--max_restarts=0"]
    cmd += ["-m", "medisyn.train", "--config", config_path, "--cache", cache_uri, "--checkpoints", checkpoints_uri]
    for o in overrides or []:
        cmd += ["--set", o]
    if result_json:
        cmd += ["--result-json", result_json]
    return cmd


def launch(cfg: RunConfig, cache_uri: str, checkpoints_uri: str, nproc: int = 1):
    """Train with ``nproc`` local processes: in-process for 1, ``torchrun --standalone`` for more.

    Returns the :class:`~medisyn.train.trainer.TrainResult` (rebuilt from the main worker's JSON
    when the workers ran under torchrun). Raises ``subprocess.CalledProcessError`` on failure.
    """
    from medisyn.train.trainer import TrainResult, train

    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    cfg.train.batch_geometry(nproc)  # refuse a batch that does not divide before starting anything
    if nproc == 1:
        return train(cfg, cache_uri, checkpoints_uri)
    with tempfile.TemporaryDirectory(prefix="medisyn-launch-") as tmp:
        config_path = Path(tmp) / "config.yaml"
        config_path.write_text(cfg.to_yaml())  # the resolved config: overrides already applied
        result_path = Path(tmp) / "result.json"
        cmd = torchrun_command(str(config_path), cache_uri, checkpoints_uri, nproc, result_json=str(result_path))
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        log.info("launching %s", " ".join(cmd))
        subprocess.run(cmd, check=True, env=env)
        data = json.loads(result_path.read_text())
    return TrainResult(**data)


def _env_int(*names: str, default: int | None = None) -> int | None:
    for n in names:
        if os.environ.get(n):
            return int(os.environ[n])
    return default


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m medisyn.train.launch",
        description="Launch training on this node: in-process for 1 process, torchrun otherwise. Node count, "
        "node rank and master address default to the PyTorchJob environment (PET_*, then MASTER_ADDR/"
        "MASTER_PORT/WORLD_SIZE/RANK).",
    )
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--cache", required=True, help="latent cache prefix (output of `medisyn encode`)")
    p.add_argument("--checkpoints", required=True, help="checkpoints prefix to write and resume from")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="config override, repeatable")
    p.add_argument("--nproc-per-node", default=os.environ.get("PET_NPROC_PER_NODE", "auto"),
                   help="worker processes on this node; auto = number of visible GPUs, else 1")
    p.add_argument("--nnodes", type=int, default=_env_int("PET_NNODES", "WORLD_SIZE", default=1),
                   help="nodes (pods) in the job; default $PET_NNODES, else $WORLD_SIZE (one process per pod)")
    p.add_argument("--node-rank", type=int, default=_env_int("PET_NODE_RANK", "RANK", default=0),
                   help="this node's index; default $PET_NODE_RANK, else $RANK")
    p.add_argument("--master-addr", default=os.environ.get("PET_MASTER_ADDR") or os.environ.get("MASTER_ADDR"),
                   help="rendezvous host (the master pod); default $PET_MASTER_ADDR / $MASTER_ADDR")
    p.add_argument("--master-port", type=int, default=_env_int("PET_MASTER_PORT", "MASTER_PORT"),
                   help="rendezvous port; default $PET_MASTER_PORT / $MASTER_PORT")
    p.add_argument("--result-json", default=None, help="URI where the main worker writes the TrainResult JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    nproc = args.nproc_per_node
    if nproc == "auto":
        import torch

        nproc = torch.cuda.device_count() or 1
    nproc = int(nproc)
    cfg = load_config(args.config, args.overrides)
    cfg.train.batch_geometry(nproc * args.nnodes)  # fail fast, before the rendezvous
    if nproc * args.nnodes == 1:
        from medisyn.train.__main__ import main as worker

        return worker(["--config", args.config, "--cache", args.cache, "--checkpoints", args.checkpoints]
                      + [a for o in args.overrides for a in ("--set", o)]
                      + (["--result-json", args.result_json] if args.result_json else []))
    master_addr = args.master_addr if args.nnodes > 1 else None
    cmd = torchrun_command(args.config, args.cache, args.checkpoints, nproc, args.nnodes, args.node_rank,
                           master_addr, args.master_port, args.result_json, args.overrides)
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a dead peer fails the job, not hangs it
    log.info("exec %s", " ".join(cmd))
    os.execv(cmd[0], cmd)
    return 0  # unreachable


if __name__ == "__main__":
    sys.exit(main())
