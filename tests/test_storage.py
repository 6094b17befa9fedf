"""Atomic storage on local disk (the S3 path is exercised against moto in the S3 tests)."""

from __future__ import annotations

import json

import pytest

from helpers import S3_BUCKET
from medisyn import storage


def test_write_read_roundtrip(tmp_path):
    uri = f"file://{tmp_path}/a/b/obj.json"
    storage.write_json(uri, {"x": 1})
    assert storage.read_json(uri) == {"x": 1}
    assert storage.exists(uri)
    # no temp files left beside the object
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["obj.json"]


def test_plain_paths_and_file_uris_are_the_same(tmp_path):
    storage.write_text(str(tmp_path / "t.txt"), "hello")
    assert storage.read_text(f"file://{tmp_path}/t.txt") == "hello"
    assert storage.normalize(str(tmp_path) + "/") == f"file://{tmp_path}"


def test_staged_dir_publishes_only_on_success(tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(RuntimeError):
        with storage.staged_dir(out) as d:
            (d / "part-0.txt").write_text("half")
            raise RuntimeError("crash mid-write")
    assert not storage.exists(out)
    assert not storage.is_complete(out)
    with storage.staged_dir(out, {"rows": 2}) as d:
        (d / "part-0.txt").write_text("full")
    assert storage.is_complete(out)
    assert json.loads(storage.read_text(storage.join(out, storage.COMPLETE_MARKER))) == {"rows": 2}


def test_publish_replaces_previous_output_whole(tmp_path):
    out = str(tmp_path / "out")
    with storage.staged_dir(out) as d:
        (d / "old.txt").write_text("1")
    with storage.staged_dir(out) as d:
        (d / "new.txt").write_text("2")
    names = sorted(p.rsplit("/", 1)[-1] for p in storage.listdir(out))
    assert names == [storage.COMPLETE_MARKER, "new.txt"]
    # no staging leftovers next to the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_require_complete_rejects_partial(tmp_path):
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "x").write_text("x")
    with pytest.raises(FileNotFoundError, match="incomplete"):
        storage.require_complete(str(tmp_path / "partial"))


def test_listdir_hides_staging_entries(tmp_path):
    (tmp_path / ".out.staging-1234").mkdir()
    (tmp_path / "visible").mkdir()
    assert [u.rsplit("/", 1)[-1] for u in storage.listdir(str(tmp_path))] == ["visible"]


def test_unsupported_scheme():
    with pytest.raises(ValueError, match="unsupported storage scheme"):
        storage.filesystem("gopher://x/y")


def test_s3_roundtrip_and_atomic_prefix(s3_endpoint, tmp_path):
    uri = f"s3://{S3_BUCKET}/storage-test/out"
    assert not storage.is_complete(uri)
    with storage.staged_dir(uri, {"n": 1}) as d:
        (d / "sub").mkdir()
        (d / "sub" / "a.bin").write_bytes(b"\x00\x01")
    assert storage.is_complete(uri)
    assert storage.read_bytes(storage.join(uri, "sub/a.bin")) == b"\x00\x01"
    with storage.local_copy(uri) as local:
        assert (local / "sub" / "a.bin").read_bytes() == b"\x00\x01"
    storage.write_json(storage.join(uri, "x.json"), {"k": "v"})
    assert storage.read_json(storage.join(uri, "x.json")) == {"k": "v"}
    storage.remove(uri)
    assert not storage.exists(storage.join(uri, "sub/a.bin"))
