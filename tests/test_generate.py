"""Generation engine: per-image seeds, batching, PNG output, and every kind of model reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from helpers import model_env, write_checkpoints
from medisyn import storage
from medisyn.generate import generate, load_model, sample


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cfg, root = model_env(tmp_path_factory.mktemp("models"))
    ck = write_checkpoints(cfg, str(tmp_path_factory.mktemp("gen") / "checkpoints"), epochs=1)[0]
    return cfg, root, ck


@pytest.fixture(scope="module")
def base_pipe(env):
    cfg, _, _ = env
    return load_model(cfg, cfg.models.sdxl_base)


def as_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def test_sample_is_seeded_per_image_not_per_batch(env, base_pipe):
    cfg, _, _ = env
    prompts = ["Dermoscopy image showing melanoma.", "Optical coherence tomography image showing drusen.", "x"]
    seeds = [11, 12, 13]
    images = sample(base_pipe, prompts, seeds, cfg.sampling, 64)
    assert len(images) == 3 and all(im.size == (64, 64) and im.mode == "RGB" for im in images)
    # The third image alone, in a batch of one, is the same image (up to batched-matmul rounding).
    alone = sample(base_pipe, prompts[2:], seeds[2:], cfg.sampling.model_copy(update={"batch_size": 1}), 64)
    assert np.abs(as_array(alone[0]) - as_array(images[2])).max() <= 2
    # Another seed gives another image.
    other = sample(base_pipe, prompts[2:], [14], cfg.sampling, 64)
    assert np.abs(as_array(other[0]) - as_array(images[2])).mean() > 1


def test_sampling_settings_reach_the_pipeline(env, base_pipe, monkeypatch):
    """CFG scale, CFG rescale and steps are passed through as configured (sampling.guidance_rescale
    is 0 by default, the paper's plain CFG)."""
    cfg, _, _ = env
    seen: list[dict] = []
    real_call = type(base_pipe).__call__

    def spy(self, *args, **kwargs):
        seen.append({k: kwargs[k] for k in ("guidance_scale", "guidance_rescale", "num_inference_steps")})
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(type(base_pipe), "__call__", spy)
    assert cfg.sampling.guidance_rescale == 0.0
    s = cfg.sampling.model_copy(update={"guidance_scale": 3.0, "guidance_rescale": 0.7, "num_inference_steps": 2})
    sample(base_pipe, ["x"], [1], s, 64)
    assert seen == [{"guidance_scale": 3.0, "guidance_rescale": 0.7, "num_inference_steps": 2}]


def test_sample_needs_one_seed_per_prompt(env, base_pipe):
    cfg, _, _ = env
    with pytest.raises(ValueError, match="one seed per image"):
        sample(base_pipe, ["a", "b"], [1], cfg.sampling, 64)


def test_generate_writes_pngs_and_an_index(env, tmp_path):
    cfg, _, ck = env
    out = tmp_path / "gen"
    prompts = ["Dermoscopy image showing melanoma.", "Optical coherence tomography image showing drusen."]
    r = generate(cfg, ck, prompts, 2, str(out), seed=5)
    assert r.n_images == 4 and r.images_per_s > 0
    assert r.files == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert storage.is_complete(str(out))
    for f in r.files:
        with Image.open(out / f) as im:
            assert im.format == "PNG" and im.size == (64, 64)
    index = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert [e["seed"] for e in index] == [5, 6, 7, 8]
    assert index[0]["prompt"] == index[1]["prompt"] != index[2]["prompt"]
    # Rerun with the same arguments: the same pixels (explicit seeds).
    again = generate(cfg, ck, ["Dermoscopy image showing melanoma."], 1, str(tmp_path / "again"), seed=5)
    first, second = as_array(Image.open(out / "00000.png")), as_array(Image.open(tmp_path / "again" / again.files[0]))
    assert np.abs(second - first).max() <= 2


def test_load_model_accepts_checkpoint_unet_and_pipeline_dirs(env, tmp_path):
    cfg, root, ck = env
    from_ck = load_model(cfg, ck)
    from_unet = load_model(cfg, ck + "/unet")
    import torch

    a = dict(from_ck.unet.named_parameters())["conv_in.weight"]
    b = dict(from_unet.unet.named_parameters())["conv_in.weight"]
    assert torch.equal(a, b)
    # A full pipeline directory (what `medisyn pull` writes) loads as is.
    from_base = load_model(cfg, cfg.models.sdxl_base)
    assert type(from_base.scheduler).__name__ == "EulerDiscreteScheduler"
    assert not torch.equal(dict(from_base.unet.named_parameters())["conv_in.weight"], a)


def test_load_model_rejects_what_is_not_a_model(env, tmp_path):
    cfg, _, _ = env
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a diffusers pipeline"):
        load_model(cfg, str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError):
        load_model(cfg, str(tmp_path / "missing"))


def test_generate_refuses_bad_arguments(env, tmp_path):
    cfg, _, ck = env
    with pytest.raises(ValueError):
        generate(cfg, ck, [], 1, str(tmp_path / "x"))
    with pytest.raises(ValueError):
        generate(cfg, ck, ["a"], 0, str(tmp_path / "x"))


class _SeedPipe:
    """A stand-in pipeline whose image i is a flat image of value seed_i % 256 (checks the seed plumbing)."""

    def __call__(self, prompt, generator, **kwargs):
        from types import SimpleNamespace

        size = kwargs["height"]
        vals = [int(g.initial_seed()) % 256 for g in generator]
        return SimpleNamespace(images=[Image.new("RGB", (size, size), (v, v, v)) for v in vals])


def _data_parallel_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import numpy as np
    import torch.distributed as dist

    from medisyn.config import SamplingConfig
    from medisyn.evaluate.fid import _gather
    from medisyn.generate import sample_distributed

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        prompts = [f"p{i}" for i in range(7)]
        seeds = [100 + i for i in range(7)]
        idx, images = sample_distributed(_SeedPipe(), prompts, seeds, SamplingConfig(batch_size=2), 8)
        feats = np.array([[np.asarray(im)[0, 0, 0]] for im in images], dtype=np.float32)
        gathered = _gather(idx, feats, len(prompts))
        np.save(f"{out_dir}/rank{rank}.npy", np.array(idx))
        np.save(f"{out_dir}/gathered{rank}.npy", gathered)
    finally:
        dist.destroy_process_group()


def test_data_parallel_sampling_shards_seeds_and_gathers(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_data_parallel_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert np.load(tmp_path / "rank0.npy").tolist() == [0, 2, 4, 6]  # each rank its own captions/seeds
    assert np.load(tmp_path / "rank1.npy").tolist() == [1, 3, 5]
    for r in (0, 1):  # every rank ends up with every image's features, in order
        assert np.load(tmp_path / f"gathered{r}.npy")[:, 0].tolist() == [100 + i for i in range(7)]


@pytest.fixture(scope="module")
def gated_dir(env, tmp_path_factory):
    """A registered-format pipeline directory whose gates judged guidance 2 and 3 steps (as the demo's
    approved model records the demo's guidance), built with the registry's own packaging."""
    from medisyn import registry

    cfg, _, ck = env
    judged = cfg.model_copy(update={"sampling": cfg.sampling.model_copy(
        update={"guidance_scale": 2.0, "num_inference_steps": 3})})
    root = tmp_path_factory.mktemp("gated")
    d = root / "artifacts" / "pipeline"  # the layout of a logged model, signed as the promoter signs it
    registry.build_pipeline_dir(judged, ck, d)
    _sign_as_promoter(root)
    return d


def _sign_as_promoter(root) -> None:
    from medisyn import signing
    from medisyn.registry.names import APPROVAL_FILE

    statement = signing.make_statement(signing.directory_digests(root), signing.APPROVAL_PREDICATE,
                                       {"approved": "test/1"})
    envelope = signing.sign_statement(statement, signing.signing_key("promoter"))
    (root / APPROVAL_FILE).write_text(json.dumps(envelope))


def test_served_is_gated_generate_uses_the_versions_settings_and_records_an_override(env, gated_dir, tmp_path,
                                                                                    monkeypatch, caplog):
    """Issue #25: the caller's config says guidance 7 and 50 steps (the paper's), the version's gates judged
    guidance 2 and 3 steps: generate samples with 2 / 3 and says so; an explicit override is used, warned
    about and recorded as not gated."""
    import medisyn.generate as gen

    cfg, _, _ = env
    assert (cfg.sampling.guidance_scale, cfg.sampling.num_inference_steps) != (2.0, 3)
    used = []
    real_sample = gen.sample
    monkeypatch.setattr(gen, "sample", lambda pipe, p, s, settings, *a, **k: used.append(settings)
                        or real_sample(pipe, p, s, settings.model_copy(update={"num_inference_steps": 1}), *a, **k))
    gen.generate(cfg, str(gated_dir), ["Dermoscopy image showing melanoma."], 1, str(tmp_path / "a"))
    record = json.loads((tmp_path / "a" / "generation.json").read_text())
    assert (used[-1].guidance_scale, used[-1].num_inference_steps) == (2.0, 3)
    assert record["gated"] is True and record["sampling"]["guidance_scale"] == 2.0
    with caplog.at_level("WARNING", logger="medisyn.generate"):
        gen.generate(cfg, str(gated_dir), ["x"], 1, str(tmp_path / "b"), guidance_scale=7.0)
    record = json.loads((tmp_path / "b" / "generation.json").read_text())
    assert used[-1].guidance_scale == 7.0 and used[-1].num_inference_steps == 3 and record["gated"] is False
    assert "not judged by any gate" in caplog.text
    # a model that records no gated settings (a bare checkpoint) samples with the config, not gated
    _, _, ck = env
    gen.generate(cfg, ck, ["x"], 1, str(tmp_path / "c"))
    assert json.loads((tmp_path / "c" / "generation.json").read_text())["gated"] is False
    assert used[-1].guidance_scale == cfg.sampling.guidance_scale


def test_served_is_gated_in_the_pyfunc(gated_dir, caplog):
    """The MLflow pyfunc's defaults are the version's gated settings (not guidance 7 / 50 steps); an
    override is served with a warning and every output row says whether it was gated."""
    import types

    import pandas as pd

    from medisyn import pyfunc_model

    model = pyfunc_model.MediSynSDXLModel()
    model.load_context(types.SimpleNamespace(artifacts={"pipeline": str(gated_dir)}))
    assert (model.defaults["guidance_scale"], model.defaults["num_inference_steps"]) == (2.0, 3)
    out = model.predict(None, pd.DataFrame([{"prompt": "Dermoscopy image showing melanoma.", "num_images": 1}]))
    assert out.loc[0, ["guidance_scale", "num_inference_steps", "gated"]].tolist() == [2.0, 3, True]
    with caplog.at_level("WARNING", logger="medisyn.pyfunc"):
        out = model.predict(None, [{"prompt": "x", "guidance_scale": 7.0, "num_inference_steps": 1}])
    assert out.loc[0, ["guidance_scale", "num_inference_steps", "gated"]].tolist() == [7.0, 1, False]
    assert "not judged by any gate" in caplog.text


def test_the_pyfunc_loads_only_what_the_promoter_signed(gated_dir, tmp_path):
    """Issue #21, defense in depth in load_context: no promoter signature beside the model, or any file not
    the signed one, fails closed before the pipeline is loaded (nothing in MLmodel is consulted)."""
    import shutil
    import types

    from medisyn import pyfunc_model
    from medisyn.registry.names import APPROVAL_FILE

    root = tmp_path / "model"
    shutil.copytree(gated_dir.parents[1], root)

    def load():
        pyfunc_model.MediSynSDXLModel().load_context(
            types.SimpleNamespace(artifacts={"pipeline": str(root / "artifacts" / "pipeline")}))

    (root / "MLmodel").write_text("run_id: attacker\n")  # a file the promoter never signed
    with pytest.raises(pyfunc_model.TamperedModelError, match="not signed: MLmodel"):
        load()
    (root / "MLmodel").unlink()
    weights = next((root / "artifacts" / "pipeline" / "unet").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(pyfunc_model.TamperedModelError, match="changed: artifacts/pipeline/unet"):
        load()
    (root / APPROVAL_FILE).unlink()
    with pytest.raises(pyfunc_model.TamperedModelError, match="no promoter signature"):
        load()
