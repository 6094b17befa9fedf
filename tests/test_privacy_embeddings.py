"""Issue #14, privacy gate: the training split's BiomedCLIP embeddings are stored once per dataset
version and reused (recomputed when the model identity changes; a half-written or corrupted copy is
never used), and the exact chunked cosine search in torch equals brute force, ties included."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from helpers import class_faithful_sampler, copying_sampler, write_gate_dataset
from medisyn import storage
from medisyn.config import RunConfig, TinyModelsConfig
from medisyn.evaluate import embeddings as emb_mod
from medisyn.evaluate.embeddings import META_FILE, TrainEmbeddings, group_id, train_group_rows
from medisyn.evaluate.privacy import privacy_gate
from medisyn.evaluate.search import ExactCosineSearch, nearest_neighbours, nearest_neighbours_in_memory

RES = 64
DERM = ("dermatology", "dermoscopy")
OCT = ("ophthalmology", "oct")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(one_torch_thread_module):
    yield


def _unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def _brute(q: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact reference: float64 products of the float32 embeddings, first (lowest) row on ties."""
    s = q.astype(np.float64) @ x.astype(np.float64).T
    return s.argmax(axis=1), s.max(axis=1)


# ----------------------------------------------------------------------------------------------
# The search
# ----------------------------------------------------------------------------------------------
def _tricky(seed: int = 0, n: int = 2000, m: int = 300, d: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Random unit vectors plus ties and near-ties: duplicated rows (exact ties, lowest row must win),
    queries that are database rows, rows one float32 ulp apart, a 40-fold duplicate (more ties than k
    candidates: the second pass), a cluster all within rounding of each other, the last row."""
    rng = np.random.default_rng(seed)
    x = _unit(rng.normal(size=(n, d)))
    q = _unit(rng.normal(size=(m, d)))
    x[100:140] = x[7]  # 41 identical rows: row 7 must win
    q[0] = x[7]
    q[1] = x[n - 1]  # the very last row
    x[500] = x[1500]  # a duplicate pair, the later one matched
    q[2] = x[1500]
    near = x[900].copy()
    near[0] = np.nextafter(near[0], np.float32(2))  # one ulp away
    x[901] = near
    q[3] = x[900]
    x[1200:1230] = _unit(x[1199] + rng.normal(scale=1e-7, size=(30, d)).astype(np.float32))  # a tight cluster
    q[4] = x[1199]
    q[5:8] = -q[5:8]
    return q, x


def _devices() -> list[str]:
    import torch

    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("k,block,chunk", [(8, 256 << 20, 65536), (1, 4096, 333), (3, 1 << 16, 1000), (50, 1 << 20, 7)])
def test_search_equals_brute_force_with_ties(k, block, chunk, device):
    q, x = _tricky()
    rows, sims = nearest_neighbours_in_memory(q, x, device, k=k, chunk_rows=chunk, max_block_bytes=block)
    ref_rows, ref_sims = _brute(q, x)
    assert np.array_equal(rows, ref_rows)
    np.testing.assert_allclose(sims, ref_sims, rtol=0, atol=1e-12)
    assert rows[0] == 7 and rows[1] == len(x) - 1 and rows[2] == 500


def test_search_is_identical_whatever_the_chunking():
    q, x = _tricky(seed=3)
    base = nearest_neighbours_in_memory(q, x, k=8)
    for chunk, block in [(1, 1 << 20), (64, 1024), (1999, 1 << 12), (5000, 1 << 30)]:
        rows, sims = nearest_neighbours_in_memory(q, x, k=8, chunk_rows=chunk, max_block_bytes=block)
        assert np.array_equal(rows, base[0]) and np.array_equal(sims, base[1])  # bit for bit


def test_search_second_pass_resolves_more_ties_than_candidates():
    q, x = _tricky()
    calls = []

    def db():
        calls.append(1)
        for s in range(0, len(x), 256):
            yield np.arange(s, min(s + 256, len(x))), x[s:s + 256]

    rows, _, refined = nearest_neighbours(q, db, "cpu", k=4)
    assert refined >= 1 and len(calls) == 2  # the 41 duplicates of row 7 cannot fit in 4 candidates
    assert np.array_equal(rows, _brute(q, x)[0])
    rows, _, refined = nearest_neighbours(q[10:], db, "cpu", k=4)  # plain random queries: one pass
    assert refined == 0 and len(calls) == 3


def test_search_matches_sklearn_and_the_previous_numpy_search():
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(1)
    x, q = _unit(rng.normal(size=(5000, 64))), _unit(rng.normal(size=(400, 64)))
    rows, sims = nearest_neighbours_in_memory(q, x, chunk_rows=700)
    ind = NearestNeighbors(n_neighbors=1, metric="cosine", algorithm="brute").fit(x).kneighbors(q)[1][:, 0]
    assert np.array_equal(rows, ind)
    # the gate's previous search: float32 products per streamed batch, argmax, strictly-better updates
    best_sim, best_row = np.full(len(q), -np.inf, np.float32), np.full(len(q), -1)
    for s in range(0, len(x), 700):
        sim = q @ x[s:s + 700].T
        j = sim.argmax(axis=1)
        v = sim[np.arange(len(q)), j]
        better = v > best_sim
        best_sim[better], best_row[better] = v[better], s + j[better]
    assert np.array_equal(rows, best_row)
    np.testing.assert_allclose(sims, best_sim, atol=1e-6)


def test_search_edge_cases():
    x = _unit(np.random.default_rng(2).normal(size=(5, 8)))
    rows, sims = nearest_neighbours_in_memory(x[:2], np.zeros((0, 8), np.float32))
    assert rows.tolist() == [-1, -1] and np.isneginf(sims).all()  # empty database
    rows, sims = nearest_neighbours_in_memory(np.zeros((0, 8), np.float32), x)
    assert rows.shape == (0,) and sims.shape == (0,)
    rows, _ = nearest_neighbours_in_memory(x, x, k=16)  # fewer rows than candidates
    assert rows.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="dim"):
        ExactCosineSearch(x).add(np.arange(2), np.zeros((2, 9), np.float32))
    bad = x.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        ExactCosineSearch(x).add(np.arange(5), bad)


def test_search_keeps_full_precision_under_reduced_precision_settings():
    import torch

    before = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"  # what a bf16 trainer may leave behind
    try:
        q, x = _tricky(seed=5)
        rows, _ = nearest_neighbours_in_memory(q, x)
        assert np.array_equal(rows, _brute(q, x)[0])
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"  # restored
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before


# ----------------------------------------------------------------------------------------------
# The store, with a cheap deterministic stand-in for BiomedCLIP
# ----------------------------------------------------------------------------------------------
def _fake_embed(images) -> np.ndarray:
    out = np.stack([np.asarray(im.convert("RGB").resize((4, 4)), dtype=np.float32).ravel() for im in images])
    return _unit(out + 1.0)


@pytest.fixture
def dataset(tmp_path):
    return write_gate_dataset(str(tmp_path / "dataset"), n_train=5, n_eval=2)


def _store(dataset, tmp_path, identity=None, calls=None):
    def embed(images):
        if calls is not None:
            calls.append(len(images))
        return _fake_embed(images)

    scratch = tmp_path / f"scratch-{len(list(tmp_path.glob('scratch-*')))}"
    scratch.mkdir()
    return TrainEmbeddings(dataset, "hash-1", identity or {"model": "fake"}, scratch, embed, batch_size=4)


def _searchable(result):
    return {g: [(r.tolist(), np.asarray(e).tolist()) for r, e in v.chunks()] for g, v in result.items()}


def test_store_computes_once_then_reuses(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(emb_mod, "SHARD_ROWS", 3)  # several shards per group
    rows = train_group_rows(dataset)
    assert set(rows) == {DERM, OCT} and all(len(r) == 10 for r in rows.values())
    calls: list[int] = []
    first = _store(dataset, tmp_path, calls=calls).prepare(rows)
    assert {g.status for g in first.values()} == {"computed"} and sum(calls) == 20
    for g in (DERM, OCT):
        uri = storage.join(dataset, "embeddings", f"biomedclip-{_store(dataset, tmp_path).key}", group_id(g))
        assert storage.is_complete(uri) and first[g].uri == uri
        meta = storage.read_json(storage.join(uri, META_FILE))
        assert meta["dataset_hash"] == "hash-1" and meta["count"] == 10 and meta["dim"] == 48
        assert len(meta["shards"]) == 4
    calls.clear()
    store = _store(dataset, tmp_path, calls=calls)
    again = store.prepare(rows)
    assert calls == [] and store.images_embedded == 0  # nothing embedded
    assert {g.status for g in again.values()} == {"reused"}
    assert _searchable(again) == _searchable(first)
    # the dataset's own readers do not see the store
    from medisyn.data import split_files

    assert all("embeddings" not in u for s in ("train", "val", "test") for u in split_files(dataset, s))


def test_store_recomputes_for_another_model_or_dataset_version(dataset, tmp_path):
    rows = train_group_rows(dataset)
    calls: list[int] = []
    a = _store(dataset, tmp_path, {"model": "a"}, calls).prepare(rows)
    b = _store(dataset, tmp_path, {"model": "b"}, calls).prepare(rows)
    assert sum(calls) == 40 and {g.status for g in b.values()} == {"computed"}
    assert a[DERM].uri != b[DERM].uri
    assert {g.status for g in _store(dataset, tmp_path, {"model": "a"}).prepare(rows).values()} == {"reused"}
    other = _store(dataset, tmp_path, {"model": "a"})
    other.dataset_hash = "hash-2"  # same key directory, another dataset version in its metadata
    found, why = other.load(DERM, rows[DERM])
    assert found is None and "dataset_hash" in why


@pytest.mark.parametrize("damage", ["no-marker", "truncated-shard", "flipped-byte", "other-rows", "staging-only"])
def test_store_never_uses_a_half_written_or_corrupted_copy(dataset, tmp_path, damage):
    rows = train_group_rows(dataset)
    first = _store(dataset, tmp_path).prepare(rows)
    d = storage.local_path(first[DERM].uri)
    emb_file = sorted(d.glob("*.emb.npy"))[0]
    if damage == "no-marker":  # a writer killed before its marker
        (d / storage.COMPLETE_MARKER).unlink()
    elif damage == "truncated-shard":
        emb_file.write_bytes(emb_file.read_bytes()[:-100])
    elif damage == "flipped-byte":
        data = bytearray(emb_file.read_bytes())
        data[-5] ^= 0xFF
        emb_file.write_bytes(bytes(data))
    elif damage == "other-rows":  # consistent files, but for rows the dataset does not have there
        meta = json.loads((d / META_FILE).read_text())
        (d / "shard-00000.rows.npy").unlink()
        np.save(d / "shard-00000.rows.npy", np.arange(10, dtype=np.int64) + 1000)
        meta["shards"][0]["rows_sha256"] = storage.sha256(d / "shard-00000.rows.npy")
        (d / META_FILE).write_text(json.dumps(meta))
    elif damage == "staging-only":  # killed mid-publish: only the hidden staging directory exists
        dead = f".{d.name}.staging-{storage._HOST}-999999-{0:012x}-deadbeef"
        shutil.move(str(d), str(d.parent / dead))
    calls: list[int] = []
    store = _store(dataset, tmp_path, calls=calls)
    found, why = store.load(DERM, rows[DERM])
    assert found is None and why, damage
    again = store.prepare(rows)
    assert again[DERM].status == "computed" and again[OCT].status == "reused" and sum(calls) == 10
    assert _searchable(again) == _searchable(_store(dataset, tmp_path).prepare(rows))  # repaired, reusable
    assert _store(dataset, tmp_path).load(DERM, rows[DERM])[0] is not None
    assert not list(d.parent.glob(".*staging*"))  # the killed writer's leftovers were cleaned


def test_store_that_cannot_be_written_costs_a_recomputation_not_the_gate(dataset, tmp_path, monkeypatch):
    rows = train_group_rows(dataset)

    def read_only(*a, **k):
        raise PermissionError("read-only bucket")

    monkeypatch.setattr(storage, "publish_dir", read_only)
    got = _store(dataset, tmp_path).prepare(rows)
    assert all(g.status == "computed" and not g.stored and "read-only" in g.note for g in got.values())
    assert sum(len(r) for g in got.values() for r, _ in g.chunks()) == 20  # searchable all the same


def test_store_on_object_storage_is_reused_and_verified(s3_endpoint, tmp_path):
    from helpers import S3_BUCKET

    dataset = write_gate_dataset(f"s3://{S3_BUCKET}/embeddings-test/dataset", n_train=5, n_eval=2)
    rows = train_group_rows(dataset)
    calls: list[int] = []
    first = _store(dataset, tmp_path, calls=calls).prepare(rows)
    assert {g.status for g in first.values()} == {"computed"} and sum(calls) == 20
    assert first[DERM].uri.startswith(f"{dataset}/embeddings/biomedclip-") and storage.is_complete(first[DERM].uri)
    again = _store(dataset, tmp_path, calls=calls).prepare(rows)  # downloaded to scratch, verified
    assert {g.status for g in again.values()} == {"reused"} and sum(calls) == 20
    assert _searchable(again) == _searchable(first)
    meta = storage.read_json(storage.join(first[DERM].uri, META_FILE))
    shard = storage.join(first[DERM].uri, meta["shards"][0]["emb"])
    storage.write_bytes(shard, storage.read_bytes(shard)[:-8])  # damaged behind the marker's back
    repaired = _store(dataset, tmp_path, calls=calls).prepare(rows)
    assert repaired[DERM].status == "computed" and repaired[OCT].status == "reused" and sum(calls) == 30
    assert _searchable(repaired) == _searchable(first)


# ----------------------------------------------------------------------------------------------
# The gate: computed on the first run, reused on the second, recomputed for another model
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from medisyn.models.biomedclip import build_tiny_biomedclip

    d = tmp_path_factory.mktemp("clip") / "biomedclip-tiny"
    build_tiny_biomedclip(TinyModelsConfig(), d)
    return d


def _cfg(clip_dir) -> RunConfig:
    return RunConfig.model_validate({
        "models": {"biomedclip": str(clip_dir)}, "runtime": {"device": "cpu"}, "data": {"resolution": RES},
        "sampling": {"batch_size": 5},
        "privacy": {"images_per_prompt": 3, "patch_size": 16, "batch_size": 4,
                    "prompts": ["Dermoscopy image showing melanoma.",
                                "Optical coherence tomography image showing drusen."]},
    })


def _run(cfg, dataset, out, sampler):
    result = privacy_gate(cfg, "fake-model", dataset, str(out), sampler=sampler)
    report = json.loads(storage.read_text(result.report_uri))
    pairs = storage.read_text(storage.join(str(out), "pairs.jsonl"))
    return result, report, pairs


def test_gate_reuses_stored_embeddings_with_the_same_verdict(clip_dir, tmp_path, monkeypatch):
    dataset = write_gate_dataset(str(tmp_path / "dataset"), n_train=4, n_eval=2)
    train_calls: list[int] = []
    compute = TrainEmbeddings._compute

    def counting(self, group_rows, why):
        train_calls.append(sum(len(r) for r in group_rows.values()))
        return compute(self, group_rows, why)

    monkeypatch.setattr(TrainEmbeddings, "_compute", counting)
    cfg = _cfg(clip_dir)
    r1, rep1, pairs1 = _run(cfg, dataset, tmp_path / "p1", class_faithful_sampler(RES))
    assert train_calls == [16]  # 2 groups x 2 classes x 4 training images, embedded once
    info = rep1["train_embeddings"]
    assert info["reused"] is False and info["images_embedded"] == 16
    assert {g["status"] for g in info["groups"].values()} == {"computed"}
    assert info["where"].startswith(storage.join(dataset, "embeddings", "biomedclip-"))

    r2, rep2, pairs2 = _run(cfg, dataset, tmp_path / "p2", class_faithful_sampler(RES))
    assert train_calls == [16]  # not called again
    info2 = rep2["train_embeddings"]
    assert info2["reused"] is True and info2["images_embedded"] == 0
    assert {g["status"] for g in info2["groups"].values()} == {"reused"}
    assert (r2.passed, r2.reasons) == (r1.passed, r1.reasons)
    assert json.dumps(r2.metrics, sort_keys=True) == json.dumps(r1.metrics, sort_keys=True)
    assert pairs2 == pairs1  # same neighbours, similarities and distances
    assert rep2["train_images_searched"] == rep1["train_images_searched"] == {"dermatology/dermoscopy": 8,
                                                                              "ophthalmology/oct": 8}

    # a copy of the same model elsewhere is the same model: still reused
    copy = tmp_path / "clip-copy"
    shutil.copytree(clip_dir, copy)
    _, rep3, pairs3 = _run(_cfg(copy), dataset, tmp_path / "p3", class_faithful_sampler(RES))
    assert rep3["train_embeddings"]["reused"] is True and pairs3 == pairs1 and train_calls == [16]

    # another model (other weights): recomputed, in its own directory; the first one stays
    from medisyn.models.biomedclip import build_tiny_biomedclip

    other = tmp_path / "clip-other"
    build_tiny_biomedclip(TinyModelsConfig(seed=1), other)
    _, rep4, _ = _run(_cfg(other), dataset, tmp_path / "p4", class_faithful_sampler(RES))
    assert train_calls == [16, 16]
    assert rep4["train_embeddings"]["reused"] is False and rep4["train_embeddings"]["where"] != info["where"]
    assert storage.is_complete(next(iter(info["groups"].values()))["uri"])


def test_gate_verdict_unchanged_when_the_stored_copy_is_corrupted(clip_dir, tmp_path):
    """A memorizing model fails with the stored embeddings as without them; a damaged copy is
    recomputed, never searched."""
    dataset = write_gate_dataset(str(tmp_path / "dataset"), n_train=4, n_eval=2)
    cfg = _cfg(clip_dir)
    r1, rep1, pairs1 = _run(cfg, dataset, tmp_path / "p1", copying_sampler(dataset))
    assert r1.passed is False and r1.metrics["fraction_below"] == 1.0
    for g in rep1["train_embeddings"]["groups"].values():
        shard = sorted(storage.local_path(g["uri"]).glob("*.emb.npy"))[0]
        shard.write_bytes(shard.read_bytes()[:-64])  # truncated behind the marker's back
    r2, rep2, pairs2 = _run(cfg, dataset, tmp_path / "p2", copying_sampler(dataset))
    assert rep2["train_embeddings"]["reused"] is False and rep2["train_embeddings"]["images_embedded"] == 16
    assert all("sha256" in g["note"] for g in rep2["train_embeddings"]["groups"].values())
    assert (r2.passed, r2.reasons, pairs2) == (r1.passed, r1.reasons, pairs1)


# ----------------------------------------------------------------------------------------------
# The utility gate's decoded-image tensors (converted once per classifier, reused by every epoch)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["float", "uint8", "host", None])
def test_image_tensors_give_the_batches_of_to_tensor_bit_for_bit(mode):
    import torch

    from medisyn.evaluate.imagecache import ImageTensors
    from medisyn.evaluate.utility import IMAGENET_MEAN, IMAGENET_STD, _to_tensor

    x = np.random.default_rng(0).integers(0, 256, (23, 12, 12, 3), dtype=np.uint8)
    cache = ImageTensors(x, "cpu", IMAGENET_MEAN, IMAGENET_STD, mode=mode)
    assert mode is None or cache.mode == mode
    for idx in [np.array([3, 0, 22, 7, 7]), np.arange(23)[::-1].copy(), slice(0, 7), slice(21, 28), slice(5, 6)]:
        want = _to_tensor(x[idx], torch.device("cpu"))
        got = cache.batch(idx)
        assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride()
        assert torch.equal(got, want)
    assert ImageTensors(x, "cpu", IMAGENET_MEAN, IMAGENET_STD, budget_bytes=x.size * 2).mode == "uint8"
    assert ImageTensors(x, "cpu", IMAGENET_MEAN, IMAGENET_STD, budget_bytes=10).mode == "host"
