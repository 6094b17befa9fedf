"""Object storage cut, slowed and restored mid-operation (a TCP proxy in front of moto), replace by
version, and the pre-flight checks (issue #12). docs/operations.md lists what an operator sees."""

from __future__ import annotations

import threading

import pytest

from faults.proxy import TCPProxy
from helpers import S3_BUCKET, demo_config
from medisyn import preflight, stages, storage

pytestmark = [pytest.mark.s3, pytest.mark.timeout(120)]

FAST = storage.RetryPolicy(attempts=3, backoff_s=0.2, max_backoff_s=1.0, connect_timeout_s=1.0, read_timeout_s=0.5)


@pytest.fixture()
def proxy(s3_endpoint):
    """The S3 server behind a proxy the test controls; storage configured through it with FAST."""
    host, port = s3_endpoint.removeprefix("http://").split(":")
    with TCPProxy((host, int(port))) as px:
        storage.configure(px.url, FAST)
        try:
            yield px
        finally:
            storage.configure(s3_endpoint, storage.RetryPolicy())


def _uri(tmp_path, name: str) -> str:
    return f"s3://{S3_BUCKET}/faults/{tmp_path.name}/{name}"


def test_cut_then_restored_mid_operation_retries_and_succeeds(proxy, tmp_path):
    uri = _uri(tmp_path, "obj.txt")
    storage.write_text(uri, "v1")
    proxy.cut()
    threading.Timer(0.5, proxy.restore).start()  # back before the budget (3 tries, backoff 0.2 + 0.4 s) is spent
    assert storage.read_text(uri) == "v1"
    proxy.cut()
    threading.Timer(0.5, proxy.restore).start()
    storage.write_text(uri, "v2")
    assert storage.read_text(uri) == "v2"


def test_slow_store_still_answers(proxy, tmp_path):
    uri = _uri(tmp_path, "slow.txt")
    proxy.slow(0.2)
    storage.write_text(uri, "slow but fine")
    assert storage.read_text(uri) == "slow but fine"


@pytest.mark.parametrize("fault", ["cut", "blackhole"])
def test_past_the_retry_budget_a_clear_error_names_the_uri(proxy, tmp_path, fault):
    """Down (refused) or hanging (accepts, never answers): bounded by the policy, then StorageError."""
    uri = _uri(tmp_path, "gone.txt")
    getattr(proxy, fault)()
    with pytest.raises(storage.StorageError, match=rf"read {uri} failed after 3 tries"):
        storage.read_text(uri)
    with pytest.raises(storage.StorageError, match="write .*failed after 3 tries"):
        storage.write_text(uri, "x")


def test_a_cut_during_publish_leaves_the_previous_version_complete(proxy, tmp_path, monkeypatch):
    """Replace by version: the new version is uploaded beside the old one; a cut mid-upload leaves the
    old version complete and readable and nothing partial in its place; the next publish cleans up."""
    uri = _uri(tmp_path, "dataset")
    with storage.staged_dir(uri, {"v": 1}) as d:
        (d / "a.bin").write_bytes(b"old-a")
        (d / "b.bin").write_bytes(b"old-b")
    fs, _ = storage.filesystem(uri)
    real_put = fs.put_file
    calls = []

    def put_then_cut(src, dst, *a, **k):
        calls.append(dst)
        if len(calls) == 2:
            proxy.cut()  # the store goes away half-way through the upload
        return real_put(src, dst, *a, **k)

    monkeypatch.setattr(fs, "put_file", put_then_cut)
    with pytest.raises(storage.StorageError, match="upload s3://"):
        with storage.staged_dir(uri, {"v": 2}) as d:
            for name in ("a.bin", "b.bin", "c.bin"):
                (d / name).write_bytes(b"new-" + name.encode())
    proxy.restore()
    monkeypatch.undo()
    assert storage.is_complete(uri)
    assert storage.read_json(storage.join(uri, storage.COMPLETE_MARKER)) == {"v": 1}
    assert storage.read_bytes(storage.join(uri, "a.bin")) == b"old-a"
    assert not storage.exists(storage.join(uri, "c.bin"))
    monkeypatch.setattr(storage, "_owner_alive", lambda name: False)  # the next run is another process
    with storage.staged_dir(uri, {"v": 3}) as d:
        (d / "c.bin").write_bytes(b"v3")
    assert [u.rsplit("/", 1)[-1] for u in storage.listdir(uri)] == [storage.COMPLETE_MARKER, "c.bin"]
    parent = uri.rsplit("/", 1)[0]
    fs.invalidate_cache()
    assert [p for p in fs.ls(parent.removeprefix("s3://")) if ".staging-" in p] == []  # no leftovers


def test_a_swap_killed_half_way_is_rolled_forward(s3_endpoint, tmp_path, monkeypatch):
    """A kill while the complete new version is moved into place: the prefix is incomplete (never a
    mix that looks complete) and the next run's recovery finishes the move."""
    uri = _uri(tmp_path, "scores")
    with storage.staged_dir(uri, {"v": 1}) as d:
        (d / "old.json").write_text("{}")
    fs, _ = storage.filesystem(uri)
    real_copy = fs.copy

    def copy_then_die(src, dst, *a, **k):
        real_copy(src, dst, *a, **k)
        raise KeyboardInterrupt("killed mid-swap")

    monkeypatch.setattr(fs, "copy", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        with storage.staged_dir(uri, {"v": 2}) as d:
            (d / "new.json").write_text("{}")
            (d / "more.json").write_text("{}")
    monkeypatch.undo()
    assert not storage.is_complete(uri)
    # the staging prefix belongs to this (live) process; a new process would see its owner gone
    monkeypatch.setattr(storage, "_owner_alive", lambda name: False)
    done = storage.recover(uri)
    assert any("rolled forward" in line for line in done)
    assert storage.read_json(storage.join(uri, storage.COMPLETE_MARKER)) == {"v": 2}
    assert sorted(u.rsplit("/", 1)[-1] for u in storage.listdir(uri)) == [storage.COMPLETE_MARKER, "more.json",
                                                                          "new.json"]


# ----------------------------------------------------------------------------------------------
# Pre-flight: found in seconds, before any heavy work
# ----------------------------------------------------------------------------------------------
@pytest.fixture()
def never_called(monkeypatch):
    """The preprocess stage's body: it must not run when a pre-flight check fails."""
    calls = []
    spec = stages.STAGES["preprocess"]
    monkeypatch.setitem(stages.STAGES, "preprocess", stages.Stage(
        spec.name, lambda cfg, raw, out: calls.append(out), output=spec.output, tracked=spec.tracked))
    return calls


def test_unreachable_object_store_fails_preflight(proxy, tmp_path, never_called):
    cfg = demo_config(tmp_path, ["storage.retry_attempts=2", "storage.retry_backoff_s=0.1",
                                 "storage.connect_timeout_s=1", "storage.read_timeout_s=1",
                                 f"storage.s3_endpoint_url={proxy.url}"])
    proxy.blackhole()
    out = _uri(tmp_path, "dataset")
    with pytest.raises(preflight.PreflightError, match=rf"output {out} is not writable.*StorageError"):
        stages.run("preprocess", cfg, raw=str(tmp_path), out=out)
    assert never_called == []


def test_unwritable_local_output_fails_preflight(tmp_path, never_called):
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(preflight.PreflightError, match="is not writable"):
        stages.run("preprocess", demo_config(tmp_path), raw=str(tmp_path), out=str(tmp_path / "a-file" / "dataset"))
    assert never_called == []


@pytest.mark.parametrize("fault", ["cut", "blackhole"])
def test_unreachable_mlflow_fails_preflight_before_any_work(proxy, tmp_path, never_called, fault):
    """MLflow refused or hanging: a PreflightError within tracking.preflight_timeout_s; nothing published."""
    getattr(proxy, fault)()
    cfg = demo_config(tmp_path, [f"tracking.tracking_uri={proxy.url}", "tracking.preflight_timeout_s=1"])
    with pytest.raises(preflight.PreflightError, match=rf"MLflow tracking server {proxy.url} is unreachable"):
        stages.run("preprocess", cfg, raw=str(tmp_path), out=str(tmp_path / "dataset"))
    assert never_called == [] and not (tmp_path / "dataset").exists()
