"""``medisyn pipeline compile | run | schedule | runs``: the KFP pipeline from the command line.

Every command but ``compile`` talks to Kubeflow Pipelines through ``kfp.Client``:

* endpoint: ``--host``, else ``$KFP_HOST`` (e.g. ``http://ml-pipeline.kubeflow:8888``, or
  ``http://localhost:8080/pipeline`` through a port-forward of the UI);
* namespace: ``--namespace``, else ``$KFP_NAMESPACE`` (multi-user Kubeflow: the profile namespace);
* credentials: ``$KFP_TOKEN`` (a bearer token), else the ServiceAccount token file at
  ``--token-path`` when it exists (the chart mounts one for multi-user KFP), else none.

``run`` and ``schedule`` validate the run config, compile the pipeline, upload it as a new version of
``--pipeline-name`` (created the first time) and pass that version's name to the run as the
``pipeline_version`` parameter, so the parent MLflow run says which pipeline version produced a
model. ``schedule`` replaces the recurring run of the same name (the chart's install hook runs it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from medisyn.pipeline.schedule import (
    build_params,
    default_version_name,
    experiment_id,
    register_and_schedule,
    upload_version,
)

log = logging.getLogger("medisyn.pipeline")

DEFAULT_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"


def kfp_client(host: str | None, namespace: str | None, token_path: str = DEFAULT_TOKEN_PATH) -> Any:
    """A ``kfp.Client`` from arguments and the environment (module docstring)."""
    import kfp

    host = host or os.environ.get("KFP_HOST")
    if not host:
        raise SystemExit("medisyn pipeline: no KFP endpoint: pass --host or set $KFP_HOST")
    token = os.environ.get("KFP_TOKEN") or (Path(token_path).read_text().strip() if Path(token_path).is_file()
                                            else None)
    namespace = namespace or os.environ.get("KFP_NAMESPACE") or "kubeflow"
    return kfp.Client(host=host, namespace=namespace, existing_token=token)


def _namespace(args: argparse.Namespace) -> str | None:
    """The KFP profile namespace: ``--namespace``, else ``$KFP_NAMESPACE``, else none (single-user)."""
    return args.namespace or os.environ.get("KFP_NAMESPACE") or None


def _compile(args: argparse.Namespace, out: Path) -> Path:
    from medisyn.pipeline.definition import compile_pipeline  # imports kfp: not for `--help`

    return compile_pipeline(out, image=args.image, gpus_per_step=args.gpus)


def cmd_compile(args: argparse.Namespace) -> dict[str, Any]:
    return {"package": str(_compile(args, Path(args.out)))}


def cmd_run(args: argparse.Namespace) -> dict[str, Any]:
    client = kfp_client(args.host, args.namespace, args.token_path)
    params = build_params(args.config, args.params_json)
    ns = _namespace(args)
    with tempfile.TemporaryDirectory(prefix="medisyn-pipeline-") as tmp:
        package = _compile(args, Path(tmp) / "medisyn_pipeline.yaml")
        pipeline_id, version_id, vname = upload_version(client, package, args.pipeline_name, ns, args.version_name)
    exp = experiment_id(client, args.experiment, ns)
    name = args.run_name or default_version_name(args.pipeline_name)
    run = client.run_pipeline(exp, name, params={**params, "pipeline_version": vname}, pipeline_id=pipeline_id,
                              version_id=version_id, service_account=args.service_account or None)
    out = {"run_id": run.run_id, "run_name": name, "experiment_id": exp, "pipeline_id": pipeline_id,
           "version_id": version_id, "pipeline_version": vname}
    if args.wait:
        done = client.wait_for_run_completion(run.run_id, timeout=args.wait)
        out["state"] = str(getattr(done, "state", ""))
    return out


def cmd_schedule(args: argparse.Namespace) -> dict[str, Any]:
    client = kfp_client(args.host, args.namespace, args.token_path)
    params = build_params(args.config, args.params_json)
    vname = args.version_name or default_version_name(args.pipeline_name)
    with tempfile.TemporaryDirectory(prefix="medisyn-pipeline-") as tmp:
        package = _compile(args, Path(tmp) / "medisyn_pipeline.yaml")
        return register_and_schedule(
            client, package, pipeline_name=args.pipeline_name, experiment=args.experiment,
            params={**params, "pipeline_version": vname}, cron=args.cron or None,
            namespace=_namespace(args), version_name=vname,
            max_concurrency=args.max_concurrency, catchup=args.catchup, service_account=args.service_account)


def cmd_runs(args: argparse.Namespace) -> dict[str, Any]:
    client = kfp_client(args.host, args.namespace, args.token_path)
    ns = _namespace(args)
    kw: dict[str, Any] = {"page_size": args.limit, "sort_by": "created_at desc"}
    if args.experiment:
        kw["experiment_id"] = experiment_id(client, args.experiment, ns)
    elif ns:
        kw["namespace"] = ns
    page = client.list_runs(**kw)
    runs = [{"run_id": r.run_id, "name": r.display_name, "state": r.state,
             "created_at": str(r.created_at) if r.created_at else "",
             "pipeline_version_id": getattr(r.pipeline_version_reference, "pipeline_version_id", None)}
            for r in (page.runs or [])]
    return {"runs": runs}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medisyn pipeline", description=(__doc__ or "").splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="<command>")

    def kfp_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--host", default=None, help="KFP API endpoint (default: $KFP_HOST)")
        sp.add_argument("--namespace", default=None, help="KFP profile namespace (default: $KFP_NAMESPACE)")
        sp.add_argument("--token-path", default=DEFAULT_TOKEN_PATH,
                        help="ServiceAccount token file for multi-user KFP, used when it exists ($KFP_TOKEN wins)")

    def compile_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--image", default=None,
                        help="project image for every step (default: $MEDISYN_IMAGE, else the trainer image)")
        sp.add_argument("--gpus", type=int, default=None, help="GPUs per GPU step (0 = CPU-only cluster)")

    def upload_args(sp: argparse.ArgumentParser) -> None:
        kfp_args(sp)
        compile_args(sp)
        sp.add_argument("--config", required=True,
                        help="run config (.yaml or .json; a path, file:// or s3:// URI), validated before upload")
        sp.add_argument("--params-json", default="{}", help="further pipeline parameters as a JSON object")
        sp.add_argument("--pipeline-name", default="medisyn-retrain", help="KFP pipeline (and recurring run) name")
        sp.add_argument("--version-name", default=None, help="name of the uploaded version (default: name-timestamp)")
        sp.add_argument("--experiment", default="medisyn", help="KFP experiment of the runs")
        sp.add_argument("--service-account", default="", help="ServiceAccount the steps run as")

    sp = sub.add_parser("compile", help="compile the pipeline to KFP IR YAML")
    compile_args(sp)
    sp.add_argument("--out", default="pipelines/medisyn_pipeline.yaml",
                    help="output path (the default is the committed IR when run at the repository root)")
    sp.set_defaults(fn=cmd_compile)
    sp = sub.add_parser("run", help="upload a new pipeline version and start one run of it")
    upload_args(sp)
    sp.add_argument("--run-name", default="", help="display name of the run (default: pipeline name + time)")
    sp.add_argument("--wait", type=int, default=0, metavar="SECONDS", help="wait this long for the run to end")
    sp.set_defaults(fn=cmd_run)
    sp = sub.add_parser("schedule", help="upload a new pipeline version and (re)create its recurring run")
    upload_args(sp)
    sp.add_argument("--cron", default="", help="KFP cron with seconds, e.g. '0 0 2 * * 0'; '' = upload only")
    sp.add_argument("--max-concurrency", type=int, default=1, help="concurrent scheduled runs")
    sp.add_argument("--catchup", action="store_true", help="backfill runs missed while paused")
    sp.set_defaults(fn=cmd_schedule)
    sp = sub.add_parser("runs", help="list recent runs")
    kfp_args(sp)
    sp.add_argument("--experiment", default="", help="only this experiment's runs")
    sp.add_argument("--limit", type=int, default=20, help="how many (newest first)")
    sp.set_defaults(fn=cmd_runs)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):  # kfp.Client prints links; stdout carries only the JSON result
        result = args.fn(args)
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
