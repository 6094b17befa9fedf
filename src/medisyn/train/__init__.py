"""Training: the latent cache (``encode``) and the U-Net fine-tune (``trainer``), section 4.2.

This package module stays light (no torch import) so that the scorer and the CLI can list
checkpoints cheaply. See docs/training.md for the formats and the launch commands.

    medisyn.train.encode.encode(cfg, dataset_uri, cache_uri) -> EncodeResult
    medisyn.train.trainer.train(cfg, cache_uri, checkpoints_uri) -> TrainResult
    medisyn.train.torchrun.launch(cfg, cache_uri, checkpoints_uri, nproc=1) -> TrainResult
    medisyn.train.list_checkpoints(checkpoints_uri, kind="epoch") -> list[str]
"""

from __future__ import annotations

import json
import re

from medisyn import storage

CHECKPOINT_KINDS = ("epoch", "step")
_NAME = re.compile(r"^(epoch|step)-(\d+)$")


def checkpoint_name(kind: str, number: int) -> str:
    """``epoch-0001`` (1-based epoch) or ``step-00000200`` (global optimizer step), docs/stages.md."""
    if kind == "epoch":
        return f"epoch-{number:04d}"
    if kind == "step":
        return f"step-{number:08d}"
    raise ValueError(f"checkpoint kind must be one of {CHECKPOINT_KINDS}, got {kind!r}")


def read_checkpoint_info(checkpoint_uri: str) -> dict:
    """The checkpoint's ``checkpoint.json`` ({"epoch", "global_step", "kind", ...})."""
    return storage.read_json(storage.join(checkpoint_uri, "checkpoint.json"))


def list_checkpoints(checkpoints_uri: str, kind: str | None = "epoch") -> list[str]:
    """URIs of the *complete* checkpoints under ``checkpoints_uri``, oldest first.

    ``kind`` is "epoch", "step", or None for both (then ordered by global step, an epoch checkpoint
    after a step checkpoint of the same step). A directory without ``_COMPLETE`` (a run killed while
    publishing, a rotation in progress) is never returned, so it is never loaded.
    """
    if kind is not None and kind not in CHECKPOINT_KINDS:
        raise ValueError(f"kind must be one of {CHECKPOINT_KINDS} or None, got {kind!r}")
    found: list[tuple[tuple, str]] = []
    for uri in storage.listdir(checkpoints_uri):
        m = _NAME.match(uri.rsplit("/", 1)[-1])
        if not m or (kind is not None and m.group(1) != kind):
            continue
        if not storage.is_complete(uri):
            continue
        if kind is None:
            try:
                step = int(read_checkpoint_info(uri)["global_step"])
            except (FileNotFoundError, KeyError, ValueError, json.JSONDecodeError):
                continue
            found.append(((step, m.group(1) == "epoch"), uri))
        else:
            found.append(((int(m.group(2)),), uri))
    return [uri for _, uri in sorted(found)]


def latest_checkpoint(checkpoints_uri: str) -> str | None:
    """The complete checkpoint with the highest global step (epoch or step kind), or None."""
    all_ckpts = list_checkpoints(checkpoints_uri, kind=None)
    return all_ckpts[-1] if all_ckpts else None


__all__ = ["CHECKPOINT_KINDS", "checkpoint_name", "latest_checkpoint", "list_checkpoints", "read_checkpoint_info"]
