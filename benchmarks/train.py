"""Training throughput: our trainer vs a diffusers-style reference loop, same model, data, batch and
precision, in one run, repetitions interleaved (#14).

Model: SDXL's U-Net architecture scaled to ~135 M parameters (``bench_model.py``) at 128 px (16 x 16 x 4
latents), batch 8. Data: a latent cache encoded once from generated images (page cache: in memory).

* ours: ``medisyn.train.trainer.train`` itself (1 epoch per repetition; its per-step wall times);
* reference: the loop of diffusers' ``train_text_to_image_sdxl.py`` with the latents and text embeddings
  precomputed in memory: ``accelerate`` autocast, ``torch.optim.AdamW`` with its defaults, SDPA
  attention (diffusers' default), prompt dropout, ``.item()`` of the loss every step.

Both in float32 (``no``) and bf16 autocast. Repetitions alternate ours/reference (ABBA), so background
load hits both alike; the figure of each is the median step time over all repetitions, first step of
each repetition dropped (one-off allocation). MFU = FLOPs per sample (``FlopCounterMode``, forward +
backward) x samples/s / this CPU's measured matmul peak in that precision (4096^2, warm, best of 5).

    .venv/bin/python benchmarks/train.py            # fp32 + bf16, 3 repetitions x 6 steps, ~15 min on 2 cores
    .venv/bin/python benchmarks/train.py --quick    # bf16 only, 1 repetition x 3 steps, ~3 min

Prints a table and writes benchmarks/results/train.json. Timings only: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
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
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_model  # noqa: E402

from medisyn.config import load_config  # noqa: E402

PRECISIONS = {"fp32": "no", "bf16": "bf16"}


def make_config(root: Path, base: Path, precision: str, batch: int, compile_unet: bool = False):
    # The reference's options: no EMA (demo.yaml turns it on), plain MSE, clipping at 1.0.
    return load_config(REPO / "configs" / "demo.yaml", [
        f"storage.root={root / 'runs'}", f"train.torch_compile={compile_unet}", f"models.sdxl_base={base}",
        "models.vae=null",
        f"data.resolution={bench_model.RESOLUTION}", "runtime.dtype=float32", "train.epochs=1", "train.resume=null",
        f"train.effective_batch_size={batch}", f"train.per_device_batch_size={batch}",
        "train.gradient_accumulation_steps=null", "train.log_every_steps=1000", "train.cache_dtype=float32",
        "train.learning_rate=1e-5", "train.use_ema=false", "train.snr_gamma=null", "train.noise_offset=0.0",
        "train.gradient_checkpointing=false", "train.channels_last=false", "train.max_grad_norm=1.0",
        f"train.mixed_precision={PRECISIONS[precision]}",
    ])


def ours(cfg, cache_uri: str, ckpt: Path) -> tuple[list[float], float]:
    """Step times of one epoch of the real trainer; its FLOPs per sample."""
    from medisyn.train.trainer import train

    result = train(cfg, cache_uri, str(ckpt))
    shutil.rmtree(ckpt, ignore_errors=True)  # ~1.6 GB of weights + optimizer state per repetition
    return result.step_seconds, result.flops_per_sample


def reference(cfg, cache_dir: Path, steps: int, batch: int) -> list[float]:
    """Step times of the diffusers-style loop (train_text_to_image_sdxl.py) on latents held in memory."""
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from medisyn.train.encode import LatentCache

    tc = cfg.train
    cache = LatentCache(cache_dir)
    n = len(cache)
    items = [cache.sample(i) for i in range(n)]
    latents_all = torch.from_numpy(np.stack([it[0] for it in items]))
    rows_all = np.array([it[1] for it in items])
    time_ids_all = torch.from_numpy(np.stack([it[2] for it in items]))
    prompt_all, pooled_all = (torch.from_numpy(a) for a in cache.text(np.arange(len(cache.prompt_embeds))))

    accelerator = Accelerator(cpu=True, mixed_precision=tc.mixed_precision)
    try:
        base = Path(cfg.models.sdxl_base)
        unet = UNet2DConditionModel.from_pretrained(base / "unet")
        sched = DDPMScheduler.from_pretrained(base / "scheduler")
        unet.train()
        optimizer = torch.optim.AdamW(unet.parameters(), lr=tc.learning_rate, betas=(tc.adam_beta1, tc.adam_beta2),
                                      weight_decay=tc.adam_weight_decay, eps=tc.adam_epsilon)
        unet, optimizer = accelerator.prepare(unet, optimizer)
        rng = np.random.default_rng(0)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            idx = rng.permutation(n)[:batch]
            rows = np.where(rng.random(batch) < tc.empty_prompt_prob, 0, rows_all[idx])  # proportion_empty_prompts
            latents = latents_all[idx]
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, sched.config.num_train_timesteps, (batch,)).long()
            noisy = sched.add_noise(latents, noise, timesteps)
            with accelerator.accumulate(unet):
                pred = unet(noisy, timesteps, encoder_hidden_states=prompt_all[rows],
                            added_cond_kwargs={"text_embeds": pooled_all[rows], "time_ids": time_ids_all[idx]},
                            return_dict=False)[0]
                loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
                avg_loss = accelerator.gather(loss.repeat(batch)).mean()
                train_loss = avg_loss.item()  # noqa: F841  (the script logs it every step)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), tc.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            times.append(time.perf_counter() - t0)
        return times
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 repetition x 3 steps, bf16 only (a smoke run)")
    p.add_argument("--precisions", nargs="+", default=None, choices=sorted(PRECISIONS), help="default: fp32 bf16")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions of each loop (default 3)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per repetition (default 6)")
    p.add_argument("--batch", type=int, default=8, help="per-step batch for both loops")
    p.add_argument("--compile", action="store_true",
                   help="ours with train.torch_compile (regional); its one-off compile lands in each repetition's "
                   "dropped first step")
    p.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: all cores)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train.json"), help="JSON output path")
    args = p.parse_args(argv)
    precisions = args.precisions or (["bf16"] if args.quick else ["fp32", "bf16"])
    reps = args.reps or (1 if args.quick else 3)
    steps = args.steps or (3 if args.quick else 6)
    threads = bench_model.pin_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("medisyn").setLevel(logging.WARNING)

    peaks = {"fp32": bench_model.measured_matmul_peak(torch.float32),
             "bf16": bench_model.measured_matmul_peak(torch.bfloat16)}
    print(f"matmul peak ({threads} threads): fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s ({peaks['bf16'] / peaks['fp32']:.2f}x)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="medisyn-bench-train-") as tmp:
        from helpers import write_tiny_dataset
        from medisyn.train.encode import encode, local_cache_dir

        root = Path(tmp)
        base = bench_model.build(root / "sdxl")
        params_m = bench_model.unet_params_m(base)
        dataset = write_tiny_dataset(root / "dataset", n=steps * args.batch, resolution=bench_model.RESOLUTION)
        enc = encode(make_config(root, base, "fp32", args.batch), dataset, str(root / "cache"))
        cache_dir = local_cache_dir(enc.cache_uri)
        for precision in precisions:
            cfg = make_config(root, base, precision, args.batch, args.compile)
            times: dict[str, list[float]] = {"ours": [], "reference": []}
            flops = 0.0
            for r in range(reps):
                order = ("ours", "reference") if r % 2 == 0 else ("reference", "ours")  # ABBA
                for name in order:
                    if name == "ours":
                        step_times, flops = ours(cfg, enc.cache_uri, root / "ckpt")
                    else:
                        step_times = reference(cfg, cache_dir, steps, args.batch)
                    times[name] += step_times[1:]
                    shown = " ".join(f"{t:.2f}" for t in step_times)
                    print(f"  {precision} rep {r + 1}/{reps} {name:<9} steps {shown} s", flush=True)
            med = {k: statistics.median(v) for k, v in times.items()}
            sps = {k: args.batch / v for k, v in med.items()}
            rows.append({
                "precision": precision, "compiled": args.compile, "batch": args.batch, "steps_per_rep": steps,
                "reps": reps,
                "ours_step_s": med["ours"], "reference_step_s": med["reference"],
                "ours_samples_per_s": sps["ours"], "reference_samples_per_s": sps["reference"],
                "speedup": sps["ours"] / sps["reference"],
                "flops_per_sample": flops,
                "ours_mfu": flops * sps["ours"] / peaks[precision],
                "reference_mfu": flops * sps["reference"] / peaks[precision],
                "step_times": times,
            })
    print(f"\nU-Net {params_m:.1f} M parameters, {bench_model.RESOLUTION} px (16x16x4 latents), batch {args.batch}, "
          f"{threads} threads, median step of {reps} interleaved repetitions")
    print(f"{'precision':<10}{'ours s/s':>10}{'ref s/s':>10}{'ratio':>8}{'GFLOP/sample':>14}"
          f"{'MFU ours':>10}{'MFU ref':>9}")
    for r in rows:
        print(f"{r['precision']:<10}{r['ours_samples_per_s']:>10.2f}{r['reference_samples_per_s']:>10.2f}"
              f"{r['speedup']:>7.2f}x{r['flops_per_sample'] / 1e9:>14.1f}{100 * r['ours_mfu']:>9.1f}%"
              f"{100 * r['reference_mfu']:>8.1f}%")
    by = {r["precision"]: r for r in rows}
    if {"fp32", "bf16"} <= set(by):
        print(f"bf16 vs fp32: ours {by['bf16']['ours_samples_per_s'] / by['fp32']['ours_samples_per_s']:.2f}x, "
              f"reference {by['bf16']['reference_samples_per_s'] / by['fp32']['reference_samples_per_s']:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "train", "host": platform.node(), "threads": threads, "torch": torch.__version__,
        "unet_params_m": params_m, "resolution": bench_model.RESOLUTION, "matmul_peak_flops": peaks,
        "quick": args.quick, "results": rows,
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
