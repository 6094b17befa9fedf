"""Approval gates: the common result type, the fail-closed runner, and what the gates share
(the dataset's catalog, the generation sampler, figures and reports). The gates read the dataset
with ``medisyn.data`` (``iter_rows``, ``decode_png``), the one dataset reader.

Rule of the house (ARCHITECTURE.md): *gates fail closed*. A gate that raises, runs past its
configured timeout (``privacy.timeout_s``, ``utility.timeout_s``, ``study.human_gate.timeout_s``: it
is interrupted), or returns something that is not a :class:`GateResult` yields a failed result
carrying the error as its reason, so a broken evaluation can never let a model be approved.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
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


class GateTimeout(BaseException):
    """Raised inside a gate that ran past its timeout. A BaseException, so that the gate's own
    ``except Exception`` handlers cannot swallow it; :func:`run_gate` turns it into a failed verdict."""


def gate_timeout_s(cfg: RunConfig, gate: str) -> float | None:
    """The configured time limit of a gate, seconds (None for a gate the config does not know)."""
    return {"privacy": cfg.privacy.timeout_s, "utility": cfg.utility.timeout_s,
            "human": cfg.study.human_gate.timeout_s}.get(gate)


@contextlib.contextmanager
def deadline(seconds: float | None, what: str) -> Iterator[None]:
    """Interrupt the block with :class:`GateTimeout` after ``seconds``.

    In the main thread a SIGALRM timer interrupts anything that returns to the interpreter: Python
    loops, sleeps, socket waits, and a long native computation at its end (a torch op). An outer
    timer (pytest-timeout's) is kept: it still fires at its own time, and is re-armed afterwards. In
    another thread the exception is posted to that thread, which sees it at its next bytecode.
    """
    if seconds is None:
        yield
        return
    if threading.current_thread() is not threading.main_thread():
        with _thread_deadline(seconds, what):
            yield
        return
    start = time.monotonic()
    ours = start + seconds
    old_handler = signal.getsignal(signal.SIGALRM)
    old_delay, _ = signal.getitimer(signal.ITIMER_REAL)
    outer = start + old_delay if old_delay > 0 else None

    def on_alarm(signum: int, frame: Any) -> None:
        now = time.monotonic()
        if now >= ours - 1e-3:
            raise GateTimeout(f"{what} ran past its timeout of {seconds:g}s and was interrupted")
        if callable(old_handler):  # the outer timer's turn
            old_handler(signum, frame)
        if outer is not None and now < outer:  # not reached: keep waiting for ours
            signal.setitimer(signal.ITIMER_REAL, max(1e-3, ours - now))

    signal.signal(signal.SIGALRM, on_alarm)
    first = min(ours, outer) if outer is not None else ours
    signal.setitimer(signal.ITIMER_REAL, max(1e-3, first - start))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if outer is not None:
            signal.setitimer(signal.ITIMER_REAL, max(1e-3, outer - time.monotonic()))


@contextlib.contextmanager
def _thread_deadline(seconds: float, what: str) -> Iterator[None]:
    import ctypes

    target = threading.get_ident()
    done = threading.Event()

    def watchdog() -> None:
        if not done.wait(seconds):
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), ctypes.py_object(GateTimeout))

    t = threading.Thread(target=watchdog, name=f"deadline-{what}", daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()


def run_gate(name: str, fn: Callable[..., GateResult], *args: Any, timeout_s: float | None = None,
             **kwargs: Any) -> GateResult:
    """Run ``fn(*args, **kwargs)`` and return its GateResult; ANY exception, running past
    ``timeout_s`` (interrupted, see :func:`deadline`), or a non-GateResult return value becomes a
    failed GateResult with the error as its reason (fail closed)."""
    try:
        with deadline(timeout_s, f"gate {name}"):
            result = fn(*args, **kwargs)
    except GateTimeout as exc:
        reason = f"gate timed out: {exc} (the {name} gate's timeout_s in the config)"
        log.error("gate %s: %s, failing closed", name, reason)
        _log_error_to_mlflow(name, reason, "")
        return failed_result(name, reason, error=f"GateTimeout: {exc}", timeout_s=timeout_s)
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
    from medisyn.data.schema import DATASET_CATALOG

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
