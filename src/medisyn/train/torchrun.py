"""Start training on this node: 1 process in this process, or N processes under torchrun.

``medisyn train --nproc N|auto`` calls :func:`launch`, locally and in every replica of a PyTorchJob
(``medisyn.launch`` submits those; this module only starts processes on the node it runs on). The
node topology comes from the environment the Kubeflow operators set (``PET_NNODES``,
``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ``PET_MASTER_PORT``, ``PET_NPROC_PER_NODE``); without it the
run is a single node and torchrun uses a ``--standalone`` rendezvous.

torchrun runs in a child process (not ``exec``), so that node rank 0 can return the
:class:`~medisyn.train.trainer.TrainResult` the main worker wrote, and the stage runner in this
process stores it as ``result.json``; other nodes return ``None``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medisyn.config import RunConfig

if TYPE_CHECKING:
    from medisyn.train.trainer import TrainResult

log = logging.getLogger("medisyn.train.torchrun")

AUTO = "auto"


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        # e.g. an elastic "1:4" PET_NNODES: MediSyn jobs use a fixed size and a static rendezvous
        raise ValueError(f"${name}={value!r} is not an integer") from None


def resolve_nproc(nproc: int | str, env: Mapping[str, str] | None = None) -> int:
    """Processes on this node: an int, or ``auto`` = ``$PET_NPROC_PER_NODE``, else the visible GPUs, else 1."""
    env = os.environ if env is None else env
    if isinstance(nproc, str) and nproc.strip().lower() == AUTO:
        pet = env.get("PET_NPROC_PER_NODE", "").strip()
        if pet and pet != AUTO:
            nproc = pet
        else:
            import torch

            return torch.cuda.device_count() or 1
    try:
        n = int(nproc)
    except ValueError:
        raise ValueError(f"nproc must be an integer or {AUTO!r}, got {nproc!r}") from None
    if n < 1:
        raise ValueError(f"nproc must be >= 1, got {n}")
    return n


@dataclass(frozen=True)
class Topology:
    """Where this node sits in the job: processes here, nodes in all, this node's rank, rendezvous."""

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @classmethod
    def from_env(cls, nproc: int | str = 1, env: Mapping[str, str] | None = None) -> Topology:
        """This node's topology from the operator's ``PET_*`` variables (single node without them)."""
        env = os.environ if env is None else env
        nnodes = _env_int(env, "PET_NNODES") or 1
        node_rank = _env_int(env, "PET_NODE_RANK") or 0
        if nnodes < 1 or not 0 <= node_rank < nnodes:
            raise ValueError(f"node rank {node_rank} is outside 0..{nnodes - 1} ($PET_NNODES / $PET_NODE_RANK)")
        addr = port = None
        if nnodes > 1:
            addr = env.get("PET_MASTER_ADDR") or env.get("MASTER_ADDR") or None
            port = _env_int(env, "PET_MASTER_PORT") or _env_int(env, "MASTER_PORT")
            if not addr or not port:
                raise ValueError(f"a {nnodes}-node launch needs $PET_MASTER_ADDR and $PET_MASTER_PORT")
        return cls(resolve_nproc(nproc, env), nnodes, node_rank, addr, port)


def torchrun_command(config_path: str, cache_uri: str, checkpoints_uri: str, nproc_per_node: int, nnodes: int = 1,
                     node_rank: int = 0, master_addr: str | None = None, master_port: int | None = None,
                     result_json: str | None = None) -> list[str]:
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
    if result_json:
        cmd += ["--result-json", result_json]
    return cmd


def launch(cfg: RunConfig, cache_uri: str, checkpoints_uri: str, nproc: int | str = 1,
           env: Mapping[str, str] | None = None) -> TrainResult | None:
    """Train with ``nproc`` processes on this node (``auto``: see :func:`resolve_nproc`).

    One process in the whole job: :func:`~medisyn.train.trainer.train` in this process. Otherwise
    torchrun starts the workers (``--standalone`` on one node, a static rendezvous on the master
    across ``$PET_NNODES`` nodes) from the resolved config written to a temp YAML; returns the
    :class:`TrainResult` the main worker wrote on node rank 0 and ``None`` on the other nodes. A
    failed torchrun raises ``subprocess.CalledProcessError`` with its exit code.
    """
    from medisyn.train.trainer import TrainResult, train

    env = os.environ if env is None else env
    topo = Topology.from_env(nproc, env)
    cfg.train.batch_geometry(topo.world_size)  # refuse a batch that does not divide before starting anything
    if topo.world_size == 1:
        return train(cfg, cache_uri, checkpoints_uri)
    with tempfile.TemporaryDirectory(prefix="medisyn-torchrun-") as tmp:
        config_path = Path(tmp) / "config.yaml"
        config_path.write_text(cfg.to_yaml())  # the resolved config: overrides already applied
        result_path = Path(tmp) / "result.json"  # the global main worker lives on node rank 0
        cmd = torchrun_command(str(config_path), cache_uri, checkpoints_uri, topo.nproc_per_node, topo.nnodes,
                               topo.node_rank, topo.master_addr, topo.master_port, result_json=str(result_path))
        child_env = dict(env)
        child_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // topo.nproc_per_node)))
        child_env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a dead peer fails the job, not hangs it
        log.info("launching %s", " ".join(cmd))
        proc = subprocess.run(cmd, env=child_env, check=False)
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, cmd)
        if topo.node_rank != 0:
            return None
        if not result_path.exists():
            raise RuntimeError(f"torchrun exited 0 but the main worker wrote no result ({' '.join(cmd)})")
        return TrainResult.from_dict(json.loads(result_path.read_text()))
