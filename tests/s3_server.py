"""An S3 API on loopback for tests: moto's server, started and stopped by a fixture.

Usage (import the fixture into a test module or conftest.py)::

    from s3_server import S3_BUCKET, s3_endpoint  # noqa: F401

    def test_x(s3_endpoint):
        uri = f"s3://{S3_BUCKET}/some/prefix"   # the bucket exists; MEDISYN_S3_ENDPOINT_URL is set

Fake credentials are set at import time (before any Ray worker starts, so workers inherit them);
moto accepts any. The endpoint is also exported as ``$MEDISYN_S3_ENDPOINT_URL`` for the session.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

S3_BUCKET = "medisyn-test"

for _k, _v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ.setdefault(_k, _v)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto_server_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("moto_server")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("moto_server")
    return [found] if found else [sys.executable, "-m", "moto.server"]


@pytest.fixture(scope="session")
def s3_endpoint():
    """URL of a fresh moto S3 server on 127.0.0.1 with bucket ``S3_BUCKET`` created."""
    import boto3

    port = free_port()
    proc = subprocess.Popen(
        _moto_server_cmd() + ["-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    old = os.environ.get("MEDISYN_S3_ENDPOINT_URL")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/", timeout=1)
                break
            except Exception:  # noqa: BLE001 - not up yet
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=S3_BUCKET)
        os.environ["MEDISYN_S3_ENDPOINT_URL"] = url
        yield url
    finally:
        if old is None:
            os.environ.pop("MEDISYN_S3_ENDPOINT_URL", None)
        else:
            os.environ["MEDISYN_S3_ENDPOINT_URL"] = old
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
