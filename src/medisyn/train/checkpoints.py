"""Training checkpoints (docs/stages.md, docs/training.md): ``epoch-NNNN`` / ``step-NNNNNNNN``
directories holding ``unet/``, ``training_state/`` and ``checkpoint.json``, published with
``_COMPLETE`` last; written and read back here, for an exact resume.

The training state (optimizer, LR schedule, EMA, RNG) is stored without pickle:
``<part>.safetensors`` for the tensors and ``<part>.json`` for the rest, so resuming cannot run code.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from medisyn import storage
from medisyn.train import checkpoint_name, latest_checkpoint, list_checkpoints, read_checkpoint_info

log = logging.getLogger("medisyn.train")


# ----------------------------------------------------------------------------------------------
# Training state on disk without pickle: <name>.safetensors (tensors) + <name>.json (the rest)
# ----------------------------------------------------------------------------------------------
STATE_FORMAT = "medisyn.training_state/1"
STATE_PARTS = ("optimizer", "scheduler", "rng")  # + "ema" with train.use_ema
LEGACY_PICKLES = ("optimizer.pt", "scheduler.pt", "ema.pt", "rng.pt")  # the old format: never opened


class CheckpointFormatError(ValueError):
    """A checkpoint's training_state/ is in the old pickle format, or malformed."""


def _encode_state(obj, tensors: dict[str, torch.Tensor]):
    """A JSON tree for ``obj``; tensors go to ``tensors`` and are referenced by key. Containers are
    tagged (``{"dict": [[k, v], ...]}``, ``{"list": [...]}``, ``{"tuple": [...]}``, ``{"tensor": key}``,
    ``{"float": "nan"}``) so ints, tuples and non-string dict keys round-trip exactly."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"float": repr(obj)}
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"tensor": key}
    if isinstance(obj, dict):
        for k in obj:
            if isinstance(k, bool) or not isinstance(k, (int, str)):
                raise TypeError(f"training state: dict key {k!r} ({type(k).__name__}) is not str or int")
        return {"dict": [[k, _encode_state(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, list):
        return {"list": [_encode_state(v, tensors) for v in obj]}
    if isinstance(obj, tuple):
        return {"tuple": [_encode_state(v, tensors) for v in obj]}
    raise TypeError(f"training state: cannot store a {type(obj).__name__} without pickle")


def _decode_state(node, tensors: dict[str, torch.Tensor]):
    """Inverse of ``_encode_state``; anything else is refused."""
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, dict) and len(node) == 1:
        ((tag, value),) = node.items()
        if tag == "tensor" and isinstance(value, str) and value in tensors:
            return tensors[value]
        if tag == "float" and value in ("inf", "-inf", "nan"):
            return float(value)
        if tag in ("list", "tuple") and isinstance(value, list):
            items = [_decode_state(v, tensors) for v in value]
            return items if tag == "list" else tuple(items)
        if tag == "dict" and isinstance(value, list):
            out = {}
            for pair in value:
                if (not isinstance(pair, list) or len(pair) != 2 or isinstance(pair[0], bool)
                        or not isinstance(pair[0], (int, str))):
                    raise CheckpointFormatError(f"malformed dict entry {str(pair)[:80]}")
                out[pair[0]] = _decode_state(pair[1], tensors)
            return out
    raise CheckpointFormatError(f"unexpected value {str(node)[:80]}")


def _write_state(state_dir: Path, name: str, obj) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode_state(obj, tensors)
    save_file(tensors, str(state_dir / f"{name}.safetensors"), metadata={"format": STATE_FORMAT})
    (state_dir / f"{name}.json").write_text(json.dumps(
        {"format": STATE_FORMAT, "tensors": sorted(tensors), "state": tree}, allow_nan=False))


def _legacy_error(uri: str, found: list[str]) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"checkpoint {uri} stores its training state in the old pickle format ({', '.join(found)}), which is "
        "never loaded: unpickling a file can run code. Its optimizer, scheduler, EMA and RNG state cannot be "
        "resumed; restart from its U-Net weights (unet/ or training_state/unet_raw/, safetensors) in a fresh run "
        "with a new checkpoints prefix or train.resume=null (docs/training.md, 'Checkpoints')"
    )


def _read_state(state_dir: Path, name: str, uri: str):
    """Load ``<name>.json`` + ``<name>.safetensors``; nothing here can unpickle."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = state_dir / f"{name}.json"
    if not path.is_file():
        if (state_dir / f"{name}.pt").exists():
            raise _legacy_error(uri, [f"{name}.pt"])
        raise CheckpointFormatError(f"checkpoint {uri} has no training_state/{name}.json")
    where = f"checkpoint {uri}: training_state/{name}"

    def _no_constants(value: str):
        raise CheckpointFormatError(f"{where}.json: non-standard JSON constant {value}")

    try:
        doc = json.loads(path.read_text(), parse_constant=_no_constants)
        if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
            raise CheckpointFormatError(f"format is not {STATE_FORMAT!r}")
        tensors = load_file(str(state_dir / f"{name}.safetensors"), device="cpu")
        if sorted(tensors) != doc.get("tensors"):
            raise CheckpointFormatError(f"tensors {sorted(tensors)} do not match the JSON's {doc.get('tensors')}")
        return _decode_state(doc["state"], tensors)
    except CheckpointFormatError as e:
        raise CheckpointFormatError(f"{where} is malformed: {e}") from None
    except (OSError, ValueError, KeyError, RecursionError, SafetensorError) as e:
        raise CheckpointFormatError(f"{where} is unreadable: {type(e).__name__}: {e}") from None


def _resolve_resume(resume: str | None, checkpoints_uri: str) -> str | None:
    if resume is None:
        return None
    if resume == "latest":
        return latest_checkpoint(checkpoints_uri)
    uri = storage.join(checkpoints_uri, resume)
    if not storage.is_complete(uri):
        raise FileNotFoundError(f"train.resume={resume!r}: {uri} is missing or incomplete")
    return uri


def _remove_incomplete(checkpoints_uri: str) -> None:
    """Leftovers of a killed run (no _COMPLETE): never listed, removed so a retry starts clean."""
    for uri in storage.listdir(checkpoints_uri):
        name = uri.rsplit("/", 1)[-1]
        if (name.startswith("epoch-") or name.startswith("step-")) and not storage.is_complete(uri):
            log.warning("removing incomplete checkpoint %s (a run stopped while writing it)", uri)
            storage.remove(uri)
    if not storage.is_remote(checkpoints_uri):  # hidden staging dirs of storage.publish_dir
        root = storage.local_path(checkpoints_uri)
        for p in root.glob(".*.staging-*") if root.exists() else []:
            shutil.rmtree(p, ignore_errors=True)


def _rotate(checkpoints_uri: str, limit: int | None) -> None:
    """Keep the newest ``limit`` step checkpoints; epoch checkpoints are never rotated (the scorer
    ranks every epoch, section 4.2). The marker goes first, so a half-deleted one is never listed."""
    if limit is None:
        return
    steps = list_checkpoints(checkpoints_uri, kind="step")
    for uri in steps[: max(0, len(steps) - limit)]:
        storage.remove(storage.join(uri, storage.COMPLETE_MARKER))
        storage.remove(uri)


# ----------------------------------------------------------------------------------------------
# RNG state
# ----------------------------------------------------------------------------------------------
def _rng_state() -> dict:
    """RNG states of python, numpy, torch (and CUDA) as plain JSON values and tensors: no pickle."""
    version, internal, gauss_next = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    state: dict = {
        "python": {"version": int(version), "internal": [int(x) for x in internal], "gauss_next": gauss_next},
        "numpy": {"name": str(np_name), "keys": [int(k) for k in np_keys], "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    """Inverse of ``_rng_state``; every value is type-checked and rebuilt, never trusted as an object."""
    py, npst = state["python"], state["numpy"]
    gauss_next = py["gauss_next"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["internal"]),
                     None if gauss_next is None else float(gauss_next)))
    np.random.set_state((str(npst["name"]), np.array([int(k) for k in npst["keys"]], dtype=np.uint32),
                         int(npst["pos"]), int(npst["has_gauss"]), float(npst["cached_gaussian"])))
    if not isinstance(state["torch"], torch.Tensor) or state["torch"].dtype != torch.uint8:
        raise TypeError("torch RNG state must be a uint8 tensor")
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        if not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in state["cuda"]):
            raise TypeError("CUDA RNG states must be uint8 tensors")
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Checkpoints (docs/stages.md): unet/, training_state/, checkpoint.json, _COMPLETE last
# ----------------------------------------------------------------------------------------------
def _save_checkpoint(accelerator, checkpoints_uri, kind, number, raw_unet, optimizer, lr_scheduler, ema,
                     next_epoch, next_step, global_step, manifest, cfg) -> None:
    """Main process writes a staged directory and publishes it (``_COMPLETE`` last); every rank
    waits, so no rank runs ahead of a checkpoint that may be needed to resume it."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        name = checkpoint_name(kind, number)
        uri = storage.join(checkpoints_uri, name)
        info = {"epoch": next_epoch if kind == "epoch" else next_epoch + 1, "global_step": global_step, "kind": kind,
                "name": name, "dataset_hash": manifest["dataset_hash"], "cache_key": manifest["cache_key"],
                "ema": ema is not None, "config_hash": cfg.config_hash()}
        with storage.staged_dir(uri, metadata=info) as d:
            state = d / "training_state"
            state.mkdir()
            if ema is not None:
                # unet/ holds what a scorer should load: the EMA weights; the raw weights go to
                # training_state/ for an exact resume.
                raw_unet.save_pretrained(state / "unet_raw", safe_serialization=True)
                ema.store(raw_unet.parameters())
                ema.copy_to(raw_unet.parameters())
                raw_unet.save_pretrained(d / "unet", safe_serialization=True)
                ema.restore(raw_unet.parameters())
                _write_state(state, "ema", ema.state_dict())
            else:
                raw_unet.save_pretrained(d / "unet", safe_serialization=True)
            # safetensors + JSON, never pickle: resuming must not be able to run code (docs/training.md)
            _write_state(state, "optimizer", optimizer.state_dict())
            _write_state(state, "scheduler", lr_scheduler.state_dict())
            _write_state(state, "rng", _rng_state())
            (state / "data_position.json").write_text(json.dumps(
                {"epoch": next_epoch, "step_in_epoch": next_step, "global_step": global_step,
                 "order": "randperm(seed, epoch)", "seed": cfg.train.seed}, indent=2))
            (d / "checkpoint.json").write_text(json.dumps(info, indent=2, sort_keys=True))
        if kind == "step":
            _rotate(checkpoints_uri, cfg.train.checkpoints_total_limit)
        log.info("checkpoint %s written (global step %d)", uri, global_step)
    accelerator.wait_for_everyone()


def _load_checkpoint(uri, raw_unet, optimizer, lr_scheduler, ema, manifest) -> tuple[int, int, int]:
    """Restore weights, optimizer, scheduler, EMA and RNG; returns (epoch, step_in_epoch, global_step)."""
    from safetensors.torch import load_file

    info = read_checkpoint_info(uri)
    if info.get("dataset_hash") != manifest["dataset_hash"]:
        raise ValueError(
            f"checkpoint {uri} was trained on dataset {info.get('dataset_hash')}, the cache holds "
            f"{manifest['dataset_hash']}: use a fresh checkpoints prefix or train.resume=null"
        )
    with storage.local_copy(uri) as d:
        state = Path(d) / "training_state"
        # No pickle on this path: the old *.pt files are refused (never opened), stray ones ignored.
        legacy = sorted(f for f in LEGACY_PICKLES if (state / f).exists())
        if legacy and not all((state / f"{part}.json").is_file() for part in STATE_PARTS):
            raise _legacy_error(uri, legacy)
        if legacy:
            log.warning("checkpoint %s: ignoring %s (pickle files are never loaded)", uri, ", ".join(legacy))
        parts = {part: _read_state(state, part, uri) for part in STATE_PARTS}
        if ema is not None and not (state / "ema.json").is_file() and not (state / "ema.pt").exists():
            raise ValueError(f"train.use_ema is on but checkpoint {uri} has no EMA state")
        ema_state = _read_state(state, "ema", uri) if ema is not None else None
        weights_dir = state / "unet_raw" if (state / "unet_raw").exists() else Path(d) / "unet"
        raw_unet.load_state_dict(load_file(str(weights_dir / "diffusion_pytorch_model.safetensors")))
        optimizer.load_state_dict(parts["optimizer"])
        lr_scheduler.load_state_dict(parts["scheduler"])
        if ema is not None:
            ema.load_state_dict(ema_state)
        try:
            _set_rng_state(parts["rng"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointFormatError(f"checkpoint {uri}: training_state/rng.json is malformed: {e}") from None
        pos = json.loads((state / "data_position.json").read_text())
    return int(pos["epoch"]), int(pos["step_in_epoch"]), int(pos["global_step"])
