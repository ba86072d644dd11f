"""The backbones' input convention: RGB images as float32 in [-1, 1], (v - 127.5) / 127.5 of uint8 v.

Loaders hand uint8 [N, 3, H, W] batches as the decoders left them (HWC memory, i.e. channels-last
strides) with one mirror flag per image; the mirror, the transpose to contiguous NCHW and the conversion
run on the compute device at the start of the training step and in ``largefr eval``, through
:func:`normalize_images` only -- as a GPU pipeline does it (DALI's ``crop_mirror_normalize`` fuses the
same three). A quarter of the bytes of float32 cross PCIe and process boundaries, and the loader does no
per-image work after decoding.
"""
from __future__ import annotations

import numpy as np
import torch

_SCALE = 1.0 / 127.5
_SHIFT = torch.tensor(-1.0)  # a 0-dim CPU tensor: CUDA kernels take it as a scalar argument (no copy, no sync)


def _check(images: torch.Tensor, mirror: torch.Tensor | None) -> None:
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 [N, 3, H, W] (the loaders' output), got {images.dtype}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {list(images.shape)}")
    if mirror is not None and (mirror.dtype != torch.bool or mirror.shape != images.shape[:1]):
        raise ValueError(f"mirror must be bool [{images.shape[0]}] (one flag per image), "
                         f"got {mirror.dtype} {list(mirror.shape)}")


def mirrored_chw_on_host(images: torch.Tensor, mirror: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """CPU uint8 [N, 3, H, W] (any strides) -> ``out`` (contiguous uint8), image i mirrored left-right where
    ``mirror[i]``. One numpy strided copy per image: for HWC memory, mirror and transpose in a single pass
    (measured here ~17 us per 112 x 112 image plain, ~29 us mirrored; a torch flip + where over the batch
    is ~4x that)."""
    source, target, flags = images.numpy(), out.numpy(), mirror.numpy()
    for i in range(source.shape[0]):
        np.copyto(target[i], source[i, :, :, ::-1] if flags[i] else source[i])
    return out


def mirrored_on_device(images: torch.Tensor, mirror: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] with image i mirrored left-right where ``mirror[i]``: one ``where`` kernel on the
    images' device, no host sync (the flags stay there)."""
    return torch.where(mirror.view(-1, 1, 1, 1), images.flip(3), images)


def normalize_images(images: torch.Tensor, mirror: torch.Tensor | None = None, out: torch.Tensor | None = None,
                     staging: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [N, 3, H, W] (any strides) -> float32 [N, 3, H, W], ``-1 + v / 127.5`` (in [-1, 1] to one ulp),
    image i mirrored left-right (width reversed) where ``mirror[i]`` (bool [N]; None: no mirror).

    Written into ``out`` when given (its own memory format is kept); ``out`` may live on another device
    than ``images``: the uint8 batch is then copied there first (non-blocking), never the float one.
    On a GPU: one ``where`` over uint8 for the mirror, then one elementwise kernel reading the (transposed)
    uint8 and writing float32. On the CPU: the mirror and transpose as one numpy copy per image into
    ``staging`` (uint8, contiguous; allocated if not given), then a uint8 -> float32 copy and one in-place
    affine pass, because torch's CPU kernels for mixed dtypes are not vectorised (measured: 17 ms for one
    mixed-dtype pass over a 256 x 3 x 112 x 112 batch against 2.7 ms for the two passes).
    """
    _check(images, mirror)
    if out is None:
        out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
    elif out.dtype != torch.float32 or out.shape != images.shape:
        raise ValueError(f"out must be float32 {list(images.shape)}, got {out.dtype} {list(out.shape)}")
    if images.device != out.device:
        images = images.to(out.device, non_blocking=True)
    if mirror is not None and mirror.device != out.device:
        mirror = mirror.to(out.device, non_blocking=True)
    if out.device.type == "cpu":
        if mirror is not None:
            if staging is None or staging.shape != images.shape or staging.dtype != torch.uint8:
                staging = torch.empty(images.shape, dtype=torch.uint8)
            images = mirrored_chw_on_host(images, mirror, staging)
        out.copy_(images)
        return torch.add(_SHIFT, out, alpha=_SCALE, out=out)
    if mirror is not None:
        images = mirrored_on_device(images, mirror)
    return torch.add(_SHIFT, images, alpha=_SCALE, out=out)


class InputBuffer:
    """:func:`normalize_images` into one float32 buffer (and, on the CPU, one uint8 staging buffer) reused
    while the batch shape stays the same.

    A fresh CPU buffer per batch costs more than filling it (a new 38 MB tensor is page-faulted in
    every time). The caller must be done with the previous result (in training: its backward has run)
    before calling again.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._out: torch.Tensor | None = None
        self._staging: torch.Tensor | None = None

    def __call__(self, images: torch.Tensor, mirror: torch.Tensor | None = None) -> torch.Tensor:
        if self._out is None or self._out.shape != images.shape:
            self._out = torch.empty(images.shape, dtype=torch.float32, device=self.device)
            self._staging = torch.empty(images.shape, dtype=torch.uint8) if self.device.type == "cpu" else None
        return normalize_images(images, mirror, out=self._out, staging=self._staging)
