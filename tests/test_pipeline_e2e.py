"""End to end: the KFP pipeline under kfp.local, as `make demo` runs it, with no network at all.

The whole demo runs inside a fresh network namespace (``unshare -n``) whose only interface is
loopback: the MLflow server it starts still works, but any attempt to download a model or a
package fails. Then the registry is read back from the demo's SQLite store. The same pipeline is
then run by hand, step by step, with the ``medisyn`` CLI alone, and must end in the same state.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _offline_prefix() -> list[str]:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("unshare/ip not available: cannot build a network-less namespace here")
    flags = "-n" if os.geteuid() == 0 else "-rn"
    probe = subprocess.run(["unshare", flags, "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare {flags} refused: {probe.stderr.decode().strip()}")
    return ["unshare", flags, "sh", "-c", 'ip link set lo up && exec "$0" "$@"']


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    cmd = _offline_prefix() + [sys.executable, "-m", "pipelines.demo", "--workdir", str(workdir)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    log = proc.stdout + proc.stderr
    (workdir / "demo.log").write_text(log)
    assert proc.returncode == 0, log[-6000:]
    return workdir, proc.stdout


def _client(workdir: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{workdir / 'mlflow' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_demo_registers_a_candidate_with_gate_verdicts(demo_run):
    workdir, stdout = demo_run
    client = _client(workdir)
    model = client.get_registered_model("medisyn-demo")
    assert "candidate" in model.aliases
    version = client.get_model_version("medisyn-demo", model.aliases["candidate"])
    tags = version.tags
    for gate in ("privacy", "utility"):
        assert tags.get(f"gate.{gate}") in ("passed", "failed"), tags
    both_passed = all(tags[f"gate.{g}"] == "passed" for g in ("privacy", "utility"))
    # approved exactly when both gates passed (and it points at the candidate)
    assert ("approved" in model.aliases) == both_passed
    if both_passed:
        assert model.aliases["approved"] == model.aliases["candidate"]
    for key in ("epoch", "dataset_hash", "config_hash"):
        assert key in tags, key
    # the KFP run id reached the version, and every stage run nests under the run's parent MLflow run
    run_folders = {d.name for d in (workdir / "runs").iterdir() if d.is_dir() and not d.name.startswith(("_", "."))}
    assert tags["pipeline_run_id"] in run_folders  # the run's folder is named by the KFP run id
    assert tags["code_version"]
    experiment = client.get_experiment_by_name("medisyn-demo")
    runs = client.search_runs([experiment.experiment_id])
    parent = [r for r in runs if r.data.tags.get("medisyn.stage") == "pipeline"]
    assert len(parent) == 1 and parent[0].data.tags["medisyn.pipeline_run_id"] == tags["pipeline_run_id"]
    nested = {r.data.tags["medisyn.stage"] for r in runs
              if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id}
    assert {"preprocess", "train", "score", "register", "privacy-gate", "utility-gate", "promote"} <= nested
    assert parent[0].info.status == "FINISHED"


def test_demo_prints_where_to_look(demo_run):
    workdir, stdout = demo_run
    assert "models:/medisyn-demo/" in stdout
    assert "mlflow server --backend-store-uri sqlite:///" in stdout
    assert "privacy gate" in stdout and "utility gate" in stdout
    assert "evaluation report (open in a browser): " in stdout and "report.html" in stdout


def test_demo_report_shows_recognisable_synthetic_images(demo_run):
    """The report step ran after promote (docs/report.md), and the real-trained classifiers recognise
    the demo's synthetic images of every class clearly above chance (issue #11)."""
    workdir, _ = demo_run
    (report,) = sorted((workdir / "runs").glob("*/report/report.html"))
    page = report.read_text()
    for section in ("model-card", "gates", "samples", "fid", "table-1", "distance-histogram", "pairs", "roc",
                    "recognisability", "reader-study"):
        assert f'<section id="{section}"' in page, section
    (utility,) = sorted((workdir / "runs").glob("*/gates/utility/report.json"))
    for task in json.loads(utility.read_text())["tasks"]:
        rec = task["recognisability"]
        for row in rec["per_class"]:
            assert row["synthetic_accuracy"] is not None and row["synthetic_accuracy"] > rec["chance"] + 0.15, (
                task["task"]["name"], row)


def test_demo_writes_figures(demo_run):
    workdir, _ = demo_run
    from pipelines.demo import find_figures

    names = {p.name for p in find_figures(workdir / "runs")}
    for expected in ("fid_curve.png", "privacy_distance_histogram.png", "privacy_closest_pairs.png"):
        assert expected in names, names
    assert any(n.startswith("utility_roc_") for n in names), names
    _, stdout = demo_run
    assert "fid_curve.png" in stdout


def test_demo_left_no_server_running(demo_run):
    workdir, _ = demo_run
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(workdir / "mlflow") not in ps


# ----------------------------------------------------------------------------------------------
# Lineage and the exit handler (issue #13): one parent MLflow run per pipeline run, every stage run
# nested under it, the KFP run id and the code version on the registered version, the outcome recorded
# ----------------------------------------------------------------------------------------------
def test_demo_lineage_kfp_run_id_and_code_version_on_the_version(demo_run):
    import re

    workdir, _ = demo_run
    client = _client(workdir)
    model = client.get_registered_model("medisyn-demo")
    tags = client.get_model_version("medisyn-demo", model.aliases["candidate"]).tags
    experiment = client.get_experiment_by_name("medisyn-demo")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("medisyn.stage") == "pipeline"]
    kfp_run_id = parent.data.tags["medisyn.pipeline_run_id"]
    # the KFP run id: the run's folder (run_tag "" = the KFP run id), the version's checkpoint lives in it
    assert tags["pipeline_run_id"] == kfp_run_id and (workdir / "runs" / kfp_run_id / "config.yaml").is_file()
    assert f"/{kfp_run_id}/checkpoints/" in tags["checkpoint_uri"]
    # every stage run is nested under the one parent and carries the same KFP run id
    stage_runs = [r for r in runs if r.info.run_id != parent.info.run_id]
    assert stage_runs and all(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in stage_runs)
    assert {r.data.tags.get("medisyn.pipeline_run_id") for r in stage_runs} == {kfp_run_id}
    # the code version: the git sha of this checkout (+dirty with local changes), on the version and the parent
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", tags["code_version"]), tags["code_version"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert tags["code_version"].split("+")[0] == head
    assert parent.data.tags["medisyn.code_version"] == tags["code_version"]
    # the exit handler recorded the run's outcome on the parent run and on the version
    assert parent.data.tags["medisyn.outcome.status"] == "SUCCEEDED"
    assert parent.data.tags["medisyn.outcome.failed_step"] == "" and parent.info.status == "FINISHED"
    assert tags["pipeline.status"] == "SUCCEEDED" and tags["pipeline.failed_step"] == ""


# ----------------------------------------------------------------------------------------------
# The same pipeline by hand, through the `medisyn` CLI alone (no KFP): the same registry state
# ----------------------------------------------------------------------------------------------
def _medisyn(*args: str, ok: tuple[int, ...] = (0,)) -> dict:
    """One `medisyn` command, in this process (the console script calls the same ``main``): the
    steps share their imports, so the by-hand run costs its work, not eleven interpreter starts."""
    import contextlib
    import io

    from medisyn.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(args))
    assert code in ok, f"medisyn {args[0]} exited {code}"
    text = "\n" + out.getvalue()  # the result is the last JSON object printed
    return json.loads(text[text.rindex("\n{") + 1:])


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, demo_run):
    """Every step of the demo pipeline as a `medisyn` command, in the pipeline's order."""
    import mlflow

    from medisyn import tracking
    from medisyn.services import MLflowServer
    from pipelines.demo import demo_config

    workdir = tmp_path_factory.mktemp("by-hand")
    (workdir / "models").symlink_to(demo_run[0] / "models")  # the same tiny models: build-tiny-models keeps them
    with MLflowServer(workdir / "mlflow") as server:
        config = workdir / "demo.yaml"
        config.write_text(demo_config(workdir, tracking_uri=server.url).to_yaml())
        # the first step through the installed console script, exit status and JSON on stdout included
        exe = Path(sys.executable).with_name("medisyn")
        proc = subprocess.run([str(exe), "plan", "--config", str(config), "--root", str(workdir / "runs"),
                               "--run-tag", "by-hand"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        plan = json.loads(proc.stdout)
        c = ["--config", plan["config_uri"]]  # every later step reads the run's stored config
        try:
            _medisyn("build-tiny-models", *c)
            _medisyn("demo-data", *c, "--out", plan["raw_uri"])
            _medisyn("preprocess", *c, "--raw", plan["raw_uri"], "--out", plan["dataset_uri"])
            _medisyn("encode", *c, "--dataset", plan["dataset_uri"], "--cache", plan["cache_uri"])
            _medisyn("train", *c, "--cache", plan["cache_uri"], "--checkpoints", plan["checkpoints_uri"])
            _medisyn("score", *c, "--dataset", plan["dataset_uri"], "--checkpoints", plan["checkpoints_uri"],
                     "--out", plan["scores_uri"])
            reg = _medisyn("register", *c, "--scores", plan["scores_uri"], "--dataset", plan["dataset_uri"],
                           "--out", plan["register_uri"])
            verdicts = {}
            for gate in ("privacy", "utility"):  # exit 3: the gate ran and did not pass (its verdict is recorded)
                verdicts[gate] = _medisyn(f"{gate}-gate", *c, "--model", reg["model_uri"], "--dataset",
                                          plan["dataset_uri"], "--out", plan[f"{gate}_uri"], ok=(0, 3))
            promoted = _medisyn("promote", *c, "--model", reg["model_uri"], "--out", plan["promote_uri"],
                                ok=(0, 3))
            _medisyn("report", *c, reg["model_uri"], "--out", plan["report_uri"])  # as the pipeline, after promote
            # as the pipeline's exit handler (issue #13): the outcome on the parent run and the version
            _medisyn("record-outcome", *c, "--root", str(workdir / "runs"), "--run-tag", "by-hand",
                     "--status", "SUCCEEDED")
        finally:  # this process's mlflow client pointed at a server that is about to stop
            mlflow.set_tracking_uri(None)
            tracking._CONFIGURED = None
        client = _client_at(server.url)
        model = client.get_registered_model("medisyn-demo")
        version = client.get_model_version("medisyn-demo", reg["version"])
        state = {"aliases": {a: str(v) for a, v in model.aliases.items()}, "tags": dict(version.tags)}
    return plan, reg, verdicts, promoted, state


def _client_at(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_cli_by_hand_ends_in_the_same_registry_state_as_the_pipeline(cli_run, demo_run):
    plan, reg, verdicts, promoted, by_hand = cli_run
    workdir, _ = demo_run
    client = _client(workdir)
    model = client.get_registered_model("medisyn-demo")
    kfp_tags = dict(client.get_model_version("medisyn-demo", model.aliases["candidate"]).tags)
    # the same aliases on the registered version
    assert by_hand["aliases"] == {a: str(v) for a, v in model.aliases.items()}
    assert set(by_hand["aliases"].values()) == {reg["version"]}
    assert "candidate" in by_hand["aliases"]
    assert ("approved" in by_hand["aliases"]) == promoted["approved"]
    # the same tags: both gate verdicts recorded, by the runner, with the same outcome
    assert set(by_hand["tags"]) == set(kfp_tags)
    for key in ("gate.privacy", "gate.utility", "epoch", "dataset_hash", "unet_dtype", "fid.n", "fid.mode"):
        assert by_hand["tags"][key] == kfp_tags[key], key
    for gate in ("privacy", "utility"):
        assert by_hand["tags"][f"gate.{gate}"] == ("passed" if verdicts[gate]["passed"] else "failed")
    # every step's typed result sits with its output
    from medisyn.evaluate.fid import ScoreResult
    from medisyn.evaluate.gates import GateResult

    assert ScoreResult.load(plan["scores_uri"]).best_checkpoint_uri.startswith(plan["checkpoints_uri"])
    assert GateResult.load(plan["privacy_uri"]).passed == verdicts["privacy"]["passed"]
