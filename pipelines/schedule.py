"""Upload the compiled pipeline to Kubeflow Pipelines and (re)create its recurring retraining run.

Run by the Helm chart's registration Job (``python -m pipelines.schedule ...``) on every install and
upgrade: it validates the run config, compiles the pipeline, uploads it as a new version of
``--pipeline-name`` (creating the pipeline the first time), and replaces the recurring run of the
same name so the schedule and parameters always match the chart's values.
"""

import argparse
import datetime as _dt
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("medisyn.schedule")


def _experiment_id(client, name: str, namespace: str | None) -> str:
    try:
        exp = client.get_experiment(experiment_name=name, namespace=namespace)
    except Exception:  # noqa: BLE001 - the kfp client raises a plain ValueError/ApiException when it does not exist
        exp = client.create_experiment(name, namespace=namespace)
    return exp.experiment_id


def _recurring_runs(client, experiment_id: str, namespace: str | None) -> list[Any]:
    runs, token = [], ""
    while True:
        page = client.list_recurring_runs(page_token=token, page_size=100, experiment_id=experiment_id,
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
    version_name = version_name or f"{pipeline_name}-{_dt.datetime.now(_dt.UTC):%Y%m%d-%H%M%S}"
    pipeline_id = client.get_pipeline_id(pipeline_name)
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(str(package_path), pipeline_name=pipeline_name,
                                             namespace=namespace).pipeline_id
        log.info("created pipeline %s (%s)", pipeline_name, pipeline_id)
    version = client.upload_pipeline_version(str(package_path), version_name, pipeline_id=pipeline_id)
    version_id = version.pipeline_version_id
    log.info("uploaded version %s (%s)", version_name, version_id)
    experiment_id = _experiment_id(client, experiment, namespace)
    for run in _recurring_runs(client, experiment_id, namespace):
        if run.display_name == pipeline_name:
            client.delete_recurring_run(run.recurring_run_id)
            log.info("deleted the previous recurring run %s", run.recurring_run_id)
    out = {"pipeline_id": pipeline_id, "version_id": version_id, "experiment_id": experiment_id,
           "recurring_run_id": None}
    if cron:
        run = client.create_recurring_run(
            experiment_id, pipeline_name, description="MediSyn scheduled retraining (helm chart)",
            cron_expression=cron, max_concurrency=max_concurrency, no_catchup=not catchup, params=params,
            pipeline_id=pipeline_id, version_id=version_id, enabled=True, enable_caching=False,
            service_account=service_account or None,
        )
        out["recurring_run_id"] = run.recurring_run_id
        log.info("recurring run %s: cron %r", run.recurring_run_id, cron)
    return out


def build_params(config_path: str | os.PathLike, params_json: str) -> dict[str, Any]:
    """Pipeline parameters: the validated run config as ``config_json`` plus the chart's parameters."""
    import yaml

    from medisyn.config import validate_config

    text = Path(config_path).read_text()
    data = json.loads(text) if str(config_path).endswith(".json") else yaml.safe_load(text)
    cfg = validate_config(data or {}, str(config_path))  # a bad value fails the install, naming the field
    params = json.loads(params_json or "{}")
    if "cluster_json" in params and not isinstance(params["cluster_json"], str):
        params["cluster_json"] = json.dumps(params["cluster_json"], sort_keys=True)
    from medisyn.launch import ClusterSettings

    ClusterSettings.from_dict(json.loads(params.get("cluster_json") or "{}"))  # typos fail here too
    return {"config_json": json.dumps(cfg.model_dump(mode="json"), sort_keys=True), **params}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Upload the MediSyn pipeline to KFP and schedule it.")
    p.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://ml-pipeline.kubeflow:8888")
    p.add_argument("--namespace", default="", help="KFP (profile) namespace; '' = single-user KFP")
    p.add_argument("--pipeline-name", required=True, help="pipeline (and recurring run) name")
    p.add_argument("--experiment", required=True, help="KFP experiment of the runs")
    p.add_argument("--config", required=True, help="run config file (.yaml or .json)")
    p.add_argument("--params-json", default="{}", help="further pipeline parameters as a JSON object")
    p.add_argument("--cron", default="", help="KFP cron (with seconds); '' = upload without a schedule")
    p.add_argument("--max-concurrency", type=int, default=1, help="concurrent scheduled runs")
    p.add_argument("--catchup", action="store_true", help="backfill runs missed while paused")
    p.add_argument("--service-account", default="", help="ServiceAccount the steps run as")
    p.add_argument("--image", default=None, help="project image for every step")
    p.add_argument("--gpus", type=int, default=None, help="GPUs per GPU step")
    p.add_argument("--token-path", default="/var/run/secrets/kubeflow/pipelines/token",
                   help="ServiceAccount token for multi-user KFP (used when the file exists)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import kfp

    from pipelines.medisyn_pipeline import compile_pipeline

    params = build_params(args.config, args.params_json)
    with tempfile.TemporaryDirectory(prefix="medisyn-pipeline-") as tmp:
        package = compile_pipeline(Path(tmp) / "medisyn_pipeline.yaml", image=args.image, gpus_per_step=args.gpus)
        token = Path(args.token_path).read_text().strip() if Path(args.token_path).exists() else None
        client = kfp.Client(host=args.host, namespace=args.namespace or "kubeflow", existing_token=token)
        result = register_and_schedule(
            client, package, pipeline_name=args.pipeline_name, experiment=args.experiment, params=params,
            cron=args.cron or None, namespace=args.namespace or None, max_concurrency=args.max_concurrency,
            catchup=args.catchup, service_account=args.service_account,
        )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
