"""Cluster launch: render, validate, submit and watch the jobs MediSyn hands to Kubernetes operators.

* Training runs as a ``PyTorchJob`` (Kubeflow Training Operator, ``kubeflow.org/v1``): one Master and
  ``num_nodes - 1`` Workers, ``gpus_per_node`` GPUs each, ``torchrun`` starting one process per GPU.
  The operator sets ``PET_NNODES`` / ``PET_NODE_RANK`` / ``PET_MASTER_ADDR`` / ``PET_MASTER_PORT`` and
  ``PET_NPROC_PER_NODE`` (from ``spec.nprocPerNode``), which torchrun reads as its defaults, so the
  command line is the same on every replica.
* Preprocessing runs as a ``RayJob`` (KubeRay, ``ray.io/v1``): an ephemeral Ray cluster that runs
  ``medisyn preprocess`` with Ray Data and is torn down when the job finishes (the manifest layout
  is the data package's, ``medisyn.data.rayjob``).

Locally none of this is used: the pipeline's ``launcher`` parameter (``local``) runs the same stage
functions in-process (``docs/deploy.md``). There is no API server on CI machines, so the tests render
every manifest and validate it against the operators' own CRD schemas (:func:`validate_against_crd`);
:func:`submit` and :func:`wait_for_job` take an injectable client.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from medisyn.config import RunConfig

log = logging.getLogger("medisyn.launch")

#: CRDs vendored for offline validation (copies of the operators' own files; see tests/data/crds).
CRD_DIR = Path(__file__).resolve().parents[2] / "tests" / "data" / "crds"
PYTORCHJOB_CRD = "kubeflow.org_pytorchjobs.yaml"
RAYJOB_CRD = "ray.io_rayjobs.yaml"

#: (group, version, plural) per kind, for the CustomObjectsApi.
RESOURCES: dict[str, tuple[str, str, str]] = {
    "PyTorchJob": ("kubeflow.org", "v1", "pytorchjobs"),
    "RayJob": ("ray.io", "v1", "rayjobs"),
}
SERVICE_ACCOUNT_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
_DNS1123 = re.compile(r"[^a-z0-9-]+")


class JobFailed(RuntimeError):
    """The operator reported the job as failed (the message carries its last condition)."""


@dataclass(frozen=True)
class ClusterSettings:
    """Where and how a job runs on the cluster; the pipeline fills it from its parameters."""

    namespace: str = ""                      # "" = the namespace of the pod we run in, else "default"
    image: str = "ghcr.io/medisyn/medisyn-trainer:0.1.0"  # the project image (docker/Dockerfile.trainer)
    service_account: str | None = None       # pod service account (S3 access via IRSA/workload identity)
    num_nodes: int = 1                       # PyTorchJob replicas (1 Master + num_nodes-1 Workers)
    gpus_per_node: int = 1                   # nvidia.com/gpu per replica = torchrun processes per node
    cpu: str = "8"                           # CPU request = limit per replica
    memory: str = "64Gi"                     # memory request = limit per replica
    shm_size: str = "16Gi"                   # /dev/shm (NCCL + dataloader workers need more than 64 MiB)
    scratch_size: str = "100Gi"              # emptyDir at /scratch (TMPDIR, HF caches)
    node_selector: dict[str, str] = field(default_factory=dict)   # e.g. {"nvidia.com/gpu.present": "true"}
    tolerations: list[dict[str, Any]] = field(default_factory=list)  # e.g. the GPU taint
    env_secrets: tuple[str, ...] = ("medisyn-s3", "medisyn-mlflow")  # Secrets mounted as env (optional)
    nccl_socket_ifname: str | None = None    # NCCL_SOCKET_IFNAME when the pod has several interfaces
    ray_workers: int = 2                     # RayJob worker replicas (preprocessing)
    ray_worker_cpu: str = "8"                # CPU per Ray worker (whole CPUs: Ray's num-cpus)
    ray_worker_memory: str = "32Gi"          # memory per Ray worker
    active_deadline_s: int | None = None     # kill the job after this many seconds (None = no limit)
    backoff_limit: int = 2                   # operator-level retries of a failed job
    ttl_after_finished_s: int = 3600         # garbage-collect finished jobs after this many seconds

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "ClusterSettings":
        data = dict(data or {})
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown cluster setting(s): {sorted(unknown)}")
        if "env_secrets" in data:
            data["env_secrets"] = tuple(data["env_secrets"])
        return cls(**data)

    @classmethod
    def from_pipeline(cls, cluster_json: str, image: str = "") -> "ClusterSettings":
        """From the pipeline's ``cluster_json`` parameter, with ``image`` (when set) as the job image."""
        import json

        data = json.loads(cluster_json or "{}")
        if image:
            data["image"] = image
        return cls.from_dict(data)

    def resolved_namespace(self) -> str:
        if self.namespace:
            return self.namespace
        try:
            return Path(SERVICE_ACCOUNT_NAMESPACE_FILE).read_text().strip() or "default"
        except OSError:
            return "default"


def job_name(prefix: str, suffix: str) -> str:
    """A DNS-1123 name <= 63 chars: ``prefix-suffix`` lower-cased, invalid characters dashed."""
    name = _DNS1123.sub("-", f"{prefix}-{suffix}".lower()).strip("-")
    return name[:63].rstrip("-")


CONFIG_ENV = "MEDISYN_CONFIG_YAML"
CONFIG_PATH_IN_POD = "/scratch/config.yaml"


def trainer_command(cache_uri: str, checkpoints_uri: str, result_json_uri: str | None = None) -> list[str]:
    """The command every PyTorchJob replica runs: ``python -m medisyn.train.launch``.

    That launcher (the training package's cluster entry point) reads the operator's ``PET_*``
    variables (nnodes, node rank, master address/port, ``nprocPerNode``) and execs torchrun with a
    static rendezvous on the master pod. It takes the config as a YAML file, so the resolved config
    travels in the ``MEDISYN_CONFIG_YAML`` env var and is written to the scratch volume first.
    """
    launch_args = ["python", "-m", "medisyn.train.launch", "--config", CONFIG_PATH_IN_POD,
                   "--cache", cache_uri, "--checkpoints", checkpoints_uri]
    if result_json_uri:
        launch_args += ["--result-json", result_json_uri]
    script = f'printf "%s" "${CONFIG_ENV}" > {CONFIG_PATH_IN_POD} && exec {shlex.join(launch_args)}'
    return ["/bin/sh", "-c", script]


def preprocess_entrypoint(cfg: RunConfig, raw_uri: str, dataset_uri: str) -> str:
    """The RayJob entrypoint (a shell string: KubeRay runs it with ``ray job submit``)."""
    args = ["python", "-m", "medisyn.cli", "preprocess",
            "--config-json", json.dumps(cfg.model_dump(mode="json"), sort_keys=True),
            "--raw", raw_uri, "--out", dataset_uri]
    return shlex.join(args)


def _env_from(settings: ClusterSettings) -> list[dict[str, Any]]:
    # optional: a cluster using IRSA / workload identity has no S3 key Secret
    return [{"secretRef": {"name": s, "optional": True}} for s in settings.env_secrets]


def _security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _volumes(settings: ClusterSettings) -> tuple[list[dict], list[dict]]:
    volumes = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}},
        {"name": "scratch", "emptyDir": {"sizeLimit": settings.scratch_size}},
    ]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "scratch", "mountPath": "/scratch"}]
    return volumes, mounts


def _pod_spec(settings: ClusterSettings, container: dict[str, Any]) -> dict[str, Any]:
    volumes, mounts = _volumes(settings)
    container = {**container, "volumeMounts": mounts, "securityContext": _security_context()}
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000},
    }
    if settings.service_account:
        spec["serviceAccountName"] = settings.service_account
    if settings.node_selector:
        spec["nodeSelector"] = dict(settings.node_selector)
    if settings.tolerations:
        spec["tolerations"] = [dict(t) for t in settings.tolerations]
    return spec


def render_pytorchjob(cfg: RunConfig, cache_uri: str, checkpoints_uri: str,
                      settings: ClusterSettings | None = None, name: str | None = None,
                      result_json_uri: str | None = None) -> dict[str, Any]:
    """The PyTorchJob that trains ``cfg`` from ``cache_uri`` into ``checkpoints_uri``.

    ``result_json_uri``: where rank 0 writes the TrainResult JSON (read back by the pipeline step).
    """
    s = settings or ClusterSettings()
    if s.num_nodes < 1 or s.gpus_per_node < 0:
        raise ValueError(f"num_nodes must be >= 1 and gpus_per_node >= 0 (got {s.num_nodes}, {s.gpus_per_node})")
    name = name or job_name(cfg.name, "train")
    resources: dict[str, dict[str, Any]] = {
        "requests": {"cpu": s.cpu, "memory": s.memory},
        "limits": {"cpu": s.cpu, "memory": s.memory},
    }
    if s.gpus_per_node:
        resources["requests"]["nvidia.com/gpu"] = s.gpus_per_node
        resources["limits"]["nvidia.com/gpu"] = s.gpus_per_node
    env = [
        {"name": CONFIG_ENV, "value": cfg.to_yaml()},
        {"name": "TMPDIR", "value": "/scratch"},
        {"name": "HF_HOME", "value": "/scratch/hf"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "OMP_NUM_THREADS", "value": "1"},
        {"name": "NCCL_DEBUG", "value": "WARN"},
        # surface a hung collective as an error instead of a silent stall (train.nccl_timeout_s)
        {"name": "TORCH_NCCL_ASYNC_ERROR_HANDLING", "value": "1"},
        {"name": "MEDISYN_NCCL_TIMEOUT_S", "value": str(cfg.train.nccl_timeout_s)},
    ]
    if cfg.storage.s3_endpoint_url:
        env.append({"name": "MEDISYN_S3_ENDPOINT_URL", "value": cfg.storage.s3_endpoint_url})
    if cfg.tracking.tracking_uri:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": cfg.tracking.tracking_uri})
    if s.nccl_socket_ifname:
        env.append({"name": "NCCL_SOCKET_IFNAME", "value": s.nccl_socket_ifname})
    container = {
        "name": "pytorch",  # the operator requires this container name
        "image": s.image,
        "imagePullPolicy": "IfNotPresent",
        "command": trainer_command(cache_uri, checkpoints_uri, result_json_uri),
        "env": env,
        "envFrom": _env_from(s),
        "resources": resources,
    }
    template = {"metadata": {"labels": {"app.kubernetes.io/part-of": "medisyn", "medisyn/stage": "train"}},
                "spec": _pod_spec(s, container)}
    replica_specs: dict[str, Any] = {
        "Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": template},
    }
    if s.num_nodes > 1:
        replica_specs["Worker"] = {"replicas": s.num_nodes - 1, "restartPolicy": "OnFailure", "template": template}
    run_policy: dict[str, Any] = {
        "cleanPodPolicy": "None",  # keep pods for their logs; ttlSecondsAfterFinished collects them
        "backoffLimit": s.backoff_limit,
        "ttlSecondsAfterFinished": s.ttl_after_finished_s,
    }
    if s.active_deadline_s:
        run_policy["activeDeadlineSeconds"] = s.active_deadline_s
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": s.resolved_namespace(),
                     "labels": {"app.kubernetes.io/part-of": "medisyn", "medisyn/run": job_name(cfg.name, "")}},
        "spec": {
            "nprocPerNode": str(max(1, s.gpus_per_node)),
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": replica_specs,
        },
    }


def render_rayjob(cfg: RunConfig, raw_uri: str, dataset_uri: str,
                  settings: ClusterSettings | None = None, name: str | None = None) -> dict[str, Any]:
    """The RayJob that preprocesses ``raw_uri`` into ``dataset_uri`` on an ephemeral KubeRay cluster.

    The data package owns the RayJob layout (``medisyn.data.rayjob.render_rayjob``); this maps the
    pipeline's :class:`ClusterSettings` onto it. The first of ``env_secrets`` is the S3 Secret.
    """
    from medisyn.data.rayjob import render_rayjob as render

    s = settings or ClusterSettings()
    return render(
        cfg, raw_uri, dataset_uri, s.image, s.resolved_namespace(),
        name=name or job_name(cfg.name, "preprocess"),
        s3_secret=s.env_secrets[0] if s.env_secrets else None,
        num_workers=s.ray_workers,
        worker_cpus=int(float(s.ray_worker_cpu)),
        worker_memory=s.ray_worker_memory,
        service_account=s.service_account,
        ttl_seconds_after_finished=s.ttl_after_finished_s,
        active_deadline_seconds=s.active_deadline_s,
    )


# ----------------------------------------------------------------------------------------------
# Validation against the operators' CRDs (offline)
# ----------------------------------------------------------------------------------------------
_CRD_CACHE: dict[str, dict[str, Any]] = {}


def _load_crd(crd_path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    key = str(Path(crd_path).resolve())
    if key not in _CRD_CACHE:
        _CRD_CACHE[key] = yaml.safe_load(Path(crd_path).read_text())
    return _CRD_CACHE[key]


def validate_against_crd(manifest: dict[str, Any], crd_path: str | os.PathLike | None = None) -> None:
    """Raise ``ValueError`` listing every violation of ``manifest`` against its CRD's OpenAPI schema.

    ``crd_path`` defaults to the vendored CRD for the manifest's kind. Checks that apiVersion and
    kind match a served version of the CRD, then validates the whole object with jsonschema.
    """
    import jsonschema

    kind = manifest.get("kind")
    if crd_path is None:
        default = {"PyTorchJob": PYTORCHJOB_CRD, "RayJob": RAYJOB_CRD}.get(str(kind))
        if default is None:
            raise ValueError(f"no vendored CRD for kind {kind!r}; pass crd_path")
        crd_path = CRD_DIR / default
    crd = _load_crd(crd_path)
    names, group = crd["spec"]["names"], crd["spec"]["group"]
    if kind != names["kind"]:
        raise ValueError(f"kind {kind!r} does not match the CRD's kind {names['kind']!r}")
    api_version = str(manifest.get("apiVersion", ""))
    grp, _, version = api_version.rpartition("/")
    versions = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served", True)}
    if grp != group or version not in versions:
        raise ValueError(f"apiVersion {api_version!r} is not served by this CRD "
                         f"({group}/{'|'.join(versions)})")
    schema = versions[version]["schema"]["openAPIV3Schema"]
    meta = manifest.get("metadata") or {}
    if not meta.get("name"):
        raise ValueError("metadata.name is required")
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{kind} {meta.get('name')} is invalid against {Path(crd_path).name}:"]
        for e in errors[:20]:
            path = ".".join(str(p) for p in e.absolute_path) or "<root>"
            lines.append(f"  {path}: {e.message[:300]}")
        raise ValueError("\n".join(lines))


# ----------------------------------------------------------------------------------------------
# Submission and watching
# ----------------------------------------------------------------------------------------------
def _custom_objects_api():
    """A ``CustomObjectsApi`` from the in-cluster config, else ~/.kube/config."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


def _have_kubernetes_client() -> bool:
    try:
        import kubernetes  # noqa: F401
    except ImportError:
        return False
    return True


def submit(manifest: dict[str, Any], namespace: str | None = None, api: Any = None) -> dict[str, Any]:
    """Create the job; returns the object the API server stored.

    Uses the kubernetes python client (``api``: a ``CustomObjectsApi`` or a fake with the same
    ``create_namespaced_custom_object``); without the client installed, falls back to ``kubectl``.
    """
    kind = manifest["kind"]
    if kind not in RESOURCES:
        raise ValueError(f"cannot submit kind {kind!r}; known: {sorted(RESOURCES)}")
    group, version, plural = RESOURCES[kind]
    namespace = namespace or manifest.get("metadata", {}).get("namespace") or "default"
    log.info("submitting %s %s/%s", kind, namespace, manifest["metadata"]["name"])
    if api is None and not _have_kubernetes_client():
        kubectl = shutil.which("kubectl")
        if not kubectl:
            raise RuntimeError("neither the kubernetes python client nor kubectl is available")
        out = subprocess.run([kubectl, "create", "-n", namespace, "-o", "json", "-f", "-"],
                             input=json.dumps(manifest), capture_output=True, text=True, check=True)
        return json.loads(out.stdout)
    api = api or _custom_objects_api()
    return api.create_namespaced_custom_object(group, version, namespace, plural, manifest)


def job_state(kind: str, obj: dict[str, Any]) -> tuple[str, str]:
    """('running'|'succeeded'|'failed', reason) from a PyTorchJob or RayJob status."""
    status = obj.get("status") or {}
    if kind == "RayJob":
        job_status = status.get("jobStatus", "")
        deploy = status.get("jobDeploymentStatus", "")
        reason = status.get("message") or status.get("reason") or f"{deploy}/{job_status}"
        if job_status == "SUCCEEDED":
            return "succeeded", reason
        if job_status in ("FAILED", "STOPPED") or deploy in ("Failed", "ValidationFailed"):
            return "failed", reason
        return "running", reason
    # Training Operator jobs: conditions Created/Running/Restarting/Succeeded/Failed
    for cond in reversed(status.get("conditions") or []):
        if cond.get("status") != "True":
            continue
        reason = f"{cond.get('type')}: {cond.get('reason', '')} {cond.get('message', '')}".strip()
        if cond.get("type") == "Succeeded":
            return "succeeded", reason
        if cond.get("type") == "Failed":
            return "failed", reason
    return "running", ""


def wait_for_job(kind: str, name: str, namespace: str, timeout_s: float = 7 * 24 * 3600, poll_s: float = 30.0,
                 api: Any = None, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Poll until the job succeeds (returns its object), fails (``JobFailed``) or times out."""
    group, version, plural = RESOURCES[kind]
    api = api or _custom_objects_api()
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        obj = api.get_namespaced_custom_object(group, version, namespace, plural, name)
        state, reason = job_state(kind, obj)
        if (state, reason) != last:
            log.info("%s %s/%s: %s %s", kind, namespace, name, state, reason)
            last = (state, reason)
        if state == "succeeded":
            return obj
        if state == "failed":
            raise JobFailed(f"{kind} {namespace}/{name} failed: {reason}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{kind} {namespace}/{name} did not finish within {timeout_s:.0f}s")
        sleep(poll_s)


def run_job(manifest: dict[str, Any], timeout_s: float = 7 * 24 * 3600, poll_s: float = 30.0,
            api: Any = None, validate: bool = True, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Validate (vendored CRD, when present), submit, and wait; returns the finished object."""
    if validate and (CRD_DIR / (PYTORCHJOB_CRD if manifest["kind"] == "PyTorchJob" else RAYJOB_CRD)).exists():
        validate_against_crd(manifest)
    ns = manifest["metadata"]["namespace"]
    submitted = submit(manifest, ns, api=api)
    name = (submitted.get("metadata") or {}).get("name") or manifest["metadata"]["name"]
    return wait_for_job(manifest["kind"], name, ns, timeout_s=timeout_s, poll_s=poll_s, api=api, sleep=sleep)
