"""``make demo`` (``python -m pipelines.demo``): the whole pipeline, end to end, on tiny models and phantom data.

It starts an MLflow server (SQLite, artifacts on local disk) on loopback with basic auth and the
platform's permission split (mlflow/REGISTRY.md: pipeline, promoter and consumer identities, with
credentials generated at run time, kept in a private temp directory and deleted at the end), runs the
KFP pipeline with ``kfp.local``, prints what it produced and where to look, and stops the server with
all its worker processes. Every stage is the real one; only the sizes are small.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import yaml

from medisyn.config import RunConfig, deep_merge, parse_overrides, validate_config

log = logging.getLogger("medisyn.demo")
DEMO_PREFIX = "demo-output"


def _find_demo_config() -> Path:
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        cand = base / "configs" / "demo.yaml"
        if cand.exists():
            return cand
    raise FileNotFoundError("configs/demo.yaml not found: run from the repository root or pass --config")


def _rebase(node: Any, workdir: Path) -> Any:
    """Rewrite every ``demo-output/...`` path in the demo config to live under ``workdir``."""
    if isinstance(node, dict):
        return {k: _rebase(v, workdir) for k, v in node.items()}
    if isinstance(node, list):
        return [_rebase(v, workdir) for v in node]
    if isinstance(node, str) and (node == DEMO_PREFIX or node.startswith(DEMO_PREFIX + "/")):
        return str(workdir / node[len(DEMO_PREFIX):].lstrip("/"))
    return node


def demo_config(workdir: str | os.PathLike, config_path: str | None = None,
                overrides: list[str] | None = None, tracking_uri: str | None = None) -> RunConfig:
    workdir = Path(workdir).resolve()
    path = Path(config_path) if config_path else _find_demo_config()
    data = _rebase(yaml.safe_load(path.read_text()) or {}, workdir)
    if tracking_uri:
        data = deep_merge(data, {"tracking": {"tracking_uri": tracking_uri}})
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
    return validate_config(data, str(path))


def find_figures(runs_dir: Path) -> list[Path]:
    """The figures the stages wrote (FID curve, sample grids, ROC curves, distance histograms)."""
    return sorted(p for p in runs_dir.rglob("*.png") if not ({"raw", "_kfp_local"} & set(p.parts)))


def registry_summary(cfg: RunConfig) -> dict[str, Any]:
    """Candidate versions with their aliases and gate tags, and the approved copies (who approved which
    candidate), read back from the registry."""
    from mlflow import MlflowClient

    from medisyn.registry import CANDIDATE_TAG, approved_model, candidates_model

    uri = cfg.tracking.tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # the demo server for both (mlflow 3 defaults differ)
    name = candidates_model(cfg)
    model = client.get_registered_model(name)
    aliases: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    approvals: dict[str, dict[str, str]] = {}
    held = str((client.get_registered_model(approved_model(cfg)).aliases or {}).get(cfg.tracking.approved_alias))
    for mv in client.search_model_versions(f"name='{approved_model(cfg)}'"):
        if "approval.at" in mv.tags and held == str(mv.version):
            approvals[mv.tags.get(CANDIDATE_TAG, "")] = {"uri": f"models:/{approved_model(cfg)}/{mv.version}",
                                                         "by": mv.tags.get("approval.by", "")}
    versions = []
    for mv in client.search_model_versions(f"name='{name}'"):
        versions.append({
            "version": int(mv.version),
            "aliases": sorted(aliases.get(str(mv.version), [])),
            "tags": dict(mv.tags),
            "approved": approvals.get(f"{name}/{mv.version}"),
        })
    return {"model_name": name, "approved_model": approved_model(cfg),
            "versions": sorted(versions, key=lambda v: v["version"])}


def _print_summary(cfg: RunConfig, workdir: Path, summary: dict[str, Any], figures: list[Path],
                   elapsed: float, store: Path) -> None:
    print()
    print("=" * 78)
    print(f"MediSyn demo finished in {elapsed / 60:.1f} min  (phantom data, tiny models trained here)")
    print("=" * 78)
    for v in summary["versions"]:
        tags = v["tags"]
        print(f"model     models:/{summary['model_name']}/{v['version']}   aliases: {', '.join(v['aliases']) or '-'}")
        for key in ("epoch", "fid", "dataset_hash"):
            if key in tags:
                print(f"  {key:<12} {tags[key]}")
        for gate in ("privacy", "utility"):
            verdict = tags.get(f"gate.{gate}", "not recorded (fails closed)")
            print(f"  {gate + ' gate':<12} {verdict}")
            try:
                details = json.loads(tags.get(f"gate.{gate}.details") or "{}")
            except json.JSONDecodeError:
                details = {}
            for reason in details.get("reasons") or []:
                print(f"  {'':<12}   {reason}")
        ok = v.get("approved")
        verdict = (f"yes: {ok['uri']} @{cfg.tracking.approved_alias}, by {ok['by']}" if ok
                   else f"no: stays {cfg.tracking.candidate_alias}")
        print(f"  approved     {verdict}")
    print("figures:")
    for f in figures:
        print(f"  {f}")
    print("reopen the MLflow UI on the demo's store (loopback only, without auth: the demo's run-time")
    print("credentials are gone):")
    print(f"  .venv/bin/mlflow server --backend-store-uri sqlite:///{store / 'mlflow.db'} "
          f"--artifacts-destination {store / 'artifacts'} --host 127.0.0.1 --port 5000")
    print("generate from the registry (with that server running):")
    approved_any = any(v.get("approved") for v in summary["versions"])
    model_ref = (f"models:/{summary['approved_model']}@{cfg.tracking.approved_alias}" if approved_any else
                 f"models:/{summary['model_name']}@{cfg.tracking.candidate_alias}")
    print(f"  MLFLOW_TRACKING_URI=http://127.0.0.1:5000 .venv/bin/medisyn generate --config configs/demo.yaml "
          f"--model {model_ref} --prompt 'Dermoscopy image showing melanoma.' -n 4 --out {workdir / 'generated'}")
    print("=" * 78)


def run_demo(workdir: str | os.PathLike = DEMO_PREFIX, config_path: str | None = None,
             overrides: list[str] | None = None, port: int | None = None,
             credentials_dir: str | None = None) -> dict[str, Any]:
    import secrets
    import shutil
    import tempfile

    from medisyn import access, signing
    from medisyn.demo.services import MLflowServer
    from medisyn.pipeline.local import run_pipeline_locally
    from medisyn.tracking import CREDENTIALS_DIR_ENV

    start = time.monotonic()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    store = workdir / "mlflow"
    # Auth on, as in the chart: credentials made now, kept outside the workdir (0700), deleted at the end
    # unless credentials_dir is given (the e2e test scans the outputs for them).
    private = Path(credentials_dir) if credentials_dir else Path(tempfile.mkdtemp(prefix="medisyn-demo-auth-"))
    private.mkdir(parents=True, exist_ok=True, mode=0o700)
    creds = access.generate_credentials()
    access.write_credentials_dir(private / "identities", creds)
    (private / "admin").write_text(f"{creds['admin'].username}\n{creds['admin'].password}\n")
    ini = access.write_auth_config(private / "basic_auth.ini", f"sqlite:///{private / 'auth.db'}", creds["admin"])
    # Signing keys, as the chart mounts them (issue #21): a gate key and a promoter key (Secrets) and the
    # trust policy holding their public halves (a ConfigMap); made now, deleted with the credentials.
    keys_dir, trust_dir = signing.provision(private / "signing")
    key_env = {CREDENTIALS_DIR_ENV: str(private / "identities"), signing.KEYS_DIR_ENV: str(keys_dir),
               signing.TRUST_DIR_ENV: str(trust_dir)}
    before = {k: os.environ.get(k) for k in key_env}
    try:
        with MLflowServer(store, port=port, auth_config=ini, flask_secret_key=secrets.token_urlsafe(32)) as server:
            cfg = demo_config(workdir, config_path, overrides, tracking_uri=server.url)
            log.info("MLflow server at %s (store %s), basic auth on", server.url, store)
            access.bootstrap(server.url, cfg, creds["admin"], {r: creds[r] for r in access.IDENTITIES})
            os.environ.update(key_env)  # each step picks its identity (and, on a cluster, gets only its key)
            result = run_pipeline_locally(
                cfg, raw_uri=str(workdir / "raw"), root_uri=str(workdir / "runs"), demo=True,
            )
            with access.acting_as(creds["consumer"]):
                summary = registry_summary(cfg)
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if not credentials_dir:
            shutil.rmtree(private, ignore_errors=True)
    figures = find_figures(workdir / "runs")
    _print_summary(cfg, workdir, summary, figures, time.monotonic() - start, store)
    reports = sorted((workdir / "runs").glob("*/report/report.html"))  # the report step's page (docs/report.md)
    for report in reports:
        print(f"evaluation report (open in a browser): {report}")
    return {"pipeline": result, "registry": summary, "figures": [str(f) for f in figures],
            "reports": [str(r) for r in reports]}


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Run the MediSyn pipeline end to end on tiny models and phantom data.")
    p.add_argument("--workdir", default=DEMO_PREFIX, help="where the demo writes everything")
    p.add_argument("--config", default=None, help="demo config (default: configs/demo.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--port", type=int, default=None, help="MLflow server port (default: a free one)")
    p.add_argument("--credentials-dir", default=None,
                   help="keep the run-time MLflow credentials here (default: a private temp dir, deleted at the end)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_demo(args.workdir, args.config, args.set, args.port, args.credentials_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
