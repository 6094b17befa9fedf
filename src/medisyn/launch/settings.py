"""Where and how a launched job runs: :class:`ClusterSettings` (the pipeline fills it from its
parameters), the deadlines that bound a job and its watch, and the jobs' DNS-1123 names."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SERVICE_ACCOUNT_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
DEFAULT_DEADLINE_S = 3 * 24 * 3600  # the paper's 15 epochs on 8 GPUs take about a day; 3x that is a hung job
DEFAULT_TIMEOUT_S = 7 * 24 * 3600  # the step's own bound (pipeline parameter job_timeout_s)
DEADLINE_GRACE_S = 600  # the watch outlasts activeDeadlineSeconds by this much, so the operator's reason is seen
TRAINING_RUNTIME = "medisyn-torch"  # the chart's TrainingRuntime (charts/medisyn/templates/trainingruntime.yaml)
_DNS1123 = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True)
class ClusterSettings:
    """Where and how a job runs on the cluster; the pipeline fills it from its parameters."""

    namespace: str = ""                      # "" = the namespace of the pod we run in, else "default"
    image: str = "ghcr.io/medisyn/medisyn-trainer:0.1.0"  # the project image (docker/Dockerfile.trainer)
    service_account: str | None = None       # pod service account (S3 access via IRSA/workload identity)
    num_nodes: int = 1                       # training nodes (TrainJob numNodes; PyTorchJob 1 Master + N-1 Workers)
    gpus_per_node: int = 1                   # nvidia.com/gpu per node = torchrun processes per node; 0 = CPU-only
    cpu: str = "8"                           # CPU request = limit per node
    memory: str = "64Gi"                     # memory request = limit per node
    shm_size: str = "16Gi"                   # /dev/shm (NCCL, dataloader workers, Ray's object store)
    scratch_size: str = "100Gi"              # emptyDir at /scratch (TMPDIR, HF_HOME, the latent cache copy)
    node_selector: dict[str, str] = field(default_factory=dict)   # training pods only, e.g. the GPU nodes
    tolerations: list[dict[str, Any]] = field(default_factory=list)  # training pods only, e.g. the GPU taint
    env_secrets: tuple[str, ...] = ("medisyn-s3", "medisyn-mlflow")  # Secrets mapped into env (optional)
    nccl_socket_ifname: str | None = None    # NCCL_SOCKET_IFNAME when the pod has several interfaces
    training_runtime: str = TRAINING_RUNTIME  # TrainJob: the TrainingRuntime in the job's namespace (the chart's)
    ray_workers: int = 2                     # RayJob worker replicas (preprocessing)
    ray_worker_cpu: str = "8"                # CPU per Ray worker (whole CPUs: Ray's num-cpus)
    ray_worker_memory: str = "32Gi"          # memory per Ray worker
    ray_head_cpu: str = "2"                  # the Ray head runs the driver only (num-cpus 0)
    ray_head_memory: str = "8Gi"
    active_deadline_s: int | None = DEFAULT_DEADLINE_S  # the operator kills the job after this; None = no limit
    backoff_limit: int = 2                   # operator-level retries of a failed PyTorchJob
    ttl_after_finished_s: int = 3600         # garbage-collect finished jobs after this many seconds
    image_pull_grace_s: int = 600            # a pod stuck in ImagePullBackOff this long fails the step

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ClusterSettings:
        data = dict(data or {})
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown cluster setting(s): {sorted(unknown)}")
        if "env_secrets" in data:
            data["env_secrets"] = tuple(data["env_secrets"])
        return cls(**data)

    @classmethod
    def from_pipeline(cls, cluster_json: str, image: str = "") -> ClusterSettings:
        """From the pipeline's ``cluster_json`` parameter, with ``image`` (when set) as the job image."""
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

    def watch_timeout_s(self, step_timeout_s: float | None) -> float:
        """How long the launcher follows a job: the step's bound, and at most the job's deadline + grace."""
        bounds = [float(step_timeout_s)] if step_timeout_s else []
        if self.active_deadline_s:
            bounds.append(float(self.active_deadline_s + DEADLINE_GRACE_S))
        return min(bounds) if bounds else float(DEFAULT_TIMEOUT_S)


def job_name(prefix: str, suffix: str) -> str:
    """A DNS-1123 name <= 63 chars: ``prefix-suffix`` lower-cased, invalid characters dashed."""
    name = _DNS1123.sub("-", f"{prefix}-{suffix}".lower()).strip("-")
    return name[:63].rstrip("-")

