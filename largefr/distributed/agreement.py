"""Small host-side agreements between ranks: one decision taken by every rank alike.

- :func:`any_rank`: True on every rank when ``flag`` is True on at least one (all-reduce MAX of one int).
- :func:`rank0_decides`: run a function on rank 0 only; every rank receives its result or raises its error.
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup, ReduceOp

from largefr.distributed.collectives import broadcast_object

T = TypeVar("T")


def any_rank(flag: bool, group: ProcessGroup, device: torch.device) -> bool:
    """forward: all-reduce MAX of a 0/1 int over ``group`` (one host read); not differentiable."""
    value = torch.tensor(int(bool(flag)), dtype=torch.int32, device=device)
    dist.all_reduce(value, op=ReduceOp.MAX, group=group)
    return bool(value.item())


class RemoteError(RuntimeError):
    """An error raised on rank 0, re-raised on another rank with rank 0's message."""


def rank0_decides(fn: Callable[[], T], group: ProcessGroup) -> T:
    """``fn()`` run on rank 0 only; its result on every rank. If it raises, rank 0 re-raises the error
    and every other rank raises :class:`RemoteError` with its message (nobody is left waiting)."""
    result: Any = None
    error: BaseException | None = None
    if dist.get_rank(group) == 0:
        try:
            result = fn()
        except Exception as exc:  # re-raised below, after the other ranks heard of it
            error = exc
    payload = broadcast_object(
        (None, f"{type(error).__name__}: {error}") if error is not None else (result, None), group, src=0)
    if error is not None:
        raise error
    if payload[1] is not None:
        raise RemoteError(f"on rank 0: {payload[1]}")
    return payload[0]
