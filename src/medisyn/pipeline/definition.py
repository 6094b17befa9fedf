"""The MediSyn retraining pipeline (KFP v2): raw images -> approved model, gates included.

    plan_run (stores the resolved config at <run>/config.yaml; every later step reads it)
      ─┬─ [demo]       build_tiny_models -> demo_data ─┐
       └─ [otherwise]  check_landing_zone ─────────────┴─ raw (OneOf)
    raw -> [preprocess_launcher == "rayjob"] preprocess_rayjob | [else] preprocess      -> dataset (OneOf)
        -> encode
        -> [train_launcher != "local"] train_job (TrainJob | PyTorchJob) | [else] train -> checkpoints (OneOf)
        -> score -> register (alias "candidate")
        -> privacy_gate -> utility_gate -> promote ("approved" iff both recorded as passed)
        -> report (the version's evaluation report, docs/report.md)

Every step is a few lines over ``medisyn.stages.run``, the runner the CLI uses, and steps hand each
other storage URIs only (results are read back from each output's ``result.json``). The runner
records each gate's verdict on the model version; the utility gate, run after a failed privacy gate,
records itself as a failed "skipped" verdict without evaluating; promote re-reads the recorded
verdicts and fails closed. So a failed (or errored) gate leaves the version at ``candidate`` with
its reason, and running the same steps with the ``medisyn`` CLI ends in the same registry state.

All of it runs inside a ``dsl.ExitHandler`` whose ``record_outcome`` step records the run's status, the
failed step and the reason on the parent MLflow run and, when one was registered, on the model version
(``medisyn.outcome``), whether the run succeeded, failed or was cancelled.

Retries (:data:`RETRIED_STEPS`, exponential backoff) go on the steps that talk to services and are
safe to repeat: planning, the landing-zone check, the job launchers (a retried launcher adopts its
job, ``medisyn.launch``), registry writes and the exit handler. Caching (:data:`CACHED_STEPS`) is on
only for steps whose output is a pure function of their inputs; docs/deploy.md has the table and the
reasons. Cluster settings (GPU limits, node selectors and tolerations, Secrets as env, scratch
emptyDirs) are kfp-kubernetes/IR settings: they compile into the YAML and ``kfp.local`` ignores them.

Compile: ``python -m medisyn.pipeline.definition --out pipelines/medisyn_pipeline.yaml [--image IMG]``
(``medisyn pipeline compile`` does the same). The IR is committed at ``pipelines/medisyn_pipeline.yaml`` of
the repository; ``make compile-pipeline`` rewrites it and tests/test_pipeline_compile.py fails when it is stale.
"""

# No `from __future__ import annotations`: KFP reads the real parameter annotations.

import argparse
import os
from pathlib import Path
from typing import Any

from kfp import compiler, dsl, kubernetes

from medisyn.pipeline import components as c
from medisyn.pipeline.components.image import MEDISYN_IMAGE
from medisyn.stages import GATE_ORDER

PIPELINE_NAME = "medisyn-retrain"
GPU_RESOURCE = "nvidia.com/gpu"
GATES = GATE_ORDER
# GPUs per GPU step (encode, train "local", score, gates). A compile-time value, not a pipeline
# parameter: KFP 2.17 does not pass a parameter used only as an accelerator limit into dsl.If
# sub-DAGs (the compiled run would fail to resolve it). `--gpus N` recompiles with another count.
GPUS_PER_STEP = int(os.environ.get("MEDISYN_GPUS_PER_STEP", "1"))
SCRATCH_SIZE = "200Gi"  # emptyDir on /tmp for heavy steps (decoded images, model copies)
DEFAULT_JOB_TIMEOUT_S = 7 * 24 * 3600

#: Steps KFP may serve from its cache: pure functions of their inputs (the models come from the config and
#: a seed, the phantom zone from a seed). Everything else is off: the landing zone is a mutable prefix
#: (new data lands under the same URI), training is not bitwise reproducible on GPUs, and registry
#: writes, gates, promotion and the exit handler must happen on every run. (docs/deploy.md, "Caching")
CACHED_STEPS = frozenset({"build-tiny-models", "demo-data"})
#: Steps retried with exponential backoff: they talk to services (MLflow, S3, the Kubernetes API) and a
#: repeat is safe (planning reuses the run's folder, launchers adopt their job, registry writes are
#: idempotent per version). Data and GPU steps are not: a crash there is not a blip to retry.
RETRIED_STEPS = frozenset({"plan-run", "check-landing-zone", "preprocess-rayjob", "train-job", "register", "promote",
                           "report", "record-outcome"})
RETRY_POLICY: dict[str, Any] = dict(num_retries=3, backoff_duration="30s", backoff_factor=2.0,
                                    backoff_max_duration="600s")


#: Steps that act as the promoting MLflow identity (mlflow/REGISTRY.md); every other step acts as the pipeline.
PROMOTER_STEPS = frozenset({"promote"})
#: Steps that sign gate verdicts: the only pods that mount the gate key (issue #21). The promoter key is
#: mounted into PROMOTER_STEPS only; the trust policy (public keys) into every step.
GATE_STEPS = frozenset({"privacy-gate", "utility-gate"})
KEYS_MOUNT = "/var/run/medisyn/keys"  # = medisyn.signing.DEFAULT_KEYS_DIR: <role>/key.pem, one Secret per role
TRUST_MOUNT = "/etc/medisyn/trust"  # = medisyn.signing.DEFAULT_TRUST_DIR: <role>*.pub, the trust ConfigMap


def _base(task: dsl.PipelineTask, s3_secret, mlflow_secret, mlflow_pipeline_secret=None, mlflow_promoter_secret=None,
          id_salt_secret=None, gate_key_secret=None, promoter_key_secret=None,
          trust_config_map=None) -> dsl.PipelineTask:
    """Settings every step gets: Secrets as env, pod labels, non-root; caching and retries per step
    (:data:`CACHED_STEPS`, :data:`RETRIED_STEPS`). Each step mounts only its own MLflow identity's
    Secret (the promoter's in :data:`PROMOTER_STEPS`, the pipeline's elsewhere), and the steps that
    preprocess get the patient-ID salt (issue #10). Signing (issue #21): the gate key only in
    :data:`GATE_STEPS`, the promoter key only in :data:`PROMOTER_STEPS`, the trust policy everywhere."""
    step = task.component_spec.name
    task.set_caching_options(step in CACHED_STEPS)
    if step in RETRIED_STEPS:
        task.set_retry(**RETRY_POLICY)
    kubernetes.use_secret_as_env(task, s3_secret, {
        "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
        "MEDISYN_S3_ENDPOINT_URL": "MEDISYN_S3_ENDPOINT_URL",
    }, optional=True)
    kubernetes.use_secret_as_env(task, mlflow_secret, {
        "MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
    }, optional=True)
    identity = mlflow_promoter_secret if step in PROMOTER_STEPS else mlflow_pipeline_secret
    if identity is not None:
        kubernetes.use_secret_as_env(task, identity, {"username": "MLFLOW_TRACKING_USERNAME",
                                                      "password": "MLFLOW_TRACKING_PASSWORD"}, optional=True)
    if id_salt_secret is not None and step.startswith("preprocess"):
        kubernetes.use_secret_as_env(task, id_salt_secret, {"MEDISYN_ID_SALT": "MEDISYN_ID_SALT"})
    # Mounted at medisyn.signing's default paths, with no env var: a task env var would also override the
    # locally provisioned keys of a kfp.local run (the demo).
    if trust_config_map is not None:  # optional: without it nothing verifies, and promote says so (fail closed)
        kubernetes.use_config_map_as_volume(task, trust_config_map, TRUST_MOUNT, optional=True)
    # Both keys are required where they are mounted: a gate pod without its key would run for hours and
    # sign nothing, and promote signs every approval (issue #21).
    role_key = {**{g: ("gate", gate_key_secret) for g in GATE_STEPS},
                **{p: ("promoter", promoter_key_secret) for p in PROMOTER_STEPS}}.get(step)
    if role_key is not None and role_key[1] is not None:
        role, secret = role_key
        kubernetes.use_secret_as_volume(task, secret, f"{KEYS_MOUNT}/{role}")
    kubernetes.add_pod_label(task, "app.kubernetes.io/part-of", "medisyn")
    kubernetes.set_security_context(task, run_as_user=1000, run_as_group=1000, run_as_non_root=True)
    return task


def _light(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """A bookkeeping step (planning, registry writes, job launchers)."""
    return task.set_cpu_request("250m").set_cpu_limit("1").set_memory_request("512Mi").set_memory_limit("2Gi")


def _heavy(task: dsl.PipelineTask, gpus=None, node_selector=None, tolerations=None,
           cpu: str = "8", memory: str = "64Gi") -> dsl.PipelineTask:
    """A data/model step: a scratch emptyDir on /tmp, bigger pod, and GPUs on GPU nodes when asked."""
    task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)
    # scratch on /tmp (the default TMPDIR): env vars set here would also apply under kfp.local
    kubernetes.empty_dir_mount(task, volume_name="scratch", mount_path="/tmp", size_limit=SCRATCH_SIZE)
    if gpus is not None:
        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(gpus)
        # NCCL and dataloader workers need more shared memory than the 64 MiB default
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
        kubernetes.add_node_selector_json(task, node_selector)
        kubernetes.add_toleration_json(task, tolerations)
    return task


def _retrain(config_json, raw_uri, root_uri, run_tag, demo, demo_n_per_class, demo_seed, preprocess_launcher,
             train_launcher, cluster_json, job_timeout_s, gpu_node_selector, gpu_tolerations, job_image,
             pipeline_version, sec: dict[str, Any]) -> None:
    """The steps inside the exit handler (the pipeline's parameters are passed through as channels)."""
    gpu: dict[str, Any] = dict(gpus=GPUS_PER_STEP, node_selector=gpu_node_selector, tolerations=gpu_tolerations)

    plan = _light(_base(c.plan_run(config_json=config_json, root_uri=root_uri, run_tag=run_tag,
                                   job_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, raw_uri=raw_uri,
                                   pipeline_version=pipeline_version), **sec))
    plan.set_display_name("plan run")
    p = plan.outputs
    config_uri = p["config_uri"]
    run_name = p["run_tag"]  # the run's folder (the KFP run id unless run_tag is set): unique job names

    # -- inputs: a phantom landing zone + tiny models (demo), or a check that the zone exists ----
    with dsl.If(demo == True, name="demo-inputs"):  # noqa: E712 (KFP condition, not a Python bool)
        models = _heavy(_base(c.build_tiny_models(config_uri=config_uri), **sec), cpu="2", memory="8Gi")
        zone = _heavy(_base(c.demo_data(config_uri=models.output, out_uri=p["raw_uri"], n_per_class=demo_n_per_class,
                                        seed=demo_seed), **sec), cpu="2", memory="8Gi")
    with dsl.Else(name="production-inputs"):
        checked = _light(_base(c.check_landing_zone(config_uri=config_uri, raw_uri=p["raw_uri"]), **sec))
    raw = dsl.OneOf(zone.output, checked.output)

    # -- preprocess: Ray Data locally / in the pod, or on a KubeRay cluster ----------------------
    with dsl.If(preprocess_launcher == "rayjob", name="preprocess-on-rayjob"):
        ds_ray = _light(_base(c.preprocess_rayjob(
            config_uri=config_uri, raw_uri=raw, dataset_uri=p["dataset_uri"], cluster_json=cluster_json,
            image=job_image, run_tag=run_name, timeout_s=job_timeout_s), **sec))
    with dsl.Else(name="preprocess-in-pod"):
        ds_local = _heavy(_base(c.preprocess(config_uri=config_uri, raw_uri=raw, dataset_uri=p["dataset_uri"]), **sec))
    dataset_uri = dsl.OneOf(ds_ray.output, ds_local.output)

    # -- encode + train: in the pod, or a multi-node TrainJob / PyTorchJob -----------------------
    enc = _heavy(_base(c.encode(config_uri=config_uri, dataset_uri=dataset_uri, cache_uri=p["cache_uri"]), **sec),
                 **gpu)
    with dsl.If(train_launcher != "local", name="train-on-cluster"):
        tr_job = _light(_base(c.train_job(
            config_uri=config_uri, cache_uri=enc.output, checkpoints_uri=p["checkpoints_uri"],
            cluster_json=cluster_json, image=job_image, run_tag=run_name, timeout_s=job_timeout_s,
            launcher=train_launcher), **sec))
    with dsl.Else(name="train-in-pod"):
        tr_local = _heavy(_base(c.train(config_uri=config_uri, cache_uri=enc.output,
                                        checkpoints_uri=p["checkpoints_uri"]), **sec), **gpu)
    checkpoints_uri = dsl.OneOf(tr_job.output, tr_local.output)

    # -- score every epoch, register the best as "candidate" -----------------------------------
    fid = _heavy(_base(c.score(config_uri=config_uri, dataset_uri=dataset_uri, checkpoints_uri=checkpoints_uri,
                               scores_uri=p["scores_uri"]), **sec), **gpu)
    reg = _light(_base(c.register(config_uri=config_uri, scores_uri=fid.output, dataset_uri=dataset_uri,
                                  out_uri=p["register_uri"]), **sec))
    model_uri = reg.outputs["model_uri"]

    # -- gates, in order; each verdict recorded on the version by the stage runner ---------------
    privacy = _heavy(_base(c.privacy_gate(config_uri=config_uri, model_uri=model_uri, dataset_uri=dataset_uri,
                                          out_uri=p["privacy_uri"]), **sec), **gpu)
    utility = _heavy(_base(c.utility_gate(config_uri=config_uri, model_uri=model_uri, dataset_uri=dataset_uri,
                                          out_uri=p["utility_uri"]), **sec), **gpu).after(privacy)
    promoted = _light(_base(c.promote(config_uri=config_uri, model_uri=model_uri, gate_names=",".join(GATES),
                                      out_uri=p["promote_uri"]), **sec)).after(utility)
    promoted.set_display_name("promote to approved")

    # -- the version's evaluation report (docs/report.md), after promote so it shows the outcome ----
    report = _heavy(_base(c.report(config_uri=config_uri, model_uri=model_uri, out_uri=p["report_uri"]), **sec),
                    cpu="2", memory="8Gi").after(promoted)
    report.set_display_name("evaluation report")


@dsl.pipeline(name=PIPELINE_NAME, description="MediSyn: preprocess, fine-tune SDXL, score, gate, promote")
def medisyn_pipeline(
    config_json: str = "{}",            # the run config (RunConfig as JSON); "{}" = the paper's defaults
    raw_uri: str = "",                  # landing zone (s3:// or file://); demo: where to write it ("" = <run>/raw)
    root_uri: str = "",                 # base URI for outputs; "" = the config's storage.root
    run_tag: str = "",                  # folder of this run under root_uri; "" = the KFP run id
    demo: bool = False,                 # build tiny models and write a phantom landing zone first
    demo_n_per_class: int = 0,          # demo: phantom images per class (0 = the config's demo.images_per_class)
    demo_seed: int = 0,                 # demo: phantom generator seed
    preprocess_launcher: str = "local",  # "local": Ray Data in the step's pod | "rayjob": a KubeRay RayJob
    train_launcher: str = "local",      # "local": in the step's pod | "auto"/"trainjob"/"pytorchjob": a cluster job
    cluster_json: str = "{}",           # medisyn.launch.ClusterSettings for RayJob/PyTorchJob (nodes, GPUs...)
    job_timeout_s: int = DEFAULT_JOB_TIMEOUT_S,  # give up on a RayJob/PyTorchJob after this many seconds
    gpu_node_selector: dict = {},       # nodeSelector for GPU steps, e.g. {"nvidia.com/gpu.present": "true"}
    gpu_tolerations: list = [],         # tolerations for GPU steps, e.g. [{"key": "nvidia.com/gpu", ...}]
    s3_secret: str = "medisyn-s3",      # Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (optional)
    mlflow_secret: str = "medisyn-mlflow",  # Secret with MLFLOW_TRACKING_URI
    mlflow_pipeline_secret: str = "medisyn-mlflow-pipeline",  # Secret (username, password): the pipeline identity
    mlflow_promoter_secret: str = "medisyn-mlflow-promoter",  # Secret (username, password): promote's identity
    id_salt_secret: str = "medisyn-id-salt",  # Secret with MEDISYN_ID_SALT (preprocessing steps and jobs)
    gate_key_secret: str = "medisyn-gate-key",  # Secret with key.pem: signs gate verdicts (gate steps only)
    promoter_key_secret: str = "medisyn-promoter-key",  # Secret with key.pem: signs approvals (promote only)
    trust_config_map: str = "medisyn-trust",  # ConfigMap with gate*.pub / promoter*.pub: the trust policy
    job_image: str = MEDISYN_IMAGE,     # image of launched RayJob/TrainJob/PyTorchJob pods (unused with "local")
    pipeline_version: str = "",         # the KFP pipeline version (set by `medisyn pipeline run|schedule`)
):  # no pipeline output: KFP allows none from inside an ExitHandler; register's model_uri names the version
    sec = dict(s3_secret=s3_secret, mlflow_secret=mlflow_secret, mlflow_pipeline_secret=mlflow_pipeline_secret,
               mlflow_promoter_secret=mlflow_promoter_secret, id_salt_secret=id_salt_secret,
               gate_key_secret=gate_key_secret, promoter_key_secret=promoter_key_secret,
               trust_config_map=trust_config_map)
    # the exit handler: the outcome on the parent MLflow run and the version, however the run ends
    outcome = _light(_base(c.record_outcome(config_json=config_json, root_uri=root_uri, run_tag=run_tag,
                                            job_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER), **sec))
    outcome.set_display_name("record outcome")
    with dsl.ExitHandler(outcome, name="retrain"):
        _retrain(config_json, raw_uri, root_uri, run_tag, demo, demo_n_per_class, demo_seed, preprocess_launcher,
                 train_launcher, cluster_json, job_timeout_s, gpu_node_selector, gpu_tolerations, job_image,
                 pipeline_version, sec)


def compile_pipeline(out: str | Path, image: str | None = None, gpus_per_step: int | None = None) -> Path:
    """Compile to KFP IR YAML at ``out``.

    ``image`` replaces the project image in every step (and the default ``job_image``);
    ``gpus_per_step`` replaces the GPU limit of every GPU step (0 = CPU-only steps).
    """
    import yaml

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(medisyn_pipeline, str(out))
    if (not image or image == MEDISYN_IMAGE) and gpus_per_step in (None, GPUS_PER_STEP):
        return out
    docs = list(yaml.safe_load_all(out.read_text()))
    spec = docs[0]
    for executor in spec["deploymentSpec"]["executors"].values():
        container = executor.get("container") or {}
        if image and container.get("image") == MEDISYN_IMAGE:
            container["image"] = image
        accel = (container.get("resources") or {}).get("accelerator")
        if accel is not None and gpus_per_step is not None:
            if gpus_per_step > 0:
                accel["resourceCount"] = accel["count"] = str(gpus_per_step)
            else:
                container["resources"].pop("accelerator")
    if image:
        spec["root"]["inputDefinitions"]["parameters"]["job_image"]["defaultValue"] = image
    out.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Compile the MediSyn pipeline to KFP IR YAML.")
    p.add_argument("--out", default="pipelines/medisyn_pipeline.yaml", help="output YAML path")
    p.add_argument("--image", default=None, help=f"project image for every step (default {MEDISYN_IMAGE})")
    p.add_argument("--gpus", type=int, default=None,
                   help=f"GPUs per GPU step (default {GPUS_PER_STEP}; 0 = CPU-only cluster)")
    args = p.parse_args(argv)
    print(compile_pipeline(args.out, args.image, args.gpus))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
