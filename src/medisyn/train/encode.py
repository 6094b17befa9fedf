"""The latent cache: the frozen VAE and both text encoders run once per training image, not per step.

Section 4.2 freezes the VAE and the text encoders and fine-tunes only the U-Net, so their outputs
are constants of the dataset: computing them once removes the VAE encoder and two CLIP towers from
every training step (``benchmarks/train.py`` measures the gain). Training then never loads them.

Layout of a cache prefix (all arrays ``.npy`` so the trainer memory-maps them)::

    <cache>/manifest.json                    cache_key, dataset_hash, model_identity, shapes, shards
    <cache>/text/prompt_embeds.npy           (C, 77, D1+D2) penultimate hidden states, both encoders
    <cache>/text/pooled_prompt_embeds.npy    (C, P)  text encoder 2 pooled projection
    <cache>/text/captions.json               the C captions; row 0 is always the empty prompt ""
    <cache>/shards/00000.latents.npy         (n, 4, h, w) VAE latent mean x scaling_factor
    <cache>/shards/00000.caption_ids.npy     (n,) int32 row in text/
    <cache>/shards/00000.time_ids.npy        (n, 6) SDXL micro-conditioning of that latent
    <cache>/_COMPLETE

Text embeddings are stored once per *distinct* caption: MediSyn captions are built from label
templates (section 4.1), so a million images share a few hundred captions; per-sample text rows would
make the cache ~10x larger than the latents. The empty prompt is encoded once (row 0) and the trainer
swaps it in for the 10% CFG dropout, re-drawn every step (section 4.2).

Memory stays bounded on any dataset size: pass 1 reads only the caption column; pass 2 streams
images in record batches and writes one shard of ``train.cache_shard_rows`` latents at a time.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medisyn import storage
from medisyn.config import RunConfig
from medisyn.data import dataset_hash, train_shards
from medisyn.progress import Progress
from medisyn.results import StageResult

log = logging.getLogger("medisyn.train.encode")

CACHE_FORMAT = 1
EMPTY_PROMPT = ""


@dataclass(frozen=True)
class EncodeResult(StageResult):
    cache_uri: str  # the published cache prefix
    cache_key: str  # sha256 of (dataset_hash, model_identity, resolution, dtype, format)[:16]
    dataset_hash: str  # from the dataset manifest
    model_identity: str  # sdxl.model_identity(cfg.models)
    num_samples: int  # training images cached
    num_captions: int  # distinct text rows, the empty prompt included
    latent_shape: tuple[int, int, int]  # (channels, height, width) derived from the VAE
    reused: bool  # True when a complete cache with the same key was already there
    seconds: float  # wall time of this call


# ----------------------------------------------------------------------------------------------
# Dataset side
# ----------------------------------------------------------------------------------------------
def _open_parquet(uri: str):
    import pyarrow.parquet as pq

    fs, path = storage.pyarrow_filesystem(uri)
    return pq.ParquetFile(fs.open_input_file(path))


def cache_key(data_hash: str, identity: str, resolution: int, dtype: str) -> str:
    blob = json.dumps(
        {"dataset_hash": data_hash, "model_identity": identity, "resolution": resolution, "dtype": dtype,
         "format": CACHE_FORMAT},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_manifest(cache_uri: str) -> dict:
    return storage.read_json(storage.join(cache_uri, "manifest.json"))


# ----------------------------------------------------------------------------------------------
# Encoders (the SDXL recipe of diffusers' train_text_to_image_sdxl.py, encode_prompt)
# ----------------------------------------------------------------------------------------------
def encode_prompts(captions: list[str], tokenizers, text_encoders, device) -> tuple:
    """(prompt_embeds (n, 77, D1+D2), pooled (n, P)): each encoder's penultimate hidden state,
    concatenated on channels (section 4.2), and encoder 2's pooled projection."""
    import torch

    embeds = []
    pooled = None
    with torch.no_grad():
        for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
            ids = tokenizer(
                captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            out = encoder(ids, output_hidden_states=True, return_dict=True)
            embeds.append(out.hidden_states[-2])
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]
    return torch.cat(embeds, dim=-1), pooled


def image_to_tensor(png: bytes, resolution: int):
    """PNG bytes -> ((3, R, R) in [-1, 1], time_ids). Images already at the dataset resolution (the
    normal case after preprocessing) keep original=(R, R), crop=(0, 0), target=(R, R): the SDXL
    micro-conditioning of the pixels actually encoded. Any other size is resized (shorter side) and
    center-cropped here, and the time ids record the true original size and crop offset."""
    import torch
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    w, h = img.size
    top = left = 0
    if (w, h) != (resolution, resolution):
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    time_ids = np.array([h, w, top, left, resolution, resolution], dtype=np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy()), time_ids


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------
def encode(cfg: RunConfig, dataset_uri: str, cache_uri: str) -> EncodeResult:
    """Encode the train split of ``dataset_uri`` into the latent cache at ``cache_uri``.

    A complete cache already at ``cache_uri`` with the same key (dataset content hash, base model
    identity, resolution, dtype) is reused; a stale one is rebuilt and replaced atomically.
    """
    from medisyn.models import sdxl

    t0 = time.monotonic()
    storage.require_complete(dataset_uri)
    cache_uri = storage.normalize(cache_uri)
    tc = cfg.train
    res = cfg.data.resolution
    data_hash = dataset_hash(dataset_uri)
    identity = sdxl.model_identity(cfg.models)
    key = cache_key(data_hash, identity, res, tc.cache_dtype)

    manifest = _reusable_manifest(cache_uri, key)
    if manifest is not None:
        return EncodeResult(
            cache_uri=cache_uri, cache_key=key, dataset_hash=data_hash, model_identity=identity,
            num_samples=int(manifest["num_samples"]), num_captions=int(manifest["num_captions"]),
            latent_shape=tuple(manifest["latent_shape"]), reused=True, seconds=time.monotonic() - t0,
        )

    device = sdxl.resolve_device(cfg.runtime)
    dtype = sdxl.resolve_dtype(cfg.runtime, device)
    np_dtype = np.float16 if tc.cache_dtype == "float16" else np.float32
    shards = train_shards(dataset_uri)
    ordered, num_samples = _caption_table(dataset_uri, shards)

    with storage.staged_dir(cache_uri, metadata={"cache_key": key}) as out:
        (out / "text").mkdir()
        (out / "shards").mkdir()
        prompt_shape, pooled_dim = _encode_text(cfg, out / "text", ordered, device, dtype, np_dtype)
        caption_id = {c: i for i, c in enumerate(ordered)}
        latent_shape, scaling, written = _encode_images(cfg, out / "shards", shards, caption_id, num_samples, device,
                                                        dtype, np_dtype)
        manifest = {
            "format": CACHE_FORMAT,
            "cache_key": key,
            "dataset_uri": storage.normalize(dataset_uri),
            "dataset_hash": data_hash,
            "model_identity": identity,
            "resolution": res,
            "latent_shape": list(latent_shape),
            "scaling_factor": scaling,
            "dtype": tc.cache_dtype,
            "num_samples": num_samples,
            "num_captions": len(ordered),
            "empty_prompt_row": 0,
            "prompt_embeds_shape": list(prompt_shape),
            "pooled_dim": pooled_dim,
            "shards": written,
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    log.info("latent cache %s: %d images, %d captions, latents %s", cache_uri, num_samples, len(ordered), latent_shape)
    return EncodeResult(
        cache_uri=cache_uri, cache_key=key, dataset_hash=data_hash, model_identity=identity,
        num_samples=num_samples, num_captions=len(ordered), latent_shape=latent_shape, reused=False,
        seconds=time.monotonic() - t0,
    )


def _reusable_manifest(cache_uri: str, key: str) -> dict | None:
    """The manifest of a complete cache at ``cache_uri`` built for ``key``, else None (build it)."""
    if not storage.is_complete(cache_uri):
        return None
    try:
        manifest = read_manifest(cache_uri)
    except (FileNotFoundError, json.JSONDecodeError):
        manifest = {}
    if manifest.get("cache_key") == key:
        log.info("latent cache %s is complete for key %s: reused", cache_uri, key)
        return manifest
    log.info("latent cache %s has key %s, want %s: rebuilding", cache_uri, manifest.get("cache_key"), key)
    return None


def _caption_table(dataset_uri: str, shards: list[str]) -> tuple[list[str], int]:
    """Pass 1, the caption column only (columnar read: no image bytes), to size the text table:
    (distinct captions, the empty prompt first; number of training images)."""
    captions: set[str] = set()
    num_samples = 0
    for uri in shards:
        pf = _open_parquet(uri)
        num_samples += pf.metadata.num_rows
        for batch in pf.iter_batches(batch_size=65536, columns=["caption"]):
            captions.update(str(c) for c in batch.column(0).to_pylist())
    if num_samples == 0:
        raise ValueError(f"the train split of {dataset_uri} is empty")
    return [EMPTY_PROMPT] + sorted(c for c in captions if c != EMPTY_PROMPT), num_samples


def _encode_text(cfg: RunConfig, text_dir: Path, ordered: list[str], device, dtype,
                 np_dtype) -> tuple[tuple[int, ...], int]:
    """The text table: every distinct caption through both text encoders, once, into memory-mapped
    arrays; returns (prompt_embeds shape per caption, pooled dim). The text towers are freed after."""
    from medisyn.models import sdxl

    batch_size = cfg.train.encode_batch_size
    tokenizers = sdxl.load_tokenizers(cfg.models)
    encoders = sdxl.load_text_encoders(cfg.models, device=device, dtype=dtype)
    probe, probe_pooled = encode_prompts([EMPTY_PROMPT], tokenizers, encoders, device)
    prompt_mm = np.lib.format.open_memmap(
        text_dir / "prompt_embeds.npy", mode="w+", dtype=np_dtype, shape=(len(ordered), *probe.shape[1:])
    )
    pooled_mm = np.lib.format.open_memmap(
        text_dir / "pooled_prompt_embeds.npy", mode="w+", dtype=np_dtype,
        shape=(len(ordered), probe_pooled.shape[1]),
    )
    text_progress = Progress(len(ordered), "encode text", unit="caption")
    for i in range(0, len(ordered), batch_size):
        chunk = ordered[i:i + batch_size]
        emb, pooled = encode_prompts(chunk, tokenizers, encoders, device)
        prompt_mm[i:i + len(chunk)] = emb.float().cpu().numpy().astype(np_dtype)
        pooled_mm[i:i + len(chunk)] = pooled.float().cpu().numpy().astype(np_dtype)
        text_progress.update(len(chunk))
    text_progress.close()
    prompt_mm.flush()
    pooled_mm.flush()
    del prompt_mm, pooled_mm, encoders, tokenizers  # the text towers are never needed again
    (text_dir / "captions.json").write_text(json.dumps(ordered))
    return tuple(probe.shape[1:]), int(probe_pooled.shape[1])


def _encode_images(cfg: RunConfig, shards_dir: Path, shards: list[str], caption_id: dict[str, int],
                   num_samples: int, device, dtype, np_dtype) -> tuple[tuple[int, int, int], float, list[dict]]:
    """Pass 2: every training image through the VAE into latent shards; returns (latent shape,
    scaling factor, the shards written)."""
    import torch

    from medisyn.models import sdxl

    tc, res = cfg.train, cfg.data.resolution
    vae = sdxl.load_vae(cfg.models, device=device, dtype=dtype)
    scaling = float(vae.config.scaling_factor)
    # Latent side derived from the VAE (each extra block halves it), never hard-coded.
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_shape = (int(vae.config.latent_channels), res // factor, res // factor)
    writer = _ShardWriter(shards_dir, tc.cache_shard_rows, latent_shape, np_dtype)
    img_progress = Progress(num_samples, "encode images", unit="img")
    for uri in shards:
        pf = _open_parquet(uri)
        for batch in pf.iter_batches(batch_size=tc.encode_batch_size, columns=["image", "caption"]):
            pngs, texts = batch.column(0).to_pylist(), batch.column(1).to_pylist()
            pixels, time_ids = zip(*(image_to_tensor(p, res) for p in pngs), strict=True)
            with torch.no_grad():
                x = torch.stack(pixels).to(device=device, dtype=dtype)
                # The posterior mean, not a sample: the cache is then a deterministic function
                # of (dataset, model) and its key stays honest (docs/training.md).
                latents = vae.encode(x).latent_dist.mean * scaling
            if tuple(latents.shape[1:]) != latent_shape:
                raise RuntimeError(f"VAE produced latents {tuple(latents.shape[1:])}, expected {latent_shape}")
            writer.add(
                latents.float().cpu().numpy(),
                np.array([caption_id[str(t)] for t in texts], dtype=np.int32),
                np.stack(time_ids),
            )
            img_progress.update(len(pngs))
    writer.close()
    img_progress.close()
    return latent_shape, scaling, writer.shards


class _ShardWriter:
    """Buffers at most one shard of latents in RAM, then writes it out (bounded memory)."""

    def __init__(self, directory: Path, rows: int, latent_shape: tuple, np_dtype):
        self.dir, self.rows, self.np_dtype = directory, rows, np_dtype
        self.latents = np.empty((rows, *latent_shape), dtype=np_dtype)
        self.caption_ids = np.empty((rows,), dtype=np.int32)
        self.time_ids = np.empty((rows, 6), dtype=np.float32)
        self.fill = 0
        self.shards: list[dict] = []

    def add(self, latents: np.ndarray, caption_ids: np.ndarray, time_ids: np.ndarray) -> None:
        i = 0
        while i < len(latents):
            take = min(self.rows - self.fill, len(latents) - i)
            self.latents[self.fill:self.fill + take] = latents[i:i + take]
            self.caption_ids[self.fill:self.fill + take] = caption_ids[i:i + take]
            self.time_ids[self.fill:self.fill + take] = time_ids[i:i + take]
            self.fill += take
            i += take
            if self.fill == self.rows:
                self._flush()

    def _flush(self) -> None:
        if self.fill == 0:
            return
        name = f"{len(self.shards):05d}"
        np.save(self.dir / f"{name}.latents.npy", self.latents[: self.fill])
        np.save(self.dir / f"{name}.caption_ids.npy", self.caption_ids[: self.fill])
        np.save(self.dir / f"{name}.time_ids.npy", self.time_ids[: self.fill])
        self.shards.append({"name": name, "rows": int(self.fill)})
        self.fill = 0

    def close(self) -> None:
        self._flush()


# ----------------------------------------------------------------------------------------------
# Reading (the trainer's side of the format)
# ----------------------------------------------------------------------------------------------
class LatentCache:
    """A local, complete cache directory, memory-mapped: O(1) RAM in the dataset size."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.manifest = json.loads((self.dir / "manifest.json").read_text())
        if self.manifest.get("format") != CACHE_FORMAT:
            raise ValueError(f"latent cache {self.dir} has format {self.manifest.get('format')}, "
                             f"expected {CACHE_FORMAT}")
        self.prompt_embeds = np.load(self.dir / "text" / "prompt_embeds.npy", mmap_mode="r")
        self.pooled_prompt_embeds = np.load(self.dir / "text" / "pooled_prompt_embeds.npy", mmap_mode="r")
        self._latents, self._caption_ids, self._time_ids, starts = [], [], [], []
        start = 0
        for shard in self.manifest["shards"]:
            base = self.dir / "shards" / shard["name"]
            self._latents.append(np.load(f"{base}.latents.npy", mmap_mode="r"))
            self._caption_ids.append(np.load(f"{base}.caption_ids.npy", mmap_mode="r"))
            self._time_ids.append(np.load(f"{base}.time_ids.npy", mmap_mode="r"))
            starts.append(start)
            start += int(shard["rows"])
        self._starts = np.array(starts, dtype=np.int64)
        self.num_samples = start
        if start != int(self.manifest["num_samples"]):
            raise ValueError(f"latent cache {self.dir}: shards hold {start} rows, "
                             f"manifest says {self.manifest['num_samples']}")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["latent_shape"])

    def __len__(self) -> int:
        return self.num_samples

    def sample(self, index: int) -> tuple[np.ndarray, int, np.ndarray]:
        """(latents (C, h, w) float32, caption row, time_ids (6,)) of sample ``index``."""
        s = int(np.searchsorted(self._starts, index, side="right") - 1)
        r = index - int(self._starts[s])
        return (
            np.array(self._latents[s][r], dtype=np.float32),  # a copy: memmaps are read-only
            int(self._caption_ids[s][r]),
            np.array(self._time_ids[s][r], dtype=np.float32),
        )

    def text(self, caption_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(prompt_embeds, pooled) float32 for the given caption rows (row 0 = empty prompt)."""
        rows = np.asarray(caption_rows, dtype=np.int64)
        return (
            np.array(self.prompt_embeds[rows], dtype=np.float32),
            np.array(self.pooled_prompt_embeds[rows], dtype=np.float32),
        )


def local_cache_dir(cache_uri: str) -> Path:
    """A local directory holding the complete cache: in place for file://, else downloaded once per
    node into ``$MEDISYN_CACHE_DIR/latent-cache/<cache_key>`` (call on the local main process first)."""
    from medisyn.models import sdxl

    storage.require_complete(cache_uri)
    if not storage.is_remote(cache_uri):
        return storage.local_path(cache_uri)
    key = read_manifest(cache_uri)["cache_key"]
    return storage.download_dir_once(cache_uri, sdxl.cache_dir() / "latent-cache" / key)
