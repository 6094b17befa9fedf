"""The pipeline compiles to KFP IR, and the IR holds the DAG and the cluster settings we rely on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medisyn.pipeline import definition as mp

REPO = Path(__file__).resolve().parents[1]
COMMITTED_IR = REPO / "pipelines" / "medisyn_pipeline.yaml"  # `make compile-pipeline` writes it

STAGE_EXECUTORS = [
    "exec-plan-run", "exec-build-tiny-models", "exec-demo-data", "exec-check-landing-zone", "exec-preprocess",
    "exec-preprocess-rayjob", "exec-encode", "exec-train", "exec-train-job", "exec-score", "exec-register",
    "exec-privacy-gate", "exec-utility-gate", "exec-promote", "exec-report", "exec-record-outcome",
]
GPU_STEPS = ["exec-encode", "exec-train", "exec-score", "exec-privacy-gate", "exec-utility-gate"]


@pytest.fixture(scope="module")
def ir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ir") / "pipeline.yaml"
    mp.compile_pipeline(out)
    docs = list(yaml.safe_load_all(out.read_text()))
    return docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _all_tasks(spec) -> dict[str, dict]:
    """Every task in the root DAG and in every sub-DAG (conditions), by task name."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        tasks.update((comp.get("dag") or {}).get("tasks") or {})
    return tasks


def _dag_containing(spec, task_name: str) -> tuple[str, dict]:
    for name, comp in [("root", spec["root"]), *spec["components"].items()]:
        if task_name in ((comp.get("dag") or {}).get("tasks") or {}):
            return name, comp
    raise KeyError(task_name)


def _condition_of(spec, task_name: str) -> str:
    """The triggerPolicy condition of the condition task that wraps ``task_name``'s DAG."""
    dag_name, _ = _dag_containing(spec, task_name)
    for t in _all_tasks(spec).values():
        if t.get("componentRef", {}).get("name") == dag_name:
            return t.get("triggerPolicy", {}).get("condition", "")
    return ""


def test_every_stage_is_a_step(ir):
    spec, _ = ir
    assert spec["pipelineInfo"]["name"] == mp.PIPELINE_NAME
    executors = spec["deploymentSpec"]["executors"]
    for name in STAGE_EXECUTORS:
        assert name in executors, name
        assert executors[name]["container"]["image"] == mp.MEDISYN_IMAGE


def test_parameters_and_defaults(ir):
    spec, _ = ir
    params = spec["root"]["inputDefinitions"]["parameters"]
    for name in ("config_json", "raw_uri", "root_uri", "demo", "preprocess_launcher", "train_launcher",
                 "cluster_json", "gpu_node_selector", "gpu_tolerations", "s3_secret", "mlflow_secret"):
        assert name in params, name
    assert params["preprocess_launcher"]["defaultValue"] == "local"
    assert params["train_launcher"]["defaultValue"] == "local"
    assert params["demo"]["defaultValue"] is False


def test_gates_run_in_order_then_promote_reads_the_recorded_verdicts(ir):
    spec, _ = ir
    tasks = _all_tasks(spec)
    # privacy -> utility -> promote, in the run's DAG (the exit handler's): no gate or promote hides
    # behind a condition, so every verdict is recorded (the runner records a utility gate after a failed
    # privacy gate as a failed "skipped" verdict) and promote always re-reads them and fails closed
    for name in ("privacy-gate", "utility-gate", "promote"):
        assert _dag_containing(spec, name)[0] == _dag_containing(spec, "plan-run")[0] == "comp-exit-handler-1", name
    assert "privacy-gate" in tasks["utility-gate"]["dependentTasks"]
    assert "utility-gate" in tasks["promote"]["dependentTasks"]
    assert tasks["promote"]["inputs"]["parameters"]["gate_names"]["runtimeValue"]["constant"] == "privacy,utility"
    # every step after planning reads the run's stored config, not a JSON parameter
    for name, task in tasks.items():
        params = task.get("inputs", {}).get("parameters", {})
        if name != "plan-run" and "config_uri" in params:
            source = params["config_uri"]  # a plan-run output, directly or through a condition's channel
            producer = source.get("taskOutputParameter", {}).get("producerTask") or source.get(
                "componentInputParameter", "")
            assert "plan-run" in producer or "build-tiny-models" in producer, (name, source)
        # only plan-run and the exit handler (which runs even when plan never did) take config_json
        assert name in ("plan-run", "record-outcome") or "config_json" not in params, name


def test_launcher_and_demo_switches_are_conditions(ir):
    spec, _ = ir
    assert "preprocess_launcher" in _condition_of(spec, "preprocess-rayjob")
    assert _condition_of(spec, "preprocess").startswith("!")
    assert "train_launcher" in _condition_of(spec, "train-job")
    assert "!= 'local'" in _condition_of(spec, "train-job").replace('"', "'")
    assert _condition_of(spec, "train").startswith("!")
    assert "demo" in _condition_of(spec, "demo-data") and "demo" in _condition_of(spec, "build-tiny-models")
    assert _condition_of(spec, "check-landing-zone").startswith("!")


def test_gpu_resources_on_gpu_steps_only(ir):
    spec, _ = ir
    executors = spec["deploymentSpec"]["executors"]
    for name in GPU_STEPS:
        accel = executors[name]["container"]["resources"]["accelerator"]
        assert accel["resourceType"] == "nvidia.com/gpu" and int(accel["resourceCount"]) == mp.GPUS_PER_STEP
    for name in ("exec-plan-run", "exec-register", "exec-promote", "exec-train-job", "exec-record-outcome"):
        assert "accelerator" not in executors[name]["container"].get("resources", {}), name


def test_every_step_has_requests_and_limits(ir):
    spec, _ = ir
    for name, ex in spec["deploymentSpec"]["executors"].items():
        res = ex["container"]["resources"]
        for key in ("resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit"):
            assert key in res, (name, key)


def test_each_signing_key_is_mounted_only_into_its_steps(ir):
    """Issue #21, least privilege: the gate key Secret only in the gate steps, the promoter key Secret only in
    promote, the trust ConfigMap (public keys) in every step, each with the env var that points at it."""
    spec, k8s = ir
    for name in STAGE_EXECUTORS:
        cfg = k8s[name]
        volumes = {v["secretNameParameter"]["componentInputParameter"].split("--")[-1]: v["mountPath"]
                   for v in cfg.get("secretAsVolume", [])}
        gate_step = name in ("exec-privacy-gate", "exec-utility-gate")
        expected = ({"gate_key_secret": "/var/run/medisyn/keys/gate"} if gate_step
                    else {"promoter_key_secret": "/var/run/medisyn/keys/promoter"} if name == "exec-promote" else {})
        assert volumes == expected, name
        (trust,) = cfg["configMapAsVolume"]
        assert trust["configMapNameParameter"]["componentInputParameter"].endswith("trust_config_map"), name
        assert trust["mountPath"] == "/etc/medisyn/trust", name
        # mounted where medisyn.signing looks by default; no env var (it would override a local run's keys)
        env = {e["name"] for e in spec["deploymentSpec"]["executors"][name]["container"].get("env", [])}
        assert not env & {"MEDISYN_TRUST_DIR", "MEDISYN_SIGNING_KEYS_DIR"}, name
    from medisyn import signing

    assert (signing.DEFAULT_TRUST_DIR, signing.DEFAULT_KEYS_DIR) == ("/etc/medisyn/trust", "/var/run/medisyn/keys")


def test_kubernetes_settings(ir):
    spec, k8s = ir
    for name in STAGE_EXECUTORS:
        cfg = k8s[name]
        secrets = {s["secretNameParameter"]["componentInputParameter"].split("--")[-1]: s for s in cfg["secretAsEnv"]}
        # each step mounts exactly one MLflow identity: the promoter's in promote, the pipeline's elsewhere;
        # the patient-ID salt only where it preprocesses (issue #10, mlflow/REGISTRY.md)
        identity = "mlflow_promoter_secret" if name == "exec-promote" else "mlflow_pipeline_secret"
        salt = {"id_salt_secret"} if "preprocess" in name else set()
        assert set(secrets) == {"s3_secret", "mlflow_secret", identity} | salt, name
        envs = {k["envVar"] for s in cfg["secretAsEnv"] for k in s["keyToEnv"]}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                "MLFLOW_TRACKING_PASSWORD"} <= envs
        assert cfg["securityContext"]["runAsNonRoot"] is True
        assert cfg["podMetadata"]["labels"]["app.kubernetes.io/part-of"] == "medisyn"
    for name in GPU_STEPS:
        cfg = k8s[name]
        assert cfg["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"].endswith("gpu_node_selector")
        assert cfg["tolerations"][0]["tolerationJson"]["componentInputParameter"].endswith("gpu_tolerations")
        mounts = {m["mountPath"]: m for m in cfg["emptyDirMounts"]}
        assert "/tmp" in mounts and mounts["/dev/shm"]["medium"] == "Memory"
    assert "nodeSelector" not in k8s["exec-plan-run"]


# ----------------------------------------------------------------------------------------------
# Exit handler, retries and caching (issue #13; the table in docs/deploy.md)
# ----------------------------------------------------------------------------------------------
# step -> (cached, retried), as docs/deploy.md "Caching and retries" documents it
STEP_POLICY = {
    "plan-run": (False, True), "build-tiny-models": (True, False), "demo-data": (True, False),
    "check-landing-zone": (False, True), "preprocess": (False, False), "preprocess-rayjob": (False, True),
    "encode": (False, False), "train": (False, False), "train-job": (False, True), "score": (False, False),
    "register": (False, True), "privacy-gate": (False, False), "utility-gate": (False, False),
    "promote": (False, True), "report": (False, True), "record-outcome": (False, True),
}


def _step_tasks(spec) -> dict[str, dict]:
    """Every task that runs a component (not a condition or exit-handler sub-DAG), by component name."""
    out = {}
    for task in _all_tasks(spec).values():
        ref = task["componentRef"]["name"]
        if "dag" not in spec["components"][ref]:
            out[ref.removeprefix("comp-")] = task
    return out


def test_every_step_has_a_documented_caching_and_retry_policy(ir):
    spec, _ = ir
    tasks = _step_tasks(spec)
    assert set(tasks) == set(STEP_POLICY)
    for name, (cached, retried) in STEP_POLICY.items():
        task = tasks[name]
        assert task.get("cachingOptions", {}).get("enableCache", False) is cached, name
        if retried:
            assert task["retryPolicy"] == {"maxRetryCount": 3, "backoffDuration": "30s", "backoffFactor": 2.0,
                                           "backoffMaxDuration": "600s"}, name
        else:
            assert "retryPolicy" not in task, name
    # never cached: registry writes, gates, promotion, the exit handler
    for name in ("register", "privacy-gate", "utility-gate", "promote", "record-outcome"):
        assert not STEP_POLICY[name][0]
    assert mp.CACHED_STEPS == {n for n, (c, _) in STEP_POLICY.items() if c}
    assert mp.RETRIED_STEPS == {n for n, (_, r) in STEP_POLICY.items() if r}
    doc = (REPO / "docs" / "deploy.md").read_text()
    for name, (cached, retried) in STEP_POLICY.items():
        row = f"| `{name}` | {'yes' if cached else 'no'} | {'yes' if retried else 'no'} |"
        assert row in doc, f"docs/deploy.md lacks the row {row!r}"


def test_every_step_runs_inside_the_exit_handler_which_records_the_outcome(ir):
    spec, _ = ir
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"exit-handler-1", "record-outcome"}
    exit_task = root["record-outcome"]
    assert exit_task["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"  # runs on failure too
    assert exit_task["dependentTasks"] == ["exit-handler-1"]
    params = exit_task["inputs"]["parameters"]
    assert params["status"] == {"taskFinalStatus": {"producerTask": "exit-handler-1"}}
    assert params["job_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    for name in ("config_json", "root_uri", "run_tag"):
        assert params[name] == {"componentInputParameter": name}  # the same run folder plan_run lays out
    # every other step is inside the handler's DAG (or a condition within it)
    handler = spec["components"][root["exit-handler-1"]["componentRef"]["name"]]["dag"]["tasks"]
    assert {"plan-run", "encode", "score", "register", "privacy-gate", "utility-gate", "promote"} <= set(handler)
    assert "pipeline_version" in spec["root"]["inputDefinitions"]["parameters"]


def test_the_committed_ir_is_current(ir, tmp_path):
    """pipelines/medisyn_pipeline.yaml is what `make compile-pipeline` writes from this code."""
    committed = COMMITTED_IR
    assert committed.exists(), "run `make compile-pipeline` and commit pipelines/medisyn_pipeline.yaml"
    fresh = mp.compile_pipeline(tmp_path / "fresh.yaml")
    assert list(yaml.safe_load_all(committed.read_text())) == list(yaml.safe_load_all(fresh.read_text())), (
        "pipelines/medisyn_pipeline.yaml is stale: run `make compile-pipeline` and commit it")


def test_compile_overrides_image_and_gpus(tmp_path):
    out = mp.compile_pipeline(tmp_path / "p.yaml", image="registry.example/medisyn@sha256:" + "a" * 64, gpus_per_step=4)
    spec = next(yaml.safe_load_all(out.read_text()))
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {"registry.example/medisyn@sha256:" + "a" * 64}
    assert executors["exec-train"]["container"]["resources"]["accelerator"]["resourceCount"] == "4"
    assert spec["root"]["inputDefinitions"]["parameters"]["job_image"]["defaultValue"].startswith("registry.example")
    cpu = mp.compile_pipeline(tmp_path / "cpu.yaml", gpus_per_step=0)
    spec = next(yaml.safe_load_all(cpu.read_text()))
    assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]


def test_module_compiles_itself_as_main(tmp_path):
    out = tmp_path / "main.yaml"
    proc = subprocess.run([sys.executable, "-m", "medisyn.pipeline.definition", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert next(yaml.safe_load_all(out.read_text()))["pipelineInfo"]["name"] == mp.PIPELINE_NAME


# ----------------------------------------------------------------------------------------------
# medisyn.pipeline.schedule: what `medisyn pipeline schedule` (the chart's registration Job) does, against a
# fake KFP client (over HTTP with the real kfp.Client: test_pipeline_cli.py)
# ----------------------------------------------------------------------------------------------
class _Obj:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class FakeKfpClient:
    def __init__(self, pipeline_id=None, existing_runs=()):
        self.pipeline_id, self.calls = pipeline_id, []
        self.runs = [_Obj(display_name=n, recurring_run_id=i) for n, i in existing_runs]

    def get_pipeline_id(self, name):
        return self.pipeline_id

    def upload_pipeline(self, path, pipeline_name=None, namespace=None):
        self.calls.append(("upload_pipeline", pipeline_name))
        return _Obj(pipeline_id="p-1")

    def upload_pipeline_version(self, path, version_name, pipeline_id=None):
        assert Path(path).exists()
        self.calls.append(("upload_pipeline_version", version_name, pipeline_id))
        return _Obj(pipeline_version_id="v-1")

    def get_experiment(self, experiment_name=None, namespace=None):
        raise ValueError("no such experiment")

    def create_experiment(self, name, namespace=None):
        self.calls.append(("create_experiment", name, namespace))
        return _Obj(experiment_id="e-1")

    def list_recurring_runs(self, page_token="", page_size=10, experiment_id=None, namespace=None):
        return _Obj(recurring_runs=self.runs, next_page_token="")

    def delete_recurring_run(self, rid):
        self.calls.append(("delete_recurring_run", rid))

    def create_recurring_run(self, experiment_id, job_name, **kw):
        self.calls.append(("create_recurring_run", experiment_id, job_name, kw))
        return _Obj(recurring_run_id="r-2")


def test_schedule_uploads_a_version_and_replaces_the_recurring_run(tmp_path):
    from medisyn.pipeline.schedule import build_params, register_and_schedule

    package = mp.compile_pipeline(tmp_path / "p.yaml")
    cfg = tmp_path / "config.json"
    cfg.write_text('{"name": "prod", "train": {"epochs": 2}}')
    params = build_params(cfg, '{"raw_uri": "s3://b/landing", "cluster_json": {"num_nodes": 2}}')
    assert json.loads(params["config_json"])["train"]["epochs"] == 2
    assert json.loads(params["cluster_json"]) == {"num_nodes": 2}
    client = FakeKfpClient(pipeline_id="p-0", existing_runs=[("medisyn-retrain", "r-1"), ("other", "r-9")])
    out = register_and_schedule(client, package, pipeline_name="medisyn-retrain", experiment="medisyn",
                                params=params, cron="0 0 2 * * 0", service_account="medisyn")
    assert out == {"pipeline_id": "p-0", "version_id": "v-1", "experiment_id": "e-1", "recurring_run_id": "r-2"}
    names = [c[0] for c in client.calls]
    assert "upload_pipeline" not in names  # the pipeline existed: only a new version
    assert ("delete_recurring_run", "r-1") in client.calls and ("delete_recurring_run", "r-9") not in client.calls
    _, exp, name, kw = client.calls[-1]
    assert (exp, name) == ("e-1", "medisyn-retrain")
    assert kw["cron_expression"] == "0 0 2 * * 0" and kw["no_catchup"] is True
    assert kw["enable_caching"] is None  # the steps' own caching options hold (CACHED_STEPS)
    assert kw["version_id"] == "v-1" and kw["params"]["raw_uri"] == "s3://b/landing"
    assert kw["service_account"] == "medisyn"
    # every parameter the Job passes is a pipeline parameter
    assert set(kw["params"]) <= set(mp.medisyn_pipeline.component_spec.inputs)


def test_schedule_refuses_a_bad_config_or_cluster_setting(tmp_path):
    from medisyn.config import ConfigError
    from medisyn.pipeline.schedule import build_params

    cfg = tmp_path / "config.yaml"
    cfg.write_text("train:\n  epocs: 2\n")
    with pytest.raises(ConfigError, match="epocs"):
        build_params(cfg, "{}")
    cfg.write_text("name: x\n")
    with pytest.raises(ValueError, match="gpus_per_nod"):
        build_params(cfg, '{"cluster_json": {"gpus_per_nod": 8}}')
    cfg.write_text("")
    with pytest.raises(ConfigError, match="is empty"):  # never silently the paper's full-scale run
        build_params(cfg, "{}")


def test_schedule_reads_its_config_from_object_storage(s3_endpoint):
    """`medisyn pipeline run/schedule --config` takes any URI a stage takes (issue #25)."""
    from helpers import S3_BUCKET
    from medisyn import storage
    from medisyn.pipeline.schedule import build_params

    uri = f"s3://{S3_BUCKET}/configs/prod.yaml"
    storage.write_text(uri, "name: prod\ntrain:\n  epochs: 3\n")
    assert json.loads(build_params(uri, "{}")["config_json"])["train"]["epochs"] == 3
