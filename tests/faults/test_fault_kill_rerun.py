"""SIGKILL of a stage mid-way, then a rerun: it completes, its output equals an uninterrupted run's,
and no partial output was ever visible downstream (issue #12). The stage runs as `medisyn <stage>` in
its own session and the kill takes the whole process group, Ray included, as a pod kill would.
(Training's kill-and-resume is tests/test_trainer_resume.py: bitwise-equal weights.)"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from helpers import demo_config, model_env, sqlite_registry, write_checkpoints, write_gate_dataset
from medisyn import storage
from medisyn.config import RunConfig
from medisyn.data import read_manifest

if TYPE_CHECKING:
    from mlflow import MlflowClient

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _cli(stage: str, config: Path, tmp: Path, **uris: str) -> list[str]:
    args = [sys.executable, "-m", "medisyn.cli", stage, "--config", str(config)]
    for key, value in uris.items():
        args += [f"--{key}", value]
    return args


def _env(tmp: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    return dict(os.environ, TMPDIR=str(tmp), MEDISYN_ID_SALT="fault-suite-salt", OMP_NUM_THREADS="1",
                HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAY_AUTH_MODE="disabled", **(extra or {}))


def _run(cmd: list[str], tmp: Path, returncodes: tuple[int, ...] = (0,), env: dict[str, str] | None = None) -> None:
    """Run the stage to the end; a gate's failed verdict or a refused promotion exits 3 (allow it)."""
    proc = subprocess.run(cmd, env=_env(tmp, env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    assert proc.returncode in returncodes, proc.stderr.decode()[-3000:]


def _kill_when(cmd: list[str], tmp: Path, ready: Callable[[], bool], env: dict[str, str] | None = None) -> None:
    """Start the stage, SIGKILL its whole process group once ``ready()`` holds (mid-way)."""
    proc = subprocess.Popen(cmd, env=_env(tmp, env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not ready():
            assert proc.poll() is None, "the stage finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _files(root: Path) -> dict[str, str]:
    """sha256 of every file under a prefix but the runner's result.json (it carries timings)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "result.json"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from medisyn.demo.phantoms import write_landing_zone
    from medisyn.models import sdxl

    root = tmp_path_factory.mktemp("kill-rerun")
    cfg = demo_config(root, ["data.ray_num_cpus=2", "data.ray_batch_size=2", "train.encode_batch_size=4",
                             "train.cache_shard_rows=8", "tracking.tracking_uri=null"])
    sdxl.build_tiny_sdxl(cfg.models.tiny, storage.local_path(cfg.models.sdxl_base), storage.local_path(cfg.models.vae))
    (root / "run.yaml").write_text(cfg.to_yaml())
    write_landing_zone(str(root / "raw"), n_per_class=6, seed=0)
    # the stages' TMPDIR: short, since Ray puts its session's unix sockets there (107-byte limit)
    tmp = Path(tempfile.mkdtemp(prefix="mks-"))
    (root / "tmp").symlink_to(tmp)
    yield root
    shutil.rmtree(tmp, ignore_errors=True)


def test_preprocess_killed_mid_decode_then_rerun_gives_the_same_dataset(workspace):
    root, tmp = workspace, (workspace / "tmp").resolve()
    config = workspace / "run.yaml"
    _run(_cli("preprocess", config, tmp, raw=str(root / "raw"), out=str(root / "reference")), tmp)

    out = root / "dataset"

    def decoding() -> bool:  # decoded images already staged (by the workers) in the scratch directory
        return any(tmp.glob("medisyn-preprocess-*/rows/*.parquet"))

    _kill_when(_cli("preprocess", config, tmp, raw=str(root / "raw"), out=str(out)), tmp, decoding)
    assert not out.exists() and not storage.is_complete(str(out))  # nothing partial is visible
    with pytest.raises(FileNotFoundError, match="incomplete"):
        read_manifest(str(out))  # what a downstream stage would do
    assert any(tmp.glob("medisyn-preprocess-*"))  # the killed run's scratch, with image bytes

    _run(_cli("preprocess", config, tmp, raw=str(root / "raw"), out=str(out)), tmp)
    assert read_manifest(str(out))["dataset_hash"] == read_manifest(str(root / "reference"))["dataset_hash"]
    assert _files(out) == _files(root / "reference")  # every shard byte-identical
    assert not any(tmp.glob("medisyn-preprocess-*"))  # the rerun removed the dead run's scratch
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []


def test_encode_killed_mid_way_then_rerun_gives_the_same_cache(workspace):
    root, tmp = workspace, (workspace / "tmp").resolve()
    config = workspace / "run.yaml"
    dataset = str(root / "reference")
    if not storage.is_complete(dataset):
        _run(_cli("preprocess", config, tmp, raw=str(root / "raw"), out=dataset), tmp)
    _run(_cli("encode", config, tmp, dataset=dataset, cache=str(root / "cache-reference")), tmp)

    cache = root / "latent-cache"

    def encoding() -> bool:  # shards being written in the hidden staging directory beside the output
        return any(p.is_file() for p in root.glob(".latent-cache.staging-*/**/*"))

    _kill_when(_cli("encode", config, tmp, dataset=dataset, cache=str(cache)), tmp, encoding)
    assert not storage.is_complete(str(cache)) and not cache.exists()
    assert any(root.glob(".latent-cache.staging-*"))  # the killed run's staging, hidden beside the output

    _run(_cli("encode", config, tmp, dataset=dataset, cache=str(cache)), tmp)
    assert _files(cache) == _files(root / "cache-reference")
    assert not any(root.glob(".latent-cache.staging-*"))


def test_privacy_gate_killed_mid_way_then_rerun_gives_the_same_verdict(tmp_path):
    """No verdict and no report from the killed gate (the version stays unapproved); the rerun's
    verdict equals an uninterrupted run's, metric for metric."""
    from helpers import register_tiny_version, write_gate_dataset
    from medisyn.evaluate.gates import GateResult
    from medisyn.models.biomedclip import build_tiny_biomedclip

    cfg, model_uri = register_tiny_version(tmp_path, [
        "privacy.prompts=[Dermoscopy image showing melanoma.]", "privacy.images_per_prompt=3",
        "privacy.patch_size=16", "privacy.batch_size=8", "runtime.device=cpu"])
    build_tiny_biomedclip(cfg.models.tiny, storage.local_path(cfg.models.biomedclip))
    dataset = write_gate_dataset(str(tmp_path / "dataset"), n_train=3, n_eval=2)
    config = tmp_path / "run.yaml"
    config.write_text(cfg.to_yaml())
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    from mlflow import MlflowClient

    name, version = model_uri.removeprefix("models:/").split("/")
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri, registry_uri=cfg.tracking.tracking_uri)

    def gate(out: Path) -> list[str]:
        return _cli("privacy-gate", config, tmp, model=model_uri, dataset=dataset, out=str(out))

    def verdict() -> dict:
        return dict(client.get_model_version(name, version).tags)

    subprocess.run(gate(tmp_path / "reference"), env=_env(tmp), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   timeout=300)  # exit 3 when the verdict is a failure: either way a verdict is recorded
    reference = GateResult.load(str(tmp_path / "reference"))
    assert verdict()["gate.privacy"] == ("passed" if reference.passed else "failed")
    client.delete_model_version_tag(name, version, "gate.privacy")

    out = tmp_path / "privacy"
    _kill_when(gate(out), tmp, lambda: any(tmp.glob("medisyn-privacy-*/*.png")))  # samples being generated
    assert "gate.privacy" not in verdict()  # the killed gate recorded nothing: not approved
    assert not storage.is_complete(str(out)) and not out.exists()

    subprocess.run(gate(out), env=_env(tmp), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    rerun = GateResult.load(str(out))
    assert (rerun.passed, rerun.reasons) == (reference.passed, reference.reasons)
    assert json.dumps(rerun.metrics, sort_keys=True) == json.dumps(reference.metrics, sort_keys=True)
    assert not any(tmp.glob("medisyn-privacy-*"))  # the killed run's generated images were removed


# ----------------------------------------------------------------------------------------------
# After training: score, register, the utility gate, promote. One uninterrupted run (score, then
# register) is the baseline every case compares with; a stage that edits the registry runs on its own
# copy of the MLflow store as it was before the stage, so the baseline and the killed run start alike.
# ----------------------------------------------------------------------------------------------
FAILPOINT = Path(__file__).with_name("failpoint.py")
CANDIDATE = "models:/medisyn-demo-candidates/1"


def _held(target: str, marker: Path, cmd: list[str]) -> list[str]:
    """``cmd`` (a ``_cli`` command) held after ``target`` first returns (tests/faults/failpoint.py)."""
    return [cmd[0], str(FAILPOINT), target, str(marker), "--", *cmd[3:]]


@dataclass(frozen=True)
class Evaluated:
    root: Path
    tmp: Path  # the stages' TMPDIR
    config: Path  # run.yaml: tracking.tracking_uri is null, each run names its store in $MLFLOW_TRACKING_URI
    cfg: RunConfig
    dataset: str
    checkpoints: str
    scored: str  # the MLflow store after the baseline's score (before register)
    registered: str  # ... after the baseline's register (candidate version 1, @candidate)

    def store(self, name: str, copy_of: str) -> str:
        return sqlite_registry(self.root / f"{name}.db", self.cfg.tracking.experiment, self.root / "artifacts",
                               copy_of=copy_of)

    def client(self, uri: str) -> MlflowClient:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=uri, registry_uri=uri)

    def record_passed(self, uri: str, *gates: str) -> None:
        """A passed verdict of each gate on the candidate, recorded as the runner records one (its own
        gate run, pinned params): what the gates before the stage under test left."""
        from medisyn import registry

        cfg = self.cfg.model_copy(update={"tracking": self.cfg.tracking.model_copy(update={"tracking_uri": uri})})
        for gate in gates:
            registry.set_gate_result(cfg, CANDIDATE, gate, True, {"reasons": ["recorded by the test"]})


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> Evaluated:
    from medisyn.models.resnet import build_tiny_resnet

    root = tmp_path_factory.mktemp("kill-rerun-eval")
    cfg, _ = model_env(root / "models", [
        "tracking.tracking_uri=null", "runtime.device=cpu", "utility.n_real_full=8", "utility.n_real_half=4",
        "utility.n_synthetic=4", "utility.epochs=1", "utility.batch_size=8", "utility.bootstrap_resamples=20"])
    assert cfg.models.tiny is not None  # tests/tiny.yaml builds the tiny stand-ins
    if not storage.local_path(cfg.models.resnet50_weights).exists():
        build_tiny_resnet(cfg.models.tiny, storage.local_path(cfg.models.resnet50_weights))
    (root / "run.yaml").write_text(cfg.to_yaml())
    (root / "tmp").mkdir()
    dataset = write_gate_dataset(str(root / "dataset"), n_train=4, n_eval=2)  # 8 train images per task
    write_checkpoints(cfg, str(root / "checkpoints"), epochs=2)
    scored = sqlite_registry(root / "scored.db", cfg.tracking.experiment, root / "artifacts")
    e = Evaluated(root, root / "tmp", root / "run.yaml", cfg, dataset, str(root / "checkpoints"), scored, "")
    _run(_cli("score", e.config, e.tmp, dataset=dataset, checkpoints=e.checkpoints, out=str(root / "scores")),
         e.tmp, env={"MLFLOW_TRACKING_URI": scored})
    registered = e.store("registered", copy_of=scored)
    _run(_cli("register", e.config, e.tmp, scores=str(root / "scores"), dataset=dataset, out=str(root / "registered")),
         e.tmp, env={"MLFLOW_TRACKING_URI": registered})
    return dataclasses.replace(e, registered=registered)


def _env_of(e: Evaluated, store: str) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": store, "MEDISYN_CACHE_DIR": str(e.root / "cache")}


def test_score_killed_between_epochs_then_rerun_gives_the_same_fids(evaluated):
    """Killed once epoch 1's sample is featurised, epoch 2's not: no result, not complete; the rerun
    reuses epoch 1's cached features and ends with the uninterrupted run's FIDs and best checkpoint."""
    from medisyn.evaluate.fid import ScoreResult
    from medisyn.results import ResultError

    e = evaluated
    out = e.root / "scores-killed"
    env = _env_of(e, e.store("score-killed", copy_of=e.scored))
    cmd = _cli("score", e.config, e.tmp, dataset=e.dataset, checkpoints=e.checkpoints, out=str(out))
    _kill_when(cmd, e.tmp, lambda: any(out.glob("epochs/epoch-0001/features-*.npz")), env=env)
    assert not any(out.glob("epochs/epoch-0002/features-*.npz"))  # mid-way: epoch 2 not scored
    assert not (out / "result.json").exists() and not storage.is_complete(str(out))
    with pytest.raises(ResultError, match="did not finish"):
        ScoreResult.load(str(out))  # what register reads

    _run(cmd, e.tmp, env=env)
    rerun, reference = ScoreResult.load(str(out)), ScoreResult.load(str(e.root / "scores"))
    assert storage.is_complete(str(out))
    same = ("best_epoch", "best_checkpoint_uri", "best_fid", "fid_by_epoch", "fid_by_specialty", "fid_ci",
            "fid_by_epoch_specialty", "num_samples", "mode", "dataset_hash")
    assert {k: getattr(rerun, k) for k in same} == {k: getattr(reference, k) for k in same}
    assert sorted(rerun.fid_by_epoch) == [1, 2]
    features = {k: v for k, v in _files(out).items() if k.endswith(".npz")}
    assert features == {k: v for k, v in _files(e.root / "scores").items() if k.endswith(".npz")}


REGISTER_KILLS = [  # (case, failpoint: killed right after it returned)
    ("packaged-not-registered", "mlflow.pyfunc:log_model"),  # artifacts uploaded, no version yet
    ("registered-no-alias-no-card", "mlflow:register_model"),  # the version exists; alias and card not yet
]


@pytest.mark.parametrize("case,failpoint", REGISTER_KILLS, ids=[c[0] for c in REGISTER_KILLS])
def test_register_killed_then_rerun_registers_one_version_with_the_same_tags(evaluated, case, failpoint):
    from medisyn import registry
    from medisyn.registry import RegisteredModel

    e = evaluated
    store = e.store(f"register-{case}", copy_of=e.scored)
    client, name = e.client(store), registry.candidates_model(e.cfg)
    out = e.root / f"registered-{case}"
    cmd = _cli("register", e.config, e.tmp, scores=str(e.root / "scores"), dataset=e.dataset, out=str(out))
    marker = e.tmp / f"failpoint-register-{case}"
    _kill_when(_held(failpoint, marker, cmd), e.tmp, marker.exists, env=_env_of(e, store))
    versions = client.search_model_versions(f"name='{name}'")
    assert not (out / "result.json").exists()
    assert "candidate" not in _aliases(client, name)  # @candidate never names the killed attempt's version
    if failpoint == "mlflow.pyfunc:log_model":
        assert versions == []  # nothing registered
    else:  # past the commit point: the version is whole (every tag came with it)
        (killed,) = versions
        assert dict(killed.tags) == dict(e.client(e.registered).get_model_version(name, "1").tags)

    _run(cmd, e.tmp, env=_env_of(e, store))
    (version,) = client.search_model_versions(f"name='{name}'")  # one version for this run + checkpoint
    reference = e.client(e.registered).get_model_version(name, "1")
    assert dict(version.tags) == dict(reference.tags)  # epoch, FID, digests, lineage: all equal
    card = version.description.replace(version.run_id, "<run>")  # the model card (it names its run)
    assert card == reference.description.replace(reference.run_id, "<run>") and "FID" in card
    assert _aliases(client, name) == {"candidate": "1"}
    assert RegisteredModel.load(str(out)).tags == RegisteredModel.load(str(e.root / "registered")).tags


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        return {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}
    except MlflowException:
        return {}  # no such model


def test_utility_gate_killed_between_tasks_then_rerun_gives_the_same_verdict(evaluated):
    """Killed after the first of its two tasks: no verdict on the version, no report; the rerun's
    verdict, reasons and metrics equal an uninterrupted run's (privacy has passed before it)."""
    from medisyn.evaluate.gates import GateResult
    from medisyn.results import ResultError

    e = evaluated
    before = e.store("privacy-passed", copy_of=e.registered)
    e.record_passed(before, "privacy")
    reference_store, store = e.store("utility-reference", copy_of=before), e.store("utility-killed", copy_of=before)

    def gate(out: Path) -> list[str]:
        return _cli("utility-gate", e.config, e.tmp, model=CANDIDATE, dataset=e.dataset, out=str(out))

    def tags(uri: str) -> dict[str, str]:
        return dict(e.client(uri).get_model_version("medisyn-demo-candidates", "1").tags)

    _run(gate(e.root / "utility-reference"), e.tmp, (0, 3), env=_env_of(e, reference_store))
    reference = GateResult.load(str(e.root / "utility-reference"))
    assert not reference.error and len(reference.reasons) >= 2  # both tasks evaluated: a real verdict

    out, marker = e.root / "utility", e.tmp / "failpoint-utility"
    _kill_when(_held("medisyn.evaluate.utility:_evaluate_task", marker, gate(out)), e.tmp, marker.exists,
               env=_env_of(e, store))
    assert not any(k.startswith("gate.utility") for k in tags(store))  # no verdict: not approved
    assert not out.exists() and not storage.is_complete(str(out))
    with pytest.raises(ResultError):
        GateResult.load(str(out))

    _run(gate(out), e.tmp, (0, 3), env=_env_of(e, store))
    rerun = GateResult.load(str(out))
    assert (rerun.passed, rerun.reasons) == (reference.passed, reference.reasons)
    assert json.dumps(rerun.metrics, sort_keys=True) == json.dumps(reference.metrics, sort_keys=True)
    assert tags(store)["gate.utility"] == tags(reference_store)["gate.utility"]


def test_promote_killed_after_the_copy_then_rerun_approves_once(evaluated):
    """Killed right after the candidate was copied into the approved model, before @approved moved:
    the copy already carries its whole approval record and nothing points consumers at it; the rerun
    approves the same version once, with the uninterrupted run's aliases and tags."""
    from medisyn.registry import PromoteResult

    e = evaluated
    before = e.store("gates-passed", copy_of=e.registered)
    e.record_passed(before, "privacy", "utility")
    reference_store, store = e.store("promote-reference", copy_of=before), e.store("promote-killed", copy_of=before)
    approved = e.cfg.tracking.model_name

    def promote(out: Path) -> list[str]:
        return _cli("promote", e.config, e.tmp, model=CANDIDATE, out=str(out))

    def approvals(uri: str) -> list[dict[str, str]]:
        return [dict(mv.tags) for mv in e.client(uri).search_model_versions(f"name='{approved}'")]

    _run(promote(e.root / "promote-reference"), e.tmp, env=_env_of(e, reference_store))
    reference = PromoteResult.load(str(e.root / "promote-reference"))
    assert reference.approved

    out, marker = e.root / "promote", e.tmp / "failpoint-promote"
    _kill_when(_held("mlflow:MlflowClient.create_model_version", marker, promote(out)), e.tmp, marker.exists,
               env=_env_of(e, store))
    (copied,) = approvals(store)
    assert {"approval.by", "approval.at", "approval.record"} <= set(copied)  # whole, never a bare copy
    assert _aliases(e.client(store), approved) == {}  # consumers of @approved are not pointed at it yet
    assert not (out / "result.json").exists()

    _run(promote(out), e.tmp, env=_env_of(e, store))
    rerun = PromoteResult.load(str(out))
    assert (rerun.approved, rerun.alias, rerun.gates, rerun.approved_uri) == (
        reference.approved, reference.alias, reference.gates, reference.approved_uri)
    assert _aliases(e.client(store), approved) == _aliases(e.client(reference_store), approved) == {"approved": "1"}
    (tags,), (ref_tags,) = approvals(store), approvals(reference_store)  # one approval, one version
    # the time of approval (the record and the promoter's signed statement hold it too)
    when = ("approval.at", "approval.record", "approval.signature")
    assert {k: v for k, v in tags.items() if k not in when} == {k: v for k, v in ref_tags.items() if k not in when}
    record, ref_record = json.loads(tags["approval.record"]), json.loads(ref_tags["approval.record"])
    assert {k: v for k, v in record.items() if k != "at"} == {k: v for k, v in ref_record.items() if k != "at"}
    from medisyn import signing  # both signed by the promoter over the same files, approving the same version

    signed = [signing.verify_envelope(json.loads(t["approval.signature"]), signing.trusted_keys("promoter"),
                                      signing.APPROVAL_PREDICATE) for t in (tags, ref_tags)]
    assert signed[0]["subject"] == signed[1]["subject"]
    assert [{k: v for k, v in s["predicate"].items() if k != "at"} for s in signed] == [
        {k: v for k, v in signed[1]["predicate"].items() if k != "at"}] * 2
    assert "revoked" not in tags
