"""What basic auth costs per MLflow call, with and without the server's credential cache.

    .venv/bin/python benchmarks/mlflow_auth.py [--calls 40]

MLflow's basic-auth app checks the password of every request against its stored hash (werkzeug's
scrypt: slow on purpose). A pipeline step makes hundreds of calls (a model log uploads each file,
promote reads every file back), so that check dominated the auth integration tests and would load
the chart's MLflow pod the same way. ``auth_cache_ttl_seconds`` (the chart's
``mlflow.auth.cacheTtlSeconds``, default 60) remembers a verified credential for that long.

Three servers on loopback, SQLite, the same calls (``get_experiment`` as an authenticated non-admin
identity and as the admin, after one warm-up call): no auth (the floor), auth with the cache off
(MLflow's default) and auth with the cache on. Prints seconds per call and the ratios to the
no-auth floor in this run, and writes ``benchmarks/results/mlflow_auth.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "mlflow_auth.json"


def per_call_s(tracking_uri: str, creds, calls: int) -> float:
    from mlflow import MlflowClient

    from medisyn import access

    with access.acting_as(creds):
        client = MlflowClient(tracking_uri)
        client.get_experiment("0")  # warm-up: connection, and the first (uncached) password check
        t0 = time.perf_counter()
        for _ in range(calls):
            client.get_experiment("0")
        return (time.perf_counter() - t0) / calls


def main(argv: list[str] | None = None) -> int:
    from medisyn import access
    from medisyn.config import RunConfig
    from medisyn.demo.services import MLflowServer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=40)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mlflow-auth-bench-"))
    creds = access.generate_credentials()
    figures: dict[str, float] = {}
    with MLflowServer(work / "none") as server:
        figures["no_auth_s"] = per_call_s(server.tracking_uri, None, args.calls)
    for label, ttl in (("cache_off", 0), ("cache_60s", access.AUTH_CACHE_TTL_SECONDS)):
        ini = access.write_auth_config(work / f"{label}.ini", f"sqlite:///{work / label}-auth.db", creds["admin"],
                                       auth_cache_ttl_seconds=ttl)
        with MLflowServer(work / label, auth_config=ini, flask_secret_key="benchmark-only") as server:
            access.bootstrap(server.tracking_uri, RunConfig(), creds["admin"],
                             {r: creds[r] for r in access.IDENTITIES})
            figures[f"{label}_admin_s"] = per_call_s(server.tracking_uri, creds["admin"], args.calls)
            figures[f"{label}_pipeline_s"] = per_call_s(server.tracking_uri, creds["pipeline"], args.calls)
    floor = figures["no_auth_s"]
    print(f"seconds per get_experiment call ({args.calls} calls, {platform.processor() or platform.machine()}):")
    for key, value in figures.items():
        print(f"  {key:<22} {value:.4f}  ({value / floor:.1f}x no auth)")
    for who in ("admin", "pipeline"):
        print(f"  cache speed-up, {who}: {figures[f'cache_off_{who}_s'] / figures[f'cache_60s_{who}_s']:.1f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"calls": args.calls, **figures}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
