"""Approval gates: the common result type, the fail-closed runner, and what the gates share
(the dataset's catalog, the generation sampler, figures and reports). The gates read the dataset
with ``medisyn.data`` (``iter_rows``, ``decode_png``), the one dataset reader.

Rule of the house (ARCHITECTURE.md): *gates fail closed*. A gate that raises, times out inside its
function, or returns something that is not a :class:`GateResult` yields a failed result carrying the
error as its reason, so a broken evaluation can never let a model be approved.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from medisyn import storage
from medisyn.config import RunConfig
from medisyn.results import StageResult

if TYPE_CHECKING:
    from medisyn.catalog import Catalog

log = logging.getLogger("medisyn.gates")

# ``sampler(prompts, seeds) -> images``: one PIL image per (prompt, seed) pair, in order. The gates
# take one so tests can inject fake generators (copies of training images, noise); the default
# is :func:`generation_sampler`, which calls ``medisyn.generate``.
Sampler = Callable[[list[str], list[int]], list[Any]]


@dataclass(frozen=True)
class GateResult(StageResult):
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


def _log_error_to_mlflow(name: str, reason: str, tb: str) -> None:
    try:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.set_tag(f"medisyn.gate.{name}", "error")
            mlflow.log_text(reason + "\n\n" + tb, f"gates/{name}-error.txt")
    except Exception:  # tracking problems must not mask the gate error
        log.exception("could not record the error of gate %s in MLflow", name)


# ----------------------------------------------------------------------------------------------
# The dataset's catalog (the dataset itself is read with ``medisyn.data``: iter_rows, decode_png)
# ----------------------------------------------------------------------------------------------
def dataset_catalog(cfg: RunConfig, dataset_uri: str) -> Catalog:
    """The catalog that describes the dataset: ``data.catalog`` when set to a path/URI; for
    ``builtin``, ``<dataset>/catalog.yaml`` when preprocessing left a copy there (the landing zone's
    own catalog), else the built-in paper catalog."""
    from medisyn.catalog import BUILTIN, load_catalog
    from medisyn.data.preprocess import DATASET_CATALOG

    if cfg.data.catalog == BUILTIN:
        copy = storage.join(dataset_uri, DATASET_CATALOG)
        if storage.exists(copy):
            return load_catalog(copy)
    return load_catalog(cfg.data.catalog)


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------
def generation_sampler(cfg: RunConfig, model_uri: str) -> Sampler:
    """The default sampler: ``medisyn.generate.load_model`` once, then ``generate.sample`` with the
    run's sampling settings (section 4.3: Euler, 50 steps, CFG 7) at the configured resolution."""
    from medisyn import generate

    pipe = generate.load_model(cfg, model_uri)
    resolution = cfg.sampling_resolution()

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
