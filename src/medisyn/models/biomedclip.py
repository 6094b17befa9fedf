"""BiomedCLIP image encoder: load from an open_clip local directory, or build a tiny stand-in.

The privacy gate (paper section 4.3.4) embeds synthetic and real training images with the vision
encoder of BiomedCLIP (``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``) and
finds nearest neighbours by cosine similarity (eq. 2). Nothing downloads at run time, so the model
is loaded with ``open_clip.create_model_from_pretrained("local-dir:<dir>")`` from a directory holding
``open_clip_config.json`` and ``open_clip_model.safetensors``.

The text tower of BiomedCLIP is a Hugging Face BERT (``hf_model_name``). open_clip builds it with
``AutoConfig.from_pretrained(hf_model_name)``, which would reach for the hub. To stay offline the
directory may carry the BERT ``config.json`` in a subdirectory and name it *relatively* in
``text_cfg.hf_model_name`` (``"text"``); :func:`load_biomedclip` resolves such a relative name
against the model directory (through a temporary directory of symlinks with a rewritten config, so
the model directory itself stays read-only and relocatable, e.g. after an s3:// download). For the
real BiomedCLIP, copy BiomedBERT's ``config.json`` to ``<dir>/text/`` and set
``"hf_model_name": "text", "hf_model_pretrained": false``; the text weights come from the open_clip
checkpoint either way. Only the image tower is used by the gates.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medisyn.config import TinyModelsConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
TEXT_SUBDIR = "text"
# The tiny vision trunk: timm's registered ``test_vit`` (a real ViT, patch 16, width 64, dynamic
# image size), the smallest ViT timm ships; BiomedCLIP uses ``vit_base_patch16_224``.
TINY_TIMM_MODEL = "test_vit"
TINY_IMAGE_SIZE = 64
# BiomedCLIP's preprocess_cfg (OpenAI CLIP normalisation).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _tiny_bert_vocab() -> dict[str, int]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789-'(),.")
    return {t: i for i, t in enumerate(specials + chars + ["##" + c for c in chars])}


def build_tiny_biomedclip(tiny: TinyModelsConfig, out_dir: str | os.PathLike) -> Path:
    """Save a tiny random-init BiomedCLIP-style open_clip model in ``out_dir``; returns the directory.

    Same structure as BiomedCLIP's ``open_clip_config.json`` (timm ViT vision tower with a linear
    projection and no pooling, HF BERT text tower with an MLP projection and CLS pooling), scaled
    down: ``test_vit`` at 64 px and a 2-layer BERT of width ``tiny.text_hidden_size``, embedding size
    ``tiny.clip_embed_dim``. The BERT config and a small character-level WordPiece tokenizer are saved
    locally so nothing is fetched from the hub.
    """
    import open_clip
    from safetensors.torch import save_file
    from transformers import BertConfig, BertTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = _tiny_bert_vocab()
    h = tiny.text_hidden_size
    bert = BertConfig(
        vocab_size=len(vocab), hidden_size=h, num_hidden_layers=2, num_attention_heads=max(1, h // 16),
        intermediate_size=2 * h, max_position_embeddings=64, pad_token_id=0,
    )
    bert.save_pretrained(out / TEXT_SUBDIR)
    BertTokenizer(vocab=vocab).save_pretrained(out)
    model_cfg = {
        "embed_dim": tiny.clip_embed_dim,
        "vision_cfg": {
            "timm_model_name": TINY_TIMM_MODEL,
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": TINY_IMAGE_SIZE,
        },
        "text_cfg": {
            "hf_model_name": TEXT_SUBDIR,  # relative: resolved against the model directory on load
            "hf_tokenizer_name": TEXT_SUBDIR,
            "hf_model_pretrained": False,
            "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": 64,
        },
    }
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}}
    with _resolved_dir(out, config) as resolved:
        torch.manual_seed(tiny.seed)
        # open_clip warns that no weights were found: expected here, we are creating them
        logging.disable(logging.WARNING)
        try:
            model = open_clip.create_model(f"local-dir:{resolved}", pretrained_text=False, pretrained_image=False)
        finally:
            logging.disable(logging.NOTSET)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


class _resolved_dir:
    """A local-dir open_clip can read: ``model_dir`` itself, or a temp dir of symlinks whose config
    names the text tower by absolute path (when the config names it relative to ``model_dir``)."""

    def __init__(self, model_dir: Path, config: dict | None = None):
        self.model_dir = Path(model_dir)
        self.config = config
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        config = self.config
        if config is None:
            config = json.loads((self.model_dir / CONFIG_FILE).read_text())
        text_cfg = config.get("model_cfg", {}).get("text_cfg", {})
        name = text_cfg.get("hf_model_name")
        if not name or Path(name).is_absolute() or not (self.model_dir / name).is_dir():
            if self.config is None:
                return self.model_dir
        config = json.loads(json.dumps(config))
        tc = config["model_cfg"].get("text_cfg", {})
        for key in ("hf_model_name", "hf_tokenizer_name"):
            if tc.get(key) and (self.model_dir / tc[key]).is_dir():
                tc[key] = str((self.model_dir / tc[key]).resolve())
        self.tmp = Path(tempfile.mkdtemp(prefix="medisyn-clip-"))
        for entry in self.model_dir.iterdir():
            if entry.name != CONFIG_FILE:
                (self.tmp / entry.name).symlink_to(entry.resolve())
        (self.tmp / CONFIG_FILE).write_text(json.dumps(config))
        return self.tmp

    def __exit__(self, *exc) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def load_biomedclip(path_or_uri: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model, preprocess) from an open_clip local directory (or an s3:// prefix, cached locally).

    The model is in eval mode (dropout off) with gradients disabled: embeddings must be deterministic.
    """
    import open_clip

    from medisyn.models.sdxl import local_model_dir

    model_dir = local_model_dir(str(path_or_uri))
    if not (model_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{model_dir} has no {CONFIG_FILE}: not an open_clip local-dir model")
    with _resolved_dir(model_dir) as resolved:
        model, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{resolved}", device=str(device))
    model.eval().requires_grad_(False)
    return model, preprocess


@torch.no_grad()
def image_embeddings(model, preprocess, images: Sequence, batch_size: int = 64) -> np.ndarray:
    """L2-normalised image embeddings, float32 array of shape (len(images), embed_dim).

    Rows are unit vectors, so the cosine similarity of eq. (2) is a plain dot product.
    """
    device = next(model.parameters()).device
    chunks: list[np.ndarray] = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([preprocess(im.convert("RGB")) for im in images[start:start + batch_size]]).to(device)
        feats = model.encode_image(batch).float()
        feats = torch.nn.functional.normalize(feats, dim=-1)
        chunks.append(feats.cpu().numpy())
    if not chunks:  # keep the (0, embed_dim) shape so callers can concatenate
        from PIL import Image

        probe = torch.stack([preprocess(Image.new("RGB", (8, 8)))]).to(device)
        return np.zeros((0, model.encode_image(probe).shape[-1]), dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32)
