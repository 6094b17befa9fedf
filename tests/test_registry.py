"""Registry: packaging, candidate registration with lineage tags, fail-closed promotion, pull.

The end-to-end tests run an MLflow server on loopback (SQLite) whose artifacts live on a moto S3
server on loopback, as in the chart (PostgreSQL + S3), and pull from a fresh Python process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from helpers import model_env, write_checkpoints, write_dataset
from medisyn import registry, storage
from medisyn.demo.services import MLflowServer, MotoS3Server
from medisyn.registry.consumer import _verify_manifest as verify_manifest

PARSE_CASES = [
    ("models:/m/3", ("m", "3", None)),
    ("models:/m@approved", ("m", None, "approved")),
    ("models:/team/m/12", ("team/m", "12", None)),
    ("7", ("medisyn-demo-candidates", "7", None)),  # a bare number is a candidate (mlflow/REGISTRY.md)
    ("@candidate", ("medisyn-demo-candidates", None, "candidate")),
    ("@approved", ("medisyn-demo", None, "approved")),
]


@pytest.fixture(scope="module")
def local_env(tmp_path_factory):
    cfg, root = model_env(tmp_path_factory.mktemp("models"))
    tmp = tmp_path_factory.mktemp("registry")
    cks = write_checkpoints(cfg, str(tmp / "checkpoints"), epochs=2)
    return cfg, tmp, cks


@pytest.mark.parametrize("ref,expected", PARSE_CASES)
def test_parse_model_uri(local_env, ref, expected):
    cfg, _, _ = local_env
    assert registry.parse_model_uri(cfg, ref) == expected


@pytest.mark.parametrize("ref", ["models:/m", "models:/m/latest", "candidate", ""])
def test_parse_model_uri_rejects(local_env, ref):
    cfg, _, _ = local_env
    with pytest.raises(ValueError):
        registry.parse_model_uri(cfg, ref)


def test_build_pipeline_dir_is_complete_pinned_and_bf16(local_env, tmp_path):
    import torch
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    cfg, _, cks = local_env
    info = registry.build_pipeline_dir(cfg, cks[0], tmp_path / "p")
    p = tmp_path / "p"
    with safe_open(str(p / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16  # tracking.package_dtype default
    base = storage.local_path(cfg.models.sdxl_base)
    for comp in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        for rel, digest in info["base_components"]["components"][comp].items():
            assert storage.sha256(base / comp / rel) == digest  # byte-identical frozen copy
    vae_src = storage.local_path(cfg.models.vae)
    assert (p / "vae" / "config.json").read_bytes() == (vae_src / "config.json").read_bytes()  # the fp16-fix VAE
    assert json.loads((p / "model_index.json").read_text())["scheduler"][1] == "EulerDiscreteScheduler"
    verify_manifest(p)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(p), dtype=torch.float32)
    assert pipe.unet.dtype == torch.float32
    (p / "unet" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="corrupt"):
        verify_manifest(p)


def _score(checkpoint_uri: str, epoch: int = 1, fid: float = 1.0):
    from medisyn.evaluate.fid import ScoreResult

    return ScoreResult(out_uri="/nowhere", best_epoch=epoch, best_checkpoint_uri=checkpoint_uri, best_fid=fid,
                       fid_by_epoch={epoch: fid}, fid_by_specialty={}, fid_ci=None, num_samples=1, seed=0,
                       mode="full", provenance={}, dataset_hash="d", real_stats_uri="", real_stats_cached=False)


def test_registry_steps_need_a_tracking_server(local_env, monkeypatch):
    cfg, _, cks = local_env
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(RuntimeError, match="tracking"):
        registry.register_candidate(cfg, _score(cks[0]), "/nowhere")
    with pytest.raises(RuntimeError, match="tracking"):
        registry.promote(cfg, 1, ["privacy"])


# ----------------------------------------------------------------------------------------------
# Against MLflow (loopback) with artifacts on S3 (moto, loopback)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    with MotoS3Server() as s3:
        s3.create_bucket("mlflow")
        with MLflowServer(tmp_path_factory.mktemp("mlflow"), artifacts_uri="s3://mlflow/artifacts",
                          s3_endpoint=s3.endpoint_url) as server:
            yield s3, server
    import mlflow

    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def registered(servers, local_env, tmp_path_factory):
    from medisyn.evaluate.fid import score_checkpoints

    s3, server = servers
    base_cfg, tmp, cks = local_env
    cfg = base_cfg.model_copy(update={
        "tracking": base_cfg.tracking.model_copy(update={"tracking_uri": server.tracking_uri}),
        "storage": base_cfg.storage.model_copy(update={"multipart_chunk_mb": 5}),  # exercise multipart parts
    })
    ds = write_dataset(str(tmp / "dataset"), n_per_specialty=8)
    score = score_checkpoints(cfg, ds, str(tmp / "checkpoints"), str(tmp / "score"))
    reg = registry.register_candidate(cfg, score, ds)
    return cfg, ds, score, reg


@pytest.mark.mlflow
@pytest.mark.s3
@pytest.mark.slow
def test_register_candidate_tags_alias_and_card(registered, servers):
    from mlflow import MlflowClient

    cfg, ds, score, reg = registered
    client = MlflowClient()
    mv = client.get_model_version_by_alias(registry.candidates_model(cfg), "candidate")
    assert str(mv.version) == reg.version
    tags = mv.tags
    assert tags["epoch"] == str(score.best_epoch)
    assert float(tags["fid"]) == pytest.approx(score.best_fid, rel=1e-5)
    assert {"fid.specialty.dermatology", "fid.specialty.ophthalmology", "fid.ci_low", "fid.ci_high"} <= set(tags)
    assert tags["fid.weights_sha256"] == score.provenance["weights_sha256"]
    assert tags["fid.n"] == str(score.num_samples) and tags["fid.seed"] == "0" and tags["fid.resize_filter"]
    assert tags["dataset_hash"] == storage.read_json(ds + "/manifest.json")["dataset_hash"]
    assert tags["config_hash"] == cfg.config_hash() and tags["code_version"] and "pipeline_run_id" in tags
    assert "# Model card" in mv.description and "Intended use" in mv.description
    assert "dermatology" in mv.description and "no gate has reported yet" in mv.description
    # The artifacts really are on S3 (proxied by the server).
    keys = [o["Key"] for o in servers[0].client().list_objects_v2(Bucket="mlflow").get("Contents", [])]
    assert any(k.endswith("unet/diffusion_pytorch_model.safetensors") for k in keys)
    # The scoring run logged the curve and the per-specialty grids.
    run_arts = [a.path for a in client.list_artifacts(score.run_id, "fid")]
    assert "fid/fid_curve.png" in run_arts
    assert {a.path for a in client.list_artifacts(score.run_id, "fid/grids")} == {
        "fid/grids/dermatology.png", "fid/grids/ophthalmology.png"}
    assert [m.step for m in client.get_metric_history(score.run_id, "fid")] == sorted(score.fid_by_epoch)


@pytest.mark.mlflow
@pytest.mark.s3
@pytest.mark.slow
def test_promote_fails_closed(registered):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    cfg, ds, score, reg = registered
    name, v = reg.name, reg.version
    client = MlflowClient()

    def approved_version():  # the candidate the approved model's @approved was copied from
        try:
            mv = client.get_model_version_by_alias(registry.approved_model(cfg), "approved")
        except MlflowException:  # no version carries the alias
            return None
        return mv.tags[registry.CANDIDATE_TAG].rsplit("/", 1)[1]

    assert not registry.promote(cfg, v, []).approved  # no gates named
    r = registry.promote(cfg, v, ["privacy", "utility"])
    assert not r.approved and r.gates == {"privacy": "missing", "utility": "missing"}
    registry.set_gate_result(cfg, reg.alias_uri, "privacy", True, {"fraction_below": 0.0})
    registry.set_gate_result(cfg, reg.model_uri, "utility", False, {"upper_ci": 0.2})
    r = registry.promote(cfg, v, ["privacy", "utility"])
    assert not r.approved and r.gates == {"privacy": "passed", "utility": "failed"} and approved_version() is None
    assert not registry.promote(cfg, "999", ["privacy"]).approved  # unknown version: an error, not approved
    client.set_model_version_tag(name, v, "gate.utility", "passed")  # a hand-set tag is never a verdict
    assert not registry.promote(cfg, v, ["privacy", "utility"]).approved
    registry.set_gate_result(cfg, v, "utility", True, {"upper_ci": 0.01})
    r = registry.promote(cfg, v, ["privacy", "utility"])
    assert r.approved and r.alias == "approved" and approved_version() == v
    card = client.get_model_version(name, v).description
    assert "| privacy | passed |" in card and "| utility | passed |" in card
    # A re-evaluation that fails takes the approval back.
    registry.set_gate_result(cfg, v, "privacy", False, {"fraction_below": 0.3})
    assert not registry.promote(cfg, v, ["privacy", "utility"]).approved and approved_version() is None
    registry.set_gate_result(cfg, v, "privacy", True, {"fraction_below": 0.0})
    assert registry.promote(cfg, v, ["privacy", "utility"]).approved


CONSUMER = textwrap.dedent("""
    import base64, io, json, sys
    import mlflow, pandas as pd
    from PIL import Image
    from diffusers import StableDiffusionXLPipeline
    from medisyn.registry import pull
    uri, dest = sys.argv[1], sys.argv[2]
    path = pull(uri, dest)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(path))
    out = pipe(prompt=["Dermoscopy image showing melanoma."], num_inference_steps=2, height=64, width=64)
    from medisyn.consumer import load_pyfunc
    model = load_pyfunc(uri)  # the promoter's signature verified before the loader code is imported
    df = model.predict(pd.DataFrame([{"prompt": "Dermoscopy image showing melanoma.", "num_images": 2,
                                      "seed": 3, "num_inference_steps": 2}]))
    img = Image.open(io.BytesIO(base64.b64decode(df.image[0])))
    print(json.dumps({"n_pipe": len(out.images), "seeds": df.seed.tolist(), "size": list(img.size),
                      "format": img.format, "scheduler": type(pipe.scheduler).__name__}))
""")


@pytest.mark.mlflow
@pytest.mark.s3
@pytest.mark.slow
def test_pull_by_alias_from_a_fresh_client_and_generate(registered, servers, tmp_path):
    cfg, ds, score, reg = registered
    registry.set_gate_result(cfg, reg.version, "privacy", True, {})
    registry.set_gate_result(cfg, reg.version, "utility", True, {})
    assert registry.promote(cfg, reg.version, ["privacy", "utility"]).approved
    uri = f"models:/{registry.approved_model(cfg)}@approved"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MEDISYN_"))}
    from medisyn import signing  # a fresh consumer: only the trust policy (public keys), no private key

    env.update(MLFLOW_TRACKING_URI=servers[1].tracking_uri, MEDISYN_CACHE_DIR=str(tmp_path / "cache"),
               MEDISYN_TRUST_DIR=os.environ[signing.TRUST_DIR_ENV])
    proc = subprocess.run([sys.executable, "-c", CONSUMER, uri, str(tmp_path / "pulled")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"n_pipe": 1, "seeds": [3, 4], "size": [64, 64], "format": "PNG",
                      "scheduler": "EulerDiscreteScheduler"}
    assert (tmp_path / "pulled" / "model_index.json").exists()
    with pytest.raises(FileExistsError):
        registry.pull(uri, tmp_path / "pulled")
    # `medisyn generate` from the registry URI (pulled into the cache by resolved version).
    from medisyn.generate import generate

    os.environ["MEDISYN_CACHE_DIR"] = str(tmp_path / "cache-gen")
    try:
        g = generate(cfg, uri, ["Optical coherence tomography image showing drusen."], 2, str(tmp_path / "gen"))
    finally:
        os.environ.pop("MEDISYN_CACHE_DIR")
    assert g.n_images == 2 and all((tmp_path / "gen" / f).exists() for f in g.files)
    assert list((tmp_path / "cache-gen" / "registry").glob(f"*/*-v{reg.version}/model_index.json"))


@pytest.mark.mlflow
@pytest.mark.s3
@pytest.mark.slow
def test_register_from_the_stored_result_moves_candidate(registered):
    """The CLI/KFP path: the score comes back from the scores prefix's result.json (int keys restored)."""
    import dataclasses

    from mlflow import MlflowClient

    from medisyn.evaluate.fid import ScoreResult

    cfg, ds, score, reg = registered
    score.save(score.out_uri)
    loaded = ScoreResult.load(score.out_uri)
    assert loaded == score
    other_epoch = next(e for e in score.fid_by_epoch if e != score.best_epoch)
    ck = score.best_checkpoint_uri.replace(f"epoch-{score.best_epoch:04d}", f"epoch-{other_epoch:04d}")
    new = registry.register_candidate(cfg, loaded, ds, checkpoint_uri=ck)
    assert int(new.version) == int(reg.version) + 1
    mv = MlflowClient().get_model_version_by_alias(registry.candidates_model(cfg), "candidate")
    assert str(mv.version) == new.version and mv.tags["epoch"] == str(other_epoch)
    assert float(mv.tags["fid"]) == pytest.approx(score.fid_by_epoch[other_epoch], rel=1e-5)
    assert "fid.ci_low" not in mv.tags  # the interval belongs to the selected epoch only
    with pytest.raises(ValueError, match="no FID for epoch"):
        registry.register_candidate(cfg, dataclasses.replace(loaded, best_epoch=9, fid_by_epoch={9: 1.0}), ds,
                                    checkpoint_uri=ck)
