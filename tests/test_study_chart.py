"""The chart's reader-study app (issue #15): off by default; when on, a hardened Deployment running
``medisyn study serve``, its Service, the database URL from a Secret (or built in the pod from the
bundled PostgreSQL's password Secret) and a NetworkPolicy (ingress from the release and listed peers,
egress to DNS and the database only). Every object is valid Kubernetes (offline schemas, strict)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from helpers import helm_binary

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "medisyn"


def render(*sets: str, ok: bool = True) -> list[dict] | str:
    """The rendered objects; with ``ok=False``, helm's error message (the render must fail)."""
    args = [helm_binary(), "template", "medisyn", str(CHART), "--namespace", "ml"]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if not ok:
        assert proc.returncode != 0, "the render should have failed"
        return proc.stderr
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def study_objects(docs) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs
            if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "study"}


def container(objs) -> dict:
    return objs[("Deployment", "medisyn-study")]["spec"]["template"]["spec"]["containers"][0]


def test_the_study_app_is_off_by_default():
    assert study_objects(render()) == {}


CASES = {
    "bundled-postgresql": ("study.enabled=true",),
    "external-url": ("study.enabled=true", "postgresql.enabled=false",
                     "mlflow.backendStore.uri=postgresql://u:p@db.example:5432/mlflow",
                     "study.database.url=postgresql+psycopg://s:pa55w0rd@db.example:5432/study",
                     "study.networkPolicy.ingressFrom[0].namespaceSelector.matchLabels.team=ingress"),
    "existing-secret": ("study.enabled=true", "study.database.existingSecret=study-db",
                        "study.networkPolicy.databaseTo[0].ipBlock.cidr=10.0.0.0/16",
                        "study.networkPolicy.databasePort=6432"),
    "no-network-policy": ("study.enabled=true", "study.networkPolicy.enabled=false", "study.replicas=2"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_study_objects_are_valid_and_hardened(case):
    import kubernetes_validate

    docs = render(*CASES[case])
    objs = study_objects(docs)
    assert ("Deployment", "medisyn-study") in objs and ("Service", "medisyn-study") in objs
    assert (("NetworkPolicy", "medisyn-study") in objs) is (case != "no-network-policy")
    version = kubernetes_validate.latest_version()
    for doc in objs.values():
        kubernetes_validate.validate(doc, version, strict=True)
    spec = objs[("Deployment", "medisyn-study")]["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
    c = container(objs)
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and {"cpu", "memory"} <= set(c["resources"]["limits"])
    assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}
    assert c["command"] == ["medisyn", "study", "serve", "--host", "0.0.0.0", "--port", "8080"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["image"] == "ghcr.io/medisyn/medisyn-trainer:0.1.0"  # the project image


def test_bundled_database_url_is_built_in_the_pod_without_a_password_in_the_manifest():
    objs = study_objects(render(*CASES["bundled-postgresql"]))
    env = container(objs)["env"]
    names = [e["name"] for e in env]
    assert names.index("POSTGRES_PASSWORD") < names.index("MEDISYN_STUDY_DB_URL")  # $(VAR) needs it defined first
    pw = env[names.index("POSTGRES_PASSWORD")]["valueFrom"]["secretKeyRef"]
    assert pw == {"name": "medisyn-postgresql", "key": "POSTGRES_PASSWORD"}
    url = env[names.index("MEDISYN_STUDY_DB_URL")]["value"]
    assert url == "postgresql+psycopg://mlflow:$(POSTGRES_PASSWORD)@medisyn-postgresql.ml.svc:5432/mlflow"
    assert not any(k == "Secret" for k, _ in objs)
    policy = objs[("NetworkPolicy", "medisyn-study")]["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    (db_rule,) = [r for r in policy["egress"] if r["ports"][0]["port"] == 5432]
    assert db_rule["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "postgresql"
    assert {p["port"] for r in policy["egress"] for p in r["ports"]} == {53, 5432}  # nothing else leaves the pod
    (rule,) = policy["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/instance": "medisyn",
                                                             "app.kubernetes.io/part-of": "medisyn"}}}]


def test_external_database_url_lives_in_a_secret():
    objs = study_objects(render(*CASES["external-url"]))
    secret = objs[("Secret", "medisyn-study-db")]
    assert secret["stringData"]["MEDISYN_STUDY_DB_URL"] == "postgresql+psycopg://s:pa55w0rd@db.example:5432/study"
    (env,) = [e for e in container(objs)["env"] if e["name"] == "MEDISYN_STUDY_DB_URL"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "medisyn-study-db", "key": "MEDISYN_STUDY_DB_URL"}
    assert "pa55w0rd" not in yaml.safe_dump(objs[("Deployment", "medisyn-study")])
    policy = objs[("NetworkPolicy", "medisyn-study")]["spec"]
    assert {"namespaceSelector": {"matchLabels": {"team": "ingress"}}} in policy["ingress"][0]["from"]
    (db_rule,) = [r for r in policy["egress"] if r["ports"][0]["port"] == 5432]
    assert "to" not in db_rule  # any address, on the database port only


def test_existing_secret_is_referenced_not_created():
    objs = study_objects(render(*CASES["existing-secret"]))
    assert not any(k == "Secret" for k, _ in objs)
    (env,) = [e for e in container(objs)["env"] if e["name"] == "MEDISYN_STUDY_DB_URL"]
    assert env["valueFrom"]["secretKeyRef"]["name"] == "study-db"
    policy = objs[("NetworkPolicy", "medisyn-study")]["spec"]
    (db_rule,) = [r for r in policy["egress"] if r["ports"][0]["port"] == 6432]
    assert db_rule["to"] == [{"ipBlock": {"cidr": "10.0.0.0/16"}}]


@pytest.mark.parametrize("sets,message", [
    (("study.enabled=true", "postgresql.enabled=false", "mlflow.enabled=false",
      "mlflow.externalUrl=http://mlflow:5000"), "study.enabled needs a database"),
    (("study.enabld=true",), "enabld"),  # a typo fails the install (values.schema.json)
    (("study.enabled=true", "study.database.url=not a url"), "url"),
    (("study.enabled=true", "study.port=0"), "port"),
])
def test_bad_study_values_fail_the_render(sets, message):
    assert message in render(*sets, ok=False)
