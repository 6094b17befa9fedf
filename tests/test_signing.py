"""Signed statements (issue #21): DSSE envelopes over in-toto Statements about every file of a directory."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from medisyn import signing
from medisyn.signing import SignatureError


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, tuple[bytes, bytes]]:
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("gate", "promoter", "attacker"):
        key, pub = signing.write_key_pair(d, name)
        assert oct(key.stat().st_mode & 0o777) == "0o600"
        out[name] = (key.read_bytes(), pub.read_bytes())
    return out


def _model(root: Path) -> Path:
    (root / "artifacts" / "pipeline" / "unet").mkdir(parents=True)
    (root / "MLmodel").write_text("python_function: {}\n")
    (root / "pyfunc_model.py").write_text("print('loader')\n")
    (root / "artifacts" / "pipeline" / "unet" / "weights.safetensors").write_bytes(b"\x00" * 1000)
    return root


def test_sign_verify_and_subject_round_trip(keys, tmp_path):
    model = _model(tmp_path / "m")
    digests = signing.directory_digests(model)
    assert set(digests) == {"MLmodel", "pyfunc_model.py", "artifacts/pipeline/unet/weights.safetensors"}
    env = signing.sign_statement(signing.make_statement(digests, signing.GATE_PREDICATE, {"passed": True}),
                                 keys["gate"][0])
    st = signing.verify_envelope(env, [keys["gate"][1], keys["promoter"][1]], signing.GATE_PREDICATE)
    assert st["predicate"] == {"passed": True} and st["_signed_by"] == signing.key_id(keys["gate"][1])
    signing.check_subject(st, signing.directory_digests(model))


@pytest.mark.parametrize("edit, message", [
    (lambda m: (m / "pyfunc_model.py").write_text("open('/tmp/sentinel','w')\n"), "changed: pyfunc_model.py"),
    (lambda m: (m / "extra.py").write_text("x"), "not signed: extra.py"),
    (lambda m: (m / "MLmodel").unlink(), "missing: MLmodel"),
], ids=["replaced-loader", "added-file", "removed-file"])
def test_any_file_change_breaks_the_subject(keys, tmp_path, edit, message):
    model = _model(tmp_path / "m")
    st = signing.make_statement(signing.directory_digests(model), signing.APPROVAL_PREDICATE, {})
    edit(model)
    with pytest.raises(SignatureError, match=message):
        signing.check_subject(st, signing.directory_digests(model))


def test_forgeries_are_refused_naming_why(keys, tmp_path):
    digests = signing.directory_digests(_model(tmp_path / "m"))
    statement = signing.make_statement(digests, signing.GATE_PREDICATE, {"passed": False})
    env = signing.sign_statement(statement, keys["gate"][0])
    trusted = [keys["gate"][1]]
    # an untrusted key (e.g. one the pipeline identity made up)
    forged = signing.sign_statement(statement, keys["attacker"][0])
    with pytest.raises(SignatureError, match="not signed by a trusted key"):
        signing.verify_envelope(forged, trusted, signing.GATE_PREDICATE)
    # the payload changed after signing (failed -> passed), signature kept
    tampered = dict(env, payload=base64.b64encode(json.dumps(
        dict(statement, predicate={"passed": True}), sort_keys=True, separators=(",", ":")).encode()).decode())
    with pytest.raises(SignatureError, match="does not verify"):
        signing.verify_envelope(tampered, trusted, signing.GATE_PREDICATE)
    # a valid gate statement offered as an approval, and no trust policy at all
    with pytest.raises(SignatureError, match="where .*approval.* was required"):
        signing.verify_envelope(env, trusted, signing.APPROVAL_PREDICATE)
    with pytest.raises(SignatureError, match="no trusted public key"):
        signing.verify_envelope(env, [], signing.GATE_PREDICATE)
    with pytest.raises(SignatureError, match="not a DSSE envelope"):
        signing.verify_envelope({"payload": env["payload"]}, trusted, signing.GATE_PREDICATE)


def test_ecdsa_p256_keys_work_too(tmp_path):
    """Keys made with `openssl ecparam -name prime256v1 -genkey` (the OpenSSF model-signing default)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    digests = signing.directory_digests(_model(tmp_path / "m"))
    env = signing.sign_statement(signing.make_statement(digests, signing.GATE_PREDICATE, {}), pem)
    assert signing.verify_envelope(env, [signing.public_key_pem(pem)], signing.GATE_PREDICATE)["subject"]


def test_links_are_refused_and_signature_files_can_be_excluded(keys, tmp_path):
    model = _model(tmp_path / "m")
    (model / "approval.dsse.json").write_text("{}")
    assert "approval.dsse.json" not in signing.directory_digests(model, exclude=["approval.dsse.json"])
    (model / "link").symlink_to(model / "MLmodel")
    with pytest.raises(SignatureError, match="not a plain file"):
        signing.directory_digests(model)


def test_pae_is_the_dsse_encoding():
    # the DSSE spec's example: PAE("http://example.com/HelloWorld", "hello world")
    assert signing.pae("http://example.com/HelloWorld", b"hello world") == \
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"


def test_keygen_writes_the_secret_and_the_trust_file_and_never_overwrites(tmp_path, capsys):
    from medisyn.cli import EXIT_BAD_INPUT, main

    assert main(["keygen", "--role", "gate", "--out", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    key, pub = tmp_path / "gate" / "key.pem", tmp_path / "gate.pub"
    assert out["keyid"] == signing.key_id(pub.read_bytes()) and oct(key.stat().st_mode & 0o777) == "0o600"
    assert signing.public_key_pem(key.read_bytes()) == pub.read_bytes()
    before = key.read_bytes()
    assert main(["keygen", "--role", "gate", "--out", str(tmp_path)]) == EXIT_BAD_INPUT
    assert key.read_bytes() == before and "not overwriting" in capsys.readouterr().err
