"""Upload the compiled pipeline to Kubeflow Pipelines and (re)create its recurring retraining run.

``medisyn pipeline schedule`` (:mod:`medisyn.pipeline.cli`) runs this; the Helm chart's registration Job calls
that on every install and upgrade: it validates the run config, compiles the pipeline, uploads it as
a new version of the pipeline (creating the pipeline the first time), and replaces the recurring run
of the same name so the schedule and parameters always match the chart's values.
"""

import datetime as _dt
import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("medisyn.schedule")


def default_version_name(pipeline_name: str) -> str:
    return f"{pipeline_name}-{_dt.datetime.now(_dt.UTC):%Y%m%d-%H%M%S}"


def upload_version(client: Any, package: Path, pipeline_name: str, namespace: str | None,
                   name: str | None = None) -> tuple[str, str, str]:
    """Upload ``package`` as a new version of ``pipeline_name`` (created the first time).

    Returns (pipeline id, version id, version name)."""
    name = name or default_version_name(pipeline_name)
    pipeline_id = client.get_pipeline_id(pipeline_name)
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(str(package), pipeline_name=pipeline_name,
                                             namespace=namespace).pipeline_id
        log.info("created pipeline %s (%s)", pipeline_name, pipeline_id)
    version = client.upload_pipeline_version(str(package), name, pipeline_id=pipeline_id)
    log.info("uploaded version %s (%s)", name, version.pipeline_version_id)
    return pipeline_id, version.pipeline_version_id, name


def experiment_id(client: Any, name: str, namespace: str | None) -> str:
    """The id of KFP experiment ``name``, created the first time."""
    try:
        exp = client.get_experiment(experiment_name=name, namespace=namespace)
    except Exception:  # noqa: BLE001 - kfp raises a plain ValueError/ApiException when it does not exist
        exp = client.create_experiment(name, namespace=namespace)
    return str(exp.experiment_id)


def _recurring_runs(client, exp_id: str, namespace: str | None) -> list[Any]:
    runs, token = [], ""
    while True:
        page = client.list_recurring_runs(page_token=token, page_size=100, experiment_id=exp_id,
                                          namespace=namespace)
        runs += list(page.recurring_runs or [])
        token = page.next_page_token or ""
        if not token:
            return runs


def register_and_schedule(
    client: Any,
    package_path: str | os.PathLike,
    *,
    pipeline_name: str,
    experiment: str,
    params: dict[str, Any],
    cron: str | None,
    namespace: str | None = None,
    version_name: str | None = None,
    max_concurrency: int = 1,
    catchup: bool = False,
    service_account: str | None = None,
) -> dict[str, Any]:
    """Upload ``package_path`` as a new pipeline version; replace the recurring run ``pipeline_name``.

    ``cron`` None = upload only (any existing recurring run of that name is deleted). Returns the ids.
    """
    pipeline_id, version_id, _ = upload_version(client, Path(package_path), pipeline_name, namespace, version_name)
    exp_id = experiment_id(client, experiment, namespace)
    for run in _recurring_runs(client, exp_id, namespace):
        if run.display_name == pipeline_name:
            client.delete_recurring_run(run.recurring_run_id)
            log.info("deleted the previous recurring run %s", run.recurring_run_id)
    out = {"pipeline_id": pipeline_id, "version_id": version_id, "experiment_id": exp_id,
           "recurring_run_id": None}
    if cron:
        run = client.create_recurring_run(
            exp_id, pipeline_name, description="MediSyn scheduled retraining (helm chart)",
            cron_expression=cron, max_concurrency=max_concurrency, no_catchup=not catchup, params=params,
            # None: each step's own caching option holds (medisyn.pipeline.definition.CACHED_STEPS);
            # False would switch caching off for every step of every scheduled run
            pipeline_id=pipeline_id, version_id=version_id, enabled=True, enable_caching=None,
            service_account=service_account or None,
        )
        out["recurring_run_id"] = run.recurring_run_id
        log.info("recurring run %s: cron %r", run.recurring_run_id, cron)
    return out


def build_params(config_path: str | os.PathLike, params_json: str) -> dict[str, Any]:
    """Pipeline parameters: the validated run config as ``config_json`` plus the chart's parameters.
    The config is read as every stage reads it (``medisyn.config.load_config``): a local path, a
    ``file://`` or an ``s3://`` URI, YAML or JSON; an empty one is refused, never the paper's full run."""
    from medisyn.config import load_config

    cfg = load_config(config_path)  # a bad value fails the install, naming the field
    params = json.loads(params_json or "{}")
    if "cluster_json" in params and not isinstance(params["cluster_json"], str):
        params["cluster_json"] = json.dumps(params["cluster_json"], sort_keys=True)
    from medisyn.launch import ClusterSettings

    ClusterSettings.from_dict(json.loads(params.get("cluster_json") or "{}"))  # typos fail here too
    return {"config_json": json.dumps(cfg.model_dump(mode="json"), sort_keys=True), **params}
