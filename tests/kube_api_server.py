"""A Kubernetes API server on loopback, for driving the launchers through the real ``kubernetes`` client.

It speaks, over plain HTTP/1.1, the part of the API that MediSyn's job launchers use (issue #13):

* discovery: ``/api``, ``/api/v1``, ``/apis`` (APIGroupList), ``/apis/<group>`` and
  ``/apis/<group>/<version>`` (APIResourceList); which operators are "installed" is chosen per server
  (``KubeAPIServer(kinds=...)``), so "Trainer v2 absent" is one argument;
* custom objects (TrainJob, TrainingRuntime, PyTorchJob, RayJob): create (the body is validated with
  jsonschema against the operator's own CRD from ``../shared/crds``, else the package's copy: 422
  Invalid when it does not match, 409 AlreadyExists on a second create), get, list with
  ``labelSelector`` / ``fieldSelector=metadata.name=``, watch (``?watch=true``: chunked JSON lines of
  ADDED / MODIFIED / DELETED events from ``resourceVersion``, ending after ``timeoutSeconds``),
  delete (404 NotFound when absent; unless ``propagationPolicy=Orphan`` the pods it owns go with it);
* pods: list / watch / get / delete, and ``pods/<name>/log`` with ``follow=true`` (the stream stays
  open until the pod terminates or is deleted).

Errors are ``Status`` objects with the real reasons and codes. What the operators would do is played
by the test (:class:`Operator`): it adds the pods a job's controller would create, with the labels the
real operators set, moves the job through its conditions, writes log lines, ends containers with
``OOMKilled`` and the like. Pods are owned by the job directly (the real chain is TrainJob -> JobSet
-> Job -> Pod); deletion is immediate where a real server would first set ``deletionTimestamp``.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_CRDS = REPO.parent / "shared" / "crds"
PACKAGE_CRDS = REPO / "src" / "medisyn" / "crds"


@dataclass(frozen=True)
class Resource:
    kind: str
    group: str
    version: str
    plural: str
    crd_file: str | None  # None: a core resource (pods), not validated here


RESOURCES: dict[str, Resource] = {r.kind: r for r in (
    Resource("TrainJob", "trainer.kubeflow.org", "v1alpha1", "trainjobs", "trainer.kubeflow.org_trainjobs.yaml"),
    Resource("TrainingRuntime", "trainer.kubeflow.org", "v1alpha1", "trainingruntimes",
             "trainer.kubeflow.org_trainingruntimes.yaml"),
    Resource("PyTorchJob", "kubeflow.org", "v1", "pytorchjobs", "kubeflow.org_pytorchjobs.yaml"),
    Resource("RayJob", "ray.io", "v1", "rayjobs", "ray.io_rayjobs.yaml"),
)}
ALL_KINDS = tuple(RESOURCES)
V1_KINDS = ("PyTorchJob", "RayJob")  # a cluster with the Training Operator v1 and KubeRay, no Trainer v2
POD = Resource("Pod", "", "v1", "pods", None)
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_SCHEMAS: dict[str, dict[str, Any]] = {}


def crd_schema(res: Resource) -> dict[str, Any]:
    """The openAPIV3Schema of ``res``'s served version, from the operator's CRD file."""
    assert res.crd_file
    if res.crd_file not in _SCHEMAS:
        path = SHARED_CRDS / res.crd_file
        if not path.exists():
            path = PACKAGE_CRDS / res.crd_file
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        doc = yaml.load(path.read_text(), Loader=loader)
        (version,) = [v for v in doc["spec"]["versions"] if v["name"] == res.version]
        _SCHEMAS[res.crd_file] = version["schema"]["openAPIV3Schema"]
    return _SCHEMAS[res.crd_file]


def schema_errors(res: Resource, obj: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(crd_schema(res))
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message[:200]}"
            for e in validator.iter_errors(obj)]


def _status(code: int, reason: str, message: str, **details: Any) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "details": details, "code": code}


def _matches(obj: dict[str, Any], label_selector: str, field_selector: str) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, (t.strip() for t in label_selector.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k) != v:
                return False
        elif term not in labels:
            return False
    for term in filter(None, (t.strip() for t in field_selector.split(","))):
        k, v = term.replace("==", "=").split("=", 1)
        if k == "metadata.name" and obj["metadata"]["name"] != v:
            return False
        if k == "metadata.namespace" and obj["metadata"].get("namespace") != v:
            return False
    return True


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class KubeAPIServer:
    """The server and its store; a context manager (``with KubeAPIServer() as api:``)."""

    def __init__(self, kinds: tuple[str, ...] = ALL_KINDS):
        self.kinds = kinds
        self.served = [RESOURCES[k] for k in kinds]
        self.cond = threading.Condition()
        self.rv = 0
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (plural, namespace, name) -> object
        self.events: list[tuple[int, str, str, dict[str, Any]]] = []  # (rv, plural, type, object)
        self.logs: dict[tuple[str, str], list[str]] = {}  # (namespace, pod) -> lines
        self.requests: list[tuple[str, str, int]] = []  # (method, path?query, status code)
        self.on_create: list[Callable[[dict[str, Any]], None]] = []  # called in a new thread per created job
        self.open_watches = 0
        self.closed = False
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="kube-api", daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> KubeAPIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self._httpd.shutdown()
        self._httpd.server_close()

    def api_client(self) -> Any:
        """A ``kubernetes.client.ApiClient`` pointed at this server."""
        from kubernetes import client

        return client.ApiClient(client.Configuration(host=self.url))

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """A kubeconfig for this server (``$KUBECONFIG`` makes ``load_kube_config`` use it)."""
        cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "loopback",
               "clusters": [{"name": "loopback", "cluster": {"server": self.url}}],
               "users": [{"name": "tester", "user": {"token": "test-token"}}],
               "contexts": [{"name": "loopback", "context": {"cluster": "loopback", "user": "tester",
                                                             "namespace": namespace}}]}
        path.write_text(yaml.safe_dump(cfg))
        return path

    # -- the store (also the test's handle on it) --------------------------------------------
    def _record(self, plural: str, etype: str, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.events.append((self.rv, plural, etype, json.loads(json.dumps(obj))))
        self.cond.notify_all()

    def create(self, res: Resource, namespace: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        meta = body.get("metadata") or {}
        name = meta.get("name", "")
        if res.crd_file:
            errors = schema_errors(res, body)
            if body.get("apiVersion") != f"{res.group}/{res.version}" or body.get("kind") != res.kind:
                errors.append(f"apiVersion/kind: want {res.group}/{res.version} {res.kind}")
            if not _NAME.match(name) or len(name) > 253:
                errors.append(f"metadata.name: {name!r} is not a DNS-1123 subdomain")
            if errors:
                return 422, _status(422, "Invalid", f"{res.kind}.{res.group} {name!r} is invalid: "
                                    + "; ".join(errors[:10]), name=name, kind=res.plural)
        with self.cond:
            key = (res.plural, namespace, name)
            if key in self.objects:
                return 409, _status(409, "AlreadyExists", f'{res.plural}.{res.group} "{name}" already exists',
                                    name=name, group=res.group, kind=res.plural)
            obj = json.loads(json.dumps(body))
            obj.pop("status", None)  # the status subresource: a create never sets it
            obj["metadata"].update(namespace=namespace, uid=str(uuid.uuid4()), generation=1,
                                   creationTimestamp=_now())
            self.objects[key] = obj
            self._record(res.plural, "ADDED", obj)
            created = json.loads(json.dumps(obj))
        if res.crd_file:
            for hook in list(self.on_create):
                threading.Thread(target=hook, args=(created,), daemon=True).start()
        return 201, created

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self.cond:
            obj = self.objects.get((plural, namespace, name))
            return json.loads(json.dumps(obj)) if obj else None

    def list(self, plural: str, namespace: str, label_selector: str = "", field_selector: str = "") -> list[dict]:
        with self.cond:
            return [json.loads(json.dumps(o)) for (p, ns, _), o in sorted(self.objects.items())
                    if p == plural and ns == namespace and _matches(o, label_selector, field_selector)]

    def update(self, plural: str, namespace: str, name: str, change: Callable[[dict[str, Any]], None]) -> dict:
        """Apply ``change`` to the stored object (a controller writing status); one MODIFIED event."""
        with self.cond:
            obj = self.objects[(plural, namespace, name)]
            change(obj)
            res = next((r for r in RESOURCES.values() if r.plural == plural), None)
            if res is not None and res.crd_file:
                errors = schema_errors(res, obj)
                assert not errors, f"the test's operator wrote an invalid {res.kind}: {errors}"
            self._record(plural, "MODIFIED", obj)
            return json.loads(json.dumps(obj))

    def delete(self, plural: str, namespace: str, name: str, propagation: str = "Background") -> dict | None:
        with self.cond:
            obj = self.objects.pop((plural, namespace, name), None)
            if obj is None:
                return None
            self._record(plural, "DELETED", obj)
            if propagation != "Orphan":
                uid = obj["metadata"]["uid"]
                for key, child in list(self.objects.items()):
                    owners = child["metadata"].get("ownerReferences") or []
                    if any(o.get("uid") == uid for o in owners):
                        self.objects.pop(key)
                        self._record(key[0], "DELETED", child)
            return obj

    def jobs(self, kind: str, namespace: str = "ml") -> list[dict[str, Any]]:
        return self.list(RESOURCES[kind].plural, namespace)

    def pods(self, namespace: str = "ml", label_selector: str = "") -> list[dict[str, Any]]:
        return self.list("pods", namespace, label_selector)

    def append_log(self, namespace: str, pod: str, *lines: str) -> None:
        with self.cond:
            self.logs.setdefault((namespace, pod), []).extend(lines)
            self.cond.notify_all()

    def created(self, plural: str) -> list[str]:
        """Names of the objects created (201) of ``plural``, in order, from the request log."""
        with self.cond:
            return [e[3]["metadata"]["name"] for e in self.events if e[1] == plural and e[2] == "ADDED"]

    def wait_until(self, predicate: Callable[[], bool], timeout_s: float = 60.0) -> None:
        end = time.monotonic() + timeout_s
        with self.cond:
            while not predicate():
                left = end - time.monotonic()
                if left <= 0 or self.closed:
                    raise TimeoutError("the condition did not come true")
                self.cond.wait(min(left, 0.5))

    # -- streams -----------------------------------------------------------------------------
    def watch(self, plural: str, namespace: str, since: int | None, label_selector: str, field_selector: str,
              timeout_s: float) -> Iterator[dict[str, Any]]:
        end = time.monotonic() + timeout_s
        with self.cond:
            self.open_watches += 1
            self.cond.notify_all()
            if since is None:  # no resourceVersion: the current objects as ADDED, then what follows
                pending = [{"type": "ADDED", "object": o} for o in self.list(plural, namespace, label_selector,
                                                                              field_selector)]
                since = self.rv
            else:
                pending = []
        try:
            while True:
                yield from pending
                with self.cond:
                    while True:
                        fresh = [(rv, t, o) for rv, p, t, o in self.events if rv > since and p == plural
                                 and o["metadata"].get("namespace") == namespace
                                 and _matches(o, label_selector, field_selector)]
                        left = end - time.monotonic()
                        if fresh or left <= 0 or self.closed:
                            break
                        self.cond.wait(min(left, 0.5))
                    if not fresh:
                        return
                    since = fresh[-1][0]
                    pending = [{"type": t, "object": o} for _, t, o in fresh]
        finally:
            with self.cond:
                self.open_watches -= 1

    def follow_log(self, namespace: str, pod: str, follow: bool) -> Iterator[str]:
        sent = 0
        while True:
            with self.cond:
                while True:
                    lines = self.logs.get((namespace, pod), [])
                    current = self.objects.get(("pods", namespace, pod))
                    phase = ((current or {}).get("status") or {}).get("phase")
                    ended = current is None or phase in ("Succeeded", "Failed") or not follow or self.closed
                    if len(lines) > sent or ended:
                        break
                    self.cond.wait(0.5)
                new, sent = lines[sent:], len(lines)
            yield from new
            if ended and sent >= len(self.logs.get((namespace, pod), [])):
                return


def _handler(server: KubeAPIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        # -- responses -----------------------------------------------------------------------
        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            server.requests.append((self.command, self.path, code))

        def _stream(self, chunks: Iterator[bytes], content_type: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            server.requests.append((self.command, self.path, 200))
            try:
                for chunk in chunks:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        def _body(self) -> dict[str, Any]:
            n = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(n) or b"{}") if n else {}

        # -- routing ---------------------------------------------------------------------------
        def _route(self) -> tuple[Resource | None, list[str], dict[str, str]]:
            url = urlparse(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            parts = [p for p in url.path.split("/") if p]
            if parts[:2] == ["api", "v1"] and len(parts) >= 5 and parts[2] == "namespaces" and parts[4] == "pods":
                return POD, [parts[3], *parts[5:]], query
            if parts[:1] == ["apis"] and len(parts) >= 6 and parts[3] == "namespaces":
                for res in server.served:
                    if (res.group, res.version, res.plural) == (parts[1], parts[2], parts[5]):
                        return res, [parts[4], *parts[6:]], query
            return None, parts, query

        def _discovery(self, parts: list[str]) -> dict[str, Any] | None:
            if parts == ["version"]:
                return {"major": "1", "minor": "33", "gitVersion": "v1.33.0-loopback"}
            if parts == ["api"]:
                return {"kind": "APIVersions", "versions": ["v1"],
                        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}
            if parts == ["api", "v1"]:
                verbs = ["create", "delete", "get", "list", "watch"]
                return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1", "resources": [
                    {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod", "verbs": verbs},
                    {"name": "pods/log", "singularName": "", "namespaced": True, "kind": "Pod", "verbs": ["get"]}]}
            groups: dict[str, list[Resource]] = {}
            for res in server.served:
                groups.setdefault(res.group, []).append(res)

            def group(name: str) -> dict[str, Any]:
                versions = sorted({r.version for r in groups[name]})
                gv = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
                return {"kind": "APIGroup", "apiVersion": "v1", "name": name, "versions": gv,
                        "preferredVersion": gv[0]}

            if parts == ["apis"]:
                return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [group(g) for g in sorted(groups)]}
            if len(parts) == 2 and parts[0] == "apis" and parts[1] in groups:
                return group(parts[1])
            if len(parts) == 3 and parts[0] == "apis" and parts[1] in groups:
                served = [r for r in groups[parts[1]] if r.version == parts[2]]
                if not served:
                    return None
                verbs = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
                resources = []
                for r in served:
                    resources.append({"name": r.plural, "singularName": r.kind.lower(), "namespaced": True,
                                      "kind": r.kind, "verbs": verbs})
                    resources.append({"name": f"{r.plural}/status", "singularName": "", "namespaced": True,
                                      "kind": r.kind, "verbs": ["get", "patch", "update"]})
                return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{parts[1]}/{parts[2]}",
                        "resources": resources}
            return None

        def _not_found(self, res: Resource | None, name: str) -> None:
            what = f"{res.plural}.{res.group}".rstrip(".") if res else "the server"
            self._send(404, _status(404, "NotFound", f'{what} "{name}" not found', name=name,
                                    kind=res.plural if res else ""))

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            res, rest, q = self._route()
            if res is None:
                found = self._discovery(rest)
                if found is None:
                    self._not_found(None, "/".join(rest))
                else:
                    self._send(200, found)
                return
            ns, *tail = rest
            if not tail:  # list / watch
                label, field = q.get("labelSelector", ""), q.get("fieldSelector", "")
                if q.get("watch", "").lower() in ("true", "1"):
                    rv = q.get("resourceVersion") or None
                    since = int(rv) if rv not in (None, "0") else None
                    events = server.watch(res.plural, ns, since, label, field, float(q.get("timeoutSeconds", 60)))
                    self._stream((json.dumps(e).encode() + b"\n" for e in events), "application/json")
                    return
                items = server.list(res.plural, ns, label, field)
                kind = f"{res.kind}List"
                api_version = f"{res.group}/{res.version}".lstrip("/")
                self._send(200, {"apiVersion": api_version, "kind": kind, "items": items,
                                 "metadata": {"resourceVersion": str(server.rv)}})
                return
            name = tail[0]
            obj = server.get(res.plural, ns, name)
            if obj is None:
                self._not_found(res, name)
                return
            if res is POD and tail[1:] == ["log"]:
                follow = q.get("follow", "").lower() in ("true", "1")
                lines = server.follow_log(ns, name, follow)
                if follow:
                    self._stream(((ln + "\n").encode() for ln in lines), "text/plain")
                else:
                    data = "".join(ln + "\n" for ln in lines).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    server.requests.append((self.command, self.path, 200))
                return
            self._send(200, obj)

        def do_POST(self) -> None:  # noqa: N802
            res, rest, _ = self._route()
            if res is None or len(rest) != 1:
                self._not_found(res, "/".join(rest))
                return
            body = self._body()
            if res is POD:
                with server.cond:
                    body["metadata"]["namespace"] = rest[0]
                    body["metadata"].setdefault("uid", str(uuid.uuid4()))
                    server.objects[("pods", rest[0], body["metadata"]["name"])] = body
                    server._record("pods", "ADDED", body)
                self._send(201, body)
                return
            code, obj = server.create(res, rest[0], body)
            self._send(code, obj)

        def do_DELETE(self) -> None:  # noqa: N802
            res, rest, q = self._route()
            if res is None or len(rest) != 2:
                self._not_found(res, "/".join(rest))
                return
            options = self._body()
            policy = q.get("propagationPolicy") or options.get("propagationPolicy") or "Background"
            obj = server.delete(res.plural, rest[0], rest[1], policy)
            if obj is None:
                self._not_found(res, rest[1])
                return
            self._send(200, obj)

    return Handler


# ----------------------------------------------------------------------------------------------
# The operators' side, played by a test: pods with the operators' labels, conditions, logs
# ----------------------------------------------------------------------------------------------
def _condition(ctype: str, reason: str, message: str = "") -> dict[str, Any]:
    return {"type": ctype, "status": "True", "reason": reason, "message": message or reason,
            "lastTransitionTime": _now(), "lastUpdateTime": _now()}


class Operator:
    """Plays the operator of one job: ``op = Operator(api, job)``, then ``op.start()``, ``op.log(...)``,
    ``op.succeed()`` / ``op.fail(...)``. Statuses and pod labels are the ones each operator writes."""

    def __init__(self, api: KubeAPIServer, job: dict[str, Any]):
        self.api, self.job = api, job
        self.kind = job["kind"]
        self.res = RESOURCES[self.kind]
        self.name, self.ns = job["metadata"]["name"], job["metadata"]["namespace"]
        self.pod_names: list[str] = []

    # pods, named and labelled as the operators do; the first one is the lead
    def _pods(self) -> list[tuple[str, dict[str, str], str]]:
        spec = self.job["spec"]
        if self.kind == "TrainJob":
            n = int(spec.get("trainer", {}).get("numNodes", 1))
            return [(f"{self.name}-node-0-{i}-x{i}", {"jobset.sigs.k8s.io/jobset-name": self.name,
                                                      "jobset.sigs.k8s.io/replicatedjob-name": "node",
                                                      "batch.kubernetes.io/job-completion-index": str(i)}, "node")
                    for i in range(n)]
        if self.kind == "PyTorchJob":
            specs = spec["pytorchReplicaSpecs"]
            pods = [(f"{self.name}-master-0", "master", 0)]
            workers = specs.get("Worker", {}).get("replicas", 0)
            pods += [(f"{self.name}-worker-{i}", "worker", i) for i in range(workers)]
            return [(n, {"training.kubeflow.org/job-name": self.name, "training.kubeflow.org/replica-type": t,
                         "training.kubeflow.org/replica-index": str(i)}, "pytorch") for n, t, i in pods]
        # RayJob: the submitter Job's pod (the driver's log) and the Ray head
        return [(f"{self.name}-sub1", {"batch.kubernetes.io/job-name": self.name, "job-name": self.name},
                 "ray-job-submitter"),
                (f"{self.name}-raycluster-head", {"ray.io/cluster": f"{self.name}-raycluster",
                                                  "ray.io/node-type": "head"}, "ray-head")]

    @property
    def lead(self) -> str:
        return self.pod_names[0]

    def start(self) -> None:
        """The job's pods are created and running; the job reports itself running."""
        job = self.api.get(self.res.plural, self.ns, self.name)
        assert job is not None
        owner = {"apiVersion": job["apiVersion"], "kind": self.kind, "name": self.name,
                 "uid": job["metadata"]["uid"], "controller": True}
        with self.api.cond:
            for name, labels, container in self._pods():
                pod = {"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": name, "namespace": self.ns, "labels": labels, "uid": str(uuid.uuid4()),
                                    "ownerReferences": [owner]},
                       "spec": {"containers": [{"name": container, "image": "img"}]},
                       "status": {"phase": "Running", "containerStatuses": [
                           {"name": container, "ready": True, "restartCount": 0,
                            "state": {"running": {"startedAt": _now()}}}]}}
                self.api.objects[("pods", self.ns, name)] = pod
                self.api._record("pods", "ADDED", pod)
                self.pod_names.append(name)
        self.set_status("running")

    def wait_for_launcher(self) -> None:
        """Until the launcher watches the job (then every later change reaches it as an event)."""
        self.api.wait_until(lambda: self.api.open_watches > 0)

    def log(self, *lines: str) -> None:
        self.api.append_log(self.ns, self.lead, *lines)

    def end_pod(self, name: str, exit_code: int = 0, reason: str = "Completed", waiting: str | None = None) -> None:
        def change(pod: dict[str, Any]) -> None:
            cs = pod["status"]["containerStatuses"][0]
            if waiting:
                pod["status"]["phase"] = "Pending"
                cs["state"] = {"waiting": {"reason": waiting, "message": f'Back-off pulling image "img": {waiting}'}}
            else:
                pod["status"]["phase"] = "Succeeded" if exit_code == 0 else "Failed"
                cs["state"] = {"terminated": {"exitCode": exit_code, "reason": reason, "finishedAt": _now()}}
        self.api.update("pods", self.ns, name, change)

    def set_status(self, state: str, reason: str = "", message: str = "") -> None:
        def change(job: dict[str, Any]) -> None:
            job["status"] = self._status(state, reason, message)
        self.api.update(self.res.plural, self.ns, self.name, change)

    def _status(self, state: str, reason: str, message: str) -> dict[str, Any]:
        if self.kind == "RayJob":
            return {"running": {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
                    "succeeded": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"},
                    "failed": {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED",
                               "reason": reason or "AppFailed", "message": message or "job failed"}}[state]
        if self.kind == "TrainJob":
            created = _condition("Created", "JobsCreationSucceeded", "Succeeded to create Jobs")
            last = {"running": [], "succeeded": [_condition("Complete", "JobsCompleted", "jobset completed")],
                    "failed": [_condition("Failed", reason or "FailedJobs", message or "jobset failed")]}[state]
            return {"conditions": [created, *last]}
        created = _condition("Created", "PyTorchJobCreated", "PyTorchJob is created.")
        running = _condition("Running", "PyTorchJobRunning", "PyTorchJob is running.")
        last = {"running": [], "succeeded": [_condition("Succeeded", "PyTorchJobSucceeded", "done")],
                "failed": [_condition("Failed", reason or "PyTorchJobFailed", message or "failed")]}[state]
        return {"conditions": [created, running, *last]}

    def succeed(self) -> None:
        for name in self.pod_names:
            self.end_pod(name)
        self.set_status("succeeded")

    def fail(self, reason: str = "", message: str = "", exit_code: int = 1, pod_reason: str = "Error") -> None:
        self.end_pod(self.lead, exit_code=exit_code, reason=pod_reason)
        self.set_status("failed", reason, message)


def run_operator(api: KubeAPIServer, script: Callable[[Operator], None]) -> list[BaseException]:
    """Run ``script`` as the operator of every job created on ``api``; returns where its errors go."""
    errors: list[BaseException] = []

    def hook(job: dict[str, Any]) -> None:
        if job["kind"] not in ("TrainJob", "PyTorchJob", "RayJob"):
            return
        try:
            script(Operator(api, job))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    api.on_create.append(hook)
    return errors
