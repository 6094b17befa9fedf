"""The chart is secure as installed (issue #10): rendered with its defaults (and with overrides), MLflow
auth is on and wired from Secrets (no `lookup`), a hook Job bootstraps the identities, NetworkPolicies
select the right pods, no secret value sits in a ConfigMap or an env literal, the patient-ID salt comes
from a Secret into every pod that preprocesses, security contexts and image digests are values, and a
`helm test` hook checks MLflow. A non-demo config without a salt fails fast, naming the field."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import yaml

from helpers import REPO

CHART = REPO / "charts" / "medisyn"
NAMESPACE = "ml"


def _render(*sets: str, show_only: str | None = None) -> list[dict]:
    import subprocess

    from helpers import helm_binary

    exe = helm_binary()
    args = [exe, "template", "medisyn", str(CHART), "--namespace", NAMESPACE]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    return _render()


def _one(docs: list[dict], kind: str, name_part: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and name_part in d["metadata"]["name"]]
    return doc


def _pod_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return spec["template"]["spec"] if "template" in spec else spec


def _labels(doc: dict) -> dict:
    spec = doc["spec"]
    return (spec["template"]["metadata"]["labels"] if "template" in spec else doc["metadata"]["labels"])


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def test_should_turn_mlflow_auth_on_by_default_with_credentials_from_secrets(rendered):
    mlflow = _one(rendered, "Deployment", "mlflow")
    container = _pod_spec(mlflow)["containers"][0]
    assert "--app-name basic-auth" in " ".join(container["args"])
    env = {e["name"]: e for e in container["env"]}
    for key, secret_key in (("MLFLOW_AUTH_ADMIN_USERNAME", "username"), ("MLFLOW_AUTH_ADMIN_PASSWORD", "password"),
                            ("MLFLOW_FLASK_SERVER_SECRET_KEY", "flask-secret-key")):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "medisyn-mlflow-admin", "key": secret_key}
    # the template of the image: least privilege for users without grants
    assert re.search(r"^default_permission = READ$", (REPO / "mlflow" / "basic_auth.ini.template").read_text(), re.M)


def test_should_not_lookup_mlflow_credentials_so_template_and_dry_runs_render_the_same():
    for name in ("secret-mlflow-client.yaml", "mlflow.yaml", "mlflow-auth-hook.yaml", "networkpolicy.yaml"):
        assert "(lookup " not in (CHART / "templates" / name).read_text(), name
    client = _one(_render(), "Secret", "mlflow-client")
    assert set(client["stringData"]) == {"MLFLOW_TRACKING_URI"}  # credentials are per identity


def test_should_bootstrap_identities_in_a_hook_job_from_their_secrets(rendered):
    job = _one(rendered, "Job", "mlflow-auth-bootstrap")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    spec = _pod_spec(job)
    assert spec["containers"][0]["command"][:4] == ["python", "-m", "medisyn.access", "bootstrap"]
    secrets = {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    assert secrets == {"medisyn-mlflow-pipeline", "medisyn-mlflow-promoter", "medisyn-mlflow-consumer"}


def test_should_restrict_mlflow_postgresql_and_minio_to_platform_pods():
    docs = _render("minio.enabled=true", "minio.rootUser=admin", "minio.rootPassword=adminadmin",
                   "networkPolicy.ingressFrom[0].namespaceSelector.matchLabels.team=ingress")
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    targets = {"mlflow": "Deployment", "postgresql": "StatefulSet", "minio": "StatefulSet"}
    for component, kind in targets.items():
        workload = next(d for d in docs if d["kind"] in (kind, "Deployment")
                        and d["metadata"]["name"].endswith(component))
        policy = policies[f"medisyn-{component}"]
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        assert _matches(policy["spec"]["podSelector"], _labels(workload)), component  # selects its own pods
        others = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet") and d is not workload]
        assert not any(_matches(policy["spec"]["podSelector"], _labels(o)) for o in others), component
        peers = [p for rule in policy["spec"]["ingress"] for p in rule["from"]]
        assert peers and all("ipBlock" not in p for p in peers)  # never "from anywhere"
    mlflow_peers = [p for r in policies["medisyn-mlflow"]["spec"]["ingress"] for p in r["from"]]
    assert {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "medisyn"}}} in mlflow_peers
    assert {"namespaceSelector": {"matchLabels": {"team": "ingress"}}} in mlflow_peers  # the ingress, when set
    pg_peers = [p for r in policies["medisyn-postgresql"]["spec"]["ingress"] for p in r["from"]]
    mlflow_pod = _labels(_one(docs, "Deployment", "mlflow"))
    assert any(_matches(p["podSelector"], mlflow_pod) for p in pg_peers)
    # the pods that must reach MLflow carry the platform label: hook Job, registration Job, helm test
    for doc in docs:
        if doc["kind"] in ("Job", "Pod"):
            assert _labels(doc).get("app.kubernetes.io/part-of") == "medisyn", doc["metadata"]["name"]


def test_should_keep_every_secret_value_out_of_configmaps_and_env_literals():
    docs = _render("minio.enabled=true", "minio.rootUser=admin", "minio.rootPassword=adminadmin-secret",
                   "s3.accessKeyId=AKIAEXAMPLEKEY", "s3.secretAccessKey=s3-secret-value-123",
                   "postgresql.auth.password=pg-secret-value-123")
    values = {"s3-secret-value-123", "pg-secret-value-123"}
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            assert not any(v in json.dumps(doc) for v in values), doc["metadata"]["name"]
        spec = doc.get("spec") or {}
        pod = _pod_spec(doc) if isinstance(spec, dict) and ("template" in spec or "containers" in spec) else {}
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            for e in c.get("env", []):
                if "value" in e:
                    assert not any(v in str(e["value"]) for v in values), (doc["metadata"]["name"], e["name"])
                    assert not re.search(r"PASSWORD|SECRET|SALT", e["name"]) or "valueFrom" in e, e
    # the values do land in Secrets (so the test above is not vacuous)
    secret_blob = json.dumps([d for d in docs if d["kind"] == "Secret"])
    decoded = " ".join(base64.b64decode(v).decode(errors="replace") for d in docs if d["kind"] == "Secret"
                       for v in (d.get("data") or {}).values())
    assert all(v in secret_blob or v in decoded for v in values)


def test_should_wire_the_id_salt_from_a_secret_into_every_pod_that_preprocesses(rendered):
    job = _one(rendered, "Job", "register-pipeline")
    args = _pod_spec(job)["containers"][0]["args"]
    params = json.loads(next(a for a in args if a.startswith("--params-json="))[len("--params-json="):])
    assert params["id_salt_secret"] == "medisyn-id-salt"  # KFP preprocessing steps: env from this Secret
    assert "medisyn-id-salt" in json.loads(params["cluster_json"])["env_secrets"]  # RayJob / TrainJob pods
    assert params["mlflow_pipeline_secret"] == "medisyn-mlflow-pipeline"
    assert params["mlflow_promoter_secret"] == "medisyn-mlflow-promoter"
    # the compiled pipeline maps that Secret into the preprocessing steps only
    from medisyn.pipeline.definition import compile_pipeline

    out = compile_pipeline(Path(pytest.importorskip("tempfile").mkdtemp()) / "p.yaml")
    docs = list(yaml.safe_load_all(out.read_text()))
    platform = next(d for d in docs if "platforms" in d)
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    salted = {name for name, ex in executors.items()
              if any(m.get("secretNameParameter", {}).get("componentInputParameter") == "id_salt_secret"
                     or "MEDISYN_ID_SALT" in json.dumps(m) for m in ex.get("secretAsEnv", []))}
    assert salted and all("preprocess" in name for name in salted), salted
    promoter = {name for name, ex in executors.items() if "mlflow_promoter_secret" in json.dumps(ex)}
    assert promoter == {"exec-promote"}, promoter


def test_should_give_each_signing_key_secret_only_to_its_steps_and_the_public_keys_to_all(tmp_path):
    """Issue #21: the gate key and the promoter key are separate Secrets, named to the pipeline, which mounts
    each only into its own steps (tests/test_pipeline_compile.py checks the compiled mounts); the trust policy
    is a ConfigMap of public keys only, and no private key is ever rendered."""
    from medisyn import signing

    _, gate_pub = signing.write_key_pair(tmp_path, "gate")
    promoter_key, promoter_pub = signing.write_key_pair(tmp_path, "promoter")
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"signing": {"promoterKeySecret": "team-promoter-key", "trust": {
        "gate": [gate_pub.read_text()], "promoter": [promoter_pub.read_text()]}}}))
    import subprocess

    from helpers import helm_binary

    out = subprocess.run([helm_binary(), "template", "medisyn", str(CHART), "--namespace", NAMESPACE, "-f",
                          str(values)], capture_output=True, text=True, timeout=120, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    trust = _one(docs, "ConfigMap", "trust")
    assert trust["data"] == {"gate-0.pub": gate_pub.read_text(), "promoter-0.pub": promoter_pub.read_text()}
    assert "PRIVATE KEY" not in out and promoter_key.read_text() not in out
    params = json.loads(next(a for a in _pod_spec(_one(docs, "Job", "register-pipeline"))["containers"][0]["args"]
                             if a.startswith("--params-json="))[len("--params-json="):])
    assert (params["gate_key_secret"], params["promoter_key_secret"], params["trust_config_map"]) == (
        "medisyn-gate-key", "team-promoter-key", "medisyn-trust")
    # no key Secret is mounted into a long-running pod of the chart (MLflow, the study app, the hooks)
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            vols = json.dumps(_pod_spec(doc).get("volumes", []))
            assert "gate-key" not in vols and "promoter-key" not in vols, doc["metadata"]["name"]
    # a public key that is not PEM is refused at install time by the values schema
    bad = subprocess.run([helm_binary(), "template", "medisyn", str(CHART), "--set", "signing.trust.gate[0]=abc"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "signing" in bad.stderr


def test_should_take_security_contexts_and_image_digests_from_values():
    digest = "sha256:" + "c" * 64
    docs = _render(f"mlflow.image.digest={digest}", "containerSecurityContext.runAsUser=2000",
                   "podSecurityContext.runAsUser=2000")
    mlflow = _pod_spec(_one(docs, "Deployment", "mlflow"))
    assert mlflow["containers"][0]["image"] == f"ghcr.io/medisyn/medisyn-mlflow@{digest}"
    assert mlflow["containers"][0]["securityContext"]["runAsUser"] == 2000
    assert mlflow["securityContext"]["runAsUser"] == 2000
    # hardened defaults
    sc = _pod_spec(_one(_render(), "Deployment", "mlflow"))["containers"][0]["securityContext"]
    assert sc["readOnlyRootFilesystem"] and sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"]


def test_should_ship_a_helm_test_that_refuses_anonymous_writes(rendered):
    pod = _one(rendered, "Pod", "test-mlflow")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = pod["spec"]["containers"][0]["command"][-1]
    assert "/health" in script and "experiments/create" in script and "401" in script


def test_a_non_demo_config_without_a_salt_fails_fast_naming_the_field(tmp_path, monkeypatch, capsys):
    from medisyn.cli import EXIT_BAD_INPUT, main

    monkeypatch.delenv("MEDISYN_ID_SALT", raising=False)
    code = main(["preprocess", "--config", str(REPO / "configs" / "paper.yaml"),
                 "--raw", str(tmp_path / "raw-that-is-never-read"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and "data.id_salt_env" in err and "MEDISYN_ID_SALT" in err, err
    assert not (tmp_path / "out").exists()  # before any work
