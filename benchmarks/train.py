"""Training throughput: our trainer on the latent cache vs a baseline that runs the VAE and both text
encoders at every step (what the reference SDXL script does without caching), same model, same data,
same batch, in one run. Also reports the one-off encode cost and the MFU the trainer logs.

    .venv/bin/python benchmarks/train.py [--sizes tiny mid] [--images 48] [--steps 6]

Prints a table and writes benchmarks/results/train.json. Timings only: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from medisyn import storage  # noqa: E402
from medisyn.config import load_config  # noqa: E402
from medisyn.models import sdxl  # noqa: E402

# The mid-size config: 3-level U-Net (64/128/256 channels), 3-block VAE (128 px -> 32x32 latents),
# 64-wide text encoders. Big enough that the frozen encoders matter, small enough for 2 CPU cores.
SIZES = {
    "tiny": {"resolution": 64, "tiny": {}},
    "mid": {
        "resolution": 128,
        "tiny": {"text_hidden_size": 64, "unet_block_out_channels": [64, 128, 256], "unet_cross_attention_dim": 128,
                 "vae_block_out_channels": [64, 128, 128]},
    },
}


def measured_cpu_peak_flops(n: int = 1024, repeats: int = 5) -> float:
    """Best float32 matmul FLOP/s of this machine: the CPU stand-in for a GPU's datasheet peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def write_dataset(root: Path, n: int, resolution: int) -> str:
    from helpers import write_tiny_dataset

    return write_tiny_dataset(root, n=n, resolution=resolution, shards=2)


def baseline_loop(cfg, dataset_uri: str, steps: int, batch: int) -> float:
    """Samples/s of the uncached loop: decode PNG, VAE-encode, run both text encoders (with the 10%
    dropout applied to the caption text), then the same U-Net step as the trainer."""
    import pyarrow.parquet as pq
    import torch.nn.functional as F
    from diffusers.models.attention_processor import AttnProcessor2_0

    from medisyn.train.encode import encode_prompts, image_to_tensor

    m = cfg.models
    vae, (te1, te2), toks = sdxl.load_vae(m), sdxl.load_text_encoders(m), sdxl.load_tokenizers(m)
    unet = sdxl.load_unet(m)
    unet.set_attn_processor(AttnProcessor2_0())
    unet.train()
    sched = sdxl.load_noise_scheduler(m)
    tc = cfg.train
    opt = torch.optim.AdamW(unet.parameters(), lr=tc.learning_rate, betas=(tc.adam_beta1, tc.adam_beta2),
                            weight_decay=tc.adam_weight_decay, eps=tc.adam_epsilon)
    rows = []
    for part in sorted((storage.local_path(dataset_uri) / "train").glob("*.parquet")):
        rows += pq.read_table(part, columns=["image", "caption"]).to_pylist()
    rng = np.random.default_rng(0)
    res = cfg.data.resolution
    t_total = 0.0
    for step in range(steps):
        idx = rng.choice(len(rows), size=batch, replace=False)
        t0 = time.perf_counter()
        pixels, time_ids = zip(*(image_to_tensor(rows[i]["image"], res) for i in idx), strict=True)
        captions = [("" if rng.random() < tc.empty_prompt_prob else rows[i]["caption"]) for i in idx]
        with torch.no_grad():
            latents = vae.encode(torch.stack(pixels)).latent_dist.sample() * vae.config.scaling_factor
            prompt, pooled = encode_prompts(captions, toks, (te1, te2), "cpu")
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,))
        pred = unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=prompt,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": torch.from_numpy(np.stack(time_ids))}).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), tc.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step > 0:  # the first step pays one-off allocations in both loops' measurement windows alike
            t_total += time.perf_counter() - t0
    return (steps - 1) * batch / t_total


def run_size(name: str, spec: dict, images: int, batch: int, peak: float, workdir: Path) -> dict:
    from helpers import demo_config  # noqa: F401  (same path layout as the tests)
    from medisyn.train.encode import encode
    from medisyn.train.trainer import train

    root = workdir / name
    tiny = json.dumps(spec["tiny"])
    overrides = [
        f"storage.root={root / 'runs'}", f"models.sdxl_base={root / 'sdxl'}", f"models.vae={root / 'vae'}",
        f"models.tiny={tiny}", f"data.resolution={spec['resolution']}", "train.epochs=2", "train.resume=null",
        f"train.effective_batch_size={batch}", f"train.per_device_batch_size={batch}",
        "train.gradient_accumulation_steps=null", "train.log_every_steps=1000", "train.cache_dtype=float16",
        f"train.peak_flops_per_device={peak}", "train.learning_rate=1e-4",
    ]
    cfg = load_config(REPO / "configs" / "demo.yaml", overrides)
    sdxl.build_tiny_sdxl(cfg.models.tiny, storage.local_path(cfg.models.sdxl_base), storage.local_path(cfg.models.vae))
    dataset = write_dataset(root / "dataset", images, spec["resolution"])
    t = time.perf_counter()
    enc = encode(cfg, dataset, str(root / "cache"))
    encode_s = time.perf_counter() - t
    result = train(cfg, enc.cache_uri, str(root / "ckpt"))
    steps = result.global_step
    baseline = baseline_loop(cfg, dataset, steps, batch)
    unet = sdxl.load_unet(cfg.models)
    return {
        "size": name,
        "resolution": spec["resolution"],
        "latent_shape": list(enc.latent_shape),
        "unet_params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
        "images": images, "batch": batch, "steps": steps,
        "encode_seconds": encode_s,
        "encode_images_per_s": images / encode_s,
        "trainer_samples_per_s": result.images_per_s,
        "baseline_samples_per_s": baseline,
        "speedup": result.images_per_s / baseline,
        "flops_per_sample": result.flops_per_sample,
        "mfu_vs_measured_cpu_peak": result.mfu,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=sorted(SIZES), help="model sizes to measure")
    p.add_argument("--images", type=int, default=48, help="training images per size (2 epochs are trained)")
    p.add_argument("--batch", type=int, default=8, help="per-step batch for both loops")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train.json"), help="JSON output path")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    peak = measured_cpu_peak_flops()
    rows = []
    with tempfile.TemporaryDirectory(prefix="medisyn-bench-train-") as tmp:
        for name in args.sizes:
            rows.append(run_size(name, SIZES[name], args.images, args.batch, peak, Path(tmp)))
    a100 = 312e12
    for r in rows:
        r["mfu_vs_a100_bf16_peak"] = r["flops_per_sample"] * r["trainer_samples_per_s"] / a100
    print(f"\nmeasured CPU fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    print(f"{'size':<6}{'U-Net M':>9}{'latents':>12}{'encode img/s':>14}{'trainer s/s':>13}{'baseline s/s':>14}"
          f"{'speedup':>9}{'GFLOP/sample':>14}{'MFU(cpu)':>10}")
    for r in rows:
        print(f"{r['size']:<6}{r['unet_params_m']:>9.2f}{'x'.join(map(str, r['latent_shape'])):>12}"
              f"{r['encode_images_per_s']:>14.1f}{r['trainer_samples_per_s']:>13.1f}{r['baseline_samples_per_s']:>14.1f}"
              f"{r['speedup']:>8.2f}x{r['flops_per_sample'] / 1e9:>14.2f}{100 * r['mfu_vs_measured_cpu_peak']:>9.1f}%")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "train", "host": platform.node(), "cpu_threads": torch.get_num_threads(),
                               "cpu_peak_flops": peak, "torch": torch.__version__, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
