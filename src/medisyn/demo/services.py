"""Local services on loopback for the demo and the tests: an MLflow server and an S3 API server (moto).

Both start in their own process session (``start_new_session=True``), so :meth:`stop` can signal the
whole process group: ``mlflow server`` forks gunicorn/uvicorn workers that would otherwise outlive
the parent (ENVIRONMENT.md). Both wait until they answer HTTP before returning from :meth:`start`.

    with MotoS3Server() as s3, MLflowServer(tmp / "mlflow", artifacts_uri="s3://mlflow/artifacts",
                                            s3_endpoint=s3.endpoint_url) as server:
        s3.create_bucket("mlflow")  # (or create it before starting the MLflow server)
        os.environ["MLFLOW_TRACKING_URI"] = server.tracking_uri
"""

from __future__ import annotations

import abc
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

DEFAULT_START_TIMEOUT_S = 120.0
DEFAULT_STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL for what is still alive after this long


def _tree(proc: subprocess.Popen) -> list[int]:
    """Pids of ``proc``, its process group and every descendant (a child that called setsid() left
    the group but is still a descendant)."""
    import psutil

    pids = {proc.pid}
    with contextlib.suppress(psutil.Error):
        pids.update(c.pid for c in psutil.Process(proc.pid).children(recursive=True))
    with contextlib.suppress(ProcessLookupError):
        pgid = os.getpgid(proc.pid)
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(p.pid) == pgid:
                    pids.add(p.pid)
    return sorted(pids)


def _alive(pids: list[int]) -> list[int]:
    import psutil

    out = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
    return out


def stop_process_tree(proc: subprocess.Popen, grace_s: float = DEFAULT_STOP_GRACE_S) -> None:
    """SIGTERM ``proc``'s process group and descendants; SIGKILL the survivors after ``grace_s``;
    return once all are gone (reaping ``proc``)."""
    pids = _tree(proc)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _alive(pids) if sig == signal.SIGKILL else pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)  # the group, as started (start_new_session: pgid == pid)
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 10.0)
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.1)
            if not _alive(pids):
                break
            time.sleep(0.1)
        if not _alive(pids):
            break
        pids = sorted(set(pids) | set(_tree(proc) if proc.poll() is None else []))
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _venv_bin(name: str) -> str:
    """The console script next to this interpreter (the venv's), else the one on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} nor on PATH")
    return found


class _ProcessService(abc.ABC):
    """A child process in its own session, polled over HTTP until ready, stopped by process group."""

    name = "service"

    def __init__(self, port: int | None, start_timeout_s: float, stop_grace_s: float = DEFAULT_STOP_GRACE_S):
        self.port = port or free_port()
        self.start_timeout_s = start_timeout_s
        self.stop_grace_s = stop_grace_s
        self.proc: subprocess.Popen | None = None
        self._log_path: Path | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @abc.abstractmethod
    def _command(self) -> list[str]:
        """The server's command line."""

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def _ready_path(self) -> str:
        return "/"

    def start(self):
        if self.proc is not None:
            return self
        fd, log_path = tempfile.mkstemp(prefix=f"medisyn-{self.name}-", suffix=".log")
        os.close(fd)
        self._log_path = Path(log_path)
        self._log = open(self._log_path, "wb")
        self.proc = subprocess.Popen(
            self._command(), stdout=self._log, stderr=subprocess.STDOUT, env=self._env(),
            start_new_session=True,  # own process group: stop() kills every forked worker too
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                log = self.log_tail()
                self.stop()
                raise RuntimeError(f"{self.name} exited with code {code} while starting:\n{log}")
            try:
                with urllib.request.urlopen(self.url + self._ready_path(), timeout=2) as resp:
                    if resp.status < 500:
                        return self
            except urllib.error.HTTPError as exc:  # any HTTP answer below 500 means it is serving
                if exc.code < 500:
                    return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.3)
        log = self.log_tail()
        self.stop()
        raise TimeoutError(f"{self.name} did not answer on {self.url} within {self.start_timeout_s:.0f}s:\n{log}")

    def log_tail(self, n_chars: int = 4000) -> str:
        if self._log_path and self._log_path.exists():
            return self._log_path.read_text(errors="replace")[-n_chars:]
        return ""

    def stop(self) -> None:
        """SIGTERM the server's process group and every descendant (also those that left the group),
        wait up to ``stop_grace_s`` for them to exit, then SIGKILL whatever is left and wait until it
        is gone (issue #12: MLflow's workers ignored SIGTERM and outlived the test that started them)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process_tree(proc, self.stop_grace_s)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class MotoS3Server(_ProcessService):
    """``moto_server`` on 127.0.0.1: an in-memory S3 API (data vanish when it stops)."""

    name = "moto-s3"

    def __init__(self, port: int | None = None, start_timeout_s: float = DEFAULT_START_TIMEOUT_S):
        super().__init__(port, start_timeout_s)

    @property
    def endpoint_url(self) -> str:
        return self.url

    def _command(self) -> list[str]:
        return [_venv_bin("moto_server"), "-H", "127.0.0.1", "-p", str(self.port)]

    def _ready_path(self) -> str:
        return "/moto-api/"

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
            aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
        )

    def create_bucket(self, name: str) -> str:
        """Create a bucket (idempotent); returns ``s3://name``."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return f"s3://{name}"


class MLflowServer(_ProcessService):
    """``mlflow server`` on 127.0.0.1 with a SQLite backend under ``store_dir``.

    ``artifacts_uri`` (e.g. ``s3://bucket/prefix``) is where the server stores artifacts, which it
    proxies (clients only talk HTTP to the server); default: ``store_dir/artifacts``. With an S3
    destination, ``s3_endpoint`` is passed to the server as ``MLFLOW_S3_ENDPOINT_URL``.
    ``backend_store_uri`` replaces the SQLite store (e.g. PostgreSQL, as in the chart). ``auth_config``
    (a basic_auth.ini, :func:`medisyn.access.write_auth_config`) turns on MLflow's basic auth
    (``--app-name basic-auth``) with ``flask_secret_key`` for its CSRF protection.
    """

    name = "mlflow"

    def __init__(
        self,
        store_dir: str | os.PathLike,
        artifacts_uri: str | None = None,
        port: int | None = None,
        s3_endpoint: str | None = None,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
        workers: int = 1,
        backend_store_uri: str | None = None,
        auth_config: str | os.PathLike | None = None,
        flask_secret_key: str | None = None,
    ):
        super().__init__(port, start_timeout_s)
        self.store_dir = Path(store_dir).resolve()
        self.artifacts_uri = artifacts_uri or (self.store_dir / "artifacts").as_uri()
        self.s3_endpoint = s3_endpoint
        self.workers = workers
        self.backend_store_uri = backend_store_uri or f"sqlite:///{self.store_dir / 'mlflow.db'}"
        self.auth_config = str(auth_config) if auth_config else None
        self.flask_secret_key = flask_secret_key

    @property
    def tracking_uri(self) -> str:
        return self.url

    def _command(self) -> list[str]:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        return [
            _venv_bin("mlflow"), "server",
            "--backend-store-uri", self.backend_store_uri,
            "--artifacts-destination", self.artifacts_uri,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", str(self.workers),
        ] + (["--app-name", "basic-auth"] if self.auth_config else [])

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # a client's, not the server's
            env.pop(key, None)
        if self.auth_config:
            env["MLFLOW_AUTH_CONFIG_PATH"] = self.auth_config
            env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = self.flask_secret_key or ""
        if self.s3_endpoint:
            env["MLFLOW_S3_ENDPOINT_URL"] = self.s3_endpoint
            env.setdefault("AWS_ACCESS_KEY_ID", "testing")
            env.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
            env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        return env

    def _ready_path(self) -> str:
        return "/health"
