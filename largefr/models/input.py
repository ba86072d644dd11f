"""The backbones' input convention: RGB images as float32 in [-1, 1], (v - 127.5) / 127.5 of uint8 v.

Loaders hand uint8 [N, 3, H, W] batches (a quarter of the bytes of float32 over PCIe and between
processes); the conversion runs on the compute device at the start of the training step and in
``largefr eval``, through :func:`normalize_images` only.
"""
from __future__ import annotations

import torch

_SCALE = 1.0 / 127.5
_SHIFT = torch.tensor(-1.0)  # a 0-dim CPU tensor: CUDA kernels take it as a scalar argument (no copy, no sync)


def normalize_images(images: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [N, 3, H, W] (any strides) -> float32 [N, 3, H, W], ``-1 + v / 127.5`` (in [-1, 1] to one ulp).

    Written into ``out`` when given (its own memory format is kept); ``out`` may live on another device
    than ``images``: the uint8 batch is then copied there first (non-blocking), never the float one.
    On a GPU this is one elementwise kernel reading uint8 and writing float32. On the CPU it is two
    passes, a uint8 -> float32 copy and one in-place affine pass, because torch's CPU kernels for mixed
    dtypes are not vectorised (measured: 17 ms for one mixed-dtype pass over a 256 x 3 x 112 x 112
    batch against 2.7 ms for the two passes).
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 [N, 3, H, W] (the loaders' output), got {images.dtype}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {list(images.shape)}")
    if out is None:
        out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
    elif out.dtype != torch.float32 or out.shape != images.shape:
        raise ValueError(f"out must be float32 {list(images.shape)}, got {out.dtype} {list(out.shape)}")
    if images.device != out.device:
        images = images.to(out.device, non_blocking=True)
    if out.device.type == "cpu":
        out.copy_(images)
        return torch.add(_SHIFT, out, alpha=_SCALE, out=out)
    return torch.add(_SHIFT, images, alpha=_SCALE, out=out)


class InputBuffer:
    """:func:`normalize_images` into one float32 buffer reused while the batch shape stays the same.

    A fresh CPU buffer per batch costs more than filling it (a new 38 MB tensor is page-faulted in
    every time). The caller must be done with the previous result (in training: its backward has run)
    before calling again.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._out: torch.Tensor | None = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self._out is None or self._out.shape != images.shape:
            self._out = torch.empty(images.shape, dtype=torch.float32, device=self.device)
        return normalize_images(images, out=self._out)
