"""Loopback services: they start, answer, and stop with every process they forked."""

from __future__ import annotations

import os
import sys
import time

import pytest

from medisyn.demo.services import MLflowServer, MotoS3Server, _ProcessService, free_port


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def wait_gone(pgid: int, timeout_s: float = 15) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not group_alive(pgid):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.s3
def test_moto_server_serves_s3_and_stops(tmp_path):
    with MotoS3Server() as s3:
        pgid = os.getpgid(s3.proc.pid)
        assert s3.create_bucket("medisyn-test") == "s3://medisyn-test"
        assert s3.create_bucket("medisyn-test") == "s3://medisyn-test"  # idempotent
        client = s3.client()
        client.put_object(Bucket="medisyn-test", Key="a/b.txt", Body=b"hello")
        assert client.get_object(Bucket="medisyn-test", Key="a/b.txt")["Body"].read() == b"hello"
        assert s3.endpoint_url.startswith("http://127.0.0.1:")
    assert wait_gone(pgid)
    assert s3.proc is None


@pytest.mark.mlflow
@pytest.mark.slow
def test_mlflow_server_with_s3_artifacts_stops_all_workers(tmp_path):
    import mlflow

    with MotoS3Server() as s3:
        s3.create_bucket("mlflow")
        server = MLflowServer(tmp_path / "mlflow", artifacts_uri="s3://mlflow/artifacts", s3_endpoint=s3.endpoint_url)
        server.start()
        try:
            pgid = os.getpgid(server.proc.pid)
            mlflow.set_tracking_uri(server.tracking_uri)
            mlflow.set_experiment("services-test")
            with mlflow.start_run():
                mlflow.log_text("artifact body", "note.txt")
            keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket="mlflow").get("Contents", [])]
            assert any(k.startswith("artifacts/") and k.endswith("note.txt") for k in keys)  # proxied to S3
            assert (tmp_path / "mlflow" / "mlflow.db").exists()
        finally:
            server.stop()
            mlflow.set_tracking_uri(None)
    assert wait_gone(pgid)  # uvicorn workers and job runners included


def test_start_failure_is_reported_and_cleaned_up(tmp_path):
    port = free_port()
    # A server that cannot start (port held by another) must raise, not hang, and leave nothing behind.
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", port))
        held.listen()
        server = MotoS3Server(port=port, start_timeout_s=20)
        with pytest.raises((RuntimeError, TimeoutError)):
            server.start()
    assert server.proc is None


def test_stop_is_idempotent():
    s = MotoS3Server()
    s.stop()  # never started: a no-op
    with s:
        pass
    s.stop()


STUBBORN_SERVER = r"""
import http.server, os, signal, subprocess, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the server itself ignores SIGTERM
child = '''
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if sys.argv[1] == "escape":
    os.setsid()  # leaves the server's process group: only the descendant walk finds it
open(sys.argv[2], "w").write(str(os.getpid()))
time.sleep(3600)
'''
for kind in ("worker", "escape"):
    subprocess.Popen([sys.executable, "-c", child, kind, os.path.join(sys.argv[2], kind + ".pid")])
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()
"""


class StubbornService(_ProcessService):
    """A server and two workers that ignore SIGTERM, one of which left the process group (issue #12)."""

    name = "stubborn"

    def __init__(self, pid_dir):
        super().__init__(None, start_timeout_s=30, stop_grace_s=1.0)
        self.pid_dir = pid_dir

    def _command(self):
        return [sys.executable, "-c", STUBBORN_SERVER, str(self.port), str(self.pid_dir)]


def test_stop_escalates_to_sigkill_for_workers_that_ignore_sigterm(tmp_path):
    import psutil

    service = StubbornService(tmp_path)
    service.start()
    try:
        server_pid = service.proc.pid
        deadline = time.monotonic() + 20
        while len(list(tmp_path.glob("*.pid"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = [server_pid] + [int(p.read_text()) for p in tmp_path.glob("*.pid")]
        assert len(pids) == 3 and all(psutil.pid_exists(p) for p in pids)
    finally:
        service.stop()
    survivors = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert survivors == []
