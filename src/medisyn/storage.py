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

Faults (issue #12, docs/operations.md):

* Every ``s3://`` operation runs under one :class:`RetryPolicy` from the config (``storage.retry_*``,
  ``storage.*_timeout_s``): bounded connect and read timeouts, tries with doubling backoff, then a
  :class:`StorageError` naming the operation and the URI. The S3 client's own retries are off, so the
  policy is the whole budget (an endpoint that accepts connections and never answers costs about
  ``retry_attempts x read_timeout_s``, not hours).
* Replace by version on object storage: a new output is uploaded complete (``_COMPLETE`` last) to a
  hidden sibling prefix first, while the previous complete output stays readable; only then is it
  moved into place (server-side copies, the old marker removed first and the new one written last).
  A kill during that move leaves a complete staging prefix that :func:`recover` (called before the
  next publish and by the stage runner's pre-flight) rolls forward.
* Leftovers of killed runs are cleaned on the next run: hidden staging directories beside an output
  (:func:`recover`) and scratch directories in the temp dir (:func:`scratch_dir` names them with
  host and pid; a later process removes those whose process is gone).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import fsspec

# storage.<name> stays the way in: the names of the two modules below are re-exported here
from medisyn.storage_local import _HOST as _HOST  # the owner tag in staging and scratch names
from medisyn.storage_local import (
    _local_staging,
    _owner_alive,
    _swap_into_place,
    clean_stale_scratch,
    owner_token,
    scratch_dir,
)
from medisyn.storage_s3 import RetryPolicy, StorageError, _aio_session, is_transient

log = logging.getLogger("medisyn.storage")

__all__ = [
    "COMPLETE_MARKER", "ENDPOINT_ENV", "RETRY_ENV", "RetryPolicy", "StorageError", "clean_stale_scratch",
    "configure", "download_dir", "download_dir_once", "exists", "filesystem", "hash_into", "is_complete",
    "is_remote", "is_transient", "join", "listdir", "local_copy", "local_path", "normalize", "owner_token",
    "publish_dir", "pyarrow_filesystem", "read_bytes", "read_json", "read_text", "recover", "remove",
    "require_complete", "retry_policy", "scratch_dir", "sha256", "staged_dir", "staged_prefix", "with_retries",
    "write_bytes", "write_json", "write_text",
]

COMPLETE_MARKER = "_COMPLETE"
_S3_ENDPOINT: str | None = None
ENDPOINT_ENV = "MEDISYN_S3_ENDPOINT_URL"
RETRY_ENV = "MEDISYN_S3_RETRY"  # the RetryPolicy as JSON, for worker processes

T = TypeVar("T")

_POLICY: RetryPolicy | None = None


def configure(s3_endpoint_url: str | None = None, retry: RetryPolicy | None = None) -> None:
    """Set the S3 endpoint and retry policy for this process and the processes it starts (Ray
    workers, torchrun).

    Called once, by the stage runner (``medisyn.stages.run``). Both are also exported
    (``$MEDISYN_S3_ENDPOINT_URL``, ``$MEDISYN_S3_RETRY``) so worker processes, which never see the
    config object, reach the same store under the same bounds; ``None`` leaves the environment's in force.
    """
    global _S3_ENDPOINT, _POLICY
    _S3_ENDPOINT = s3_endpoint_url
    if s3_endpoint_url:
        os.environ[ENDPOINT_ENV] = s3_endpoint_url
    if retry is not None:
        _POLICY = retry
        os.environ[RETRY_ENV] = json.dumps(asdict(retry), sort_keys=True)


def retry_policy() -> RetryPolicy:
    """The policy in force: :func:`configure`'s, else ``$MEDISYN_S3_RETRY``'s, else the defaults."""
    if _POLICY is not None:
        return _POLICY
    text = os.environ.get(RETRY_ENV)
    if text:
        try:
            return RetryPolicy(**json.loads(text))
        except (TypeError, ValueError):
            log.warning("ignoring malformed $%s=%r", RETRY_ENV, text)
    return RetryPolicy()


def with_retries(op: str, uri: str, fn: Callable[[], T], policy: RetryPolicy | None = None) -> T:
    """``fn()`` under the retry policy: transient errors are retried with doubling backoff; past the
    budget a :class:`StorageError` names ``op`` and ``uri``. Local paths run once (no retry)."""
    if not is_remote(uri):
        return fn()
    policy = policy or retry_policy()
    t0 = time.monotonic()
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified just below
            if not is_transient(exc):
                raise
            if attempt == policy.attempts:
                raise StorageError(
                    f"{op} {uri} failed after {attempt} tries in {time.monotonic() - t0:.0f}s "
                    f"(storage.retry_attempts={policy.attempts}): {type(exc).__name__}: {exc}") from exc
            wait = policy.wait_s(attempt)
            log.warning("%s %s: %s: %s; try %d of %d in %.1fs", op, uri, type(exc).__name__, exc, attempt + 1,
                        policy.attempts, wait)
            _invalidate_caches(uri)
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


def _invalidate_caches(uri: str) -> None:
    with contextlib.suppress(Exception):
        fs, _ = filesystem(uri)
        fs.invalidate_cache()


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
    policy = retry_policy()
    # One try per request in the client (botocore's and s3fs's own retries off): with_retries holds
    # the whole budget, so its bound is the real one.
    kwargs: dict[str, Any] = {
        "config_kwargs": {"connect_timeout": policy.connect_timeout_s, "read_timeout": policy.read_timeout_s,
                          "retries": {"max_attempts": 1, "mode": "standard"}},
    }
    if _endpoint():
        kwargs["client_kwargs"] = {"endpoint_url": _endpoint()}
    fs = fsspec.filesystem("s3", skip_instance_cache=False, session=_aio_session(), **kwargs)
    fs.retries = 1  # s3fs's own retry loop (class default 5, not a constructor argument)
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
    policy = retry_policy()
    kwargs.update(connect_timeout=policy.connect_timeout_s, request_timeout=policy.read_timeout_s,
                  retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=policy.attempts))
    return pafs.S3FileSystem(region=region, **kwargs), parsed.netloc + parsed.path


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return with_retries("exists", uri, lambda: bool(fs.exists(path)))


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)

    def read() -> bytes:
        with fs.open(path, "rb") as f:
            return f.read()

    return with_retries("read", uri, read)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def hash_into(h, uri: str | os.PathLike) -> None:
    """Stream an object (local path, file:// or s3://) into a hashlib object, 1 MiB at a time."""
    fs, path = filesystem(str(uri))
    done = 0

    def feed() -> None:  # a retry resumes at the first byte not yet hashed
        nonlocal done
        with fs.open(path, "rb") as f:
            f.seek(done)
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
                done += len(chunk)

    with_retries("read", str(uri), feed)


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
        try:
            tmp.write_bytes(data)
            os.replace(tmp, p)
        finally:  # a full disk (ENOSPC) leaves no partial temp file behind
            tmp.unlink(missing_ok=True)
        return

    def put() -> None:
        with fs.open(path, "wb") as f:
            f.write(data)

    with_retries("write", uri, put)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def listdir(uri: str) -> list[str]:
    """Immediate children (full URIs), sorted; [] when the prefix does not exist."""
    fs, path = filesystem(uri)

    def ls() -> list[str]:
        fs.invalidate_cache(path)
        return list(fs.ls(path, detail=False)) if fs.exists(path) else []

    entries = with_retries("list", uri, ls)
    scheme = "s3://" if is_remote(uri) else "file://"
    out = []
    for entry in entries:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("."):  # staging directories / temp files are never listed
            continue
        out.append(scheme + entry.rstrip("/") if is_remote(uri) else "file://" + entry.rstrip("/"))
    return sorted(out)


def remove(uri: str) -> None:
    fs, path = filesystem(uri)

    def rm() -> None:
        if fs.exists(path):
            fs.rm(path, recursive=True)

    with_retries("remove", uri, rm)


def is_complete(uri: str) -> bool:
    return exists(join(uri, COMPLETE_MARKER))


def require_complete(uri: str) -> None:
    if not is_complete(uri):
        raise FileNotFoundError(f"{uri} is missing or incomplete (no {COMPLETE_MARKER} marker): "
                                "rerun the stage that writes it")


# ----------------------------------------------------------------------------------------------
# Publishing a directory: local rename, or replace by version on object storage
# ----------------------------------------------------------------------------------------------
def publish_dir(local_dir: str | os.PathLike, uri: str, metadata: dict[str, Any] | None = None) -> str:
    """Publish a fully written local directory at ``uri`` atomically; returns the normalized URI.

    An existing complete output at ``uri`` is replaced, and stays readable until the new one is
    complete (local: one rename; object storage: replace by version, see the module docstring).
    The ``_COMPLETE`` marker (JSON, holding ``metadata``) is written last, so a reader never sees a
    partial prefix as complete.
    """
    src = Path(local_dir)
    uri = normalize(uri)
    _write_marker(src, metadata)
    if not is_remote(uri):
        recover(uri)
        staging = _local_staging(local_path(uri))
        try:
            shutil.copytree(src, staging, dirs_exist_ok=True)
            _swap_into_place(staging, local_path(uri))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return uri
    recover(uri)
    fs, path = filesystem(uri)
    version = _version_prefix(path)
    try:
        _upload_version(fs, src, version)
    except BaseException:
        with contextlib.suppress(Exception):  # best effort: recover() removes what is left
            fs.rm(version, recursive=True)
        raise
    _swap_remote(fs, version, path)
    return uri


def _version_prefix(path: str) -> str:
    """The hidden prefix a new version of ``path`` is written to, beside the old one, owner-named."""
    parent, name = path.rsplit("/", 1)
    return f"{parent}/.{name}.staging-{owner_token()}"


def _upload_version(fs: Any, src: Path, version: str) -> None:
    """Upload every file of ``src`` below ``version``, its ``_COMPLETE`` marker last."""
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER)
    for p in [*files, src / COMPLETE_MARKER]:  # the marker last
        key = version + "/" + p.relative_to(src).as_posix()
        with_retries("upload", "s3://" + key, functools.partial(fs.put_file, str(p), key))


@contextlib.contextmanager
def staged_prefix(uri: str) -> Iterator[tuple[str, Path, Callable[[dict[str, Any]], None]]]:
    """``with staged_prefix(out) as (staging_uri, local, publish)``: a staging location that other
    processes (e.g. Ray workers) write into directly, published like :func:`publish_dir`.

    ``staging_uri`` is the hidden ``.<name>.staging-*`` directory (local output) or prefix (object
    storage) beside ``uri``; ``local`` a local directory for the caller's own small files (the same
    directory for a local output); ``publish(metadata)`` moves the whole version into place with
    ``_COMPLETE`` last (a rename, or replace by version). Whatever is not published is removed; a
    killed run's leftovers are removed by the next run (:func:`recover`, owner in the name)."""
    recover(uri)
    published = []
    if not is_remote(uri):
        dest = local_path(uri)
        staging = _local_staging(dest)

        def publish_local(metadata: dict[str, Any]) -> None:
            _write_marker(staging, metadata)
            _swap_into_place(staging, dest)
            published.append(True)

        try:
            yield "file://" + str(staging), staging, publish_local
        finally:
            if not published:
                shutil.rmtree(staging, ignore_errors=True)
        return
    fs, path = filesystem(uri)
    version = _version_prefix(path)
    local = scratch_dir("stage")

    def publish_remote(metadata: dict[str, Any]) -> None:
        _write_marker(local, metadata)
        _upload_version(fs, local, version)
        _swap_remote(fs, version, path)  # removes the version prefix too
        published.append(True)

    try:
        yield "s3://" + version, local, publish_remote
    finally:
        shutil.rmtree(local, ignore_errors=True)
        if not published:
            with contextlib.suppress(Exception):  # best effort: recover() removes what is left
                remove("s3://" + version)


def _keys_below(fs: Any, path: str) -> set[str]:
    """Relative keys of every object below ``path`` (fresh listing)."""
    fs.invalidate_cache()
    if not fs.exists(path):
        return set()
    return {f[len(path):].lstrip("/") for f in fs.find(path)}


def _swap_remote(fs: Any, staging: str, path: str) -> None:
    """Move the complete version in ``staging`` to ``path`` (server-side copies): the old marker goes
    first (the old version stops being complete), the new marker comes last, the staging prefix
    is removed at the end. Idempotent, so an interrupted swap is finished by running it again."""
    uri = "s3://" + path
    new = _keys_below(fs, staging)
    assert COMPLETE_MARKER in new, f"staging prefix {staging} is not complete"
    with_retries("unpublish", uri, functools.partial(_rm_if_exists, fs, path + "/" + COMPLETE_MARKER))
    for key in sorted(new - {COMPLETE_MARKER}):
        with_retries("publish", uri, functools.partial(fs.copy, staging + "/" + key, path + "/" + key))
    for key in sorted(_keys_below(fs, path) - new):
        with_retries("publish", uri, functools.partial(fs.rm, path + "/" + key))
    with_retries("publish", uri, functools.partial(fs.copy, staging + "/" + COMPLETE_MARKER,
                                                   path + "/" + COMPLETE_MARKER))
    with_retries("publish", uri, functools.partial(_rm_if_exists, fs, staging))
    fs.invalidate_cache()


def _rm_if_exists(fs: Any, path: str) -> None:
    if fs.exists(path):
        fs.rm(path, recursive=True)


def recover(uri: str) -> list[str]:
    """Clean what killed writers left beside the output ``uri``, and finish an interrupted publish.

    Hidden ``.<name>.staging-*`` / ``.<name>.old-*`` siblings whose owner process is gone are
    removed; when ``uri`` itself is not complete and a complete staging sibling exists (a publish
    killed while moving its new version into place), the newest is moved into place first (rolled
    forward). Returns what was done, one line each (logged)."""
    uri = normalize(uri)
    done: list[str] = []
    if not is_remote(uri):
        dest = local_path(uri)
        if not dest.parent.is_dir():
            return done
        prefix = f".{dest.name}."
        stale = sorted((p for p in dest.parent.iterdir()
                        if p.name.startswith(prefix) and re.match(r"(staging|old)-", p.name[len(prefix):])
                        and not _owner_alive(p.name)), key=lambda p: p.name)
        complete = [p for p in stale if p.name[len(prefix):].startswith("staging-") and (p / COMPLETE_MARKER).exists()]
        if complete and not (dest / COMPLETE_MARKER).exists():
            _swap_into_place(complete[-1], dest)
            done.append(f"rolled forward {complete[-1].name} -> {dest}")
        for p in stale:
            if p.exists():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                done.append(f"removed {p}")
    else:
        fs, path = filesystem(uri)
        parent, name = path.rsplit("/", 1)

        def siblings() -> list[str]:
            fs.invalidate_cache(parent)
            if not fs.exists(parent):
                return []
            return sorted(e.rstrip("/") for e in fs.ls(parent, detail=False)
                          if e.rstrip("/").rsplit("/", 1)[-1].startswith(f".{name}.staging-"))

        abandoned = [e for e in with_retries("list", uri, siblings) if not _owner_alive(e.rsplit("/", 1)[-1])]
        finished = [e for e in abandoned
                    if with_retries("exists", uri, functools.partial(fs.exists, e + "/" + COMPLETE_MARKER))]
        if finished and not is_complete(uri):
            _swap_remote(fs, finished[-1], path)  # removes that staging prefix too
            done.append(f"rolled forward s3://{finished[-1]} -> {uri}")
        for e in abandoned:
            if with_retries("exists", "s3://" + e, functools.partial(fs.exists, e)):
                with_retries("remove", "s3://" + e, functools.partial(_rm_if_exists, fs, e))
                done.append(f"removed s3://{e}")
    for line in done:
        log.info("storage recovery: %s", line)
    return done


def _write_marker(directory: Path, metadata: dict[str, Any] | None) -> None:
    (directory / COMPLETE_MARKER).write_text(json.dumps(metadata or {}, sort_keys=True, default=str))


@contextlib.contextmanager
def staged_dir(uri: str, metadata: dict[str, Any] | None = None) -> Iterator[Path]:
    """``with staged_dir(out_uri) as d: write into d`` -> published atomically on success only.

    Local outputs are written in a hidden sibling (``.<name>.staging-*``, skipped by
    :func:`listdir`) and renamed into place, so publishing copies nothing; remote outputs are
    written to a local scratch directory and published by version (:func:`publish_dir`). What a
    killed run left behind is cleaned first (:func:`recover`).
    """
    if not is_remote(uri):
        dest = local_path(normalize(uri))
        recover(normalize(uri))
        staging = _local_staging(dest)
        try:
            yield staging
            _write_marker(staging, metadata)
            _swap_into_place(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return
    tmp = scratch_dir("stage")
    try:
        yield tmp
        publish_dir(tmp, uri, metadata)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Local copies of a prefix (scratch space: medisyn.storage_local)
# ----------------------------------------------------------------------------------------------
def download_dir(uri: str, local_dir: str | os.PathLike) -> Path:
    """Copy a complete prefix to a local directory (a no-op copy for local URIs); returns the path."""
    dest = Path(local_dir)
    if not is_remote(uri):
        src = local_path(uri)
        shutil.copytree(src, dest, dirs_exist_ok=True)
        return dest
    fs, path = filesystem(uri)
    dest.mkdir(parents=True, exist_ok=True)
    for f in with_retries("list", uri, lambda: list(fs.find(path))):
        rel = f[len(path):].lstrip("/")
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with_retries("download", "s3://" + f, functools.partial(fs.get_file, f, str(target)))
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
    tmp = scratch_dir("dl")
    try:
        yield download_dir(uri, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
