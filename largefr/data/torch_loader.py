"""The torch loader: index-addressed reads from the tar shards, PIL decoding in DataLoader workers.

Workers decode *chunks* of consecutive rank positions (chunk c goes to worker c mod num_workers, and the
DataLoader returns them in order); this process drops corrupt samples, cuts the valid ones into full
batches and moves them to the target device as they were decoded: uint8 HWC memory, handed as a
[B, 3, H, W] view, with the plan's mirror flags (a quarter of the bytes of float32 between processes and
over PCIe; the training step mirrors and normalises). Workers decode into a ring of shared-memory slots
that this process reuses once a batch's last view is gone (largefr.data.shm_ring), so a chunk crosses
processes as a slot index, not as a copy in a new shared-memory segment.
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
from largefr.data.shm_ring import SlotRing, shared_memory_free_bytes

log = logging.getLogger("largefr.data")


class Chunk(NamedTuple):
    images: torch.Tensor  # uint8 [n, H, W, 3] (empty in decode-only mode, or when decoded into a ring slot)
    # numpy, not torch: a small tensor would cross processes in a shared-memory segment of its own (a file
    # descriptor sent, mapped and unmapped: ~1 ms each on both sides), an array is pickled inline
    labels: np.ndarray  # int64 [n]
    mirror: np.ndarray  # bool [n]: the plan's flip of each valid sample
    positions: np.ndarray  # int64 [n], rank positions of the valid samples
    bad: list[tuple[int, str, str]]  # (position, sample, reason) of skipped samples
    decoded: int
    slot: int = -1  # the ring slot holding the images, or -1 (they are in ``images``)


class ChunkStream(IterableDataset):
    """Rank positions [start, limit) in chunks of ``chunk`` samples, split over DataLoader workers."""

    def __init__(self, manifest: Manifest, plan: EpochPlan, start: int, limit: int, chunk: int,
                 flip: bool, decode_only: bool = False, ring: SlotRing | None = None) -> None:
        super().__init__()
        self.manifest, self.plan = manifest, plan
        self.start, self.limit, self.chunk = start, limit, chunk
        self.flip, self.decode_only, self.ring = flip, decode_only, ring

    def __iter__(self) -> Iterator[Chunk]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = ShardReader(self.manifest)
        try:
            c = worker
            while self.start + c * self.chunk < self.limit:
                q0 = self.start + c * self.chunk
                yield self._chunk(reader, q0, min(q0 + self.chunk, self.limit), c)
                c += workers
        finally:
            reader.close()

    def _chunk(self, reader: ShardReader, q0: int, q1: int, number: int) -> Chunk:
        h, w = self.manifest.image_size
        keep = 0 if self.decode_only else q1 - q0
        claimed = self.ring.claim(number) if keep and self.ring is not None else None
        slot, images = claimed if claimed is not None else (-1, np.empty((keep, h, w, 3), dtype=np.uint8))
        flips = self.plan.flips(np.arange(q0, q1)) if self.flip else np.zeros(q1 - q0, dtype=bool)
        labels = np.empty(q1 - q0, dtype=np.int64)
        mirror = np.empty(q1 - q0, dtype=bool)
        positions = np.empty(q1 - q0, dtype=np.int64)
        bad: list[tuple[int, str, str]] = []
        scratch = np.empty((h, w, 3), dtype=np.uint8)  # decode-only: decoded, then dropped
        n = 0
        for seg in self.plan.segments(q0, q1):
            for i, row in enumerate(seg.rows.tolist()):
                raw = reader.read(seg.shard, row)
                try:
                    label = parse_label(raw.label, self.manifest.num_classes)
                except LabelOutOfRange as exc:
                    raise exc.at(reader.describe(seg.shard, row)) from None
                target = images[n] if keep else scratch  # JPEGs decode straight into it (largefr.data.samples)
                array, reason = decode_image(raw.image, (h, w), out=target)
                if label is None and array is not None:
                    reason = f"label {raw.label[:24]!r} is not a class id in [0, {self.manifest.num_classes})"
                if label is None or array is None:
                    bad.append((seg.start + i, reader.describe(seg.shard, row), reason))
                    continue
                if keep and array is not target:
                    images[n] = array
                labels[n], positions[n], mirror[n] = label, seg.start + i, flips[seg.start + i - q0]
                n += 1
        kept = torch.from_numpy(images[: min(n, keep) if slot < 0 else 0])
        return Chunk(kept, labels[:n], mirror[:n], positions[:n], bad, n, slot)


def ignore_stop_signals(worker_id: int) -> None:
    """Worker init: SIGTERM/SIGINT sent to the whole process group (torchrun, SLURM, Ctrl-C) must reach
    the training process, which stops at a step boundary with a checkpoint; a worker killed by it would
    fail the next batch not yet prefetched. Workers still end with the loader, or when the training
    process dies."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _as_is(chunk: Chunk) -> Chunk:
    return chunk


def make_dataloader(stream: ChunkStream, num_workers: int, prefetch: int, pin: bool) -> DataLoader:
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        prefetch_factor=prefetch if num_workers else None,
        pin_memory=pin,
        collate_fn=_as_is,  # the default converts numpy arrays to tensors in the worker (see Chunk)
        persistent_workers=False,
        worker_init_fn=ignore_stop_signals if num_workers else None,
    )


@register_loader
class TorchLoader(FaceLoader):
    """See :class:`largefr.data.loader.FaceLoader`; ``config.num_threads`` DataLoader workers."""

    kind = "torch"
    _idle_ring: SlotRing | None = None  # the ring of the last iteration, once its workers have stopped

    def _ring(self) -> SlotRing | None:
        """A slot ring no running worker writes to: the idle one (its stopped workers' claims freed), a new one,
        or None where shared memory is too small for one (chunks then travel as copies, as in torch's own path)."""
        c, (h, w) = self.config, self.manifest.image_size
        ring, self._idle_ring = self._idle_ring, None
        if ring is not None:
            ring.reclaim()
            return ring
        workers = max(1, c.num_threads)
        # every chunk in flight (prefetch per worker), the batch the step holds and the one being cut
        slots, shape = workers * (c.prefetch + 2), (c.batch_size, h, w, 3)
        free = shared_memory_free_bytes()
        need = slots * int(np.prod(shape))
        if free is not None and 2 * need > free:  # e.g. a container's 64 MiB /dev/shm: keep room for the rest
            log.info("rank %d: no shared-memory ring (%d MiB of %d MiB free); chunks are copied", c.rank,
                     need >> 20, free >> 20)
            return None
        return SlotRing(slots, shape, workers)

    def _batches(self, plan: EpochPlan, position: int, step: int) -> Iterator[Batch]:
        c = self.config
        limit = position + (plan.steps - step) * c.batch_size + plan.block_size
        ring = self._ring()
        stream = ChunkStream(self.manifest, plan, position, limit, c.batch_size, c.flip, ring=ring)
        chunks = iter(make_dataloader(stream, c.num_threads, c.prefetch, pin=c.device.type != "cpu"))
        try:
            yield from self._cut(chunks, ring, plan)
        except GeneratorExit:  # closed by the consumer: stop the workers, then the ring may serve the next epoch
            # what the DataLoader iterator does when collected (join, else terminate), done now
            getattr(chunks, "_shutdown_workers", lambda: None)()
            self._idle_ring = ring
            raise

    def _cut(self, chunks: Iterator[Chunk], ring: SlotRing | None, plan: EpochPlan) -> Iterator[Batch]:
        """Full batches cut from the decoded chunks (corrupt samples dropped), moved to the device."""
        c = self.config
        images: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        mirror: list[torch.Tensor] = []
        ends: list[torch.Tensor] = []
        bad_positions: deque[int] = deque()
        have, corrupt = 0, 0
        for chunk in chunks:
            for q, where, reason in chunk.bad:
                log.warning("rank %d: skipping corrupt sample %s: %s", c.rank, where, reason)
                bad_positions.append(q)
            corrupt += len(chunk.bad)
            images.append(chunk.images if ring is None or chunk.slot < 0 else ring.view(chunk.slot, chunk.decoded))
            labels.append(torch.from_numpy(chunk.labels))
            mirror.append(torch.from_numpy(chunk.mirror))
            ends.append(torch.from_numpy(chunk.positions))
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
