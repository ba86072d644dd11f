"""Flip-test embedding of encoded images, decoded in parallel threads while the model runs.

Preprocessing is the project convention: RGB, ``image_size`` x ``image_size``; the uint8 batch goes to
the device and is normalised there (:func:`largefr.models.input.normalize_images`, float32 [N, 3, H, W]
in [-1, 1]). The flip-test embedding is ``model(x) + model(mirror(x))``.
"""
from __future__ import annotations

import io
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from largefr.models.input import InputBuffer


def decode_image(data: bytes, image_size: int, index: int = -1) -> np.ndarray:
    """Encoded image bytes -> uint8 RGB [image_size, image_size, 3] (resized if the size differs)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"image {index}: cannot decode {len(data)} bytes as an image ({exc})") from None
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def encode_image(rgb: np.ndarray, fmt: str = "JPEG", quality: int = 95) -> bytes:
    """uint8 RGB [H, W, 3] -> encoded bytes (what a verification .bin stores)."""
    from PIL import Image

    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 RGB [H, W, 3], got {rgb.dtype} {rgb.shape}")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, quality=quality)
    return buf.getvalue()


def _decoded_batches(
    images: Sequence[bytes], image_size: int, batch_size: int, pool: ThreadPoolExecutor, prefetch: int = 2
) -> Iterator[np.ndarray]:
    """Yield uint8 batches in order while the next ``prefetch`` batches are being decoded."""
    starts = iter(range(0, len(images), batch_size))
    pending: deque[list[Future[np.ndarray]]] = deque()

    def submit(start: int) -> None:
        chunk = images[start : start + batch_size]
        pending.append([pool.submit(decode_image, b, image_size, start + i) for i, b in enumerate(chunk)])

    for _ in range(prefetch):
        start = next(starts, None)
        if start is not None:
            submit(start)
    while pending:
        futures = pending.popleft()
        start = next(starts, None)
        if start is not None:
            submit(start)
        yield np.stack([f.result() for f in futures])


@torch.inference_mode()
def embed_batch(model: nn.Module, batch: torch.Tensor, flip: bool = True) -> torch.Tensor:
    """Embeddings of a normalised batch [N, 3, H, W]; with ``flip``, emb(x) + emb(mirror(x)) in one forward."""
    n = batch.shape[0]
    inputs = torch.cat([batch, batch.flip(3)]) if flip else batch
    out = model(inputs)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != inputs.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"expected the backbone to return [N, D] embeddings for N={inputs.shape[0]}, got {shape}")
    return out[:n] + out[n:] if flip else out


def embed_images(
    model: nn.Module,
    images: Sequence[bytes],
    image_size: int = 112,
    batch_size: int = 128,
    workers: int = 4,
    device: torch.device | str = "cpu",
    flip: bool = True,
) -> np.ndarray:
    """float32 [len(images), D] embeddings (not normalised) of encoded images, in order."""
    if batch_size < 1 or workers < 1:
        raise ValueError(f"batch_size and workers must be >= 1, got {batch_size} and {workers}")
    if len(images) == 0:
        raise ValueError("no images to embed")
    model.eval()
    chunks: list[np.ndarray] = []
    inputs = InputBuffer(torch.device(device))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        for batch in _decoded_batches(images, image_size, batch_size, pool):
            # HWC uint8 to the device; the normalisation writes the contiguous NCHW float input there
            x = inputs(torch.from_numpy(batch).to(device, non_blocking=True).permute(0, 3, 1, 2))
            chunks.append(embed_batch(model, x, flip).float().cpu().numpy())
    return np.concatenate(chunks)
