"""``build_loader``: the loader of a dataset for one rank, by kind ("auto", "dali", "torch").

The loader classes register themselves (:func:`largefr.data.loader.register_loader`) when their
modules are imported here; the interface they share is :class:`largefr.data.loader.FaceLoader`.
"""
from __future__ import annotations

import os

import torch

from largefr.data import dali_loader, torch_loader  # noqa: F401  (import registers the loader kinds)
from largefr.data.loader import LOADER_CLASSES, FaceLoader, LoaderConfig
from largefr.data.manifest import Manifest, read_manifest

LOADER_KINDS = ("auto", *sorted(LOADER_CLASSES))


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def build_loader(
    source: str | os.PathLike[str] | Manifest,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
    kind: str = "auto",
    num_threads: int = 2,
    prefetch: int = 2,
    shuffle_buffer: int = 0,
    flip: bool = True,
    sampler: str = "uniform",
    images_per_identity: int = 1,
) -> FaceLoader:
    """A loader over the dataset directory ``source`` (or its manifest) for this rank.

    kind: "dali" (``fn.readers.webdataset``; CPU decoding when ``device.type == "cpu"``, nvJPEG "mixed"
    decoding on ``device`` otherwise), "torch" (PIL in ``num_threads`` DataLoader worker processes) or
    "auto" (dali when ``nvidia.dali`` imports, else torch). num_threads: DALI threads / torch workers
    (0: decode in this process). prefetch: batches prepared ahead. shuffle_buffer: DALI only, extra
    in-pipeline shuffle of that many samples (0: the exact planned order; see docs/data_format.md).
    flip: random horizontal flip. sampler: "uniform" (the default) or "pk" (P = batch_size // K identities x
    K = images_per_identity images per rank batch; see largefr.data.identity_balanced: small identities
    are drawn with replacement). Raises if a shard is missing or truncated, naming it.
    """
    if kind not in LOADER_KINDS:
        raise ValueError(f"loader kind {kind!r} is not one of {LOADER_KINDS}")
    manifest = source if isinstance(source, Manifest) else read_manifest(source)
    config = LoaderConfig(batch_size, rank, world_size, seed, device, num_threads, prefetch, shuffle_buffer, flip,
                          sampler, images_per_identity)
    if kind == "auto":
        kind = "dali" if dali_available() else "torch"
    if shuffle_buffer and kind == "torch":
        raise ValueError(f"shuffle_buffer={shuffle_buffer} applies to the DALI loader only; use 0 with kind='torch'")
    return LOADER_CLASSES[kind](manifest, config)

