"""A ring of shared-memory slots that DataLoader workers decode into, reused from batch to batch.

A tensor returned by a DataLoader worker is copied into a new shared-memory segment, which the training
process then maps: at 112x112 a 256-image uint8 chunk is 9.6 MB, ~2,350 freshly faulted pages and a
copy on the worker (6-7 ms per chunk on this project's 2-core VM, where PIL decoded one in ~60 ms and
simplejpeg in ~25 ms),
then a map, an unmap and more faults where the step reads it. Here the training process allocates the
slots once, before the workers start (they inherit them): a worker decodes chunk ``c`` straight into
slot ``c mod S`` and sends only the slot's index; the training process hands out a view of that slot
whose storage owns a guard, and the slot becomes free again when the last view of it is gone.

Safety: a worker writes a slot only after it finds it FREE, so a batch that is still referenced
anywhere (a view, a slice, a list the caller keeps) is never overwritten; if its slot is still in use,
the worker fills a new array and sends that (the plain DataLoader path) instead of waiting. ``S`` is a
multiple of the worker count and worker ``w`` decodes chunks ``w, w + W, ...``, so each slot has one
writer. A worker stopped while it held a slot (a loader closed mid-epoch) leaves it CLAIMED;
:meth:`SlotRing.reclaim`, called once no worker of the ring runs any more, frees every slot no view holds.
"""
from __future__ import annotations

import os
import threading
import weakref

import numpy as np
import torch

FREE, CLAIMED = 0, 1
SHARED_MEMORY_DIR = "/dev/shm"  # where torch's CPU shared memory lives on Linux


def shared_memory_free_bytes() -> int | None:
    """Free bytes of the shared-memory file system, or None where it cannot be told (not Linux)."""
    try:
        stat = os.statvfs(SHARED_MEMORY_DIR)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


class _SlotArray(np.ndarray):
    """A numpy view of one slot; torch.from_numpy keeps it alive as long as any tensor view of the slot."""


class SlotRing:
    """``slots`` uint8 arrays of ``shape`` in shared memory, and a shared FREE / CLAIMED flag per slot."""

    def __init__(self, slots: int, shape: tuple[int, ...], workers: int) -> None:
        if workers < 1 or slots < workers or slots % workers:
            raise ValueError(f"slots={slots} must be a positive multiple of workers={workers} (one writer per slot)")
        self.images = torch.empty((slots, *shape), dtype=torch.uint8).share_memory_()
        self.flags = torch.zeros(slots, dtype=torch.int32).share_memory_()
        self._held: set[int] = set()  # slots with live views (training process only)
        self._lock = threading.Lock()

    @property
    def num_slots(self) -> int:
        return self.images.shape[0]

    def claim(self, chunk: int) -> tuple[int, np.ndarray] | None:
        """Worker side: (slot, writable array) for chunk number ``chunk``, or None while its slot is in use."""
        slot = chunk % self.num_slots
        flags = self.flags.numpy()
        if flags[slot] != FREE:
            return None
        flags[slot] = CLAIMED
        return slot, self.images[slot].numpy()

    def view(self, slot: int, count: int) -> torch.Tensor:
        """Training-process side: the first ``count`` images of ``slot``, freed for reuse with their last view."""
        if not 0 <= slot < self.num_slots or not 0 <= count <= self.images.shape[1]:
            raise ValueError(f"slot {slot} / count {count} outside the ring's {tuple(self.images.shape[:2])}")
        array = self.images[slot, :count].numpy().view(_SlotArray)
        with self._lock:
            self._held.add(slot)
        weakref.finalize(array, self._release, slot)
        return torch.from_numpy(array)

    def reclaim(self) -> None:
        """Free every slot no view holds (call when no worker is running: claims of stopped workers)."""
        flags = self.flags.numpy()
        with self._lock:
            for slot in range(self.num_slots):
                if slot not in self._held:
                    flags[slot] = FREE

    def __getstate__(self) -> dict[str, object]:
        """What a worker started by spawn needs: the shared tensors (sent as handles), not the views' bookkeeping."""
        return {"images": self.images, "flags": self.flags}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state, _held=set(), _lock=threading.Lock())

    def _release(self, slot: int) -> None:
        with self._lock:
            self._held.discard(slot)
            self.flags.numpy()[slot] = FREE
