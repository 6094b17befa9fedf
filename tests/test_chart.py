"""The Helm chart: lints, renders with default and non-default values, every object is valid
Kubernetes (offline JSON schemas, strict), the values schema catches typos, and every container is
hardened (non-root, read-only root filesystem, ALL capabilities dropped, RuntimeDefault seccomp,
requests and limits)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers import helm_binary

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "medisyn"


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def render(*sets: str, values: dict | None = None, tmp: Path | None = None) -> list[dict]:
    args = ["template", "medisyn", str(CHART), "--namespace", "ml"]
    for s in sets:
        args += ["--set", s]
    if values is not None:
        path = tmp / "values.yaml"
        path.write_text(yaml.safe_dump(values))
        args += ["-f", str(path)]
    out = helm(*args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


NON_DEFAULT = {
    "fullnameOverride": "msyn",
    "image": {"digest": "sha256:" + "b" * 64},
    "imagePullSecrets": [{"name": "regcred"}],
    "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/medisyn"}},
    "s3": {"endpoint": "https://s3.example.com", "bucket": "medisyn-prod", "existingSecret": "prod-s3"},
    "mlflow": {"replicas": 2, "allowedHosts": ["mlflow.example.com"],
               "auth": {"enabled": True, "existingSecret": "mlflow-admin"},
               "backendStore": {"existingSecret": "mlflow-db"}, "nodeSelector": {"pool": "system"},
               "tolerations": [{"key": "system", "operator": "Exists", "effect": "NoSchedule"}]},
    "postgresql": {"enabled": False},
    "minio": {"enabled": True, "rootUser": "admin", "rootPassword": "adminadmin",
              "buckets": ["medisyn-prod", "mlflow"]},
    "pipeline": {"kfpNamespace": "team-a", "kfpToken": True, "gpusPerStep": 2, "serviceAccount": "pipeline-runner",
                 "schedule": {"cron": "0 30 3 * * *", "catchup": True},
                 "params": {"trainLauncher": "local", "preprocessLauncher": "local",
                            "gpuNodeSelector": {"nvidia.com/gpu.present": "true"},
                            "gpuTolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                            "cluster": {"num_nodes": 4, "gpus_per_node": 8}}},
}

CASES = {
    "defaults": dict(),
    "non-default": dict(values=NON_DEFAULT),
    "minimal": dict(sets=("mlflow.enabled=false", "mlflow.externalUrl=http://mlflow.shared:5000",
                          "postgresql.enabled=false", "pipeline.register=false", "rbac.create=false",
                          "serviceAccount.create=false", "serviceAccount.name=existing-sa")),
    "external-db-no-schedule": dict(sets=("postgresql.enabled=false",
                                          "mlflow.backendStore.uri=postgresql://u:p@db.example:5432/mlflow",
                                          "pipeline.schedule.enabled=false")),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def rendered(request, tmp_path_factory):
    case = CASES[request.param]
    return request.param, render(*case.get("sets", ()), values=case.get("values"), tmp=tmp_path_factory.mktemp("v"))


def _pod_specs(docs):
    for d in docs:
        kind = d["kind"]
        if kind in ("Deployment", "StatefulSet", "Job"):
            yield d, d["spec"]["template"]["spec"]


def test_helm_lint():
    proc = helm("lint", str(CHART), "--strict")
    assert "0 chart(s) failed" in proc.stdout


def test_every_object_is_valid_kubernetes(rendered):
    import kubernetes_validate

    from medisyn.launch import validate_against_crd
    from medisyn.launch.crd import CRD_FILES

    _, docs = rendered
    version = kubernetes_validate.latest_version()
    for doc in docs:
        if doc["kind"] in CRD_FILES:  # an operator's resource (TrainingRuntime): against its own CRD
            validate_against_crd(doc)
            continue
        kubernetes_validate.validate(doc, version, strict=True)


def test_every_container_is_hardened(rendered):
    name, docs = rendered
    count = 0
    for obj, spec in _pod_specs(docs):
        psc = spec.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True and psc["seccompProfile"]["type"] == "RuntimeDefault", (
            obj["metadata"]["name"])
        for c in spec.get("initContainers", []) + spec["containers"]:
            count += 1
            where = f"{name}: {obj['kind']}/{obj['metadata']['name']}/{c['name']}"
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            for key in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][key]), where
            # a read-only root needs a writable /tmp
            assert "/tmp" in {m["mountPath"] for m in c.get("volumeMounts", [])}, where
    assert count >= 1 or name == "minimal"  # minimal: external MLflow, no registration Job


def _by_kind(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_defaults_render_mlflow_postgres_rbac_and_the_schedule():
    docs = render()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for kind, name in [("Deployment", "medisyn-mlflow"), ("Service", "medisyn-mlflow"),
                       ("StatefulSet", "medisyn-postgresql"), ("Role", "medisyn-jobs"),
                       ("RoleBinding", "medisyn-jobs"), ("ServiceAccount", "medisyn"),
                       ("ConfigMap", "medisyn-run-config"), ("Job", "medisyn-register-pipeline")]:
        assert (kind, name) in kinds, (kind, name)
    assert not any(d["kind"] == "StatefulSet" and "minio" in d["metadata"]["name"] for d in docs)
    role = _by_kind(docs, "Role")["medisyn-jobs"]
    granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               if "create" in rule["verbs"]}
    assert ("kubeflow.org", "pytorchjobs") in granted and ("ray.io", "rayjobs") in granted
    assert ("trainer.kubeflow.org", "trainjobs") in granted
    deleted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               if "delete" in rule["verbs"]}
    assert {("trainer.kubeflow.org", "trainjobs"), ("kubeflow.org", "pytorchjobs"), ("ray.io", "rayjobs")} <= deleted
    cm = _by_kind(docs, "ConfigMap")["medisyn-run-config"]
    assert json.loads(cm["data"]["config.json"]) == yaml.safe_load(cm["data"]["config.yaml"])
    from medisyn.config import validate_config

    validate_config(json.loads(cm["data"]["config.json"]))  # the chart's default run config is valid
    mlflow = _by_kind(docs, "Deployment")["medisyn-mlflow"]["spec"]["template"]["spec"]["containers"][0]
    assert "--artifacts-destination \"s3://medisyn/mlflow-artifacts\"" in mlflow["args"][0]
    assert "--backend-store-uri \"$MLFLOW_BACKEND_STORE_URI\"" in mlflow["args"][0]
    secret = _by_kind(docs, "Secret")["medisyn-mlflow-backend"]
    assert secret["stringData"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://mlflow:")
    assert "@medisyn-postgresql.ml.svc:5432/mlflow" in secret["stringData"]["MLFLOW_BACKEND_STORE_URI"]


def _job_args(docs, name="medisyn-register-pipeline") -> dict[str, str]:
    job = _by_kind(docs, "Job")[name]
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["medisyn", "pipeline", "schedule"]
    return dict(a[2:].split("=", 1) if "=" in a else (a[2:], "") for a in c["args"])


def test_registration_job_passes_the_schedule_and_parameters():
    docs = render()
    args = _job_args(docs)
    assert args["cron"] == "0 0 2 * * 0" and args["pipeline-name"] == "medisyn-retrain"
    params = json.loads(args["params-json"])
    assert params["train_launcher"] == "auto" and params["preprocess_launcher"] == "rayjob"
    assert params["s3_secret"] == "medisyn-s3" and params["mlflow_secret"] == "medisyn-mlflow-client"
    cluster = json.loads(params["cluster_json"])
    assert cluster["namespace"] == "ml" and cluster["service_account"] == "medisyn" and cluster["num_nodes"] == 2
    from medisyn.launch import ClusterSettings

    ClusterSettings.from_dict(cluster)  # what the chart renders is what launch accepts
    assert set(params) <= set(_pipeline_parameters()), set(params) - set(_pipeline_parameters())


def _pipeline_parameters() -> set[str]:
    from medisyn.pipeline.definition import medisyn_pipeline

    return set(medisyn_pipeline.component_spec.inputs)


def test_non_default_values_take_effect(tmp_path):
    docs = render(values=NON_DEFAULT, tmp=tmp_path)
    deps = _by_kind(docs, "Deployment")
    mlflow = deps["msyn-mlflow"]
    assert mlflow["spec"]["replicas"] == 2
    pod = mlflow["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "system"} and pod["imagePullSecrets"] == [{"name": "regcred"}]
    c = pod["containers"][0]
    assert "--app-name basic-auth" in c["args"][0] and "mlflow.example.com" in c["args"][0]
    assert any(e["name"] == "MLFLOW_AUTH_ADMIN_PASSWORD" for e in c["env"])
    assert not any(d["kind"] == "StatefulSet" and "postgresql" in d["metadata"]["name"] for d in docs)
    assert "msyn-minio" in _by_kind(docs, "StatefulSet")
    args = _job_args(docs, "msyn-register-pipeline")
    assert args["image"] == "ghcr.io/medisyn/medisyn-trainer@sha256:" + "b" * 64
    assert args["gpus"] == "2" and args["namespace"] == "team-a" and "catchup" in args
    params = json.loads(args["params-json"])
    assert params["gpu_node_selector"] == {"nvidia.com/gpu.present": "true"}
    assert params["s3_secret"] == "prod-s3"
    assert json.loads(params["cluster_json"])["service_account"] == "pipeline-runner"
    job = _by_kind(docs, "Job")["msyn-register-pipeline"]["spec"]["template"]["spec"]
    assert any("projected" in v for v in job["volumes"])  # multi-user KFP token
    binding = _by_kind(docs, "RoleBinding")["msyn-jobs"]
    assert {s["name"] for s in binding["subjects"]} == {"msyn", "pipeline-runner"}


def test_schema_rejects_typos_and_bad_values():
    for bad in ("mlflow.replcas=2", "pipeline.params.trainLauncher=slurm", "pipeline.schedule.cron=daily",
                "postgresql.resources.limits.cpux=1", "pipeline.params.cluster.gpus_per_nod=8",
                "image.digest=latest", "mlflow.auth.cacheTtlSeconds=-1"):
        proc = helm("template", "medisyn", str(CHART), "--set", bad, check=False)
        assert proc.returncode != 0, bad
        assert ("values don't meet the specifications of the schema" in proc.stderr
                or "schema" in proc.stderr), proc.stderr


def test_required_pairs_fail_with_a_clear_message():
    proc = helm("template", "medisyn", str(CHART), "--set", "postgresql.enabled=false", check=False)
    assert proc.returncode != 0 and "backend store" in proc.stderr
    # MLflow auth is on by default (issue #10): its Secrets have default names, nothing is required at render
    # time, and nothing is looked up (tests/test_chart_security.py)
    proc = helm("template", "medisyn", str(CHART), check=False)
    assert proc.returncode == 0 and "--app-name basic-auth" in proc.stdout


def test_every_value_is_documented():
    """Each key in values.yaml is preceded by a comment line (bitnami/KubeRay style)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        parent_is_documented_map = False
        j = i - 1
        while j >= 0 and lines[j].strip() and not lines[j].strip().startswith("#"):
            prev = lines[j]
            if len(prev) - len(prev.lstrip()) < indent:
                # inside a documented free-form map (resources, runConfig, cluster...)
                parent_is_documented_map = True
                break
            j -= 1
        assert lines[i - 1].strip().startswith("#") or parent_is_documented_map, f"undocumented value: {stripped}"


def test_notes_say_how_to_reach_mlflow_and_minio():
    proc = helm("install", "medisyn", str(CHART), "--dry-run=client", "--namespace", "ml",
                "--set", "minio.enabled=true")
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "port-forward svc/medisyn-mlflow 5000:5000" in notes
    assert "port-forward svc/medisyn-minio 9001:9001" in notes
    assert "models:/medisyn-sdxl@approved" in notes
