"""The operators, as the launcher sees them: where a job lives (group, version, plural), which pods
are its and which one leads, its state, and why it failed (the job's condition, the pods' container
states, an NCCL timeout in the lead pod's last log lines)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class JobKind:
    kind: str
    group: str
    version: str
    plural: str
    pod_selector: str  # label selector of the job's pods, formatted with the job's name
    lead_labels: dict[str, str]  # among those, the labels of the lead pod (whose log is the step's log)
    container: str  # the lead pod's container that runs our command


JOB_KINDS: dict[str, JobKind] = {k.kind: k for k in (
    # JobSet names its child Jobs' pods; the lead is completion index 0 of the "node" replicated job
    JobKind("TrainJob", "trainer.kubeflow.org", "v1alpha1", "trainjobs", "jobset.sigs.k8s.io/jobset-name={name}",
            {"batch.kubernetes.io/job-completion-index": "0"}, "node"),
    JobKind("PyTorchJob", "kubeflow.org", "v1", "pytorchjobs", "training.kubeflow.org/job-name={name}",
            {"training.kubeflow.org/replica-type": "master"}, "pytorch"),
    # K8sJobMode: the submitter is a batch Job of the RayJob's name; its pod carries the driver's log
    JobKind("RayJob", "ray.io", "v1", "rayjobs", "batch.kubernetes.io/job-name={name}", {}, "ray-job-submitter"),
)}
#: (group, version, plural) per kind, for the CustomObjectsApi.
RESOURCES: dict[str, tuple[str, str, str]] = {k: (j.group, j.version, j.plural) for k, j in JOB_KINDS.items()}


def job_state(kind: str, obj: dict[str, Any]) -> tuple[str, str]:
    """('running'|'succeeded'|'failed', reason) from a TrainJob, PyTorchJob or RayJob status."""
    status = obj.get("status") or {}
    if kind == "RayJob":
        job_status = status.get("jobStatus", "")
        deploy = status.get("jobDeploymentStatus", "")
        reason = status.get("message") or status.get("reason") or f"{deploy}/{job_status}"
        if job_status == "SUCCEEDED":
            return "succeeded", reason
        if job_status in ("FAILED", "STOPPED") or deploy in ("Failed", "ValidationFailed"):
            return "failed", f"{status.get('reason') or deploy}: {status.get('message') or job_status}".strip(": ")
        return "running", reason
    # TrainJob: Created/Suspended/Complete/Failed; Training Operator: Created/Running/Restarting/Succeeded/Failed
    done = {"Complete": "succeeded", "Succeeded": "succeeded", "Failed": "failed"}
    last = ""
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        text = f"{cond.get('type')}: {cond.get('reason', '')} {cond.get('message', '')}".strip()
        if cond.get("type") in done:
            return done[cond["type"]], text
        last = text
    return "running", last



# ----------------------------------------------------------------------------------------------
# Failure reasons: the job's condition, the pods' container states, the lead pod's last log lines
# ----------------------------------------------------------------------------------------------
FATAL_WAITING = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError")
_NCCL_TIMEOUT = re.compile(r"(NCCL|ProcessGroupNCCL|c10d).*(timeout|timed out|Timeout)|Watchdog caught collective")


def pod_problems(pods: list[dict[str, Any]]) -> list[str]:
    """One line per container that ended badly or cannot start: ``<pod>/<container>: OOMKilled (exit 137)``."""
    problems: list[str] = []
    for pod in pods:
        pname = (pod.get("metadata") or {}).get("name", "?")
        status = pod.get("status") or {}
        for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
            for key in ("state", "lastState"):
                state = cs.get(key) or {}
                term, waiting = state.get("terminated"), state.get("waiting")
                if term and (term.get("exitCode") or 0) != 0:
                    what = term.get("reason") or "Error"
                    msg = f" {term['message'].strip()[:200]}" if term.get("message") else ""
                    problems.append(f"{pname}/{cs.get('name')}: {what} (exit {term.get('exitCode')}){msg}")
                    break
                if waiting and waiting.get("reason") in FATAL_WAITING:
                    msg = f" {waiting['message'][:200]}" if waiting.get("message") else ""
                    problems.append(f"{pname}/{cs.get('name')}: {waiting['reason']}{msg}")
                    break
        if status.get("reason") == "Evicted":
            problems.append(f"{pname}: Evicted {status.get('message', '')}".strip())
    return list(dict.fromkeys(problems))


def failure_reason(condition: str, pods: list[dict[str, Any]], last_lines: list[str]) -> str:
    """The reason a job failed, most specific first: pod problems, an NCCL timeout, the job's condition."""
    parts = pod_problems(pods)
    nccl = [ln for ln in last_lines if _NCCL_TIMEOUT.search(ln)]
    if nccl:
        parts.append(f"NCCL timeout: {nccl[-1].strip()[:300]}")
    if condition:
        parts.append(condition)
    return "; ".join(parts) or "no reason reported"

