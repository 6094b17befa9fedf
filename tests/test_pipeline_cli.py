"""``medisyn pipeline compile | run | schedule | runs`` through the real ``kfp.Client`` over HTTP, against a
small Kubeflow Pipelines REST server (v2beta1) on loopback that records what it was asked."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


class FakeKFP:
    """The v2beta1 endpoints ``kfp.Client`` calls for upload, experiments, runs and recurring runs."""

    def __init__(self) -> None:
        self.pipelines: dict[str, dict[str, Any]] = {}
        self.versions: list[dict[str, Any]] = []
        self.experiments: dict[str, dict[str, Any]] = {}
        self.runs: list[dict[str, Any]] = []
        self.recurring: dict[str, dict[str, Any]] = {}
        self.uploads: list[bytes] = []
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.auth: list[str] = []  # Authorization headers received
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @staticmethod
    def _filtered(items: list[dict[str, Any]], query: dict[str, str]) -> list[dict[str, Any]]:
        flt = json.loads(query.get("filter") or "{}")
        for pred in flt.get("predicates", []):
            items = [i for i in items if i.get(pred["key"]) == pred.get("stringValue", pred.get("string_value"))]
        return items

    def route(self, method: str, path: str, query: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        self.requests.append((method, path, query))
        base = "/apis/v2beta1/"
        rest = path[len(base):] if path.startswith(base) else path
        new_id = str(uuid.uuid4())
        if rest == "healthz":
            return 200, {"multi_user": False}
        if rest == "pipelines" and method == "GET":
            return 200, {"pipelines": self._filtered(list(self.pipelines.values()), query) or None}
        if rest == "pipelines/upload":
            self.uploads.append(body)
            p = {"pipeline_id": new_id, "display_name": query.get("name") or query.get("display_name")}
            self.pipelines[new_id] = p
            return 200, p
        if rest == "pipelines/upload_version":
            self.uploads.append(body)
            v = {"pipeline_id": query["pipelineid"], "pipeline_version_id": new_id, "display_name": query.get("name")}
            self.versions.append(v)
            return 200, v
        if rest == "experiments" and method == "GET":
            return 200, {"experiments": self._filtered(list(self.experiments.values()), query) or None}
        if rest == "experiments" and method == "POST":
            e = {**json.loads(body), "experiment_id": new_id}
            self.experiments[new_id] = e
            return 200, e
        if rest == "runs" and method == "POST":
            r = {**json.loads(body), "run_id": new_id, "state": "PENDING", "created_at": "2026-12-01T00:00:00Z"}
            self.runs.append(r)
            return 200, r
        if rest == "runs" and method == "GET":
            exp = query.get("experiment_id")
            runs = [r for r in self.runs if not exp or r["experiment_id"] == exp]
            return 200, {"runs": list(reversed(runs))[: int(query.get("page_size", 20))] or None}
        if rest == "recurringruns" and method == "GET":
            return 200, {"recurringRuns": list(self.recurring.values()) or None}
        if rest == "recurringruns" and method == "POST":
            r = {**json.loads(body), "recurring_run_id": new_id}
            self.recurring[new_id] = r
            return 200, r
        if rest.startswith("recurringruns/") and method == "DELETE":
            self.recurring.pop(rest.split("/", 1)[1], None)
            return 200, {}
        return 404, {"error": f"no route {method} {path}", "code": 5}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _do(self) -> None:
                url = urlparse(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Authorization"):
                    server.auth.append(self.headers["Authorization"])
                code, out = server.route(self.command, url.path, query, body)
                data = json.dumps(out).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _do

        return Handler


@pytest.fixture
def kfp_server(monkeypatch, tmp_path) -> Iterator[FakeKFP]:
    server = FakeKFP()
    monkeypatch.setenv("KFP_HOST", server.url)
    monkeypatch.setenv("HOME", str(tmp_path))  # kfp.Client reads ~/.config/kfp/context.json
    monkeypatch.delenv("KFP_NAMESPACE", raising=False)
    monkeypatch.delenv("KFP_TOKEN", raising=False)
    yield server
    server.close()


def _medisyn(*args: str) -> dict[str, Any]:
    from medisyn.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["pipeline", *args]) == 0
    return json.loads(out.getvalue())


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text("name: prod\ntrain:\n  epochs: 2\n")
    return path


def test_run_uploads_a_version_and_starts_a_run_of_it(kfp_server, config):
    out = _medisyn("run", "--config", str(config), "--params-json", '{"raw_uri": "s3://b/landing"}',
                   "--version-name", "medisyn-retrain-v7", "--run-name", "by-hand-1")
    (pipeline,) = kfp_server.pipelines.values()
    assert pipeline["display_name"] == "medisyn-retrain"
    (version,) = kfp_server.versions
    assert version["display_name"] == "medisyn-retrain-v7"
    assert b"pipelineInfo" in kfp_server.uploads[-1] and b"record-outcome" in kfp_server.uploads[-1]
    (run,) = kfp_server.runs
    assert run["display_name"] == "by-hand-1" and out["run_id"] == run["run_id"]
    assert run["pipeline_version_reference"] == {"pipeline_id": pipeline["pipeline_id"],
                                                 "pipeline_version_id": version["pipeline_version_id"]}
    params = run["runtime_config"]["parameters"]
    assert params["pipeline_version"] == "medisyn-retrain-v7"  # lineage: tagged on the parent MLflow run
    assert params["raw_uri"] == "s3://b/landing" and json.loads(params["config_json"])["train"]["epochs"] == 2
    assert run["experiment_id"] == next(iter(kfp_server.experiments))
    # a second run reuses the pipeline and the experiment
    _medisyn("run", "--config", str(config))
    assert len(kfp_server.pipelines) == 1 and len(kfp_server.experiments) == 1 and len(kfp_server.versions) == 2


def test_runs_lists_the_newest_first(kfp_server, config):
    for name in ("first", "second"):
        _medisyn("run", "--config", str(config), "--run-name", name)
    out = _medisyn("runs", "--experiment", "medisyn", "--limit", "5")
    assert [r["name"] for r in out["runs"]] == ["second", "first"]
    assert all(r["state"] == "PENDING" and r["run_id"] for r in out["runs"])


def test_schedule_replaces_the_recurring_run_and_keeps_per_step_caching(kfp_server, config):
    first = _medisyn("schedule", "--config", str(config), "--cron", "0 0 2 * * 0", "--version-name", "v1")
    second = _medisyn("schedule", "--config", str(config), "--cron", "0 30 3 * * *", "--version-name", "v2")
    (recurring,) = kfp_server.recurring.values()  # the first one was deleted
    assert recurring["recurring_run_id"] == second["recurring_run_id"] != first["recurring_run_id"]
    assert recurring["trigger"]["cron_schedule"]["cron"] == "0 30 3 * * *"
    assert recurring["runtime_config"]["parameters"]["pipeline_version"] == "v2"
    assert recurring["no_catchup"] is True
    # no run-level cache override: the steps' own caching options (CACHED_STEPS) hold
    assert "cache" not in json.dumps({k: v for k, v in recurring.items() if k != "runtime_config"}).lower()


def test_the_token_comes_from_the_environment(kfp_server, config, monkeypatch):
    monkeypatch.setenv("KFP_TOKEN", "secret-token")
    _medisyn("runs")
    assert kfp_server.auth and set(kfp_server.auth) == {"Bearer secret-token"}


def test_compile_writes_the_ir(tmp_path):
    out = _medisyn("compile", "--out", str(tmp_path / "p.yaml"), "--gpus", "0")
    spec = next(yaml.safe_load_all(Path(out["package"]).read_text()))
    assert spec["pipelineInfo"]["name"] == "medisyn-retrain"
    assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]


def test_compile_works_outside_the_checkout(tmp_path):
    """`medisyn pipeline` comes with the installed package (issue #22): no repository on sys.path."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import importlib.util, sys\n"
            "assert importlib.util.find_spec('pipelines') is None, 'the checkout is importable'\n"
            "from medisyn.cli import main\n"
            "sys.exit(main(['pipeline', 'compile', '--out', 'p.yaml']))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["package"] == "p.yaml"
    assert next(yaml.safe_load_all((tmp_path / "p.yaml").read_text()))["pipelineInfo"]["name"] == "medisyn-retrain"


def test_no_endpoint_is_a_clear_error(monkeypatch, config):
    monkeypatch.delenv("KFP_HOST", raising=False)
    from medisyn.pipeline import cli

    with pytest.raises(SystemExit, match="KFP_HOST"):
        cli.main(["runs"])


def test_the_charts_install_hook_runs_medisyn_pipeline_schedule():
    import subprocess

    from helpers import helm_binary

    helm = helm_binary()
    out = subprocess.run([helm, "template", "medisyn", str(REPO / "charts" / "medisyn"), "--namespace", "ml"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    job = next(d for d in yaml.safe_load_all(out)
               if d and d["kind"] == "Job" and d["metadata"]["name"] == "medisyn-register-pipeline")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["medisyn", "pipeline", "schedule"]
    from medisyn.pipeline.cli import build_parser

    args = build_parser().parse_args(["schedule", *container["args"]])  # every flag the hook passes exists
    assert args.cron == "0 0 2 * * 0" and args.config == "/etc/medisyn/config.json"
    assert json.loads(args.params_json)["train_launcher"] == "auto"
