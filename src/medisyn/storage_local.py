"""Owner-named directories on local disk: the hidden staging sibling an output is written in before
it is renamed into place, and scratch directories in the temp dir. Each name carries its owner
(host, pid), so a later process removes what a killed one left (issue #12). A bottom module:
:mod:`medisyn.storage` imports it and re-exports its names."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path

log = logging.getLogger("medisyn.storage")

_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
# .<name>.staging-<host>-<pid>-<ms>-<rand> beside an output; medisyn-<kind>-<host>-<pid>-* in the temp dir
_OWNER = re.compile(r"-(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-(?P<ms>[0-9a-f]+)-[0-9a-z_]+$")


def owner_token() -> str:
    return f"{_HOST}-{os.getpid()}-{int(time.time() * 1000):012x}-{uuid.uuid4().hex[:8]}"


def _owner_alive(name: str, other_hosts_alive: bool = False) -> bool:
    """Whether the process that created ``name`` (host and pid in the name) still runs. Names without
    an owner (older layouts) count as gone. Another host's process cannot be checked from here: for
    the staging of an output it counts as gone (one step writes an output at a time, and a retried
    step runs in a new pod, on another host), for scratch in a temp dir as alive (``other_hosts_alive``)."""
    m = _OWNER.search(name)
    if m is None:
        return False
    if m["host"] != _HOST:
        return other_hosts_alive
    pid = int(m["pid"])
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _local_staging(dest: Path) -> Path:
    """A fresh hidden directory beside ``dest`` (same filesystem, so publishing is a rename), named
    with its owner (host, pid) so that a later run removes it once that process is gone."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.staging-{owner_token()}"
    staging.mkdir()
    return staging


def _swap_into_place(staging: Path, dest: Path) -> None:
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{owner_token()}"
        os.replace(dest, old)
    os.replace(staging, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_SCRATCH = re.compile(r"^medisyn-[a-z0-9]+-")


def clean_stale_scratch(root: str | os.PathLike | None = None) -> list[Path]:
    """Remove ``medisyn-<kind>-<host>-<pid>-*`` scratch directories of processes that are gone
    (a killed run's decoded images, downloads, staging); returns what was removed."""
    root = Path(root or tempfile.gettempdir())
    removed: list[Path] = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for p in entries:
        if _SCRATCH.match(p.name) and _OWNER.search(p.name) and not _owner_alive(p.name, other_hosts_alive=True):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if removed:
        log.info("removed %d scratch directories of finished processes: %s", len(removed),
                 ", ".join(p.name for p in removed[:5]))
    return removed


_SCRATCH_CLEANED: set[int] = set()


def scratch_dir(kind: str) -> Path:
    """A fresh scratch directory ``$TMPDIR/medisyn-<kind>-<host>-<pid>-<ms>-<rand>``; the first call in
    a process removes those of processes that are gone (what killed runs left)."""
    if os.getpid() not in _SCRATCH_CLEANED:
        _SCRATCH_CLEANED.add(os.getpid())
        clean_stale_scratch()
    path = Path(tempfile.gettempdir()) / f"medisyn-{kind}-{owner_token()}"
    path.mkdir(parents=True)
    return path
