"""Approval gates: the common result type, the fail-closed runner, and what the gates share
(reading a dataset split in bounded memory, the generation sampler, figures and reports).

Rule of the house (ARCHITECTURE.md): *gates fail closed*. A gate that raises, times out inside its
function, or returns something that is not a :class:`GateResult` yields a failed result carrying the
error as its reason, so a broken evaluation can never let a model be approved.
"""

from __future__ import annotations

import io
import logging
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from medisyn import storage
from medisyn.config import RunConfig

log = logging.getLogger("medisyn.gates")

# ``sampler(prompts, seeds) -> images``: one PIL image per (prompt, seed) pair, in order. The gates
# take one so tests can inject fake generators (copies of training images, noise); the default
# is :func:`generation_sampler`, which calls ``medisyn.generate``.
Sampler = Callable[[list[str], list[int]], list[Any]]


@dataclass(frozen=True)
class GateResult:
    """The verdict of one gate. ``passed`` is True only when the gate ran to completion and its
    criteria held; ``reasons`` says why in words (always non-empty for a failure)."""

    gate: str
    passed: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    reasons: tuple[str, ...] = ()
    report_uri: str | None = None
    figures: tuple[str, ...] = ()
    error: str | None = None  # set when the gate raised: the verdict is then a fail-closed failure

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reasons"] = list(self.reasons)
        d["figures"] = list(self.figures)
        return d


def failed_result(gate: str, reason: str, error: str | None = None, **metrics: Any) -> GateResult:
    return GateResult(gate=gate, passed=False, metrics=dict(metrics), reasons=(reason,), error=error)


def run_gate(name: str, fn: Callable[..., GateResult], *args: Any, **kwargs: Any) -> GateResult:
    """Run ``fn(*args, **kwargs)`` and return its GateResult; ANY exception (or a non-GateResult
    return value) becomes a failed GateResult with the error as its reason (fail closed)."""
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - fail closed on everything, KeyboardInterrupt re-raised
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        tb = traceback.format_exc()
        log.error("gate %s errored, failing closed: %s\n%s", name, exc, tb)
        reason = f"gate errored: {type(exc).__name__}: {exc}"
        _log_error_to_mlflow(name, reason, tb)
        return failed_result(name, reason, error=f"{type(exc).__name__}: {exc}")
    if not isinstance(result, GateResult):
        reason = f"gate returned {type(result).__name__}, not a GateResult"
        log.error("gate %s: %s, failing closed", name, reason)
        return failed_result(name, reason, error=reason)
    if not result.passed and not result.reasons:
        # a failure must always say why
        result = GateResult(**{**asdict(result), "reasons": ("gate failed without a stated reason",)})
    log.info("gate %s: %s%s", name, "PASSED" if result.passed else "FAILED",
             "" if result.passed else " - " + "; ".join(result.reasons))
    return result


def verdict_json(result: GateResult) -> str:
    """The pipeline's gate verdict: ``{"gate", "passed", "result": GateResult.to_dict()}`` as JSON
    (what ``record_gate_result`` reads; anything but an explicit ``passed: true`` is a failure)."""
    import json

    return json.dumps({"gate": result.gate, "passed": bool(result.passed), "result": result.to_dict()},
                      sort_keys=True, default=str)


def _log_error_to_mlflow(name: str, reason: str, tb: str) -> None:
    try:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.set_tag(f"medisyn.gate.{name}", "error")
            mlflow.log_text(reason + "\n\n" + tb, f"gates/{name}-error.txt")
    except Exception:  # tracking problems must not mask the gate error
        log.exception("could not record the error of gate %s in MLflow", name)


# ----------------------------------------------------------------------------------------------
# Reading a dataset split (docs/stages.md, "Dataset prefix") in bounded memory
# ----------------------------------------------------------------------------------------------
def split_files(dataset_uri: str, split: str) -> list[str]:
    """Sorted Parquet files of one split (sorted, so row order, hence row ids, are reproducible)."""
    storage.require_complete(dataset_uri)
    files = [u for u in storage.listdir(storage.join(dataset_uri, split)) if u.endswith(".parquet")]
    return sorted(files)


def iter_rows(
    dataset_uri: str,
    split: str,
    columns: Sequence[str],
    batch_size: int = 256,
    where: dict[str, str] | None = None,
) -> Iterator[tuple[np.ndarray, dict[str, list]]]:
    """Yield ``(row_ids, {column: values})`` batches of a split, filtered on equality ``where``.

    ``row_ids`` number the rows of the split in file order, before filtering, so a second pass can
    fetch exactly the rows a first pass chose without holding the split in memory. Only the
    requested columns are read (the ``image`` column is the heavy one).
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    cols = list(dict.fromkeys(list(columns) + list((where or {}).keys())))
    offset = 0
    for uri in split_files(dataset_uri, split):
        fs, path = storage.pyarrow_filesystem(uri)
        with fs.open_input_file(path) as fh:
            pf = pq.ParquetFile(fh)
            for batch in pf.iter_batches(batch_size=batch_size, columns=cols):
                n = batch.num_rows
                ids = np.arange(offset, offset + n)
                offset += n
                if where:
                    mask = None
                    for k, v in where.items():
                        m = pc.equal(batch.column(k), v)
                        mask = m if mask is None else pc.and_(mask, m)
                    keep = np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)
                    if not keep.any():
                        continue
                    batch = batch.filter(mask)
                    ids = ids[keep]
                yield ids, {c: batch.column(c).to_pylist() for c in columns}


DATASET_CATALOG = "catalog.yaml"


def dataset_catalog(cfg: RunConfig, dataset_uri: str):
    """The catalog that describes the dataset: ``data.catalog`` when set to a path/URI; for
    ``builtin``, ``<dataset>/catalog.yaml`` when preprocessing left a copy there (the landing zone's
    own catalog), else the built-in paper catalog."""
    from medisyn.catalog import BUILTIN, load_catalog

    if cfg.data.catalog == BUILTIN:
        copy = storage.join(dataset_uri, DATASET_CATALOG)
        if storage.exists(copy):
            return load_catalog(copy)
    return load_catalog(cfg.data.catalog)


def decode_image(png: bytes):
    from PIL import Image

    im = Image.open(io.BytesIO(png))
    im.load()
    return im


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------
def generation_sampler(cfg: RunConfig, model_uri: str) -> Sampler:
    """The default sampler: ``medisyn.generate.load_model`` once, then ``generate.sample`` with the
    run's sampling settings (section 4.3: Euler, 50 steps, CFG 7) at the configured resolution."""
    from medisyn import generate

    pipe = generate.load_model(cfg, model_uri)
    resolution = cfg.sampling.resolution or cfg.data.resolution

    def sample(prompts: list[str], seeds: list[int]) -> list[Any]:
        return generate.sample(pipe, list(prompts), list(seeds), cfg.sampling, resolution)

    return sample


def sample_in_batches(sampler: Sampler, prompts: list[str], seeds: list[int], batch_size: int) -> Iterator[list[Any]]:
    """Call the sampler ``batch_size`` (prompt, seed) pairs at a time and check it kept its contract."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    for start in range(0, len(prompts), batch_size):
        p, s = prompts[start:start + batch_size], seeds[start:start + batch_size]
        images = list(sampler(p, s))
        if len(images) != len(p):
            raise RuntimeError(f"sampler returned {len(images)} images for {len(p)} prompts")
        yield images


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------
def save_figure(fig, directory, name: str) -> str:
    """Write ``fig`` as ``directory/name`` (PNG) and log it to the active MLflow run; returns name."""
    from pathlib import Path

    from medisyn import tracking

    fig.savefig(Path(directory) / name, dpi=100, bbox_inches="tight")
    tracking.log_figure(fig, f"gates/{name}")  # closes the figure
    return name


def log_metrics(prefix: str, metrics: dict[str, Any]) -> None:
    """Numeric metrics to the active MLflow run (no-op without one)."""
    try:
        import mlflow

        if mlflow.active_run() is None:
            return
        flat = {f"{prefix}.{k}": float(v) for k, v in metrics.items()
                if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and np.isfinite(v)}
        if flat:
            mlflow.log_metrics(flat)
    except Exception:
        log.exception("could not log %s metrics to MLflow", prefix)
