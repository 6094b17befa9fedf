"""Sampling throughput: ``medisyn.generate.sample`` vs a plain ``StableDiffusionXLPipeline``, same model,
prompts, seeds, steps, CFG scale and precision, in one run, repetitions interleaved (#14).

Model: SDXL's architecture scaled to a ~135 M-parameter U-Net (``bench_model.py``) at 128 px. Prompts:
4 captions cycled, as the privacy gate and FID sample many images per caption.

* ours: ``load_model`` + ``sample`` as FID, the gates and ``medisyn generate`` call them, with
  ``sampling.torch_compile`` on (``--no-compile`` to time it off);
* reference: ``StableDiffusionXLPipeline.from_pretrained(dir, dtype=...)`` called per batch with the
  batch's prompts and one CPU generator per image (its defaults: SDPA attention, batched CFG).

Each side runs one warm-up batch first (ours: that is where compilation happens; its seconds are
reported); then repetitions alternate (ABBA) and each side's figure is its median repetition.
Images of the two sides are compared pixel by pixel (same weights, same seeds: they should agree
up to kernel rounding).

    .venv/bin/python benchmarks/generate.py          # bf16 + fp32, 16 images x 20 steps, 3 reps: ~30 min on 2 cores
    .venv/bin/python benchmarks/generate.py --quick  # bf16, 8 images x 4 steps, 1 rep: ~5-10 min (compile)

Prints a table and writes benchmarks/results/generate.json. Timings only: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
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
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_model  # noqa: E402

from medisyn.config import load_config  # noqa: E402

CAPTIONS = ["Chest X-ray showing pneumonia.", "Dermoscopy image showing melanoma.",
            "Brain MRI showing glioma.", "Optical coherence tomography image showing drusen."]
DTYPES = {"bf16": ("bfloat16", torch.bfloat16), "fp32": ("float32", torch.float32)}


def reference_sample(pipe, prompts, seeds, batch: int, steps: int, guidance: float, resolution: int):
    images = []
    for start in range(0, len(prompts), batch):
        out = pipe(prompt=prompts[start:start + batch],
                   generator=[torch.Generator("cpu").manual_seed(s) for s in seeds[start:start + batch]],
                   guidance_scale=guidance, num_inference_steps=steps, height=resolution, width=resolution,
                   output_type="pil")
        images += out.images
    return images


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="bf16, 8 images x 4 steps, 1 repetition (a smoke run)")
    p.add_argument("--precisions", nargs="+", default=None, choices=sorted(DTYPES), help="default: bf16 fp32")
    p.add_argument("--images", type=int, default=None, help="images per repetition (default 16)")
    p.add_argument("--batch", type=int, default=8, help="images per pipeline call (sampling.batch_size)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default 20; the paper samples 50)")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 3)")
    p.add_argument("--no-compile", action="store_true", help="ours without sampling.torch_compile")
    p.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: all cores)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "generate.json"), help="JSON output path")
    args = p.parse_args(argv)
    precisions = args.precisions or (["bf16"] if args.quick else ["bf16", "fp32"])
    n_images = args.images or (8 if args.quick else 16)
    steps = args.steps or (4 if args.quick else 20)
    reps = args.reps or (1 if args.quick else 3)
    threads = bench_model.pin_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    from diffusers import StableDiffusionXLPipeline

    from medisyn.generate import load_model, sample

    prompts = [CAPTIONS[i % len(CAPTIONS)] for i in range(n_images)]
    seeds = list(range(n_images))
    rows = []
    with tempfile.TemporaryDirectory(prefix="medisyn-bench-generate-") as tmp:
        base = bench_model.build(Path(tmp) / "sdxl")
        params_m = bench_model.unet_params_m(base)
        for precision in precisions:
            dtype_name, dtype = DTYPES[precision]
            cfg = load_config(REPO / "configs" / "demo.yaml", [
                f"storage.root={Path(tmp) / 'runs'}", f"models.sdxl_base={base}", "models.vae=null",
                f"runtime.dtype={dtype_name}", f"sampling.batch_size={args.batch}",
                f"sampling.num_inference_steps={steps}", f"sampling.torch_compile={not args.no_compile}",
            ])
            ours_pipe = load_model(cfg, str(base))
            ref_pipe = StableDiffusionXLPipeline.from_pretrained(str(base), dtype=dtype, add_watermarker=False)
            ref_pipe.set_progress_bar_config(disable=True)

            def run_ours(ps, ss, pipe=ours_pipe, sampling=cfg.sampling):
                return sample(pipe, ps, ss, sampling, bench_model.RESOLUTION)

            def run_ref(ps, ss, pipe=ref_pipe, guidance=cfg.sampling.guidance_scale):
                return reference_sample(pipe, ps, ss, args.batch, steps, guidance, bench_model.RESOLUTION)

            warm = {}
            for name, fn in (("ours", run_ours), ("reference", run_ref)):
                t = time.perf_counter()
                fn(prompts[:args.batch], seeds[:args.batch])
                warm[name] = time.perf_counter() - t
                print(f"  {precision} warm-up batch {name:<9} {warm[name]:.1f} s", flush=True)
            times: dict[str, list[float]] = {"ours": [], "reference": []}
            images = {}
            for r in range(reps):
                order = ("ours", "reference") if r % 2 == 0 else ("reference", "ours")  # ABBA
                for name in order:
                    t = time.perf_counter()
                    images[name] = (run_ours if name == "ours" else run_ref)(prompts, seeds)
                    times[name].append(time.perf_counter() - t)
                    print(f"  {precision} rep {r + 1}/{reps} {name:<9} {times[name][-1]:.1f} s", flush=True)
            diff = np.abs(np.stack([np.asarray(i, dtype=np.int16) for i in images["ours"]])
                          - np.stack([np.asarray(i, dtype=np.int16) for i in images["reference"]]))
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({
                "precision": precision, "images": n_images, "batch": args.batch, "steps": steps, "reps": reps,
                "compiled": not args.no_compile,
                "ours_s": med["ours"], "reference_s": med["reference"],
                "ours_images_per_s": n_images / med["ours"], "reference_images_per_s": n_images / med["reference"],
                "speedup": med["reference"] / med["ours"],
                "warmup_batch_s": warm,
                "one_off_compile_s": max(0.0, warm["ours"] - med["ours"] * args.batch / n_images),
                "pixel_diff_mean": float(diff.mean()), "pixel_diff_max": int(diff.max()),
                "times": times,
            })
            del ours_pipe, ref_pipe, run_ours, run_ref
    print(f"\nU-Net {params_m:.1f} M parameters, {bench_model.RESOLUTION} px, {n_images} images x {steps} steps, "
          f"CFG {7.0}, batch {args.batch}, {threads} threads, median of {reps} interleaved repetitions")
    print(f"{'precision':<10}{'ours img/s':>12}{'ref img/s':>11}{'ratio':>8}{'compile s':>11}{'|diff| mean/max':>17}")
    for r in rows:
        print(f"{r['precision']:<10}{r['ours_images_per_s']:>12.3f}{r['reference_images_per_s']:>11.3f}"
              f"{r['speedup']:>7.2f}x{r['one_off_compile_s']:>11.1f}{r['pixel_diff_mean']:>12.2f}/{r['pixel_diff_max']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "generate", "host": platform.node(), "threads": threads, "torch": torch.__version__,
        "unet_params_m": params_m, "resolution": bench_model.RESOLUTION, "quick": args.quick, "results": rows,
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
