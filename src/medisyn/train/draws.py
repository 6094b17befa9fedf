"""The data order and every sample's random draws, by construction (section 4.2; see medisyn.train.trainer).

* the data order of epoch ``e`` is ``randperm(N)`` seeded by ``(seed, e)``;
* every sample's noise, timestep, offset noise and prompt-dropout draw come from a generator seeded
  by ``(seed, epoch, position in the epoch order)``;
* global batch ``s`` is positions ``[s*E, (s+1)*E)`` of the epoch order, split into micro-batches
  and ranks without changing which numbers a sample sees.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from medisyn.train.encode import LatentCache


def _mix(*parts: int | str) -> int:
    """A 63-bit seed from a tuple: independent streams per (seed, epoch, position)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a permutation that depends only on (seed, epoch)."""
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(_mix(seed, "order", epoch)))


def sample_draws(seed: int, epoch: int, position: int, latent_shape, num_timesteps: int, noise_offset: float):
    """(dropout uniform, timestep, noise, offset noise) of one sample at one step, from its own
    generator: the same numbers whichever rank, micro-batch or resume processes it."""
    g = torch.Generator().manual_seed(_mix(seed, "sample", epoch, position))
    u = float(torch.rand((), generator=g))
    t = int(torch.randint(0, num_timesteps, (), generator=g))
    noise = torch.randn(tuple(latent_shape), generator=g)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((latent_shape[0], 1, 1), generator=g)
    return u, t, noise


def dropout_mask(seed: int, epoch: int, positions, prob: float) -> np.ndarray:
    """Which samples get the empty prompt at (epoch, positions): the same draws the trainer makes."""
    out = []
    for p in positions:
        g = torch.Generator().manual_seed(_mix(seed, "sample", epoch, int(p)))
        out.append(float(torch.rand((), generator=g)) < prob)
    return np.array(out, dtype=bool)


class _EpochBatches(torch.utils.data.Dataset):
    """One epoch of the latent cache with every sample's random draws, ready for the step.

    Items are (position in the epoch order, sample index): the position keys the draws. The
    per-sample generators, prompt dropout and text-table lookup run here, in the data path
    (DataLoader workers when ``train.dataloader_num_workers`` > 0), not in the training step, so
    the step itself only moves finished tensors to the device: no Python per-sample loop and no
    host sync on the hot path (#14).
    """

    def __init__(self, cache: LatentCache, seed: int, epoch: int, num_timesteps: int, noise_offset: float,
                 empty_prompt_prob: float):
        self.cache, self.seed, self.epoch = cache, seed, epoch
        self.num_timesteps, self.noise_offset, self.empty_prompt_prob = num_timesteps, noise_offset, empty_prompt_prob

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, item):
        position, index = item
        latents, caption_row, time_ids = self.cache.sample(int(index))
        u, t, noise = sample_draws(self.seed, self.epoch, position, self.cache.latent_shape, self.num_timesteps,
                                   self.noise_offset)
        # Prompt dropout for CFG, re-drawn per sample per step (section 4.2): row 0 of the text
        # table is the empty prompt, encoded once by the encode stage.
        row = 0 if u < self.empty_prompt_prob else int(caption_row)
        return torch.from_numpy(latents), row, torch.from_numpy(time_ids), t, noise

    def collate(self, items) -> dict[str, torch.Tensor]:
        latents, rows, time_ids, timesteps, noise = zip(*items, strict=True)
        prompt, pooled = self.cache.text(np.array(rows, dtype=np.int64))
        return {
            "latents": torch.stack(latents), "noise": torch.stack(noise),
            "timesteps": torch.tensor(timesteps, dtype=torch.long), "time_ids": torch.stack(time_ids),
            "prompt_embeds": torch.from_numpy(np.ascontiguousarray(prompt)),
            "text_embeds": torch.from_numpy(np.ascontiguousarray(pooled)),
        }


def micro_batches(order: torch.Tensor, start_step: int, steps: int, rank: int, world: int, per_device: int,
                  accumulation: int):
    """This rank's micro-batches from optimizer step ``start_step`` on, as lists of (position, index).

    Global batch ``s`` is positions ``[s*E, (s+1)*E)`` of the epoch order; its micro-batch ``m`` is
    the next ``world*per_device`` positions, of which rank ``r`` takes slice ``r``.
    """
    eff = per_device * accumulation * world
    for s in range(start_step, steps):
        for m in range(accumulation):
            lo = s * eff + m * world * per_device + rank * per_device
            yield [(p, int(order[p])) for p in range(lo, lo + per_device)]
