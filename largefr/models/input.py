"""The backbones' input convention: RGB images as float32 in [-1, 1], (v - 127.5) / 127.5 of uint8 v."""
from __future__ import annotations

import torch


def normalize_images(images: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float32 [N, 3, H, W] in [-1, 1], written into ``out`` when given.

    ``out`` may live on another device (the copy is non-blocking) and keeps its own memory format.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {list(images.shape)}")
    if out is None:
        out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
    out.copy_(images, non_blocking=True)
    return out.mul_(1.0 / 127.5).sub_(1.0)
