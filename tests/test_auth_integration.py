"""The chart's MLflow configuration, for real (issue #10): PostgreSQL backend (a throwaway Debian
cluster on loopback), artifacts on an S3 server (moto, loopback), basic auth on, the identities and
permissions created by ``medisyn.access.bootstrap`` as the chart's hook Job does.

One scenario, in order: the pipeline registers a candidate (idempotently) and cannot approve it; a
forged gate tag followed by promote does not approve; nobody but the promoter can set ``approved``;
verified gates let the promoter approve, with who/when/evidence recorded; the consumer pulls
``@approved`` and can write nothing; revoke withdraws; a tampered artifact is refused by pull and by
``mlflow.pyfunc.load_model``; an unreachable registry is a non-zero exit, not "not approved". Then the
attacks of issue #21 with a stolen pipeline credential, and the consumer's side of signed approval.

The server (and its database cluster and bucket) starts once for the module; each test bootstraps and
works in its own experiment and registered models. The server remembers verified passwords for 60 s
as the chart configures it (``auth_cache_ttl_seconds``). When every test started its own servers and
every call paid the password hash, this module took 11 minutes; now about 2.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request

import pytest

from helpers import model_env, write_checkpoints
from medisyn import access, registry, storage, tracking
from medisyn.demo.services import MLflowServer, MotoS3Server

pytestmark = [pytest.mark.slow, pytest.mark.mlflow, pytest.mark.s3]
GATES = ["privacy", "utility"]


def _score(checkpoint_uri: str):
    from medisyn.evaluate.fid import ScoreResult

    return ScoreResult(out_uri="/nowhere", best_epoch=1, best_checkpoint_uri=checkpoint_uri, best_fid=1.0,
                       fid_by_epoch={1: 1.0}, fid_by_specialty={}, fid_ci=None, num_samples=1, seed=0,
                       mode="full", provenance={}, dataset_hash="d", real_stats_uri="", real_stats_cached=False)


def _denied(fn) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        fn()
    except MlflowException as exc:
        return "403" in str(exc) or "401" in str(exc) or "Permission denied" in str(exc)
    return False


@pytest.fixture(scope="module")
def chart_mlflow(tmp_path_factory):
    """(server, s3, creds, base cfg): MLflow on PostgreSQL + S3 with basic auth, as the chart runs it,
    started once for this module (each test bootstraps its own experiment and models on it)."""
    from sqlalchemy import create_engine, text

    from helpers import postgres_cluster

    tmp = tmp_path_factory.mktemp("chart-mlflow")
    with postgres_cluster() as postgres_url:
        engine = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:  # tracking data and users in their own databases of the one cluster
            conn.execute(text("CREATE DATABASE mlflow"))
            conn.execute(text("CREATE DATABASE mlflow_auth"))
        engine.dispose()
        base = postgres_url.rsplit("/", 1)[0]
        creds = access.generate_credentials()
        ini = access.write_auth_config(tmp / "basic_auth.ini", f"{base}/mlflow_auth", creds["admin"])
        cfg, _ = model_env(tmp / "models")
        with MotoS3Server() as s3:
            s3.create_bucket("mlflow")
            with MLflowServer(tmp / "mlflow", artifacts_uri="s3://mlflow/artifacts", s3_endpoint=s3.endpoint_url,
                              backend_store_uri=f"{base}/mlflow", auth_config=ini,
                              flask_secret_key="flask-key-for-this-test-only") as server:
                yield server, s3, creds, cfg


@pytest.fixture
def platform(chart_mlflow, request):
    """(cfg, server, s3, creds, experiment_id): this test's own experiment and registered models on the
    module's server, bootstrapped as the chart's hook Job does (identities, grants)."""
    server, s3, creds, cfg = chart_mlflow
    name = request.node.name.removeprefix("test_")[:40]
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(
        update={"tracking_uri": server.tracking_uri, "experiment": f"exp-{name}", "model_name": f"m-{name}"})})
    ids = access.bootstrap(server.tracking_uri, cfg, creds["admin"], {r: creds[r] for r in access.IDENTITIES})
    try:
        yield cfg, server, s3, creds, ids["experiment_id"]
    finally:
        import mlflow

        mlflow.set_tracking_uri(None)
        tracking._CONFIGURED = None


def _store_keys(s3, experiment_id: str, suffix: str) -> list[str]:
    """The objects of this test's experiment in the artifact bucket whose keys end with ``suffix``."""
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket="mlflow", Prefix=f"artifacts/{experiment_id}/")
            .get("Contents", [])]
    return [k for k in keys if k.endswith(suffix)]


def _store_key(s3, experiment_id: str, suffix: str) -> str:
    """The one such object (:func:`_store_keys`)."""
    (key,) = _store_keys(s3, experiment_id, suffix)
    return key


def _tamper_weights_and_manifest(s3, weights_key: str) -> bytes:
    """Flip a byte of the U-Net in the store and rewrite its manifest to match (what a store-level
    attacker can do); returns the new manifest's bytes."""
    import hashlib

    manifest_key = weights_key.replace(registry.UNET_WEIGHTS, registry.MANIFEST_FILE)
    body = bytearray(s3.client().get_object(Bucket="mlflow", Key=weights_key)["Body"].read())
    body[-1] ^= 0xFF
    manifest = json.loads(s3.client().get_object(Bucket="mlflow", Key=manifest_key)["Body"].read())
    manifest[registry.UNET_WEIGHTS] = hashlib.sha256(bytes(body)).hexdigest()
    new_manifest = json.dumps(manifest).encode()
    s3.client().put_object(Bucket="mlflow", Key=weights_key, Body=bytes(body))
    s3.client().put_object(Bucket="mlflow", Key=manifest_key, Body=new_manifest)
    return new_manifest


def _candidate(cfg, creds, tmp_path, monkeypatch, gates_pass: bool = False):
    """A registered candidate (pipeline identity) of a tiny checkpoint; with ``gates_pass``, both gates
    have run and passed (signed with the session's gate key). Returns (registration, checkpoint URI)."""
    monkeypatch.setenv("MEDISYN_CACHE_DIR", str(tmp_path / "cache"))
    (ck,) = write_checkpoints(cfg, str(tmp_path / "checkpoints"), epochs=1)
    with access.acting_as(creds["pipeline"]):
        reg = registry.register_candidate(cfg, _score(ck), str(tmp_path / "no-dataset"))
        if gates_pass:
            for gate in GATES:
                registry.set_gate_result(cfg, reg.model_uri, gate, True, {})
    return reg, ck


def test_permission_split_verified_verdicts_revoke_and_integrity(platform, tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    cfg, server, s3, creds, experiment_id = platform
    as_ = access.acting_as
    cands, appr = registry.candidates_model(cfg), registry.approved_model(cfg)

    # -- the pipeline registers a candidate, once however often it retries, and cannot approve it ---------
    reg, ck = _candidate(cfg, creds, tmp_path, monkeypatch)
    with as_(creds["pipeline"]):
        again = registry.register_candidate(cfg, _score(ck), str(tmp_path / "no-dataset"))
        assert again.version == reg.version and reg.name == cands
        client = MlflowClient()
        assert len(client.search_model_versions(f"name='{cands}'")) == 1
        tags = client.get_model_version(cands, reg.version).tags
        assert len(tags[registry.MANIFEST_DIGEST_TAG]) == 64 and len(tags[registry.UNET_DIGEST_TAG]) == 64
        assert _denied(lambda: client.create_model_version(appr, f"models:/{cands}/{reg.version}"))
        assert _denied(lambda: client.set_registered_model_alias(appr, "approved", "1"))
        # -- a forged verdict: hand-set tags saying passed --------------------------------------------------
        for gate in ("privacy", "utility"):
            client.set_model_version_tag(cands, reg.version, f"gate.{gate}", "passed")
    with as_(creds["promoter"]):
        forged = registry.promote(cfg, reg.model_uri, ["privacy", "utility"])
    assert not forged.approved and all(s.startswith("unverified") for s in forged.gates.values()), forged

    # -- direct alias calls by any identity but the promoter are refused (anonymous: not even read) ------
    for who in ("pipeline", "consumer"):
        with as_(creds[who]):
            assert _denied(lambda: MlflowClient().set_registered_model_alias(appr, "approved", "1")), who
    with as_(None):
        assert _denied(lambda: MlflowClient().set_registered_model_alias(appr, "approved", "1"))
        assert _denied(lambda: MlflowClient().search_registered_models())

    # -- real gate runs (pipeline identity): a failed one does not approve, passed ones do ---------------
    with as_(creds["pipeline"]):
        registry.set_gate_result(cfg, reg.model_uri, "privacy", True, {"fraction_below": 0.0})
        registry.set_gate_result(cfg, reg.model_uri, "utility", False, {"upper_ci": 0.2})
    with as_(creds["promoter"]):
        r = registry.promote(cfg, reg.model_uri, ["privacy", "utility"])
    assert not r.approved and r.gates == {"privacy": "passed", "utility": "failed"}
    with as_(creds["pipeline"]):
        registry.set_gate_result(cfg, reg.model_uri, "utility", True, {"upper_ci": 0.01})
        # the pipeline forging the tag back to "failed" changes nothing: the run is the verdict
    with as_(creds["promoter"]):
        r = registry.promote(cfg, reg.model_uri, ["privacy", "utility"])
        assert r.approved and r.approved_by == creds["promoter"].username, r
        assert registry.promote(cfg, reg.model_uri, ["privacy", "utility"]).approved_uri == r.approved_uri  # idempotent
        mv = MlflowClient().get_model_version_by_alias(appr, "approved")
    record = json.loads(mv.tags["approval.record"])
    assert mv.tags["approval.by"] == creds["promoter"].username and mv.tags["approval.at"]
    assert record["candidate"] == f"{cands}/{reg.version}" and set(record["gates"]) == {"privacy", "utility"}
    assert record["manifest_sha256"] == tags[registry.MANIFEST_DIGEST_TAG] == mv.tags[registry.MANIFEST_DIGEST_TAG]
    assert all(len(e["verdict_sha256"]) == 64 and e["identity"] == creds["pipeline"].username
               for e in record["gates"].values())

    # -- the consumer pulls @approved (digests verified) and can write nothing --------------------------
    uri = f"models:/{appr}@approved"
    with as_(creds["consumer"]):
        pulled = registry.pull(uri, tmp_path / "pulled")
        assert (pulled / "model_index.json").exists()
        client = MlflowClient()
        assert _denied(lambda: client.set_model_version_tag(appr, mv.version, "x", "y"))
        assert _denied(lambda: client.set_model_version_tag(cands, reg.version, "gate.utility", "passed"))
        assert _denied(lambda: client.create_run(client.get_experiment_by_name(cfg.tracking.experiment).experiment_id))
        assert _denied(lambda: client.delete_registered_model_alias(appr, "approved"))

    # -- revoke: @approved goes away with the reason, and comes back only through promote ----------------
    with as_(creds["pipeline"]):
        assert _denied(lambda: registry.revoke(cfg, uri, "not yours to revoke"))
    with as_(creds["promoter"]):
        rv = registry.revoke(cfg, uri, "found a label leak")
    assert rv.approved_now is None and rv.revoked_by == creds["promoter"].username
    with as_(creds["consumer"]), pytest.raises(LookupError, match="found a label leak"):
        registry.pull(uri, tmp_path / "pulled-after-revoke")
    with as_(creds["promoter"]):
        assert registry.promote(cfg, reg.model_uri, ["privacy", "utility"]).approved

    # -- artifact writes need an identity; a tampered store is refused by pull and pyfunc ---------------
    weights = _store_key(s3, experiment_id, "pipeline/" + registry.UNET_WEIGHTS)
    rel = weights.split("/artifacts/", 1)[1]  # <exp>/.../artifacts/...: the proxy path below artifacts/
    req = urllib.request.Request(f"{server.url}/api/2.0/mlflow-artifacts/artifacts/{rel}", data=b"evil", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(req, timeout=30)
    assert denied.value.code == 401
    _tamper_weights_and_manifest(s3, weights)  # what the old pull accepted: the manifest matches the weights
    with as_(creds["consumer"]):
        with pytest.raises(registry.IntegrityError, match="tampered"):
            registry.pull(uri, tmp_path / "pulled-tampered")
        assert not (tmp_path / "pulled-tampered").exists()
        with pytest.raises(Exception, match="tampered"):
            mlflow.pyfunc.load_model(uri)
        from medisyn.generate import load_model

        with pytest.raises(registry.IntegrityError, match="tampered"):
            load_model(cfg, uri)


def test_an_unreachable_registry_is_a_nonzero_exit_not_a_verdict(tmp_path, monkeypatch, capsys):
    from medisyn.cli import EXIT_REGISTRY_UNAVAILABLE, main
    from medisyn.demo.services import free_port

    cfg, _ = model_env(tmp_path / "models")
    config = tmp_path / "c.yaml"
    config.write_text(cfg.to_yaml())
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    dead = f"http://127.0.0.1:{free_port()}"
    try:
        code = main(["promote", "--config", str(config), "--set", f"tracking.tracking_uri={dead}", "--model", "1"])
    finally:
        import mlflow

        mlflow.set_tracking_uri(None)
        tracking._CONFIGURED = None
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_REGISTRY_UNAVAILABLE and err[-1].startswith("medisyn: registry"), err[-3:]
    assert storage  # (imported for the S3 helpers above)


def _fabricated_gate_run(cfg, cands: str, version: str, gate: str, attestation: bytes | None = None) -> str:
    """What the pipeline identity can write by itself: a complete, FINISHED gate run saying passed for the
    version's current manifest, with the params promote reads, tagged on the version (issue #21, item 1);
    optionally with an attestation envelope copied in (a replay of an honest signed verdict)."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    client = MlflowClient()
    manifest = client.get_model_version(cands, version).tags[registry.MANIFEST_DIGEST_TAG]
    exp = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    run = client.create_run(exp, tags={"medisyn.stage": f"{gate}-gate"}).info.run_id
    verdict = json.dumps({"gate": gate, "passed": True, "model": f"{cands}/{version}", "manifest_sha256": manifest,
                          "identity": "gatekeeper", "at": "2026-12-07T00:00:00+00:00", "report_sha256": {},
                          "details": {}}, sort_keys=True)
    client.log_text(run, verdict, registry.VERDICT_ARTIFACT)
    if attestation is not None:
        client.log_text(run, attestation.decode(), "gate/attestation.dsse.json")
    import hashlib

    client.log_batch(run, params=[
        Param("medisyn.gate", gate), Param("medisyn.gate.model", f"{cands}/{version}"),
        Param("medisyn.gate.verdict", "passed"),
        Param("medisyn.gate.verdict_sha256", hashlib.sha256(verdict.encode()).hexdigest()),
        Param("medisyn.gate.manifest_sha256", manifest), Param("medisyn.gate.identity", "gatekeeper")])
    client.set_terminated(run)
    client.set_model_version_tag(cands, version, f"gate.{gate}.run_id", run)
    client.set_model_version_tag(cands, version, f"gate.{gate}", "passed")
    return run


def test_a_stolen_pipeline_credential_cannot_approve(platform, tmp_path, monkeypatch):
    """Issue #21, acting as the pipeline identity (whose Secret is in almost every pod) on the chart's
    configuration: fabricated gate runs, a self-declared gate identity with a key of the attacker's own, and
    a replaced U-Net with replayed honest signed verdicts: promote refuses each, naming why. The honest
    gates (the gate key, mounted into the gate steps only) still approve."""
    import hashlib

    from mlflow import MlflowClient

    from medisyn import signing

    cfg, server, s3, creds, experiment_id = platform
    as_ = access.acting_as
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"gate_identities": ["gatekeeper"]})})
    cands = registry.candidates_model(cfg)
    gates = GATES
    reg, _ = _candidate(cfg, creds, tmp_path, monkeypatch)

    def promote() -> registry.PromoteResult:
        with as_(creds["promoter"]):
            return registry.promote(cfg, reg.model_uri, gates)

    # 1. fabricated gate runs, "written by the gatekeeper" by the run's own say-so: no signed verdict
    with as_(creds["pipeline"]):
        for gate in gates:
            _fabricated_gate_run(cfg, cands, reg.version, gate)
    r = promote()
    assert not r.approved and all("no signed attestation" in s for s in r.gates.values()), r.gates

    # 2. the same, with verdicts signed by a key the attacker made (not in the trust policy)
    attacker, _ = signing.write_key_pair(tmp_path / "attacker", "key")
    from medisyn.registry.attestation import version_digests

    with as_(creds["pipeline"]):
        digests = version_digests(cands, reg.version)
        for gate in gates:
            stmt = signing.make_statement(digests, signing.GATE_PREDICATE,
                                          {"gate": gate, "passed": True, "model": f"{cands}/{reg.version}"})
            env = json.dumps(signing.sign_statement(stmt, attacker.read_bytes())).encode()
            _fabricated_gate_run(cfg, cands, reg.version, gate, attestation=env)
    r = promote()
    assert not r.approved and all("not signed by a trusted key" in s for s in r.gates.values()), r.gates

    # 3. honest gates sign; then the U-Net (and its manifest, and the manifest tag) is replaced in the store,
    #    and the honest signed verdicts are replayed in fresh runs that judge the new manifest
    import mlflow

    honest = {}
    with as_(creds["pipeline"]):  # the gate steps: the session's gate key is mounted (tests/conftest.py)
        for gate in gates:
            run = registry.set_gate_result(cfg, reg.model_uri, gate, True, {})
            honest[gate] = mlflow.artifacts.download_artifacts(
                artifact_uri=f"runs:/{run}/gate/attestation.dsse.json", dst_path=str(tmp_path / gate))
    new_manifest = _tamper_weights_and_manifest(s3, _store_key(s3, experiment_id, "pipeline/" + registry.UNET_WEIGHTS))
    with as_(creds["pipeline"]):
        MlflowClient().set_model_version_tag(cands, reg.version, registry.MANIFEST_DIGEST_TAG,
                                             hashlib.sha256(new_manifest).hexdigest())
        for gate in gates:
            _fabricated_gate_run(cfg, cands, reg.version, gate, attestation=open(honest[gate], "rb").read())
    r = promote()
    assert not r.approved, r
    assert all("not the signed ones" in s and registry.UNET_WEIGHTS in s for s in r.gates.values()), r.gates


def test_honest_approval_and_consumers_load_only_what_the_promoter_signed(platform, tmp_path, monkeypatch):
    """Issue #21, the honest path and the consumer's side, on the chart's configuration: honest signed gates
    do not approve without a trust policy (fail closed) and do with it, the approval record naming each
    signed subject and key; after that approval, a store-level
    attacker replaces the pyfunc's loader code with one that writes a sentinel file: `load_pyfunc`, `pull`
    and `generate` refuse it before any model code runs (the sentinel never appears); weights, manifest and
    MLmodel changed together are refused online and offline; `<candidates>@approved` (an alias the pipeline
    may set) and a revoked version are refused; an honest pull verifies offline with no registry."""
    import mlflow

    from medisyn import consumer, signing
    from medisyn.generate import generate
    from medisyn.registry.names import APPROVAL_FILE

    cfg, server, s3, creds, experiment_id = platform
    as_ = access.acting_as
    cands, appr = registry.candidates_model(cfg), registry.approved_model(cfg)
    reg, _ = _candidate(cfg, creds, tmp_path, monkeypatch, gates_pass=True)
    with monkeypatch.context() as no_trust:
        no_trust.delenv(signing.TRUST_DIR_ENV)
        with as_(creds["promoter"]):
            r = registry.promote(cfg, reg.model_uri, GATES)
    assert not r.approved and all("no trusted public key" in s for s in r.gates.values()), r.gates
    with as_(creds["promoter"]):
        r = registry.promote(cfg, reg.model_uri, GATES)
    assert r.approved, r
    name, version = r.approved_uri[len("models:/"):].rsplit("/", 1)
    with as_(creds["consumer"]):
        record = json.loads(mlflow.MlflowClient().get_model_version(name, version).tags["approval.record"])
    assert all(len(g["subject_sha256"]) == 64 and g["attestation_keyid"] for g in record["gates"].values())
    uri = f"models:/{appr}@approved"

    # honest: pulled, verified offline (no registry), loaded as a pyfunc and used
    with as_(creds["consumer"]):
        pulled = registry.pull(uri, tmp_path / "pulled")
        model = consumer.load_pyfunc(uri, str(tmp_path / "pyfunc"))
    assert consumer.verify_pulled(pulled)["predicate"]["approved"] == f"{appr}/1"
    assert model.predict({"prompt": "Dermoscopy image showing melanoma.", "num_inference_steps": 1}).shape[0] == 1
    shutil.rmtree(tmp_path / "pyfunc")

    # the pipeline sets `approved` on the candidates' model: no consumer path serves it
    with as_(creds["pipeline"]):
        mlflow.MlflowClient().set_registered_model_alias(cands, "approved", reg.version)
    with as_(creds["consumer"]):
        for attempt in (lambda: registry.pull(f"models:/{cands}@approved", tmp_path / "c"),
                        lambda: consumer.load_pyfunc(f"models:/{cands}@approved"),
                        lambda: generate(cfg, f"models:/{cands}@approved", ["x"], 1, str(tmp_path / "g"))):
            with pytest.raises(registry.IntegrityError, match="no promoter signature"):
                attempt()

    # a store-level attacker plants a loader (the approved version's files live in the artifact store)
    sentinel = tmp_path / "loader-ran"
    loaders = _store_keys(s3, experiment_id, "/pyfunc_model.py")
    assert loaders
    planted = f"open({str(sentinel)!r}, 'w').write('pwned')\n".encode()
    for loader in loaders:
        s3.client().put_object(Bucket="mlflow", Key=loader, Body=planted + s3.client().get_object(
            Bucket="mlflow", Key=loader)["Body"].read())
    with as_(creds["consumer"]):
        for attempt in (lambda: consumer.load_pyfunc(uri), lambda: registry.pull(uri, tmp_path / "p2"),
                        lambda: generate(cfg, uri, ["x"], 1, str(tmp_path / "g2"))):
            with pytest.raises(registry.IntegrityError, match="changed: pyfunc_model.py"):
                attempt()
    assert not sentinel.exists()  # refused before any model code ran

    # weights + manifest + MLmodel changed together in a pulled copy: refused offline (registry down)
    weights = next((pulled / "unet").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    manifest = json.loads((pulled / registry.MANIFEST_FILE).read_text())
    import hashlib

    manifest[registry.UNET_WEIGHTS] = hashlib.sha256(bytes(data)).hexdigest()
    (pulled / registry.MANIFEST_FILE).write_text(json.dumps(manifest))
    (pulled / "MLmodel").write_text("run_id: attacker\n")
    with pytest.raises(registry.IntegrityError, match="refusing a tampered model"):
        consumer.verify_pulled(pulled)
    (pulled / APPROVAL_FILE).unlink()
    with pytest.raises(registry.IntegrityError, match="no promoter signature"):
        consumer.verify_pulled(pulled)

    # revoked: refused by every consumer path, naming the revocation
    with as_(creds["promoter"]):
        registry.revoke(cfg, f"models:/{appr}/1", "label leak found")
    with as_(creds["consumer"]):
        for attempt in (lambda: consumer.load_pyfunc(f"models:/{appr}/1"),
                        lambda: registry.pull(f"models:/{appr}/1", tmp_path / "p3"),
                        lambda: generate(cfg, f"models:/{appr}/1", ["x"], 1, str(tmp_path / "g3"))):
            with pytest.raises(LookupError, match="label leak found"):
                attempt()
