"""Reusable step buffers for the head's large temporaries.

On CPU every fresh [rows x D] allocation of ~100 MB is paid in page faults (measured here: a new
50K x 512 fp32 buffer costs ~60 ms to fill, an existing one ~10 ms), which would cost more than the
elementwise work itself. The head therefore takes its big temporaries from named, grow-only slots.
A slot is lent together with a :class:`Lease`; while anyone holds the lease (an autograd context, a
pending gradient record), the slot is busy and a second request gets a fresh tensor instead, so
overlapping uses (two forwards before a backward, gradient accumulation) stay correct.
"""
from __future__ import annotations

import math
import weakref

import torch


class Lease:
    """Token whose lifetime marks a borrowed slot as busy."""

    __slots__ = ("__weakref__",)


class Workspace:
    def __init__(self) -> None:
        self._slots: dict[str, tuple[torch.Tensor, "weakref.ref[Lease]"]] = {}

    def take(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, Lease]:
        """A tensor of ``shape`` (uninitialised) and the lease that keeps it reserved."""
        numel = math.prod(shape)
        lease = Lease()
        slot = self._slots.get(name)
        busy = slot is not None and slot[1]() is not None
        if slot is not None and not busy:
            storage = slot[0]
            if storage.numel() >= numel and storage.dtype == dtype and storage.device == device:
                self._slots[name] = (storage, weakref.ref(lease))
                return storage[:numel].view(shape), lease
        tensor = torch.empty(numel, dtype=dtype, device=device)
        if not busy:
            self._slots[name] = (tensor, weakref.ref(lease))
        return tensor.view(shape), lease

    def nbytes(self) -> int:
        return sum(self.slot_bytes().values())

    def slot_bytes(self) -> dict[str, int]:
        """Bytes held by each named slot."""
        return {name: t.numel() * t.element_size() for name, (t, _) in self._slots.items()}
