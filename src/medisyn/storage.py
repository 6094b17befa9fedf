"""Object storage: ``file://`` (or plain paths) and ``s3://``, with atomic publication.

Rule of the house: a stage never lets a half-written output be read as complete.

* A single object is written to a temporary name and moved into place (``os.replace`` locally; an S3
  PUT is atomic per object, so S3 objects are written directly).
* A directory output ("prefix") is written in a hidden sibling directory and renamed into place
  (local), or staged in a local temp directory and uploaded file by file with the ``_COMPLETE``
  marker last (S3). Readers call :func:`is_complete` / :func:`require_complete` and treat a prefix without the
  marker as absent.

The S3 endpoint comes from the config (``storage.s3_endpoint_url``) or the environment
(``MEDISYN_S3_ENDPOINT_URL``, then ``AWS_ENDPOINT_URL``), so MinIO, moto and AWS all work.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fsspec

COMPLETE_MARKER = "_COMPLETE"
_S3_ENDPOINT: str | None = None
ENDPOINT_ENV = "MEDISYN_S3_ENDPOINT_URL"


def configure(s3_endpoint_url: str | None = None) -> None:
    """Set the S3 endpoint for this process and the processes it starts (Ray workers, torchrun).

    Called once, by the stage runner (``medisyn.stages.run``). The endpoint is also exported
    as ``$MEDISYN_S3_ENDPOINT_URL`` so worker processes, which never see the config object, reach
    the same store; ``None`` leaves the environment's endpoint in force.
    """
    global _S3_ENDPOINT
    _S3_ENDPOINT = s3_endpoint_url
    if s3_endpoint_url:
        os.environ[ENDPOINT_ENV] = s3_endpoint_url


def _endpoint() -> str | None:
    return _S3_ENDPOINT or os.environ.get(ENDPOINT_ENV) or os.environ.get("AWS_ENDPOINT_URL")


def is_remote(uri: str) -> bool:
    return urlparse(str(uri)).scheme not in ("", "file")


def local_path(uri: str | os.PathLike) -> Path:
    """Path of a ``file://`` URI or plain path (relative paths resolve against the cwd)."""
    uri = str(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if is_remote(uri):
        raise ValueError(f"{uri} is not a local path")
    return Path(uri).expanduser().resolve()


def normalize(uri: str | os.PathLike) -> str:
    """Canonical form: ``s3://bucket/key`` unchanged, local paths as absolute ``file://`` URIs."""
    uri = str(uri).rstrip("/")
    return uri if is_remote(uri) else "file://" + str(local_path(uri))


def join(uri: str, *parts: str) -> str:
    out = str(uri).rstrip("/")
    for p in parts:
        out = out + "/" + str(p).strip("/")
    return out


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it) for a URI."""
    if not is_remote(uri):
        return fsspec.filesystem("file"), str(local_path(uri))
    parsed = urlparse(uri)
    if parsed.scheme != "s3":
        raise ValueError(f"unsupported storage scheme {parsed.scheme!r} in {uri} (use file:// or s3://)")
    kwargs: dict[str, Any] = {"config_kwargs": {"connect_timeout": 30, "read_timeout": 300}}
    if _endpoint():
        kwargs["client_kwargs"] = {"endpoint_url": _endpoint()}
    fs = fsspec.filesystem("s3", skip_instance_cache=False, **kwargs)
    return fs, parsed.netloc + parsed.path


def pyarrow_filesystem(uri: str):
    """(pyarrow.fs.FileSystem, path) for Ray Data / Parquet I/O."""
    import pyarrow.fs as pafs

    if not is_remote(uri):
        return pafs.LocalFileSystem(), str(local_path(uri))
    parsed = urlparse(uri)
    ep = _endpoint()
    kwargs: dict[str, Any] = {}
    if ep:
        u = urlparse(ep)
        kwargs = {"endpoint_override": u.netloc or u.path, "scheme": u.scheme or "http"}
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    return pafs.S3FileSystem(region=region, **kwargs), parsed.netloc + parsed.path


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def hash_into(h, uri: str | os.PathLike) -> None:
    """Stream an object (local path, file:// or s3://) into a hashlib object, 1 MiB at a time."""
    fs, path = filesystem(str(uri))
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def sha256(uri: str | os.PathLike) -> str:
    """sha256 hex digest of one object, streamed (checkpoints and weights files are large)."""
    import hashlib

    h = hashlib.sha256()
    hash_into(h, uri)
    return h.hexdigest()


def write_bytes(uri: str, data: bytes) -> None:
    """Write one object atomically (temp name + rename locally; a single PUT on S3)."""
    fs, path = filesystem(uri)
    if not is_remote(uri):
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(data)
        os.replace(tmp, p)
        return
    with fs.open(path, "wb") as f:
        f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def listdir(uri: str) -> list[str]:
    """Immediate children (full URIs), sorted; [] when the prefix does not exist."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    scheme = "s3://" if is_remote(uri) else "file://"
    out = []
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("."):  # staging directories / temp files are never listed
            continue
        out.append(scheme + entry.rstrip("/") if is_remote(uri) else "file://" + entry.rstrip("/"))
    return sorted(out)


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def is_complete(uri: str) -> bool:
    return exists(join(uri, COMPLETE_MARKER))


def require_complete(uri: str) -> None:
    if not is_complete(uri):
        raise FileNotFoundError(f"{uri} is missing or incomplete (no {COMPLETE_MARKER} marker): "
                                "rerun the stage that writes it")


def publish_dir(local_dir: str | os.PathLike, uri: str, metadata: dict[str, Any] | None = None) -> str:
    """Publish a fully written local directory at ``uri`` atomically; returns the normalized URI.

    An existing complete output at ``uri`` is replaced. The ``_COMPLETE`` marker (JSON, holding
    ``metadata``) is written last, so a reader never sees a partial prefix as complete.
    """
    src = Path(local_dir)
    uri = normalize(uri)
    _write_marker(src, metadata)
    if not is_remote(uri):
        staging = _local_staging(local_path(uri))
        shutil.copytree(src, staging, dirs_exist_ok=True)
        _swap_into_place(staging, local_path(uri))
        return uri
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER)
    for p in files:
        fs.put_file(str(p), path + "/" + p.relative_to(src).as_posix())
    fs.put_file(str(src / COMPLETE_MARKER), path + "/" + COMPLETE_MARKER)
    return uri


def _write_marker(directory: Path, metadata: dict[str, Any] | None) -> None:
    (directory / COMPLETE_MARKER).write_text(json.dumps(metadata or {}, sort_keys=True, default=str))


def _local_staging(dest: Path) -> Path:
    """A fresh hidden directory beside ``dest`` (same filesystem, so publishing is a rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return staging


def _swap_into_place(staging: Path, dest: Path) -> None:
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dest, old)
    os.replace(staging, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(uri: str, metadata: dict[str, Any] | None = None) -> Iterator[Path]:
    """``with staged_dir(out_uri) as d: write into d`` -> published atomically on success only.

    Local outputs are written in a hidden sibling (``.<name>.staging-*``, skipped by
    :func:`listdir`) and renamed into place, so publishing copies nothing; remote outputs are
    written to a local temp directory and uploaded with ``_COMPLETE`` last.
    """
    if not is_remote(uri):
        dest = local_path(normalize(uri))
        staging = _local_staging(dest)
        try:
            yield staging
            _write_marker(staging, metadata)
            _swap_into_place(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return
    tmp = Path(tempfile.mkdtemp(prefix="medisyn-stage-"))
    try:
        yield tmp
        publish_dir(tmp, uri, metadata)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download_dir(uri: str, local_dir: str | os.PathLike) -> Path:
    """Copy a complete prefix to a local directory (a no-op copy for local URIs); returns the path."""
    dest = Path(local_dir)
    if not is_remote(uri):
        src = local_path(uri)
        shutil.copytree(src, dest, dirs_exist_ok=True)
        return dest
    fs, path = filesystem(uri)
    dest.mkdir(parents=True, exist_ok=True)
    for f in fs.find(path):
        rel = f[len(path):].lstrip("/")
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f, str(target))
    return dest


def download_dir_once(uri: str, dest: str | os.PathLike) -> Path:
    """``download_dir`` into a local cache entry, once: downloaded under a per-process partial name,
    renamed into place, then marked ``.complete``; an entry with the marker is reused as is."""
    dest = Path(dest)
    if (dest / ".complete").exists():
        return dest
    tmp = dest.with_name(dest.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    download_dir(uri, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    (dest / ".complete").write_text(uri)
    return dest


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """A local directory holding ``uri``'s content: the path itself for local URIs, else a temp download."""
    if not is_remote(uri):
        yield local_path(uri)
        return
    tmp = Path(tempfile.mkdtemp(prefix="medisyn-dl-"))
    try:
        yield download_dir(uri, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
