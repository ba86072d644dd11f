"""The torch loader: index-addressed reads from the tar shards, PIL decoding in DataLoader workers.

Workers decode *chunks* of consecutive rank positions (chunk c goes to worker c mod num_workers, and the
DataLoader returns them in order); this process drops corrupt samples, cuts the valid ones into full
batches and moves them to the target device as they were decoded: uint8 HWC memory, handed as a
[B, 3, H, W] view, with the plan's mirror flags (a quarter of the bytes of float32 between processes and
over PCIe; the training step mirrors and normalises).
"""
from __future__ import annotations

import logging
import signal
from collections import deque
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from largefr.data.labels import LabelOutOfRange, parse_label
from largefr.data.loader import Batch, FaceLoader, LoaderConfig, out_of_samples_error, register_loader
from largefr.data.manifest import Manifest
from largefr.data.epoch_order import EpochPlan
from largefr.data.samples import ShardReader, decode_image

log = logging.getLogger("largefr.data")


class Chunk(NamedTuple):
    images: torch.Tensor  # uint8 [n, H, W, 3] (empty in decode-only mode)
    labels: torch.Tensor  # int64 [n]
    mirror: torch.Tensor  # bool [n]: the plan's flip of each valid sample
    positions: torch.Tensor  # int64 [n], rank positions of the valid samples
    bad: list[tuple[int, str, str]]  # (position, sample, reason) of skipped samples
    decoded: int


class ChunkStream(IterableDataset):
    """Rank positions [start, limit) in chunks of ``chunk`` samples, split over DataLoader workers."""

    def __init__(self, manifest: Manifest, plan: EpochPlan, start: int, limit: int, chunk: int,
                 flip: bool, decode_only: bool = False) -> None:
        super().__init__()
        self.manifest, self.plan = manifest, plan
        self.start, self.limit, self.chunk = start, limit, chunk
        self.flip, self.decode_only = flip, decode_only

    def __iter__(self) -> Iterator[Chunk]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = ShardReader(self.manifest)
        try:
            c = worker
            while self.start + c * self.chunk < self.limit:
                q0 = self.start + c * self.chunk
                yield self._chunk(reader, q0, min(q0 + self.chunk, self.limit))
                c += workers
        finally:
            reader.close()

    def _chunk(self, reader: ShardReader, q0: int, q1: int) -> Chunk:
        h, w = self.manifest.image_size
        keep = 0 if self.decode_only else q1 - q0
        images = np.empty((keep, h, w, 3), dtype=np.uint8)
        flips = self.plan.flips(np.arange(q0, q1)) if self.flip else np.zeros(q1 - q0, dtype=bool)
        labels = np.empty(q1 - q0, dtype=np.int64)
        mirror = np.empty(q1 - q0, dtype=bool)
        positions = np.empty(q1 - q0, dtype=np.int64)
        bad: list[tuple[int, str, str]] = []
        n = 0
        for seg in self.plan.segments(q0, q1):
            for i, row in enumerate(seg.rows.tolist()):
                raw = reader.read(seg.shard, row)
                try:
                    label = parse_label(raw.label, self.manifest.num_classes)
                except LabelOutOfRange as exc:
                    raise exc.at(reader.describe(seg.shard, row)) from None
                array, reason = decode_image(raw.image, (h, w))
                if label is None and array is not None:
                    reason = f"label {raw.label[:24]!r} is not a class id in [0, {self.manifest.num_classes})"
                if label is None or array is None:
                    bad.append((seg.start + i, reader.describe(seg.shard, row), reason))
                    continue
                if keep:
                    images[n] = array
                labels[n], positions[n], mirror[n] = label, seg.start + i, flips[seg.start + i - q0]
                n += 1
        return Chunk(torch.from_numpy(images[: min(n, keep)]), torch.from_numpy(labels[:n]),
                     torch.from_numpy(mirror[:n]), torch.from_numpy(positions[:n]), bad, n)


def ignore_stop_signals(worker_id: int) -> None:
    """Worker init: SIGTERM/SIGINT sent to the whole process group (torchrun, SLURM, Ctrl-C) must reach
    the training process, which stops at a step boundary with a checkpoint; a worker killed by it would
    fail the next batch not yet prefetched. Workers still end with the loader, or when the training
    process dies."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_dataloader(stream: ChunkStream, num_workers: int, prefetch: int, pin: bool) -> DataLoader:
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        prefetch_factor=prefetch if num_workers else None,
        pin_memory=pin,
        persistent_workers=False,
        worker_init_fn=ignore_stop_signals if num_workers else None,
    )


@register_loader
class TorchLoader(FaceLoader):
    """See :class:`largefr.data.loader.FaceLoader`; ``config.num_threads`` DataLoader workers."""

    kind = "torch"

    def _batches(self, plan: EpochPlan, position: int, step: int) -> Iterator[Batch]:
        c = self.config
        limit = position + (plan.steps - step) * c.batch_size + plan.block_size
        stream = ChunkStream(self.manifest, plan, position, limit, c.batch_size, c.flip)
        loader = make_dataloader(stream, c.num_threads, c.prefetch, pin=c.device.type != "cpu")
        images: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        mirror: list[torch.Tensor] = []
        ends: list[torch.Tensor] = []
        bad_positions: deque[int] = deque()
        have, corrupt = 0, 0
        for chunk in loader:
            for q, where, reason in chunk.bad:
                log.warning("rank %d: skipping corrupt sample %s: %s", c.rank, where, reason)
                bad_positions.append(q)
            corrupt += len(chunk.bad)
            images.append(chunk.images)
            labels.append(chunk.labels)
            mirror.append(chunk.mirror)
            ends.append(chunk.positions)
            have += chunk.decoded
            while have >= c.batch_size:
                batch_images, images = _take(images, c.batch_size)
                batch_labels, labels = _take(labels, c.batch_size)
                batch_mirror, mirror = _take(mirror, c.batch_size)
                batch_pos, ends = _take(ends, c.batch_size)
                end = int(batch_pos[-1]) + 1
                skipped = 0
                while bad_positions and bad_positions[0] < end:
                    bad_positions.popleft()
                    skipped += 1
                have -= c.batch_size
                yield Batch(batch_images.to(c.device, non_blocking=True).permute(0, 3, 1, 2),
                            batch_labels.to(c.device, non_blocking=True),
                            batch_mirror.to(c.device, non_blocking=True), end, skipped)
        raise out_of_samples_error(c.rank, plan, corrupt, self.manifest.root)


def _take(parts: list[torch.Tensor], n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The first ``n`` rows of the concatenation of ``parts``, and the remaining parts."""
    if parts[0].shape[0] == n:
        return parts[0], parts[1:]
    whole = torch.cat(parts) if len(parts) > 1 else parts[0]
    return whole[:n], ([whole[n:]] if whole.shape[0] > n else [])
