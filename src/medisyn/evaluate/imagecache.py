"""Decoded images held as tensors between epochs (the utility gate's classifiers, issue #14).

``train_classifier`` used to turn the uint8 image array into a normalised float tensor batch by batch
in every epoch (numpy gather, host-to-device copy, conversion), three times per epoch (training,
the BatchNorm pass, validation). :class:`ImageTensors` does the conversion once per classifier and
hands out batches:

* ``float``: the normalised float32 images on the device (4 bytes per value), when they fit the
  memory budget; a batch is a gather;
* ``uint8``: the raw images on the device (1 byte per value), converted per batch there;
* ``host``: neither fits: the uint8 array stays where it is, converted per batch as before.

Every mode gives a batch bit for bit equal to ``utility._to_tensor(x[idx], device)``: the same
elementwise operations ((x / 255 - mean) / std in float32, each correctly rounded, so batching does
not change a value) and the same memory layout (the channels-last strides of the NCHW view of an
NHWC array), so training is numerically identical (tests/test_privacy_embeddings.py checks it
against ``_to_tensor``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

log = logging.getLogger("medisyn.utility")

BUDGET_FRACTION = 0.25  # of the device's free memory (CPU: available RAM) one cache may take
_CONVERT_ROWS = 256  # images converted at a time while building the float cache (bounds temporaries)


def memory_budget(device: torch.device) -> int:
    """Bytes one cache may take: a quarter of the free device memory (CPU: of available RAM)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * BUDGET_FRACTION)
    try:
        import psutil

        return int(psutil.virtual_memory().available * BUDGET_FRACTION)
    except ImportError:  # pragma: no cover - psutil ships with the stack (ray)
        return 1 << 30


class ImageTensors:
    """uint8 (n, H, W, 3) images as normalised classifier input, converted once (see module doc)."""

    def __init__(self, x: np.ndarray, device, mean: Sequence[float], std: Sequence[float],
                 budget_bytes: int | None = None, mode: str | None = None):
        self.x = x
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        budget = memory_budget(self.device) if budget_bytes is None else budget_bytes
        if mode is None:
            mode = "float" if x.size * 4 <= budget else "uint8" if x.size <= budget else "host"
        self.mode = mode
        self._data: torch.Tensor | None = None
        if mode == "uint8":
            self._data = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        elif mode == "float":
            data = torch.empty(x.shape, dtype=torch.float32, device=self.device)  # NHWC
            for s in range(0, len(x), _CONVERT_ROWS):
                chunk = torch.from_numpy(np.ascontiguousarray(x[s:s + _CONVERT_ROWS])).to(self.device)
                data[s:s + _CONVERT_ROWS] = self._convert(chunk).permute(0, 2, 3, 1)
            self._data = data
        elif mode != "host":
            raise ValueError(f"unknown mode {mode!r}")
        log.debug("image tensors: %d images held as %s on %s", len(x), mode, self.device)

    def __len__(self) -> int:
        return len(self.x)

    def _convert(self, t: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> normalised float NCHW view: exactly utility._to_tensor's operations."""
        t = t.permute(0, 3, 1, 2).float().div_(255)
        return (t - self.mean) / self.std

    def batch(self, idx: np.ndarray | slice) -> torch.Tensor:
        """The classifier input of images ``idx`` (an index array or a slice)."""
        if self.mode == "host":
            return self._convert(torch.from_numpy(self.x[idx]).to(self.device))
        assert self._data is not None
        sel = idx if isinstance(idx, slice) else torch.as_tensor(np.asarray(idx), device=self.device)
        if self.mode == "uint8":
            return self._convert(self._data[sel])
        return self._data[sel].permute(0, 3, 1, 2)


def as_image_tensors(x, device, mean: Sequence[float], std: Sequence[float]) -> ImageTensors:
    """``x`` itself when already converted, else a new :class:`ImageTensors`."""
    return x if isinstance(x, ImageTensors) else ImageTensors(x, device, mean, std)
