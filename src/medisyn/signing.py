"""Signed statements about model files: DSSE envelopes over in-toto Statements (issue #21).

A gate verdict or an approval is worth only what its signature is worth: an MLflow run, a tag or an
artifact can be written by whoever holds the pipeline's credentials, a signature only by whoever
holds the key. So a verdict that matters is a signed statement about digests:

* the **subject** is every file of a model directory, by relative path and sha256
  (:func:`directory_digests`): replacing, adding or removing any file — weights, ``MLmodel``, the
  pyfunc's loader code, the environment files — changes the subject;
* the **predicate** says what is claimed about it (a gate's verdict and evidence, or the promoter's
  approval), with its own ``predicateType``;
* the envelope is DSSE (``payloadType`` + base64 payload + signatures over the pre-authentication
  encoding), the format in-toto attestations and SLSA provenance use; keys are Ed25519 or ECDSA P-256
  in PEM, identified by the sha256 of their public key (``keyid``).

Verification (:func:`verify_envelope`) takes the trust policy, a set of public keys, and returns the
statement only when a signature by one of them checks and the predicate type is the expected one;
:func:`check_subject` then compares the subject with the files actually at hand. Every refusal is a
:class:`SignatureError` whose message names what failed.

This module imports nothing from the rest of medisyn: gates, promote, the consumer module and an
offline verifier all use it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
GATE_PREDICATE = "https://medisyn.dev/attestations/gate-verdict/v1"
APPROVAL_PREDICATE = "https://medisyn.dev/attestations/approval/v1"


class SignatureError(ValueError):
    """A signature, key or subject that does not verify; the message says which and why."""


# ----------------------------------------------------------------------------------------------
# Keys
# ----------------------------------------------------------------------------------------------
def generate_private_key_pem() -> bytes:
    """A new Ed25519 private key, PKCS#8 PEM (unencrypted: it lives in a Kubernetes Secret)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_key_pem(private_pem: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = _load_private(private_pem)
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def write_key_pair(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """``<name>.key`` (mode 0600) and ``<name>.pub`` in ``directory``; returns their paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    private = generate_private_key_pem()
    key_path, pub_path = d / f"{name}.key", d / f"{name}.pub"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    pub_path.write_bytes(public_key_pem(private))
    return key_path, pub_path


def _load_private(pem: bytes):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"not a PEM private key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise SignatureError(f"unsupported key type {type(key).__name__}: use Ed25519 or ECDSA P-256")
    return key


def _load_public(pem: bytes):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"not a PEM public key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise SignatureError(f"unsupported key type {type(key).__name__}: use Ed25519 or ECDSA P-256")
    return key


def key_id(public_pem: bytes) -> str:
    """sha256 of the DER SubjectPublicKeyInfo: the same key has the same id whatever its PEM layout."""
    from cryptography.hazmat.primitives import serialization

    der = _load_public(public_pem).public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def read_key_file(path: str | os.PathLike, what: str) -> bytes:
    """A key file's bytes, with an error that names the setting when it is missing."""
    p = Path(path)
    if not p.is_file():
        raise SignatureError(f"{what}: no key file at {p}")
    return p.read_bytes()


# ----------------------------------------------------------------------------------------------
# Where keys live: Secret and ConfigMap volumes
# ----------------------------------------------------------------------------------------------
#: ``<dir>/<role>/key.pem``: a role's private key, one Kubernetes Secret volume per role, mounted only into
#: that role's steps (the gate key into the gate steps, the promoter key into promote). The demo writes one.
KEYS_DIR_ENV = "MEDISYN_SIGNING_KEYS_DIR"
DEFAULT_KEYS_DIR = "/var/run/medisyn/keys"  # where the pipeline mounts the key Secrets (no env var needed)
#: ``<dir>/<role>*.pub``: the trust policy, the public keys each role's signatures are checked against (a
#: ConfigMap volume in every pod). Several files per role = key rotation (old and new both trusted).
TRUST_DIR_ENV = "MEDISYN_TRUST_DIR"
DEFAULT_TRUST_DIR = "/etc/medisyn/trust"  # where the pipeline mounts the trust ConfigMap
ROLES = ("gate", "promoter")


def signing_key(role: str) -> bytes | None:
    """This process's private key for ``role`` (gate | promoter), or None when none is mounted here."""
    base = os.environ.get(KEYS_DIR_ENV) or DEFAULT_KEYS_DIR
    if role not in ROLES:
        raise ValueError(f"unknown signing role {role!r}: one of {ROLES}")
    path = Path(base) / role / "key.pem"
    return path.read_bytes() if path.is_file() else None


def trusted_keys(role: str) -> list[bytes]:
    """The public keys trusted for ``role``'s signatures ([] when no trust policy is mounted: every
    verification then fails closed)."""
    base = os.environ.get(TRUST_DIR_ENV) or DEFAULT_TRUST_DIR
    if role not in ROLES:
        raise ValueError(f"unknown signing role {role!r}: one of {ROLES}")
    return [p.read_bytes() for p in sorted(Path(base).glob(f"{role}*.pub"))]


def provision(directory: str | os.PathLike) -> tuple[Path, Path]:
    """A fresh key per role and the matching trust policy under ``directory`` (``keys/<role>/key.pem``,
    ``trust/<role>.pub``), for the demo and tests; returns (keys dir, trust dir) to export as
    :data:`KEYS_DIR_ENV` and :data:`TRUST_DIR_ENV`. A cluster gets its keys from ``medisyn keygen``."""
    base = Path(directory)
    keys, trust = base / "keys", base / "trust"
    trust.mkdir(parents=True, exist_ok=True)
    for role in ROLES:
        key, pub = write_key_pair(keys / role, "key")
        key.rename(key.with_name("key.pem"))
        pub.replace(trust / f"{role}.pub")
    return keys, trust


# ----------------------------------------------------------------------------------------------
# Subjects: every file of a directory
# ----------------------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def directory_digests(root: str | os.PathLike, exclude: Iterable[str] = ()) -> dict[str, str]:
    """{relative posix path: sha256} of every regular file under ``root``, except the relative paths in
    ``exclude`` (a signature file stored beside what it signs). A symbolic link or any other special
    file is refused: a signed directory holds plain files only."""
    base = Path(root)
    if not base.is_dir():
        raise SignatureError(f"{base} is not a directory")
    skip = set(exclude)
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            mode = os.lstat(p).st_mode
            if stat.S_ISLNK(mode) or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise SignatureError(f"{p.relative_to(base)}: not a plain file (link or device)")
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(base).as_posix()
            if rel not in skip:
                out[rel] = file_sha256(Path(dirpath) / name)
    return dict(sorted(out.items()))


def subject_digest(digests: Mapping[str, str]) -> str:
    """One sha256 over the whole subject (sorted path/digest pairs): a short name for a file set."""
    blob = json.dumps(sorted(digests.items()), separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


# ----------------------------------------------------------------------------------------------
# Statements and envelopes
# ----------------------------------------------------------------------------------------------
def make_statement(digests: Mapping[str, str], predicate_type: str, predicate: Mapping[str, Any]) -> dict:
    """An in-toto Statement v1 whose subject is every file in ``digests``."""
    return {"_type": STATEMENT_TYPE,
            "subject": [{"name": name, "digest": {"sha256": h}} for name, h in sorted(digests.items())],
            "predicateType": predicate_type, "predicate": dict(predicate)}


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what is actually signed (type and payload, length-prefixed)."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def sign_statement(statement: Mapping[str, Any], private_pem: bytes) -> dict:
    """A DSSE envelope of ``statement`` signed with ``private_pem`` (Ed25519 or ECDSA P-256/SHA-256)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = _load_private(private_pem)
    payload = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()
    message = pae(PAYLOAD_TYPE, payload)
    sig = key.sign(message, ec.ECDSA(hashes.SHA256())) if isinstance(key, ec.EllipticCurvePrivateKey) \
        else key.sign(message)
    return {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(payload).decode(),
            "signatures": [{"keyid": key_id(public_key_pem(private_pem)), "sig": base64.b64encode(sig).decode()}]}


def verify_envelope(envelope: Mapping[str, Any], trusted_public_pems: Iterable[bytes], predicate_type: str) -> dict:
    """The statement of ``envelope`` if a signature by one of the trusted keys verifies and the statement
    is an in-toto Statement of ``predicate_type``; else :class:`SignatureError` saying what failed."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    trusted = {key_id(pem): _load_public(pem) for pem in trusted_public_pems}
    if not trusted:
        raise SignatureError("no trusted public key is configured: nothing can be verified (fail closed)")
    if not isinstance(envelope, Mapping) or envelope.get("payloadType") != PAYLOAD_TYPE:
        raise SignatureError(f"not a DSSE envelope of {PAYLOAD_TYPE}")
    try:
        payload = base64.b64decode(str(envelope.get("payload", "")), validate=True)
    except ValueError:
        raise SignatureError("the envelope's payload is not base64") from None
    message = pae(PAYLOAD_TYPE, payload)
    signed_by = None
    for entry in envelope.get("signatures") or []:
        key = trusted.get(str(entry.get("keyid", "")))
        if key is None:
            continue
        try:
            sig = base64.b64decode(str(entry.get("sig", "")), validate=True)
            if isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(sig, message, ec.ECDSA(hashes.SHA256()))
            else:
                key.verify(sig, message)
        except (InvalidSignature, ValueError):
            raise SignatureError(f"the signature by key {entry.get('keyid')} does not verify "
                                 "(the statement was changed after signing, or forged)") from None
        signed_by = entry["keyid"]
        break
    if signed_by is None:
        ids = sorted(str(e.get("keyid")) for e in envelope.get("signatures") or [])
        raise SignatureError(f"not signed by a trusted key (signed by {ids or 'nobody'}; trusted: {sorted(trusted)})")
    statement = json.loads(payload)
    if statement.get("_type") != STATEMENT_TYPE:
        raise SignatureError(f"the payload is not an in-toto Statement ({statement.get('_type')!r})")
    if statement.get("predicateType") != predicate_type:
        raise SignatureError(f"a {statement.get('predicateType')!r} statement where {predicate_type!r} was "
                             "required")
    statement["_signed_by"] = signed_by
    return statement


def statement_digests(statement: Mapping[str, Any]) -> dict[str, str]:
    return {str(s["name"]): str(s["digest"]["sha256"]) for s in statement.get("subject") or []}


def check_subject(statement: Mapping[str, Any], digests: Mapping[str, str]) -> None:
    """The files at hand are exactly the statement's subject; otherwise a :class:`SignatureError` naming
    the first files that differ (changed, added or missing)."""
    signed = statement_digests(statement)
    changed = sorted(n for n in signed.keys() & digests.keys() if signed[n] != digests[n])
    added = sorted(digests.keys() - signed.keys())
    missing = sorted(signed.keys() - digests.keys())
    problems = ([f"changed: {', '.join(changed[:5])}"] if changed else []) + \
        ([f"not signed: {', '.join(added[:5])}"] if added else []) + \
        ([f"missing: {', '.join(missing[:5])}"] if missing else [])
    if problems:
        raise SignatureError("the files are not the signed ones (" + "; ".join(problems) + ")")


def write_envelope(path: str | os.PathLike, envelope: Mapping[str, Any]) -> None:
    """Write an envelope atomically (a temp file moved into place)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(envelope, indent=1, sort_keys=True))
    os.replace(tmp, p)


def read_envelope(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SignatureError(f"no signature at {p}")
    try:
        return json.loads(p.read_text())
    except ValueError:
        raise SignatureError(f"{p} is not JSON") from None
