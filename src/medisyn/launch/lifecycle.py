"""One lifecycle for every job kind (:func:`run_job`, issue #13): validate, create or adopt, watch,
stream the lead pod's log, stop at a deadline, name the failure reason, and always delete the job
(success, failure, timeout, an error, SIGTERM). The steps are listed in :mod:`medisyn.launch`."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from medisyn.launch.crd import validate_against_crd
from medisyn.launch.operators import FATAL_WAITING, JOB_KINDS, JobKind, failure_reason, job_state, pod_problems
from medisyn.launch.settings import DEADLINE_GRACE_S, DEFAULT_TIMEOUT_S

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

log = logging.getLogger("medisyn.launch")

SPEC_HASH_ANNOTATION = "medisyn.io/spec-hash"


class JobFailed(RuntimeError):
    """The operator reported the job as failed; the message carries the reason (:func:`failure_reason`)."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


class JobCancelled(BaseException):
    """The step got SIGTERM (a cancelled pipeline run); its job was deleted first.

    A ``BaseException``, like ``KeyboardInterrupt``: no ``except Exception`` on the way (the
    kubernetes client's, urllib3's) may swallow a cancellation.
    """



def _tag_failure(reason: str, kind: str, name: str) -> None:
    """Put the reason on the active MLflow run (the launcher's stage run), when there is one."""
    try:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.set_tags({"medisyn.job.failure_reason": reason[:5000], "medisyn.job": f"{kind}/{name}"})
    except Exception as exc:  # noqa: BLE001 - bookkeeping must not hide the job's own failure
        log.warning("could not tag the MLflow run with the failure reason: %s", exc)



# ----------------------------------------------------------------------------------------------
# The one job runner (every kind): create or adopt, watch, stream logs, deadline, always delete
# ----------------------------------------------------------------------------------------------
def api_client() -> ApiClient:
    """A client from the in-cluster config, else ``$KUBECONFIG`` / ~/.kube/config (read now, not at import)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None, client_configuration=configuration)
    return client.ApiClient(configuration)


def spec_hash(manifest: dict[str, Any]) -> str:
    """sha256 of what defines the job (kind, spec, labels): equal hashes = the same job."""
    meta = manifest.get("metadata") or {}
    blob = json.dumps({"apiVersion": manifest.get("apiVersion"), "kind": manifest.get("kind"),
                       "labels": meta.get("labels") or {}, "spec": manifest.get("spec")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class _LogFollower(threading.Thread):
    """Follows the lead pod's log into the step's log; keeps the last lines for the failure reason."""

    def __init__(self, core: Any, kind: JobKind, name: str, namespace: str):
        super().__init__(name=f"logs-{name}", daemon=True)
        self.core, self.kind, self.job, self.ns = core, kind, name, namespace
        self.last_lines: collections.deque[str] = collections.deque(maxlen=50)
        self.stop = threading.Event()
        self._followed: set[str] = set()

    def _lead_pod(self) -> dict[str, Any] | None:
        pods = _list_pods(self.core, self.kind, self.job, self.ns)
        lead = [p for p in pods if all((p["metadata"].get("labels") or {}).get(k) == v
                                       for k, v in self.kind.lead_labels.items())]
        return lead[0] if lead else None

    def _stream(self, pod: str, follow: bool) -> None:
        resp = self.core.read_namespaced_pod_log(pod, self.ns, container=self.kind.container, follow=follow,
                                                 _preload_content=False)
        buf = b""
        try:
            for chunk in resp.stream(4096):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    self._emit(pod, raw)
            if buf:
                self._emit(pod, buf)
        finally:
            resp.release_conn()

    def _emit(self, pod: str, raw: bytes) -> None:
        line = raw.decode(errors="replace").rstrip("\r")
        self.last_lines.append(line)
        log.info("[%s] %s", pod, line)

    def run(self) -> None:
        while True:
            stopping = self.stop.is_set()
            try:
                pod = self._lead_pod()
                name = pod["metadata"]["name"] if pod else None
                started = pod is not None and (pod.get("status") or {}).get("phase") not in (None, "Pending")
                if name and name not in self._followed and (started or stopping):
                    self._followed.add(name)
                    self._stream(name, follow=not stopping)
            except Exception as exc:  # noqa: BLE001 - a pod that went away, a dropped stream: logs are best effort
                log.debug("log stream of %s/%s: %s", self.ns, self.job, exc)
            if stopping:
                return
            self.stop.wait(1.0)  # once stopped, one last pass reads what a not yet followed lead pod wrote


def _list_pods(core: Any, kind: JobKind, name: str, namespace: str) -> list[dict[str, Any]]:
    resp = core.list_namespaced_pod(namespace, label_selector=kind.pod_selector.format(name=name),
                                    _preload_content=False)
    return list(json.loads(resp.data).get("items") or [])


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM (Kubernetes stopping a cancelled step's pod) raises :class:`JobCancelled` in the main
    thread, so the ``finally`` that deletes the job runs. Elsewhere (a worker thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def cancel(signum: int, frame: Any) -> None:
        raise JobCancelled(f"the step was cancelled (signal {signum})")

    previous = signal.signal(signal.SIGTERM, cancel)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class JobRunner:
    """One job's lifecycle (see the module docstring); :func:`run_job` is the entry point."""

    def __init__(self, manifest: dict[str, Any], client: ApiClient | None = None, watch_s: float = 60.0,
                 image_pull_grace_s: float = 600.0):
        from kubernetes import client as k8s_client

        self.manifest = manifest
        self.kind = JOB_KINDS[manifest["kind"]]
        self.name = manifest["metadata"]["name"]
        self.ns = manifest["metadata"].get("namespace") or "default"
        self.client = client or api_client()
        self.custom = k8s_client.CustomObjectsApi(self.client)
        self.core = k8s_client.CoreV1Api(self.client)
        self.watch_s = watch_s
        self.image_pull_grace_s = image_pull_grace_s
        self.what = f"{self.kind.kind} {self.ns}/{self.name}"

    # -- API calls ---------------------------------------------------------------------------
    def _get(self) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        k = self.kind
        try:
            obj: dict[str, Any] = self.custom.get_namespaced_custom_object(k.group, k.version, self.ns, k.plural,
                                                                          self.name)
            return obj
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete(self, wait_s: float = 120.0) -> bool:
        """Delete the job and its pods (foreground); wait until it is gone. False when it did not exist."""
        from kubernetes.client.exceptions import ApiException

        k = self.kind
        try:
            self.custom.delete_namespaced_custom_object(k.group, k.version, self.ns, k.plural, self.name,
                                                        propagation_policy="Foreground")
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        log.info("deleted %s", self.what)
        end = time.monotonic() + wait_s
        while self._get() is not None and time.monotonic() < end:
            time.sleep(0.5)
        return True

    def create_or_adopt(self) -> dict[str, Any]:
        """Create the job; adopt an existing one with the same spec hash that has not failed; replace others."""
        from kubernetes.client.exceptions import ApiException

        k = self.kind
        want = spec_hash(self.manifest)
        body = json.loads(json.dumps(self.manifest))
        body["metadata"].setdefault("annotations", {})[SPEC_HASH_ANNOTATION] = want
        for _attempt in range(3):
            try:
                created: dict[str, Any] = self.custom.create_namespaced_custom_object(
                    k.group, k.version, self.ns, k.plural, body)
                log.info("created %s (spec %s)", self.what, want[:12])
                return created
            except ApiException as exc:
                if exc.status != 409:
                    raise
            existing = self._get()
            if existing is None:
                continue  # deleted in between: create again
            have = ((existing.get("metadata") or {}).get("annotations") or {}).get(SPEC_HASH_ANNOTATION)
            state, reason = job_state(k.kind, existing)
            if have == want and state != "failed":
                log.info("adopting the existing %s (same spec %s, %s)", self.what, want[:12], state)
                return existing
            log.info("replacing the existing %s (%s)", self.what,
                     f"spec {str(have)[:12]} != {want[:12]}" if have != want else f"it failed: {reason}")
            self.delete()
        raise RuntimeError(f"could not create {self.what}: it kept coming back after deletion")

    # -- watching ----------------------------------------------------------------------------
    def _events(self, resource_version: str, timeout_s: float) -> Iterator[tuple[str, dict[str, Any]]]:
        from kubernetes import watch

        k = self.kind
        w = watch.Watch()
        try:
            for event in w.stream(self.custom.list_namespaced_custom_object, k.group, k.version, self.ns, k.plural,
                                  field_selector=f"metadata.name={self.name}", resource_version=resource_version,
                                  timeout_seconds=max(1, int(timeout_s)), allow_watch_bookmarks=False):
                yield event["type"], event["object"]
        finally:
            w.stop()

    def _stuck_pulling(self, first_seen: dict[str, float]) -> str | None:
        """A pod that cannot pull its image for longer than the grace: the job would never start."""
        now = time.monotonic()
        stuck = [p for p in pod_problems(_list_pods(self.core, self.kind, self.name, self.ns))
                 if any(r in p for r in FATAL_WAITING)]
        for p in stuck:
            first_seen.setdefault(p, now)
        late = [p for p in stuck if now - first_seen[p] >= self.image_pull_grace_s]
        return "; ".join(late) if late else None

    def wait(self, timeout_s: float, logs: _LogFollower) -> dict[str, Any]:
        """Follow the job until it succeeds (returns it) or fails (:class:`JobFailed`); TimeoutError past
        the deadline."""
        from kubernetes.client.exceptions import ApiException

        deadline = time.monotonic() + timeout_s
        last: tuple[str, str] | None = None
        pulling: dict[str, float] = {}
        obj = self._get()
        while True:
            if obj is None:
                raise JobFailed(f"{self.what} was deleted by someone else", "deleted")
            state, reason = job_state(self.kind.kind, obj)
            if (state, reason) != last:
                log.info("%s: %s %s", self.what, state, reason)
                last = (state, reason)
            if state == "succeeded":
                return obj
            if state == "failed":
                logs.stop.set()
                logs.join(timeout=30)
                pods = _list_pods(self.core, self.kind, self.name, self.ns)
                why = failure_reason(reason, pods, list(logs.last_lines))
                raise JobFailed(f"{self.what} failed: {why}", why)
            stuck = self._stuck_pulling(pulling)
            if stuck:
                raise JobFailed(f"{self.what} cannot start: {stuck}", stuck)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.what} did not finish within {timeout_s:.0f}s")
            rv = (obj.get("metadata") or {}).get("resourceVersion") or ""
            try:
                for etype, eobj in self._events(rv, min(self.watch_s, remaining)):
                    if etype == "DELETED":
                        obj = None
                        break
                    if etype in ("ADDED", "MODIFIED"):
                        obj = eobj
                        if job_state(self.kind.kind, obj) != last:
                            break
                else:
                    obj = self._get()  # the watch window ended: re-read (also covers a 410 Gone resync)
            except ApiException as exc:
                if exc.status != 410:
                    raise
                obj = self._get()

    def run(self, timeout_s: float) -> dict[str, Any]:
        with _sigterm_raises():
            logs = _LogFollower(self.core, self.kind, self.name, self.ns)
            try:
                self.create_or_adopt()
                logs.start()
                done = self.wait(timeout_s, logs)
                logs.stop.set()
                logs.join(timeout=30)  # the lead pod has exited: its stream ends with its last line
                return done
            except JobFailed as exc:
                _tag_failure(exc.reason, self.kind.kind, self.name)
                raise
            except (TimeoutError, JobCancelled) as exc:
                _tag_failure(str(exc), self.kind.kind, self.name)
                raise
            finally:
                logs.stop.set()
                # every exit path: success, failure, deadline, error, SIGTERM (a second one waits for this)
                with _ignore_sigterm():
                    try:
                        self.delete()
                    except Exception as exc:  # noqa: BLE001 - report, but keep the original outcome
                        log.error("could not delete %s: %s (delete it by hand)", self.what, exc)


@contextlib.contextmanager
def _ignore_sigterm() -> Iterator[None]:
    """While the job is being deleted a second SIGTERM must not interrupt the deletion."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_job(manifest: dict[str, Any], timeout_s: float | None = None, *, api_client: ApiClient | None = None,
            watch_s: float = 60.0, image_pull_grace_s: float = 600.0) -> dict[str, Any]:
    """Validate, create or adopt, follow and delete one job (module docstring); returns its final object.

    ``timeout_s`` defaults to the job's ``activeDeadlineSeconds`` + :data:`DEADLINE_GRACE_S`.
    Raises :class:`JobFailed` (with the reason), ``TimeoutError`` or :class:`JobCancelled`; the
    job is deleted in every case.
    """
    if timeout_s is None:
        deadline = (manifest.get("spec") or {}).get("activeDeadlineSeconds")
        timeout_s = float(deadline + DEADLINE_GRACE_S) if deadline else float(DEFAULT_TIMEOUT_S)
    if manifest.get("kind") not in JOB_KINDS:
        raise ValueError(f"cannot run kind {manifest.get('kind')!r}; known: {sorted(JOB_KINDS)}")
    validate_against_crd(manifest)
    runner = JobRunner(manifest, api_client, watch_s=watch_s, image_pull_grace_s=image_pull_grace_s)
    return runner.run(timeout_s)

