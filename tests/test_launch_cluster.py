"""Every launcher, driven through the real ``kubernetes`` client over HTTP against a loopback server that
speaks the Kubernetes API (tests/kube_api_server.py) and validates what it is sent against the operators'
own CRDs: success, failure with its reason, timeout, a cancelled step and a rerun, for TrainJob,
PyTorchJob and RayJob; API discovery choosing between Trainer v2 and the v1 operator (issue #13).

The operator is played by a script per test (:class:`kube_api_server.Operator`); the launcher under
test is the production code path, ``medisyn.launch.run_job`` and the stage runner above it. No
assertion is about time: short deadlines only make the timeout cases end soon.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kube_api_server import RESOURCES as SERVED
from kube_api_server import V1_KINDS, KubeAPIServer, Operator, run_operator
from medisyn import launch
from medisyn.config import RunConfig, load_config
from medisyn.launch.lifecycle import SPEC_HASH_ANNOTATION, spec_hash
from medisyn.launch.operators import RESOURCES, job_state
from medisyn.launch.settings import DEADLINE_GRACE_S, DEFAULT_DEADLINE_S, DEFAULT_TIMEOUT_S

REPO = Path(__file__).resolve().parents[1]
CONFIG_URI = "s3://b/run-7/config.yaml"
RUN_TAG = "run-2026-12-01-abcdef"
KINDS = ["TrainJob", "PyTorchJob", "RayJob"]


@pytest.fixture(autouse=True)
def _storage_settings_restored():
    """The stage runner configures storage for its process (the cluster's MinIO endpoint, here) and
    exports it to the environment for workers: put the session's settings back after each test."""
    from medisyn import storage

    saved_env = {k: os.environ.get(k) for k in (storage.ENDPOINT_ENV, storage.RETRY_ENV)}
    saved = (storage._S3_ENDPOINT, storage._POLICY)
    yield
    storage._S3_ENDPOINT, storage._POLICY = saved
    for k, v in saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def cfg() -> RunConfig:
    return load_config(REPO / "configs" / "demo.yaml", ["storage.s3_endpoint_url=http://minio:9000"])


@pytest.fixture
def api() -> Iterator[KubeAPIServer]:
    with KubeAPIServer() as server:
        yield server


def _settings(**kw: Any) -> launch.ClusterSettings:
    return launch.ClusterSettings(**{"namespace": "ml", "image": "registry.example/medisyn:1.2.3",
                                     "num_nodes": 2, "gpus_per_node": 8, **kw})


def _manifest(cfg: RunConfig, kind: str, tmp_path: Path, **kw: Any) -> dict[str, Any]:
    s = _settings(**kw)
    out = (tmp_path / "out").as_uri()
    if kind == "RayJob":
        return launch.render_rayjob(cfg, CONFIG_URI, "s3://b/raw", out, s, name=launch.job_name(cfg.name, "prep"))
    launcher = {"TrainJob": "trainjob", "PyTorchJob": "pytorchjob"}[kind]
    return launch.render_training_job(launcher, cfg, CONFIG_URI, "s3://b/cache", out, s, RUN_TAG)


def _run(api: KubeAPIServer, manifest: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return launch.run_job(manifest, api_client=api.api_client(), watch_s=1, **kw)


def _gone(api: KubeAPIServer, kind: str) -> None:
    """The job and every pod it owned are deleted."""
    assert api.jobs(kind) == []
    assert api.pods() == []
    plural = RESOURCES[kind][2]
    assert any(m == "DELETE" and f"/{plural}/" in p and code == 200 for m, p, code in api.requests)


# ----------------------------------------------------------------------------------------------
# Success: status changes and the lead pod's log in the step's log; the job deleted afterwards
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_success_streams_status_and_lead_pod_log_then_deletes_the_job(api, cfg, kind, tmp_path, caplog):
    def operator(op: Operator) -> None:
        op.start()
        op.wait_for_launcher()
        op.log("step 1/4 loss 0.31", "step 4/4 loss 0.12")
        op.succeed()

    errors = run_operator(api, operator)
    job = _manifest(cfg, kind, tmp_path)
    with caplog.at_level(logging.INFO, logger="medisyn.launch"):
        done = _run(api, job)
    assert errors == []
    assert job_state(kind, done)[0] == "succeeded"
    lines = [r.getMessage() for r in caplog.records if r.name == "medisyn.launch"]
    name = job["metadata"]["name"]
    assert any(f"{kind} ml/{name}: running" in ln for ln in lines), lines
    assert any(f"{kind} ml/{name}: succeeded" in ln for ln in lines), lines
    assert [ln.split("] ", 1)[1] for ln in lines if ln.startswith("[")] == ["step 1/4 loss 0.31", "step 4/4 loss 0.12"]
    assert lines[-1] == f"deleted {kind} ml/{name}"
    _gone(api, kind)
    # what the server stored carried the spec hash the launcher adopts by
    assert api.events[0][3]["metadata"]["annotations"][SPEC_HASH_ANNOTATION] == spec_hash(job)


# ----------------------------------------------------------------------------------------------
# Failure: the reason, from the job's condition, the pods' container states and the last log lines
# ----------------------------------------------------------------------------------------------
def _oom(op: Operator) -> None:
    op.start()
    op.log("loading U-Net", "step 1")
    op.fail("FailedJobs" if op.kind == "TrainJob" else "", "node 0 exited", exit_code=137, pod_reason="OOMKilled")


def _nccl(op: Operator) -> None:
    op.start()
    op.log("step 812", "[rank3]:[E ProcessGroupNCCL.cpp:616] Watchdog caught collective operation timeout: "
           "WorkNCCL(SeqNum=5012, OpType=ALLREDUCE) ran for 1800021 milliseconds before timing out.")
    op.fail("", "", exit_code=1)


def _driver(op: Operator) -> None:
    op.start()
    op.log("ValueError: no images under s3://b/raw")
    op.fail("AppFailed", "driver exit 1", exit_code=1)


FAILURES = [
    # (kind, operator script, substrings the error and the MLflow tag carry)
    ("TrainJob", _oom, ["OOMKilled (exit 137)", "Failed: FailedJobs node 0 exited"]),
    ("PyTorchJob", _oom, ["OOMKilled (exit 137)", "Failed: PyTorchJobFailed"]),
    ("PyTorchJob", _nccl, ["NCCL timeout:", "Watchdog caught collective operation timeout"]),
    ("TrainJob", _nccl, ["NCCL timeout:", "Error (exit 1)"]),
    ("RayJob", _driver, ["AppFailed: driver exit 1", "ray-job-submitter: Error (exit 1)"]),
]


@pytest.mark.parametrize("kind,script,expected", FAILURES, ids=[f"{k}-{s.__name__[1:]}" for k, s, _ in FAILURES])
def test_failure_names_the_reason_and_deletes_the_job(api, cfg, kind, script, expected, tmp_path):
    run_operator(api, script)
    with pytest.raises(launch.JobFailed) as err:
        _run(api, _manifest(cfg, kind, tmp_path))
    for text in expected:
        assert text in str(err.value) and text in err.value.reason, (text, str(err.value))
    _gone(api, kind)


def test_a_pod_that_cannot_pull_its_image_fails_the_step(api, cfg, tmp_path):
    def operator(op: Operator) -> None:
        op.start()
        op.end_pod(op.lead, waiting="ImagePullBackOff")

    run_operator(api, operator)
    with pytest.raises(launch.JobFailed, match="ImagePullBackOff"):
        _run(api, _manifest(cfg, "TrainJob", tmp_path), image_pull_grace_s=0)
    _gone(api, "TrainJob")


# ----------------------------------------------------------------------------------------------
# Timeout and cancellation: the job is deleted
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_timeout_deletes_the_job(api, cfg, kind, tmp_path):
    run_operator(api, lambda op: op.start())  # runs forever
    with pytest.raises(TimeoutError, match="did not finish"):
        _run(api, _manifest(cfg, kind, tmp_path), timeout_s=2)
    _gone(api, kind)


def test_the_deadline_comes_from_the_settings_by_default(cfg, tmp_path):
    for kind in KINDS:
        spec = _manifest(cfg, kind, tmp_path)["spec"]
        deadline = spec.get("activeDeadlineSeconds") or spec.get("runPolicy", {}).get("activeDeadlineSeconds")
        assert deadline == DEFAULT_DEADLINE_S, kind
    assert _settings().watch_timeout_s(None) == DEFAULT_DEADLINE_S + DEADLINE_GRACE_S
    assert _settings().watch_timeout_s(60) == 60
    assert _settings(active_deadline_s=None).watch_timeout_s(None) == DEFAULT_TIMEOUT_S


@pytest.mark.parametrize("kind", KINDS)
def test_sigterm_deletes_the_job_then_raises_cancelled(api, cfg, kind, tmp_path):
    assert threading.current_thread() is threading.main_thread()

    def operator(op: Operator) -> None:
        op.start()
        op.wait_for_launcher()
        os.kill(os.getpid(), signal.SIGTERM)  # what the kubelet sends a cancelled step's pod

    before = signal.getsignal(signal.SIGTERM)
    run_operator(api, operator)
    with pytest.raises(launch.JobCancelled):
        _run(api, _manifest(cfg, kind, tmp_path), timeout_s=600)
    _gone(api, kind)
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is restored


# ----------------------------------------------------------------------------------------------
# A rerun while the job exists: adopt it (same spec) or replace it (changed, or failed); never two
# ----------------------------------------------------------------------------------------------
def _existing(api: KubeAPIServer, manifest: dict[str, Any], hash_of: dict[str, Any] | None = None) -> dict[str, Any]:
    body = json.loads(json.dumps(manifest))
    body["metadata"]["annotations"] = {SPEC_HASH_ANNOTATION: spec_hash(hash_of or manifest)}
    code, obj = api.create(SERVED[manifest["kind"]], "ml", body)
    assert code == 201
    return obj


@pytest.mark.parametrize("kind", KINDS)
def test_a_rerun_adopts_the_running_job_with_the_same_spec(api, cfg, kind, tmp_path):
    job = _manifest(cfg, kind, tmp_path)

    def operator(op: Operator) -> None:
        op.start()
        op.wait_for_launcher()  # the rerun found it and is watching
        op.succeed()

    run_operator(api, operator)
    first = _existing(api, job)  # left by a step whose pod was evicted
    done = _run(api, job)
    assert done["metadata"]["uid"] == first["metadata"]["uid"]
    plural = RESOURCES[kind][2]
    assert api.created(plural) == [job["metadata"]["name"]]  # one job, ever
    assert any(m == "POST" and code == 409 for m, _, code in api.requests)  # the rerun met AlreadyExists
    _gone(api, kind)


@pytest.mark.parametrize("change", ["spec", "failed"])
def test_a_rerun_replaces_a_changed_or_failed_job(api, cfg, change, tmp_path):
    kind = "TrainJob"
    job = _manifest(cfg, kind, tmp_path)
    old = _manifest(cfg, kind, tmp_path, num_nodes=4) if change == "spec" else job
    live: list[int] = []

    def operator(op: Operator) -> None:
        if op.job["metadata"]["uid"] == first["metadata"]["uid"]:
            return  # the stale job: its operator is gone
        live.append(len(api.jobs(kind)))
        op.start()
        op.succeed()

    first = _existing(api, job, hash_of=old)
    if change == "failed":
        Operator(api, first).start()
        Operator(api, first).set_status("failed", "FailedJobs", "earlier attempt")
    run_operator(api, operator)
    done = _run(api, job)
    assert done["metadata"]["uid"] != first["metadata"]["uid"]
    assert live == [1]  # the old one was gone before the new one was created
    assert api.created("trainjobs") == [job["metadata"]["name"]] * 2
    _gone(api, kind)


# ----------------------------------------------------------------------------------------------
# The server's own answers reach the client as the real API's errors
# ----------------------------------------------------------------------------------------------
def test_the_server_answers_404_409_and_422_like_the_api(api, cfg, tmp_path):
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    custom = client.CustomObjectsApi(api.api_client())
    job = _manifest(cfg, "TrainJob", tmp_path)
    group, version, plural = RESOURCES["TrainJob"]
    with pytest.raises(ApiException) as err:
        custom.delete_namespaced_custom_object(group, version, "ml", plural, "absent")
    assert err.value.status == 404 and json.loads(err.value.body)["reason"] == "NotFound"
    custom.create_namespaced_custom_object(group, version, "ml", plural, job)
    with pytest.raises(ApiException) as err:
        custom.create_namespaced_custom_object(group, version, "ml", plural, job)
    assert err.value.status == 409 and json.loads(err.value.body)["reason"] == "AlreadyExists"
    bad = json.loads(json.dumps(job))
    bad["metadata"]["name"] = "other"
    bad["spec"]["trainer"]["numNodes"] = "four"
    with pytest.raises(ApiException) as err:
        custom.create_namespaced_custom_object(group, version, "ml", plural, bad)
    assert err.value.status == 422 and "spec.trainer.numNodes" in json.loads(err.value.body)["message"]


def test_an_invalid_job_never_reaches_the_server(api, cfg, tmp_path):
    job = _manifest(cfg, "PyTorchJob", tmp_path)
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "two"
    with pytest.raises(ValueError, match=r"Worker\.replicas"):
        _run(api, job)
    assert not any(m == "POST" for m, _, _ in api.requests)


# ----------------------------------------------------------------------------------------------
# Discovery: TrainJob where Trainer v2 is served, else PyTorchJob
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kinds,expected", [(("TrainJob", "TrainingRuntime", "PyTorchJob", "RayJob"), "trainjob"),
                                            (V1_KINDS, "pytorchjob"), (("RayJob",), None)])
def test_the_train_launcher_follows_api_discovery(kinds, expected):
    with KubeAPIServer(kinds=kinds) as server:
        if expected is None:
            with pytest.raises(RuntimeError, match="Kubeflow Trainer v2"):
                launch.discover_train_launcher("auto", server.api_client())
        else:
            assert launch.discover_train_launcher("auto", server.api_client()) == expected
        assert launch.discover_train_launcher("pytorchjob", server.api_client()) == "pytorchjob"
    with pytest.raises(ValueError, match="train launcher"):
        launch.discover_train_launcher("mpijob")


# ----------------------------------------------------------------------------------------------
# Through the stage runner, as the KFP component and `medisyn train-job` run it: $KUBECONFIG, the
# stored result read back, the failure reason on the launcher's MLflow run
# ----------------------------------------------------------------------------------------------
def _train_result(checkpoints_uri: str):
    from medisyn.train.trainer import TrainResult

    return TrainResult(checkpoints=[f"{checkpoints_uri}/epoch-0001"], epochs=1, global_step=4, final_loss=0.25,
                       world_size=16, per_device_batch_size=8, gradient_accumulation_steps=1,
                       effective_batch_size=128, steps_per_epoch=4, resumed_from=None, mixed_precision="bf16",
                       flops_per_sample=1.0e12, images_per_s=100.0, mfu=0.2, dataset_hash="cd" * 32, cache_key="k")


@pytest.mark.parametrize("kinds,expected_kind", [(None, "TrainJob"), (V1_KINDS, "PyTorchJob")])
def test_train_job_stage_picks_the_kind_runs_it_and_reads_the_result(cfg, tmp_path, monkeypatch, kinds,
                                                                    expected_kind):
    from medisyn import stages

    checkpoints = (tmp_path / "ckpt").as_uri()
    expected = _train_result(checkpoints)
    with KubeAPIServer(**({"kinds": kinds} if kinds else {})) as server:
        monkeypatch.setenv("KUBECONFIG", str(server.write_kubeconfig(tmp_path / "kubeconfig")))
        seen: list[dict[str, Any]] = []

        def operator(op: Operator) -> None:
            seen.append(op.job)
            op.start()
            expected.save(checkpoints)  # the job's own stage runner, on node rank 0
            op.succeed()

        run_operator(server, operator)
        got = stages.run("train-job", cfg.model_copy(update={"tracking": cfg.tracking.model_copy(
                             update={"tracking_uri": None})}),
                         job_config=CONFIG_URI, cache="s3://b/cache", checkpoints=checkpoints,
                         cluster_json=json.dumps({"namespace": "ml", "num_nodes": 4, "gpus_per_node": 8}),
                         image="reg/img:1", run_tag=RUN_TAG, timeout_s=600)
        assert got == expected
        (job,) = seen
        assert job["kind"] == expected_kind
        assert job["metadata"]["name"] == launch.job_name(cfg.name, "train-" + RUN_TAG[-20:])
        assert server.jobs(expected_kind) == []


def test_the_failure_reason_lands_on_the_launchers_mlflow_run(api, cfg, tmp_path, monkeypatch):
    import mlflow

    from medisyn import stages, tracking

    monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig(tmp_path / "kubeconfig")))
    monkeypatch.delenv(tracking.PARENT_RUN_ENV, raising=False)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"tracking_uri": store})})
    run_operator(api, _oom)
    try:
        with pytest.raises(launch.JobFailed, match="OOMKilled"):
            stages.run("train-job", run_cfg, job_config=CONFIG_URI, cache="s3://b/cache",
                       checkpoints=(tmp_path / "ckpt").as_uri(), cluster_json='{"namespace": "ml"}',
                       run_tag=RUN_TAG, launcher="trainjob")
        (run,) = mlflow.MlflowClient(store).search_runs(
            [mlflow.MlflowClient(store).get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    finally:
        mlflow.set_tracking_uri(None)
        tracking._CONFIGURED = None
    assert run.data.tags["medisyn.stage"] == "train-job" and run.info.status == "FAILED"
    assert "OOMKilled (exit 137)" in run.data.tags["medisyn.job.failure_reason"]
    assert run.data.tags["medisyn.job"] == "TrainJob/" + launch.job_name(cfg.name, "train-" + RUN_TAG[-20:])
    _gone(api, "TrainJob")

