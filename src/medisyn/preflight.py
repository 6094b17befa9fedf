"""Pre-flight checks, run by the stage runner before a stage's heavy work (issue #12).

An output that cannot be written, an object store that does not answer or an MLflow server that is
down used to be found after hours of decoding or training (preprocess published its dataset, then
spent 4 minutes retrying MLflow and exited 1). :func:`check` finds each in seconds, bounded by the
config's timeouts, and names what failed:

* every output URI of the stage is writable: a probe object is written and removed beside it (on
  object storage under the retry policy ``storage.retry_*``); what a killed run left there is
  cleaned first (:func:`medisyn.storage.recover`), and stale scratch directories of the temp dir;
* the MLflow server answers ``/health`` within ``tracking.preflight_timeout_s`` (stages that track
  or use the registry, when the tracking URI is an HTTP server).
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from medisyn import storage
from medisyn.config import RunConfig

log = logging.getLogger("medisyn.preflight")

#: Stages checked before they run: those with heavy work or an output. Left out: plan (it lays the
#: run out), the small lookups, and record-outcome (the exit handler must run whatever is broken).
CHECKED_STAGES = frozenset({
    "demo-data", "preprocess", "preprocess-rayjob", "encode", "train", "train-job", "score", "register",
    "privacy-gate", "utility-gate", "human-gate", "promote", "report", "generate",
})
#: Stages that need the MLflow server though they open no stage run (the registry).
REGISTRY_STAGES = frozenset({"report", "pull"})


class PreflightError(RuntimeError):
    """A stage cannot run: an output is not writable or a service does not answer. Nothing was done."""


def check_writable(uri: str) -> None:
    """Write and remove a probe object beside ``uri`` (its parent prefix); clean a killed run's leftovers."""
    uri = storage.normalize(uri)
    parent, name = uri.rsplit("/", 1)
    probe = storage.join(parent, f".{name}.preflight-{storage.owner_token()}")
    try:
        storage.recover(uri)
        storage.write_bytes(probe, b"medisyn pre-flight probe\n")
        storage.remove(probe)
    except Exception as exc:  # noqa: BLE001 - reported with the URI, whatever the store raised
        raise PreflightError(f"output {uri} is not writable: {type(exc).__name__}: {exc}") from exc


def check_tracking(cfg: RunConfig) -> None:
    """The MLflow server answers (any HTTP status below 500) within ``tracking.preflight_timeout_s``."""
    from medisyn import tracking

    uri = tracking.tracking_uri(cfg)
    if not uri or not uri.startswith(("http://", "https://")):
        return  # tracking off, or a local store (sqlite://, file:) that needs no server
    timeout = cfg.tracking.preflight_timeout_s
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except Exception as exc:  # noqa: BLE001 - refused, reset, timed out, DNS: all "unreachable"
        raise PreflightError(f"MLflow tracking server {uri} is unreachable (tracking.preflight_timeout_s="
                             f"{timeout:g}): {type(exc).__name__}: {exc}") from exc
    if status >= 500:
        raise PreflightError(f"MLflow tracking server {uri} answered HTTP {status} on /health")


def check(cfg: RunConfig, stage: str, output: str | None, inputs: Mapping[str, Any], tracked: bool) -> None:
    """Every check that applies to ``stage`` (see the module docstring); raises :class:`PreflightError`."""
    storage.clean_stale_scratch()
    if stage not in CHECKED_STAGES and stage not in REGISTRY_STAGES:
        return
    out = inputs.get(output) if output else None
    if out and str(out).strip():
        check_writable(str(out))
    if tracked or stage in REGISTRY_STAGES:
        check_tracking(cfg)
    log.debug("pre-flight of %s passed", stage)



def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC anywhere in the chain, also as the text libraries wrap it in (torch, safetensors, arrow)."""
    import errno

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        text = str(e)
        if "No space left on device" in text or "StorageFull" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def disk_full_error(stage: str, exc: BaseException) -> OSError:
    """One clear error for a full disk: what filled up, that nothing was published, what to do."""
    import errno
    import tempfile

    return OSError(errno.ENOSPC, f"stage {stage}: no space left on device ({type(exc).__name__}: {exc}). "
                   "Nothing was published (an output appears only complete). Free space on the output's volume "
                   f"or the scratch directory (TMPDIR, now {tempfile.gettempdir()}) and rerun the stage.")


__all__ = ["CHECKED_STAGES", "PreflightError", "check", "check_tracking", "check_writable", "disk_full_error",
           "is_disk_full"]
