"""MLflow pyfunc (models-from-code) wrapping the MediSyn SDXL pipeline.

This file is logged as the model's code by ``medisyn.registry`` (``python_model=<this file>``): MLflow
copies it into the model artifact, so it imports nothing from ``medisyn`` and needs only torch,
diffusers, Pillow and pandas on the consumer's side. The diffusers pipeline directory (fine-tuned
U-Net in safetensors + the frozen base components) is the artifact ``pipeline``.

Input (a pandas DataFrame, one row per request; only ``prompt`` is required):
    prompt (str), num_images (int, default 1), seed (int, default 0),
    guidance_scale (float), num_inference_steps (int): default = the settings this version's gates
    judged (``medisyn_model.json["sampling"]``; 7.0 / 50 as in the paper, section 4.3, when none is
    recorded). Other values are allowed, with a warning: those images were not judged by any gate.
Output (a DataFrame, one row per image): prompt, seed (= row seed + image index), image (PNG bytes,
base64-encoded str so the output survives JSON serving), guidance_scale, num_inference_steps, and
gated (whether those were the gated settings).

    model = mlflow.pyfunc.load_model("models:/medisyn-sdxl@approved")
    out = model.predict(pd.DataFrame([{"prompt": "Dermoscopy image showing melanoma.", "num_images": 2}]))
    image = PIL.Image.open(io.BytesIO(base64.b64decode(out.image[0])))

Integrity (issues #10, #21): load approved versions with ``medisyn.consumer.load_pyfunc(uri)``, which
verifies the promoter's signature over every file of the version (this file included) **before** MLflow
imports any of its code, and writes the verified envelope beside the model. ``load_context`` checks it
again (defense in depth) and fails closed: a model without that envelope (e.g. loaded with a bare
``mlflow.pyfunc.load_model``, which runs this file before anything could check it) or whose files differ
from the signed ones raises :class:`TamperedModelError`; so does a pipeline file that differs from
``medisyn_manifest.json``. Nothing in ``MLmodel`` is trusted.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os

import mlflow
from mlflow.pyfunc import PythonModel

DEFAULTS = {"num_images": 1, "seed": 0, "guidance_scale": 7.0, "num_inference_steps": 50}
MANIFEST_FILE = "medisyn_manifest.json"
log = logging.getLogger("medisyn.pyfunc")


class TamperedModelError(ValueError):
    """The model's files do not match their manifest or the digest the registry recorded."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_signed_model(model_root: str) -> None:
    """The promoter's signature (``medisyn_approval.dsse.json``, written by ``medisyn.consumer.load_pyfunc``
    after it verified the version) covers exactly the files under ``model_root``; else TamperedModelError."""
    envelope = os.path.join(model_root, "medisyn_approval.dsse.json")
    if not os.path.isfile(envelope):
        raise TamperedModelError("no promoter signature beside the model: load approved MediSyn models with "
                                 "medisyn.consumer.load_pyfunc(uri), which verifies every file before any model "
                                 "code runs (refusing an unverified, possibly tampered model)")
    try:
        from pathlib import Path

        from medisyn.registry.consumer import verify_approval
    except ImportError as exc:  # fail closed: nothing here can check a signature
        raise TamperedModelError(f"medisyn is not installed, so the promoter signature cannot be checked: {exc}") \
            from None
    try:
        with open(envelope) as f:
            verify_approval(None, None, f.read(), Path(model_root))
    except ValueError as exc:
        raise TamperedModelError(str(exc)) from None


def verify_pipeline_dir(path: str, expected_manifest_sha256: list[str] | None = None) -> None:
    """Refuse a pipeline directory whose files differ from its manifest or whose manifest differs from
    the registry's digest(s)."""
    manifest = os.path.join(path, MANIFEST_FILE)
    if not os.path.exists(manifest):
        raise TamperedModelError(f"{path} has no {MANIFEST_FILE}: refusing an unverifiable model")
    if expected_manifest_sha256 and any(d != _sha256(manifest) for d in expected_manifest_sha256):
        raise TamperedModelError(f"{MANIFEST_FILE} does not match the sha256 recorded in the registry: "
                                 "refusing a tampered model")
    with open(manifest) as f:
        entries = json.load(f)
    for rel, digest in entries.items():
        f_path = os.path.join(path, rel)
        if not os.path.isfile(f_path) or _sha256(f_path) != digest:
            raise TamperedModelError(f"{rel} is missing or does not match its sha256 in {MANIFEST_FILE}: "
                                     "refusing a tampered model")


class MediSynSDXLModel(PythonModel):
    def load_context(self, context) -> None:
        import torch
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = context.artifacts["pipeline"]
        # <model root>/artifacts/pipeline: the signature covers the whole model root
        verify_signed_model(os.path.dirname(os.path.dirname(os.path.abspath(path))))
        verify_pipeline_dir(path)
        cuda = torch.cuda.is_available()
        # Half precision on GPU (bf16, as trained, section 4.2); float32 on CPU.
        dtype = torch.bfloat16 if cuda else torch.float32
        pipe = StableDiffusionXLPipeline.from_pretrained(path, dtype=dtype, add_watermarker=False)
        if not isinstance(pipe.scheduler, EulerDiscreteScheduler):
            pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to("cuda" if cuda else "cpu")
        info = os.path.join(path, "medisyn_model.json")
        self.info = json.load(open(info)) if os.path.exists(info) else {}
        self.resolution = int(self.info.get("resolution") or 1024)
        self.batch_size = int(self.info.get("batch_size") or 4)
        # Served = gated (issue #25): the defaults are the sampling settings this version's gates judged.
        gated = self.info.get("sampling") or {}
        self.defaults = dict(DEFAULTS, **{k: gated[k] for k in ("guidance_scale", "num_inference_steps") if k in gated})
        self.guidance_rescale = float(gated.get("guidance_rescale") or 0.0)

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        if isinstance(model_input, dict):
            model_input = pd.DataFrame([model_input])
        elif isinstance(model_input, str):
            model_input = pd.DataFrame([{"prompt": model_input}])
        elif isinstance(model_input, list):
            model_input = pd.DataFrame([{"prompt": p} if isinstance(p, str) else p for p in model_input])
        rows = []
        for rec in model_input.to_dict("records"):
            opts = {k: (self.defaults[k] if rec.get(k) is None or rec.get(k) != rec.get(k) else rec[k])
                    for k in self.defaults}
            gated = all(opts[k] == self.defaults[k] for k in ("guidance_scale", "num_inference_steps"))
            if not gated:
                log.warning("sampling with guidance %s / %s steps instead of the gated %s / %s: these images were "
                            "not judged by any gate", opts["guidance_scale"], opts["num_inference_steps"],
                            self.defaults["guidance_scale"], self.defaults["num_inference_steps"])
            prompt = str(rec["prompt"])
            n = int(opts["num_images"])
            seeds = [int(opts["seed"]) + i for i in range(n)]
            for start in range(0, n, self.batch_size):
                chunk = seeds[start:start + self.batch_size]
                # One CPU generator per image: the image depends on its seed only (as in medisyn.generate).
                gens = [torch.Generator("cpu").manual_seed(s) for s in chunk]
                with torch.inference_mode():
                    images = self.pipe(
                        prompt=[prompt] * len(chunk), generator=gens,
                        guidance_scale=float(opts["guidance_scale"]), guidance_rescale=self.guidance_rescale,
                        num_inference_steps=int(opts["num_inference_steps"]),
                        height=self.resolution, width=self.resolution,
                    ).images
                for s, img in zip(chunk, images, strict=True):  # one image per prompt
                    buf = io.BytesIO()
                    img.convert("RGB").save(buf, format="PNG")
                    rows.append({"prompt": prompt, "seed": s, "image": base64.b64encode(buf.getvalue()).decode(),
                                 "guidance_scale": float(opts["guidance_scale"]),
                                 "num_inference_steps": int(opts["num_inference_steps"]), "gated": gated})
        return pd.DataFrame(rows, columns=["prompt", "seed", "image", "guidance_scale", "num_inference_steps", "gated"])


mlflow.models.set_model(MediSynSDXLModel())
