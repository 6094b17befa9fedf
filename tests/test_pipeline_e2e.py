"""End to end: the KFP pipeline under kfp.local, as `make demo` runs it, with no network at all.

The whole demo runs inside a fresh network namespace (``unshare -n``) whose only interface is
loopback: the MLflow server it starts still works, but any attempt to download a model or a
package fails. Then the registry is read back from the demo's SQLite store. The same pipeline is
then run by hand, step by step, with the ``medisyn`` CLI alone, and must end in the same state.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import missing_tool

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _offline_prefix() -> list[str]:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        missing_tool("unshare/ip not available: cannot build a network-less namespace here")
    flags = "-n" if os.geteuid() == 0 else "-rn"
    probe = subprocess.run(["unshare", flags, "true"], capture_output=True)
    if probe.returncode != 0:
        missing_tool(f"unshare {flags} refused: {probe.stderr.decode().strip()}")
    return ["unshare", flags, "sh", "-c", 'ip link set lo up && exec "$0" "$@"']


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    creds = tmp_path_factory.mktemp("demo-credentials")  # kept outside the workdir, for the byte scan
    cmd = _offline_prefix() + [sys.executable, "-m", "pipelines.demo", "--workdir", str(workdir),
                               "--credentials-dir", str(creds)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=2700)
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
    model = client.get_registered_model("medisyn-demo-candidates")  # the pipeline's model (mlflow/REGISTRY.md)
    assert "candidate" in model.aliases
    version = client.get_model_version("medisyn-demo-candidates", model.aliases["candidate"])
    tags = version.tags
    # the demo's models learn (models.tiny.pretrain, 15 epochs) and both gates decide on evidence, and
    # pass: the privacy gate (48 pairs, the closest at 0.12 against the demo's calibrated 0.05; held-out
    # real phantoms come within 0.08 of a training image) and the utility gate (intervals narrower than
    # its margin; the synthetic images carry 0.99 / 0.77 / 1.00 of the real images' class signal for
    # dermoscopy / OCT / chest X-ray, measured, bar 0.5). So the demo ends approved (issue #11).
    for gate in ("privacy", "utility"):
        assert tags[f"gate.{gate}.run_id"]  # the verdict is the gate's own run, not the tag (issue #10)
        assert tags.get(f"gate.{gate}") == "passed", (gate, tags.get(f"gate.{gate}.details"))
    utility = _utility_report(workdir)
    for task in utility["tasks"]:
        d = task["diff_full_vs_synthetic"]
        assert d["hi"] - d["lo"] < utility["config"]["max_auroc_drop"], (task["task"]["name"], d)
    approved = client.get_registered_model("medisyn-demo")
    assert "approved" in approved.aliases and "approved     yes" in stdout
    # approved through the permission split: the promoter copied the candidate
    mv = client.get_model_version("medisyn-demo", approved.aliases["approved"])
    assert mv.tags["medisyn.candidate"] == f"medisyn-demo-candidates/{version.version}"
    assert mv.tags["approval.by"] == "promoter" and json.loads(mv.tags["approval.record"])["gates"]
    assert mv.tags["medisyn.manifest_sha256"] == tags["medisyn.manifest_sha256"]
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
    assert "models:/medisyn-demo-candidates/" in stdout
    assert "models:/medisyn-demo@approved" in stdout and "approved     yes" in stdout
    assert "mlflow server --backend-store-uri sqlite:///" in stdout
    assert "privacy gate" in stdout and "utility gate" in stdout
    assert "evaluation report (open in a browser): " in stdout and "report.html" in stdout


def _utility_report(workdir: Path) -> dict:
    (utility,) = sorted((workdir / "runs").glob("*/gates/utility/report.json"))
    return json.loads(utility.read_text())


def test_demo_report_shows_recognisable_synthetic_images(demo_run):
    """The report step ran after promote (docs/report.md), and the real-trained classifier of every
    utility task ranks the demo's synthetic images by their class well above chance (AUROC on the
    synthetic images, the gate's synthetic-signal condition)."""
    workdir, _ = demo_run
    (report,) = sorted((workdir / "runs").glob("*/report/report.html"))
    page = report.read_text()
    for section in ("model-card", "gates", "samples", "fid", "table-1", "distance-histogram", "pairs", "roc",
                    "recognisability", "reader-study"):
        assert f'<section id="{section}"' in page, section
    for task in _utility_report(workdir)["tasks"]:
        # measured: dermoscopy 0.99, OCT 0.88, chest X-ray 1.00 (chance: 0.5)
        assert task["synthetic_signal"]["synthetic_auroc"] > 0.7, (task["task"]["name"], task["synthetic_signal"])


def test_demo_synthetic_images_of_every_class_are_classified_above_chance(demo_run):
    """The automatic stand-in for the reader study (issues #11, #29): the real-trained classifier of each
    utility task calls the synthetic images of every class by their class above chance, by the one-sided
    95% Clopper-Pearson lower bound of its accuracy (26-34 images per class), not by a point estimate."""
    from medisyn.evaluate.binomial import accuracy_lower_bound

    workdir, _ = demo_run
    for task in _utility_report(workdir)["tasks"]:
        rec = task["recognisability"]
        assert rec["confidence"] == 0.95
        for row in rec["per_class"]:
            hits = round(row["synthetic_accuracy"] * row["n_synthetic"])
            assert row["synthetic_accuracy_lower"] == accuracy_lower_bound(hits, row["n_synthetic"])
            assert row["synthetic_above_chance"] and row["synthetic_accuracy_lower"] > rec["chance"], (
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
    model = client.get_registered_model("medisyn-demo-candidates")
    tags = client.get_model_version("medisyn-demo-candidates", model.aliases["candidate"]).tags
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
# The demo learned, and the gates would have stopped a model that did not (issue #11): negative
# controls on the demo's own data, config and gates
# ----------------------------------------------------------------------------------------------
def _demo_outputs(workdir: Path) -> tuple[Path, str]:
    (config,) = sorted(p for p in (workdir / "runs").glob("*/config.yaml") if "_kfp_local" not in p.parts)
    return config.parent, f"file://{config.parent / 'dataset'}"


def test_demo_fid_falls_as_the_model_learns(demo_run):
    """The learning-curve check (issue #29) on a statistic that fits N = 64: the first epoch's FID minus the
    selected epoch's, by a paired bootstrap over the shared captions and seeds, is above 0 with 95%
    confidence. (Each epoch's own interval is wider than the whole curve at this N.)"""
    from medisyn.evaluate.fid import ScoreResult

    run, _ = _demo_outputs(demo_run[0])
    scores = ScoreResult.load(f"file://{run / 'scores'}")
    fid = scores.fid_by_epoch
    assert len(fid) == 15 and set(scores.fid_diff_ci_by_epoch) == set(fid)
    assert scores.best_epoch != 1 and scores.learning_detected, (fid, scores.fid_diff_ci_by_epoch)
    lo, _ = scores.fid_diff_ci_by_epoch[1]
    assert lo > 0 and fid[1] > fid[scores.best_epoch], (fid, scores.fid_diff_ci_by_epoch)


def test_negative_control_an_untrained_model_fails_the_utility_gate(demo_run, tmp_path):
    """The demo's base U-Net, before any training, through the demo's utility gate on the demo's
    dataset: its samples carry no class signal, so the gate fails, whatever the real half achieves."""
    from medisyn.evaluate.utility import utility_gate
    from pipelines.demo import demo_config

    workdir, _ = demo_run
    _, dataset = _demo_outputs(workdir)
    cfg = demo_config(workdir, overrides=[
        "utility.tasks=[{name: dermoscopy, specialty: dermatology, image_type: dermoscopy},"
        " {name: oct, specialty: ophthalmology, image_type: oct}]"])
    result = utility_gate(cfg, str(workdir / "models" / "sdxl-tiny"), dataset, f"file://{tmp_path / 'utility'}")
    assert result.passed is False, result.reasons
    assert any("< min_synthetic_signal" in r for r in result.reasons), result.reasons


def test_negative_control_a_model_that_reproduces_training_images_fails_the_privacy_gate(demo_run, tmp_path):
    """A 'model' that returns (near-)copies of the demo's training images, through the demo's privacy
    gate: pairs at/below the demo's threshold (0.05; copies are at ~0.01) are found and the gate fails."""
    from helpers import copying_sampler
    from medisyn.evaluate.privacy import privacy_gate
    from pipelines.demo import demo_config

    workdir, _ = demo_run
    _, dataset = _demo_outputs(workdir)
    cfg = demo_config(workdir)
    result = privacy_gate(cfg, "memorizing-model", dataset, f"file://{tmp_path / 'privacy'}",
                          sampler=copying_sampler(dataset))
    assert result.passed is False, result.reasons
    assert result.metrics["fraction_below"] > 0.9, result.metrics


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
    """Every step of the demo pipeline as a `medisyn` command, in the pipeline's order, on the tests'
    smallest config (tests/tiny.yaml: random-init tiny models, a few images per class): the CLI path
    is what is checked here, the demo's learning is checked on the pipeline run above."""
    import mlflow

    from helpers import demo_config as tiny_config
    from medisyn import tracking
    from medisyn.demo.services import MLflowServer

    workdir = tmp_path_factory.mktemp("by-hand")
    with MLflowServer(workdir / "mlflow") as server:
        config = workdir / "demo.yaml"
        config.write_text(tiny_config(workdir, [f"tracking.tracking_uri={server.url}"]).to_yaml())
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
        model = client.get_registered_model("medisyn-demo-candidates")
        version = client.get_model_version("medisyn-demo-candidates", reg["version"])
        approved = client.get_registered_model("medisyn-demo").aliases if promoted["approved"] else {}
        state = {"aliases": {a: str(v) for a, v in model.aliases.items()}, "tags": dict(version.tags),
                 "approved": "approved" in approved}
    return plan, reg, verdicts, promoted, state


def _client_at(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_cli_by_hand_ends_in_the_registry_state_the_pipeline_would(cli_run, demo_run):
    plan, reg, verdicts, promoted, by_hand = cli_run
    workdir, _ = demo_run
    client = _client(workdir)
    model = client.get_registered_model("medisyn-demo-candidates")
    kfp_tags = dict(client.get_model_version("medisyn-demo-candidates", model.aliases["candidate"]).tags)
    # the aliases on the registered version follow the recorded verdicts, as in the pipeline
    assert set(by_hand["aliases"].values()) == {reg["version"]}
    assert "candidate" in by_hand["aliases"]
    assert by_hand["approved"] == promoted["approved"]
    assert promoted["approved"] == all(verdicts[g]["passed"] for g in ("privacy", "utility"))
    # the same tags (values differ: the by-hand run uses the tests' smallest config); both gate
    # verdicts recorded by the runner, as the CLI reported them
    assert set(by_hand["tags"]) == set(kfp_tags)
    for key in ("unet_dtype", "fid.mode"):
        assert by_hand["tags"][key] == kfp_tags[key], key
    for gate in ("privacy", "utility"):
        assert by_hand["tags"][f"gate.{gate}"] == ("passed" if verdicts[gate]["passed"] else "failed")
    # every step's typed result sits with its output
    from medisyn.evaluate.fid import ScoreResult
    from medisyn.evaluate.gates import GateResult

    assert ScoreResult.load(plan["scores_uri"]).best_checkpoint_uri.startswith(plan["checkpoints_uri"])
    assert GateResult.load(plan["privacy_uri"]).passed == verdicts["privacy"]["passed"]


# ----------------------------------------------------------------------------------------------
# Nothing identifying leaves preprocessing, and no credential is written anywhere (issue #10)
# ----------------------------------------------------------------------------------------------
def _phantom_identifiers(raw: Path) -> set[str]:
    """Every fake patient identifier of the demo's landing zone (src/medisyn/demo/phantoms.py, _fake_patient):
    DICOM PatientID / PatientName / AccessionNumber and the labels tables' patient ids, read back from
    the raw files, plus anything in them shaped like one (PHANTOM-<SOURCE>-NNNN, Phantom^..., ACC...)."""
    import csv
    import re

    import pydicom

    found: set[str] = set()
    for f in sorted(p for p in raw.rglob("*") if p.is_file()):
        data = f.read_bytes()
        found.update(m.decode() for m in re.findall(rb"PHANTOM-[A-Z_]+-\d+|Phantom\^[A-Za-z^]+|ACC\d{4,}", data))
        if f.suffix.lower() == ".dcm" or data[128:132] == b"DICM":
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
            found.update(str(ds.get(k, "")) for k in ("PatientID", "PatientName", "AccessionNumber"))
        elif f.suffix.lower() in (".csv", ".tsv"):
            with open(f, newline="", encoding="utf-8", errors="replace") as fh:
                for row in csv.DictReader(fh, delimiter="\t" if f.suffix.lower() == ".tsv" else ","):
                    found.add(str(row.get("patient_id") or ""))
    return {s for s in found if len(s) >= 6}  # short strings (e.g. "M") would match anything


def test_demo_writes_no_patient_identifier_and_no_credential_anywhere(demo_run, tmp_path_factory):
    """Every byte the demo wrote outside its landing zone (dataset, caches, checkpoints, gate reports,
    the report page, the MLflow database and artifacts, the run's log) is searched for the landing
    zone's fake patient identifiers and for the run-time MLflow credentials: zero hits."""
    workdir, _ = demo_run
    identifiers = _phantom_identifiers(workdir / "raw")
    assert len(identifiers) > 50 and any(i.startswith("PHANTOM-") for i in identifiers), sorted(identifiers)[:5]
    creds_dir = next(p for p in workdir.parent.iterdir() if p.name.startswith("demo-credentials"))
    secrets = {p.read_text().strip() for p in creds_dir.rglob("password")}
    secrets |= set((creds_dir / "admin").read_text().split()[1:])
    # the gate and promoter private keys (issue #21): the base64 body of each PEM
    secrets |= {"".join(k.read_text().splitlines()[1:-1]) for k in creds_dir.rglob("key.pem")}
    assert len(secrets) == 6 and all(len(s) >= 20 for s in secrets)
    # identifiers case-insensitively (file names carry them lower-cased), in one pass per file: every
    # identifier starts with one of three prefixes, found by one regex, then matched in full there;
    # credentials exactly
    ids = {i.lower().encode() for i in identifiers}
    prefixes = (b"phantom-", b"phantom^", b"acc")
    assert all(i.startswith(prefixes) for i in ids), sorted(i for i in ids if not i.startswith(prefixes))[:5]
    shaped = re.compile(rb"phantom[-^]|acc\d")
    scanned, hits = 0, []
    for f in sorted(p for p in workdir.rglob("*") if p.is_file() and not p.is_symlink()):
        if (workdir / "raw") in f.parents:
            continue  # the input itself
        data = f.read_bytes()
        lower = data.lower()
        scanned += len(data)
        rel = str(f.relative_to(workdir))
        for m in shaped.finditer(lower):
            hits += [(rel, i.decode()[:24]) for i in ids if lower.startswith(i, m.start())]
        hits += [(rel, "<credential>") for s in secrets if s.encode() in data]
    assert scanned > 1_000_000 and (workdir / "mlflow" / "mlflow.db").is_file()
    assert hits == [], hits[:20]
