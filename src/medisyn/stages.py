"""The one way to run a stage: ``medisyn.stages.run(stage, config, **uris)``.

The CLI (``medisyn <stage>``), the Kubeflow components, the pods of cluster jobs and the tests all
reach a stage through :func:`run`, which, in this order:

1. loads and validates the run config (a :class:`RunConfig`, or the path/URI of its YAML: the one
   config transport; a pipeline run stores its resolved config once at ``<run>/config.yaml``);
2. configures object storage, once, for this process and its children (and MLflow tracking for
   the stages that track or use the registry);
3. opens the stage's MLflow run (nested under the pipeline run when ``$MEDISYN_PARENT_RUN_ID`` is
   set; processes the stage starts, e.g. torchrun workers, log into the same run);
4. calls the stage function; a gate runs fail-closed (an error is a failed verdict), is skipped as a
   failure when an earlier gate in :data:`GATE_ORDER` has not passed on the same version, and its
   verdict is recorded on the model version;
5. writes the typed result to ``<output prefix>/result.json`` (see :mod:`medisyn.results`).

Downstream steps take URIs only and read results back with ``XResult.load(uri)``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast, overload

from medisyn import preflight, storage, tracking
from medisyn.config import RunConfig, load_config
from medisyn.results import StageResult
from medisyn.run_plan import RunPlan

if TYPE_CHECKING:
    from medisyn.data.preprocess import PreprocessResult
    from medisyn.demo.phantoms import LandingZone
    from medisyn.evaluate.fid import ScoreResult
    from medisyn.evaluate.gates import GateResult
    from medisyn.generate import GenerateResult
    from medisyn.outcome import PipelineOutcome
    from medisyn.registry import PromoteResult, RegisteredModel, RevokeResult
    from medisyn.report import ReportResult
    from medisyn.train.encode import EncodeResult
    from medisyn.train.trainer import TrainResult

log = logging.getLogger("medisyn.stages")

#: Gates in the order they run; a gate counts as failed ("skipped") unless every gate before it passed.
GATE_ORDER: tuple[str, ...] = ("privacy", "utility")
#: Gates a config switches on, run after GATE_ORDER: "human" = the reader study (``study.human_gate``, #15).
OPTIONAL_GATES: tuple[str, ...] = ("human",)
CONFIG_FILE = "config.yaml"


# ----------------------------------------------------------------------------------------------
# The runner's own small stages: planning a run, checking a landing zone
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LandingZoneCheck(StageResult):
    uri: str  # the landing zone, known to exist


@dataclass(frozen=True)
class TinyModels(StageResult):
    paths: dict[str, str]  # model name -> local path


@dataclass(frozen=True)
class PulledModel(StageResult):
    model: str  # the registry reference as given
    path: str  # the diffusers pipeline directory


def plan_run(cfg: RunConfig, root: str = "", run_tag: str = "", raw: str = "", pipeline_run_id: str = "",
             pipeline_version: str = "") -> RunPlan:
    """Lay out a run under ``<root or storage.root>/<run_tag>``, open its parent MLflow run, and store
    its resolved config there (with the run's identity, which every later step then reads)."""
    if not run_tag:
        raise ValueError("a run needs a run tag (its folder name under the root)")
    run_uri = storage.join(storage.normalize(root or cfg.storage.root), run_tag)
    pipeline_run_id = pipeline_run_id or run_tag
    parent = tracking.start_pipeline_run(cfg, run_tag, pipeline_run_id, pipeline_version) or ""
    stored = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(
        update={"pipeline_run_id": pipeline_run_id, "parent_run_id": parent or None})})
    config_uri = storage.join(run_uri, CONFIG_FILE)
    storage.write_text(config_uri, stored.to_yaml())

    def at(*parts: str) -> str:
        return storage.join(run_uri, *parts)

    return RunPlan(
        run_uri=run_uri, run_tag=run_tag, config_uri=config_uri, config_hash=cfg.config_hash(),
        raw_uri=storage.normalize(raw) if raw else at("raw"), dataset_uri=at("dataset"),
        cache_uri=at("latent-cache"), checkpoints_uri=at("checkpoints"), scores_uri=at("scores"),
        register_uri=at("registry", "candidate"), privacy_uri=at("gates", "privacy"),
        utility_uri=at("gates", "utility"), promote_uri=at("registry", "promote"),
        pipeline_run_id=pipeline_run_id, parent_run_id=parent, report_uri=at("report"),
    )


def check_landing_zone(cfg: RunConfig, raw: str) -> LandingZoneCheck:
    """Fail fast on a landing zone that does not exist, instead of an empty run hours later."""
    if not storage.exists(raw):
        raise FileNotFoundError(f"raw landing zone {raw} does not exist")
    return LandingZoneCheck(uri=storage.normalize(raw))


# ----------------------------------------------------------------------------------------------
# The stage table: name -> function, the argument naming its output prefix, gate name
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    name: str  # the CLI command and the MLflow run's medisyn.stage tag
    fn: Callable[..., StageResult | None]  # fn(cfg, **inputs); None only on non-zero nodes of a job
    output: str | None  # the input (else result field) naming the prefix that receives result.json
    gate: str | None = None  # a gate: fail closed, ordered, verdict recorded on the version
    tracked: bool = True  # opens an MLflow run when tracking is configured
    # The MLflow identity the stage acts as (mlflow/REGISTRY.md): "pipeline" edits candidates, "promoter"
    # alone edits the approved model, "consumer" reads. Credentials: tracking.use_identity.
    identity: str = "pipeline"


# The two demo stages below are the only places outside medisyn.demo
# that import it (issue #22; tests/test_import_graph.py): they run the demo's scaffolding.
def _build_tiny_models(cfg: RunConfig, overwrite: bool = False) -> TinyModels:
    from medisyn.demo.tiny_models import build_tiny_models  # allowed: demo stage

    return TinyModels(paths=build_tiny_models(cfg, overwrite=overwrite))


def _demo_data(cfg: RunConfig, out: str, n_per_class: int = 0, seed: int = 0) -> StageResult:
    """The demo's phantom landing zone; ``n_per_class`` 0 = ``demo.images_per_class`` of the config."""
    from medisyn.demo.phantoms import write_landing_zone  # allowed: demo stage

    return write_landing_zone(out, n_per_class=n_per_class or cfg.demo.images_per_class, seed=seed)


def _preprocess(cfg: RunConfig, raw: str, out: str) -> StageResult:
    from medisyn.data.preprocess import preprocess
    from medisyn.data.splits import id_salt

    id_salt(cfg)  # the patient-ID salt is required outside demo runs: a ConfigError before any work (#10)
    return preprocess(cfg, raw, out)


def _encode(cfg: RunConfig, dataset: str, cache: str) -> StageResult:
    from medisyn.train.encode import encode

    return encode(cfg, dataset, cache)


def _train(cfg: RunConfig, cache: str, checkpoints: str, nproc: int | str = 1) -> StageResult | None:
    from medisyn.train.torchrun import launch

    return launch(cfg, cache, checkpoints, nproc=nproc)  # "auto": $PET_NPROC_PER_NODE, else one per GPU


def _cluster_settings(cluster_json: str, image: str) -> Any:
    from medisyn.launch import ClusterSettings

    return ClusterSettings.from_pipeline(cluster_json, image)


def _preprocess_rayjob(cfg: RunConfig, job_config: str, raw: str, out: str, cluster_json: str = "{}",
                       image: str = "", run_tag: str = "", timeout_s: float = 7 * 24 * 3600) -> StageResult:
    """``preprocess`` as a KubeRay RayJob; its pods read ``job_config`` and run this runner's preprocess."""
    from medisyn import launch
    from medisyn.data.splits import id_salt

    id_salt(cfg)  # fail here, not in the job's pods an hour later (#10)

    return launch.preprocess_on_cluster(cfg, job_config, raw, out, _cluster_settings(cluster_json, image),
                                        run_tag=run_tag or cfg.name, timeout_s=timeout_s)


def _train_job(cfg: RunConfig, job_config: str, cache: str, checkpoints: str, cluster_json: str = "{}",
               image: str = "", run_tag: str = "", timeout_s: float = 7 * 24 * 3600,
               launcher: str = "auto") -> StageResult:
    """``train`` as a multi-node TrainJob (Kubeflow Trainer v2) or PyTorchJob (``launcher``; ``auto``:
    TrainJob where the cluster serves it); its pods read ``job_config`` and run this runner's train."""
    from medisyn import launch

    return launch.train_on_cluster(cfg, job_config, cache, checkpoints, _cluster_settings(cluster_json, image),
                                   run_tag=run_tag or cfg.name, timeout_s=timeout_s, launcher=launcher)


def _score(cfg: RunConfig, dataset: str, checkpoints: str, out: str) -> StageResult:
    from medisyn.evaluate.fid import score_checkpoints

    return score_checkpoints(cfg, dataset, checkpoints, out)


def _register(cfg: RunConfig, scores: str, dataset: str, out: str = "") -> StageResult:
    from medisyn import registry
    from medisyn.evaluate.fid import ScoreResult

    return registry.register_candidate(cfg, ScoreResult.load(scores), dataset)


def _privacy_gate(cfg: RunConfig, model: str, dataset: str, out: str) -> StageResult:
    from medisyn.evaluate.privacy import privacy_gate

    return privacy_gate(cfg, model, dataset, out)


def _utility_gate(cfg: RunConfig, model: str, dataset: str, out: str) -> StageResult:
    from medisyn.evaluate.utility import utility_gate

    return utility_gate(cfg, model, dataset, out)


def gate_order(cfg: RunConfig) -> tuple[str, ...]:
    """The gates a version must pass under ``cfg``: GATE_ORDER, then the optional gates it switches on."""
    return GATE_ORDER + (("human",) if cfg.study.human_gate.enabled else ())


def _human_gate(cfg: RunConfig, model: str, out: str, study: str = "") -> StageResult:
    from medisyn.study.gate import human_gate

    return human_gate(cfg, model, out, study=study)


def _promote(cfg: RunConfig, model: str, gates: Sequence[str] = GATE_ORDER, out: str = "") -> StageResult:
    from medisyn import registry

    # A gate the config switches on is required whatever the caller named (fail closed).
    names = list(gates) + [g for g in gate_order(cfg) if g not in gates]
    result = registry.promote(cfg, model, names)
    tracking.end_pipeline_run(cfg)  # the last step of a pipeline run: its parent MLflow run ends here
    return result


def _revoke(cfg: RunConfig, model: str, reason: str) -> StageResult:
    from medisyn import registry

    return registry.revoke(cfg, model, reason)


def _report(cfg: RunConfig, model: str, out: str) -> StageResult:
    from medisyn.report import write_report

    return write_report(cfg, model, out)


def _record_outcome(cfg: RunConfig, root: str = "", run_tag: str = "", pipeline_run_id: str = "",
                    status: str = "FAILED", error: str = "") -> StageResult:
    from medisyn.outcome import record_outcome

    return record_outcome(cfg, root, run_tag, pipeline_run_id, status, error)


def _generate(cfg: RunConfig, model: str, prompts: Sequence[str], out: str, n: int = 4, seed: int = 0,
              guidance_scale: float | None = None, num_inference_steps: int | None = None) -> StageResult:
    from medisyn.generate import generate

    return generate(cfg, model, list(prompts), n, out, seed=seed, guidance_scale=guidance_scale,
                    num_inference_steps=num_inference_steps)


def _pull(cfg: RunConfig, model: str, dest: str, overwrite: bool = False) -> PulledModel:
    from medisyn import registry

    tracking.configure(cfg)  # the registry to pull from: tracking.tracking_uri, else $MLFLOW_TRACKING_URI
    return PulledModel(model=model, path=str(registry.pull(model, dest, overwrite=overwrite)))


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("plan", plan_run, output="run_uri", tracked=False),
    Stage("build-tiny-models", _build_tiny_models, output=None, tracked=False),
    Stage("demo-data", _demo_data, output="out", tracked=False),
    Stage("check-landing-zone", check_landing_zone, output=None, tracked=False),
    Stage("preprocess", _preprocess, output="out"),
    # encode logs nothing to MLflow (its result.json and the train run's cache_key tag are its record):
    # an untracked step does not pay for importing mlflow
    Stage("encode", _encode, output="cache", tracked=False),
    Stage("train", _train, output="checkpoints"),
    # Launchers: the job's own runner writes the result (result.json) that they read back. Tracked: the
    # launcher's run carries the job's name and, when it fails, the reason (medisyn.job.failure_reason).
    Stage("preprocess-rayjob", _preprocess_rayjob, output=None),
    Stage("train-job", _train_job, output=None),
    Stage("score", _score, output="out"),
    Stage("register", _register, output="out"),
    Stage("privacy-gate", _privacy_gate, output="out", gate="privacy"),
    Stage("utility-gate", _utility_gate, output="out", gate="utility"),
    Stage("human-gate", _human_gate, output="out", gate="human"),  # optional: study.human_gate.enabled
    Stage("promote", _promote, output="out", identity="promoter"),
    # withdraw an approval with a reason; @approved falls back to the previous standing approval (#10)
    Stage("revoke", _revoke, output=None, identity="promoter"),
    # the evaluation report of a version (docs/report.md): its record is report.html + result.json in
    # `out`, the artifact report/report.html on the version's run and the version tag `report`
    Stage("report", _report, output="out", tracked=False),
    Stage("generate", _generate, output="out", tracked=False, identity="consumer"),
    Stage("pull", _pull, output=None, tracked=False, identity="consumer"),
    # the pipeline's exit handler: status, failed step and reason on the parent run and the version
    Stage("record-outcome", _record_outcome, output=None, tracked=False),
)}
assert tuple(s.gate for s in STAGES.values() if s.gate) == GATE_ORDER + OPTIONAL_GATES


# ----------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------
Config = RunConfig | str | os.PathLike[str] | None  # a config, or the path / URI of its YAML (None: the paper's)


def resolve_config(config: Config) -> RunConfig:
    """A validated config from a RunConfig, a YAML path / ``file://`` / ``s3://`` URI, or None (the paper's)."""
    return config if isinstance(config, RunConfig) else load_config(config)


def is_primary_process() -> bool:
    """False in the non-zero ranks of a distributed job: they neither track nor write results."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def _check_inputs(stage: Stage, inputs: dict[str, Any]) -> None:
    params = stage_inputs(stage.name)
    names = {p.name for p in params}
    unknown = sorted(set(inputs) - names)
    missing = sorted(p.name for p in params if p.default is inspect.Parameter.empty and p.name not in inputs)
    if unknown or missing:
        raise TypeError(f"stage {stage.name!r} takes {', '.join(p.name for p in params)}"
                        + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                        + (f"; missing: {', '.join(missing)}" if missing else ""))


@contextlib.contextmanager
def _stage_env(run_id: str | None) -> Iterator[None]:
    """Processes started by the stage (torchrun workers) log into the stage's MLflow run."""
    if run_id is None:
        yield
        return
    before = os.environ.get(tracking.STAGE_RUN_ENV)
    os.environ[tracking.STAGE_RUN_ENV] = run_id
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(tracking.STAGE_RUN_ENV, None)
        else:
            os.environ[tracking.STAGE_RUN_ENV] = before


# The result type of each stage, for type checkers (the KFP components and the CLI read fields).
@overload
def run(stage: Literal["plan"], config: Config, /, **inputs: Any) -> RunPlan: ...
@overload
def run(stage: Literal["build-tiny-models"], config: Config, /, **inputs: Any) -> TinyModels: ...
@overload
def run(stage: Literal["demo-data"], config: Config, /, **inputs: Any) -> LandingZone: ...
@overload
def run(stage: Literal["check-landing-zone"], config: Config, /, **inputs: Any) -> LandingZoneCheck: ...
@overload
def run(stage: Literal["preprocess", "preprocess-rayjob"], config: Config, /, **inputs: Any) -> PreprocessResult: ...
@overload
def run(stage: Literal["encode"], config: Config, /, **inputs: Any) -> EncodeResult: ...
@overload
def run(stage: Literal["train", "train-job"], config: Config, /, **inputs: Any) -> TrainResult | None: ...
@overload
def run(stage: Literal["score"], config: Config, /, **inputs: Any) -> ScoreResult: ...
@overload
def run(stage: Literal["register"], config: Config, /, **inputs: Any) -> RegisteredModel: ...
@overload
def run(stage: Literal["privacy-gate", "utility-gate", "human-gate"], config: Config, /,
        **inputs: Any) -> GateResult: ...
@overload
def run(stage: Literal["promote"], config: Config, /, **inputs: Any) -> PromoteResult: ...
@overload
def run(stage: Literal["revoke"], config: Config, /, **inputs: Any) -> RevokeResult: ...
@overload
def run(stage: Literal["report"], config: Config, /, **inputs: Any) -> ReportResult: ...
@overload
def run(stage: Literal["generate"], config: Config, /, **inputs: Any) -> GenerateResult: ...
@overload
def run(stage: Literal["pull"], config: Config, /, **inputs: Any) -> PulledModel: ...
@overload
def run(stage: Literal["record-outcome"], config: Config, /, **inputs: Any) -> PipelineOutcome: ...
@overload
def run(stage: str, config: Config, /, **inputs: Any) -> StageResult | None: ...


def run(stage: str, config: Config, /, **inputs: Any) -> StageResult | None:
    """Run one stage (see the module docstring); returns its typed result.

    ``inputs`` are the stage's storage URIs and options, by name (``STAGES[stage].fn``'s parameters
    after ``cfg``; ``medisyn <stage> --help`` lists them). Raises ``KeyError`` for an unknown stage,
    ``TypeError`` for unknown or missing inputs, :class:`~medisyn.config.ConfigError` for a bad config.
    Returns None only on the non-zero nodes of a multi-node training job (node 0 reports).
    """
    if stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    spec = STAGES[stage]
    _check_inputs(spec, inputs)
    cfg = resolve_config(config)
    tracking.use_identity(spec.identity)  # this stage's MLflow credentials, when per-identity ones are mounted
    # Object storage for this process and the processes it starts (the one call of storage.configure).
    # Tracking is configured where it is used (the stage's MLflow run, the registry, plan's parent run),
    # so steps without a run do not pay for importing mlflow (~1.3 s a step).
    storage.configure(cfg.storage.s3_endpoint_url, storage.RetryPolicy.from_config(cfg.storage))
    primary = is_primary_process()
    track = spec.tracked and primary
    if primary:  # outputs writable, services reachable, a killed run's leftovers cleaned (issue #12)
        preflight.check(cfg, spec.name, spec.output, inputs, track)
    with (tracking.stage_run(cfg, spec.name) if track else contextlib.nullcontext(None)) as mlflow_run:
        try:
            with _stage_env(mlflow_run.info.run_id if mlflow_run is not None else None):
                result = _run_gate(spec, cfg, inputs) if spec.gate else spec.fn(cfg, **inputs)
        except Exception as exc:
            if mlflow_run is not None:  # the reason, on the run that ends FAILED (read by record-outcome)
                tracking.record_error(exc)
            if preflight.is_disk_full(exc):
                raise preflight.disk_full_error(spec.name, exc) from exc
            raise
        if result is None:  # a non-zero node of a multi-node job: node 0 reports
            return None
        if mlflow_run is not None:
            tracking.log_json(result.envelope(), "result.json")
    # the output prefix: the input of that name, else the result's field (plan: run_uri, derived)
    out = (inputs.get(spec.output) or getattr(result, spec.output, None)) if spec.output else None
    if primary and out:
        result.save(str(out))
    return result


def _run_gate(spec: Stage, cfg: RunConfig, inputs: dict[str, Any]) -> GateResult:
    """A gate: fail closed, in :data:`GATE_ORDER`, its verdict recorded on the registered version."""
    from medisyn import registry
    from medisyn.evaluate.gates import failed_result, gate_timeout_s, run_gate

    assert spec.gate is not None
    model = str(inputs["model"])
    in_registry = model.startswith("models:/")
    order = gate_order(cfg)
    order = order if spec.gate in order else (*order, spec.gate)  # an optional gate run while off: last
    earlier = order[: order.index(spec.gate)]
    not_passed = registry.gates_not_passed(cfg, model, earlier) if in_registry and earlier else {}
    if not_passed:
        reason = "skipped: " + "; ".join(f"the {g} gate is {s}" for g, s in not_passed.items())
        log.warning("gate %s %s", spec.gate, reason)
        result = failed_result(spec.gate, reason)
    else:
        gate_fn = cast("Callable[..., GateResult]", spec.fn)  # a gate stage returns a GateResult
        # fail closed: an error, or running past the gate's timeout_s (interrupted), is a failed verdict
        result = run_gate(spec.gate, gate_fn, cfg, timeout_s=gate_timeout_s(cfg, spec.gate), **inputs)
    if in_registry:
        # Recorded by the runner, whoever called it (CLI, KFP, a test): the only path to a verdict.
        # If recording fails the step fails, and the version stays unapproved (no tag = failed).
        registry.set_gate_result(cfg, model, result.gate, result.passed, result.to_dict())
    return result


def stage_inputs(stage: str) -> list[inspect.Parameter]:
    """The inputs of a stage, in order: its function's parameters after the config."""
    return list(inspect.signature(STAGES[stage].fn).parameters.values())[1:]


__all__ = ["GATE_ORDER", "OPTIONAL_GATES", "STAGES", "LandingZoneCheck", "PulledModel", "RunPlan", "Stage",
           "TinyModels", "check_landing_zone", "gate_order", "plan_run", "resolve_config", "run", "stage_inputs"]
