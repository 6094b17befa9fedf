"""MLflow tracking conventions shared by every stage.

A stage opens its run with :func:`stage_run` (the stage runner does it for every stage). ``medisyn
plan`` opens the pipeline run's parent MLflow run and records its id (and the orchestrator's run id)
on the run's stored config, so every stage run of a retraining nests under one parent run
(``$MEDISYN_PARENT_RUN_ID`` / ``$MEDISYN_PIPELINE_RUN_ID`` do the same outside a planned run).
When no tracking URI is configured (``tracking.tracking_uri`` or
``$MLFLOW_TRACKING_URI``), stages still run and :func:`stage_run` yields ``None``; the registry
steps, which need a server, refuse to run without one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from medisyn.config import RunConfig

PARENT_RUN_ENV = "MEDISYN_PARENT_RUN_ID"
PIPELINE_RUN_ENV = "MEDISYN_PIPELINE_RUN_ID"
STAGE_RUN_ENV = "MEDISYN_STAGE_RUN_ID"  # set by the stage runner for the processes a stage starts


def tracking_uri(cfg: RunConfig) -> str | None:
    return cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")


_CONFIGURED: str | None = None  # the URI this process's mlflow client points at


def configure(cfg: RunConfig) -> bool:
    """Point the mlflow client at the configured server (once per URI); False when tracking is off.

    The stage runner (:mod:`medisyn.stages`) calls this once per stage; it is idempotent, so a
    stage function called directly (a test) may call it again at no cost.
    """
    global _CONFIGURED
    uri = tracking_uri(cfg)
    if not uri:
        return False
    if uri != _CONFIGURED:
        import mlflow

        configure_uploads(cfg)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        _CONFIGURED = uri
    return True


def configure_uploads(cfg: RunConfig) -> None:
    """Large artifacts (a packaged SDXL is ~7 GB) upload in parts with timeouts from the config.

    MLflow reads these environment variables per request. Values already set in the environment
    win (an operator's override); the config supplies the defaults.
    """
    chunk = str(cfg.storage.multipart_chunk_mb * 1024 * 1024)
    timeout = str(int(cfg.storage.upload_timeout_s))
    defaults = {
        "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "true" if cfg.tracking.proxy_multipart_upload else "false",
        "MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZE": chunk,
        "MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE": chunk,
        "MLFLOW_MULTIPART_DOWNLOAD_CHUNK_SIZE": chunk,
        # REST calls are bounded (issue #12): a restarted server is ridden out by the retries
        # (backoff 1, 2, 4, ... x request_backoff_s), a dead one fails in about a minute, not four.
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(cfg.tracking.request_timeout_s)),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(cfg.tracking.request_retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(cfg.tracking.request_backoff_s),  # an int for MLflow
        "MLFLOW_ARTIFACT_UPLOAD_DOWNLOAD_TIMEOUT": timeout,
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


CREDENTIALS_DIR_ENV = "MEDISYN_MLFLOW_CREDENTIALS_DIR"


def use_identity(role: str) -> bool:
    """Act as MLflow identity ``role`` (pipeline | promoter | consumer) for the requests that follow.

    ``$MEDISYN_MLFLOW_CREDENTIALS_DIR/<role>/{username,password}`` (the layout of a Kubernetes Secret
    volume; the demo writes one at run time) sets ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``, which
    MLflow reads per request. On the cluster each step mounts only its own identity's Secret, so a
    pipeline step cannot act as the promoter. Without that directory (or that role in it) the
    environment's credentials stand; returns whether they were switched.
    """
    base = os.environ.get(CREDENTIALS_DIR_ENV)
    if not base:
        return False
    d = os.path.join(base, role)
    try:
        with open(os.path.join(d, "username")) as u, open(os.path.join(d, "password")) as p:
            username, password = u.read().strip(), p.read().strip()
    except OSError:
        return False
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = username, password
    return True


def pipeline_run_id(cfg: RunConfig) -> str:
    """The orchestrator's run id of this pipeline run ("" outside one)."""
    return cfg.tracking.pipeline_run_id or os.environ.get(PIPELINE_RUN_ENV) or ""


def parent_run_id(cfg: RunConfig) -> str:
    """The MLflow run this pipeline run's stage runs nest under ("" for none)."""
    return cfg.tracking.parent_run_id or os.environ.get(PARENT_RUN_ENV) or ""


def start_pipeline_run(cfg: RunConfig, run_tag: str, pipeline_id: str, pipeline_version: str = "") -> str | None:
    """Open the parent MLflow run of one pipeline run (``medisyn plan`` does); None when tracking is off.

    Tagged with the orchestrator's run id, the pipeline version it ran (the KFP pipeline version
    ``medisyn pipeline run|schedule`` uploaded; "" by hand) and the code version (git sha, or the
    image's baked ``$MEDISYN_CODE_VERSION``). It stays RUNNING while the stages run under it;
    ``promote`` ends it, and the pipeline's exit handler records the outcome on it (medisyn.outcome).
    """
    if not configure(cfg):
        return None
    import mlflow

    from medisyn.provenance import code_version

    experiment = mlflow.set_experiment(cfg.tracking.experiment)
    client = mlflow.MlflowClient()
    # a retried plan step (KFP retries it) finds the parent run its first attempt opened: one per run
    existing = client.search_runs([experiment.experiment_id], max_results=1, filter_string=(
        f"tags.`medisyn.stage` = 'pipeline' AND tags.`medisyn.pipeline_run_id` = '{pipeline_id}' "
        f"AND tags.`medisyn.run_tag` = '{run_tag}'"))
    if existing:
        return str(existing[0].info.run_id)
    run = client.create_run(
        experiment.experiment_id, run_name=f"{cfg.name}-{run_tag}",
        tags={"medisyn.stage": "pipeline", "medisyn.run_name": cfg.name, "medisyn.run_tag": run_tag,
              "medisyn.pipeline_run_id": pipeline_id, "medisyn.pipeline_version": pipeline_version,
              "medisyn.code_version": code_version()})
    return str(run.info.run_id)


def record_error(exc: BaseException) -> None:
    """Tag the active run with the error that ended its stage (``medisyn.error``; read by record-outcome)."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.set_tag("medisyn.error", f"{type(exc).__name__}: {exc}"[:5000])


def end_pipeline_run(cfg: RunConfig, status: str = "FINISHED") -> None:
    """Mark this pipeline run's parent MLflow run as ended (no-op without one)."""
    parent = parent_run_id(cfg)
    if parent and configure(cfg):
        import mlflow

        mlflow.MlflowClient().set_terminated(parent, status=status)


def require_tracking(cfg: RunConfig) -> str:
    """The tracking URI, configured; the registry steps need a server and refuse to run without one."""
    if not configure(cfg):
        raise RuntimeError(
            "no MLflow tracking URI: set tracking.tracking_uri or $MLFLOW_TRACKING_URI (the registry needs a server)"
        )
    return tracking_uri(cfg)  # type: ignore[return-value]


@contextlib.contextmanager
def stage_run(cfg: RunConfig, stage: str, tags: dict[str, str] | None = None) -> Iterator[Any]:
    """The MLflow run of one stage, or None when tracking is off.

    * Inside a run that is already active (the stage runner opened it), that run is reused and
      ``tags`` are added to it: a stage function never opens a second run for itself.
    * In a process the stage started (a torchrun worker), ``$MEDISYN_STAGE_RUN_ID`` names the
      stage's run, which is resumed.
    * Otherwise a new run, nested under the pipeline run when ``$MEDISYN_PARENT_RUN_ID`` is set.
    """
    if not configure(cfg):
        yield None
        return
    import mlflow

    active = mlflow.active_run()
    if active is not None:
        if tags:
            mlflow.set_tags(tags)
        yield active
        return
    resume = os.environ.get(STAGE_RUN_ENV)
    if resume:
        with mlflow.start_run(run_id=resume) as run:
            if tags:
                mlflow.set_tags(tags)
            yield run
        return
    mlflow.set_experiment(cfg.tracking.experiment)
    all_tags = {"medisyn.stage": stage, "medisyn.run_name": cfg.name}
    if pipeline_run_id(cfg):
        all_tags["medisyn.pipeline_run_id"] = pipeline_run_id(cfg)
    all_tags.update(tags or {})
    parent = parent_run_id(cfg)
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(run_name=f"{cfg.name}-{stage}", tags=all_tags) as run:
        yield run


def log_figure(fig, artifact_file: str) -> None:
    """Log a matplotlib figure to the active run (no-op without one); always closes the figure."""
    import matplotlib.pyplot as plt
    import mlflow

    try:
        if mlflow.active_run() is not None:
            mlflow.log_figure(fig, artifact_file)
    finally:
        plt.close(fig)


def log_json(obj: Any, artifact_file: str) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_dict(obj, artifact_file)


def log_text(text: str, artifact_file: str) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_text(text, artifact_file)
