"""MLflow identities and permissions of the platform (issue #10; mlflow/REGISTRY.md).

MLflow's basic-auth model grants READ / EDIT / MANAGE per experiment and per registered model, and
creating a version, tagging it and moving an alias all need EDIT on its registered model. So approval
is separated by registered model, and enforced by the server:

| identity | experiment | ``<model>-candidates`` | ``<model>`` (approved) |
| --- | --- | --- | --- |
| pipeline (register, gates, report) | EDIT | EDIT | READ |
| promoter (promote, revoke) | EDIT (its stage run) | READ | MANAGE (removing an alias needs it) |
| consumer (pull, generate, pyfunc) | READ | READ | READ |
| anyone else, anonymous | READ if a user (``default_permission = READ``); anonymous: 401 | | |

The admin creates the experiment and both registered models before any identity can (a creator
gets MANAGE on what it creates, so the pipeline must never be first to create the approved model).

``bootstrap`` does all of it idempotently through MLflow's auth API; the chart's hook Job, the demo
and the tests call it (``python -m medisyn.access bootstrap``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from medisyn.config import RunConfig

log = logging.getLogger("medisyn.access")

IDENTITIES = ("pipeline", "promoter", "consumer")
# identity -> (experiment, candidates model, approved model) permission; None = default_permission (READ)
GRANTS: dict[str, tuple[str | None, str | None, str | None]] = {
    "pipeline": ("EDIT", "EDIT", None),
    "promoter": ("EDIT", None, "MANAGE"),  # EDIT sets an alias; deleting one (revoke) needs MANAGE
    "consumer": (None, None, None),
}

#: Seconds a verified password is remembered by the server (the chart's mlflow.auth.cacheTtlSeconds).
AUTH_CACHE_TTL_SECONDS = 60

AUTH_INI = """[mlflow]
# written by medisyn.access.write_auth_config (the image renders mlflow/basic_auth.ini.template)
default_permission = READ
database_uri = {database_uri}
admin_username = {admin_username}
admin_password = {admin_password}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
grant_default_workspace_access = false
auth_cache_ttl_seconds = {auth_cache_ttl_seconds}
"""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


def generate_credentials(prefix: str = "") -> dict[str, Credentials]:
    """Fresh random credentials for admin and each identity (the demo's, made at run time, never stored
    in the repository or in the demo's outputs)."""
    return {role: Credentials(f"{prefix}{role}", secrets.token_urlsafe(24)) for role in ("admin", *IDENTITIES)}


def write_credentials_dir(directory: str | os.PathLike, creds: dict[str, Credentials]) -> Path:
    """``<dir>/<role>/{username,password}`` (mode 0700/0600): the layout of a Secret volume, read by
    :func:`medisyn.tracking.use_identity`."""
    base = Path(directory)
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    for role, c in creds.items():
        if role == "admin":
            continue
        d = base / role
        d.mkdir(exist_ok=True, mode=0o700)
        for name, value in (("username", c.username), ("password", c.password)):
            f = d / name
            f.write_text(value)
            f.chmod(0o600)
    return base


def write_auth_config(path: str | os.PathLike, database_uri: str, admin: Credentials,
                      auth_cache_ttl_seconds: int = AUTH_CACHE_TTL_SECONDS) -> Path:
    """The server's basic_auth.ini (mode 600), as the chart renders it (mlflow/basic_auth.ini.template)."""
    path = Path(path)
    path.write_text(AUTH_INI.format(database_uri=database_uri, admin_username=admin.username,
                                    admin_password=admin.password, auth_cache_ttl_seconds=int(auth_cache_ttl_seconds)))
    path.chmod(0o600)
    return path


@contextlib.contextmanager
def acting_as(creds: Credentials | None) -> Iterator[None]:
    """Temporarily act as ``creds`` (None: anonymous) for MLflow requests in this process."""
    keys = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    before = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ.pop(k, None)
    if creds is not None:
        os.environ[keys[0]], os.environ[keys[1]] = creds.username, creds.password
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _wait_until_up(tracking_uri: str, timeout_s: float) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=5):
                return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"MLflow at {tracking_uri} did not answer within {timeout_s:.0f}s")
        time.sleep(2)


def bootstrap(tracking_uri: str, cfg: RunConfig, admin: Credentials, identities: dict[str, Credentials],
              wait_s: float = 0.0) -> dict[str, str]:
    """Create (or update) the identities, the experiment and both registered models as admin, and grant
    :data:`GRANTS`. Idempotent: a rerun (helm upgrade) resets passwords and permissions to the Secrets'."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    from medisyn.registry import approved_model, candidates_model

    if wait_s:
        _wait_until_up(tracking_uri, wait_s)
    with acting_as(admin):
        auth = AuthServiceClient(tracking_uri)
        client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
        for c in identities.values():
            try:
                auth.create_user(c.username, c.password)
            except MlflowException as exc:
                exists = getattr(exc, "error_code", "") == "RESOURCE_ALREADY_EXISTS"
                if not exists and "already exists" not in str(exc).lower():
                    raise
                auth.update_user_password(c.username, c.password)
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        experiment_id = exp.experiment_id if exp is not None else client.create_experiment(cfg.tracking.experiment)
        models = (candidates_model(cfg), approved_model(cfg))
        for name in models:
            try:
                client.create_registered_model(name, description=(
                    "MediSyn candidates: every registered checkpoint, awaiting its gates (pipeline identity)"
                    if name == models[0] else
                    "MediSyn approved models: versions copied from candidates by `promote` after verified gates; "
                    "pull models:/" + name + "@approved"))
            except MlflowException as exc:
                if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS" and "already exists" not in str(exc):
                    raise
        resources = (("experiment", str(experiment_id)), ("registered_model", models[0]),
                     ("registered_model", models[1]))
        for role, c in identities.items():
            for (rtype, rid), perm in zip(resources, GRANTS[role], strict=True):
                if perm is None:
                    continue
                auth.grant_user_permission(c.username, rtype, rid, perm)
    log.info("MLflow access bootstrapped: experiment %s, models %s, identities %s", experiment_id, models,
             {r: c.username for r, c in identities.items()})
    return {"experiment_id": str(experiment_id), "candidates": models[0], "approved": models[1]}


def _read_secret_dir(base: str, role: str) -> Credentials:
    d = Path(base) / role
    return Credentials((d / "username").read_text().strip(), (d / "password").read_text().strip())


def main(argv: list[str] | None = None) -> int:
    """``python -m medisyn.access bootstrap``: the chart's hook Job. Admin credentials from
    $MLFLOW_AUTH_ADMIN_USERNAME / $MLFLOW_AUTH_ADMIN_PASSWORD, each identity's from
    $MEDISYN_MLFLOW_CREDENTIALS_DIR/<role>/{username,password} (Secret volumes)."""
    from medisyn.config import load_config
    from medisyn.tracking import CREDENTIALS_DIR_ENV

    p = argparse.ArgumentParser(prog="python -m medisyn.access", description=(__doc__ or "").splitlines()[0])
    p.add_argument("command", choices=["bootstrap"])
    p.add_argument("--config", default=None, help="run config (tracking.experiment / model_name)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", ""), help="MLflow server")
    p.add_argument("--wait-s", type=float, default=300.0, help="wait this long for the server to answer")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.set)
    admin = Credentials(os.environ["MLFLOW_AUTH_ADMIN_USERNAME"], os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"])
    base = os.environ[CREDENTIALS_DIR_ENV]
    identities = {role: _read_secret_dir(base, role) for role in IDENTITIES}
    print(bootstrap(args.tracking_uri, cfg, admin, identities, wait_s=args.wait_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
