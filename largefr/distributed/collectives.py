"""Collectives used by largefr, each with an explicit process group.

Autograd Functions document their forward and backward in the first docstring line, e.g.
"forward: all-gather rows; backward: reduce-scatter (sum) of row gradients".
Plain helpers (no autograd) are for tensors that carry no gradient (labels, statistics) or are used
inside Functions that write their own backward.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup, ReduceOp


def group_size(group: ProcessGroup | None) -> int:
    """Ranks in ``group``; ``None`` means a job that is not distributed (never the implicit WORLD)."""
    if group is None:
        if dist.is_initialized():
            raise ValueError("torch.distributed is initialised: pass the process group explicitly, not None")
        return 1
    return dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    """This process's rank in ``group`` (0 when ``group`` is None, see :func:`group_size`)."""
    return 0 if group_size(group) == 1 and group is None else dist.get_rank(group)


def all_gather_rows(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Concatenate equally sized tensors of every rank along dim 0 (no autograd)."""
    world = group_size(group)
    if world == 1:
        return tensor
    out = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))
    dist.all_gather_single(out, tensor.contiguous(), group=group)
    return out


def reduce_scatter_rows(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Sum ``tensor`` over ranks and return this rank's 1/world block of rows (no autograd)."""
    world = group_size(group)
    if world == 1:
        return tensor
    if tensor.shape[0] % world:
        raise ValueError(f"reduce_scatter_rows needs rows divisible by world={world}, got {tensor.shape[0]}")
    out = tensor.new_empty((tensor.shape[0] // world, *tensor.shape[1:]))
    dist.reduce_scatter_single(out, tensor.contiguous(), op=ReduceOp.SUM, group=group)
    return out


def all_reduce_max_(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """In-place element-wise maximum over the ranks of ``group`` (e.g. a "found inf" flag)."""
    return all_reduce_(tensor, ReduceOp.MAX, group)


def barrier(group: ProcessGroup | None) -> None:
    """Wait until every rank of ``group`` is here; a no-op on a group of one."""
    if group_size(group) > 1:
        dist.barrier(group=group)


def global_rank(group: ProcessGroup | None) -> int:
    """This process's rank in the default (world) group, found through ``group``."""
    if group_size(group) == 1 and group is None:
        return 0
    return dist.get_global_rank(group, dist.get_rank(group))


def broadcast_object(obj: Any, group: ProcessGroup | None, src: int = 0) -> Any:
    """The picklable ``obj`` of rank ``src`` of ``group``, returned on every rank (other ranks' ``obj`` unused)."""
    if group_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, group=group, group_src=src)
    return box[0]


def all_gather_objects(obj: Any, group: ProcessGroup | None) -> list[Any]:
    """The picklable ``obj`` of every rank of ``group``, in rank order, on every rank."""
    world = group_size(group)
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def all_reduce_(tensor: torch.Tensor, op: ReduceOp.RedOpType, group: ProcessGroup | None) -> torch.Tensor:
    """In-place all-reduce of a tensor this code owns; a no-op on a group of one."""
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class _AllGatherRows(torch.autograd.Function):
    """forward: all-gather rows of every rank; backward: reduce-scatter (sum) of the gathered rows' grads.

    The backward sums because every rank uses the whole gathered batch in its own part of the loss:
    d(total)/d(local rows) = sum over ranks of that rank's grad block for these rows.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return all_gather_rows(tensor, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return reduce_scatter_rows(grad, ctx.group), None


def gather_rows_with_grad(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """All-gather rows along dim 0 with a reduce-scatter backward (see :class:`_AllGatherRows`)."""
    if group_size(group) == 1:
        return tensor
    return _AllGatherRows.apply(tensor, group)


class _AllReduceSum(torch.autograd.Function):
    """forward: all-reduce (sum) of per-rank partial losses; backward: identity.

    Every rank holds the same total L = sum_r l_r and calls L.backward(): the identity hands each rank
    dL/dl_r = 1 for its own part, and the reduce-scatter of :class:`_AllGatherRows` then sums the parts'
    gradients for each row, so every rank ends with d(L)/d(its local rows).
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def sum_partials_with_grad(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Sum per-rank partial terms of one global loss (see :class:`_AllReduceSum`); identity on one rank."""
    if group_size(group) == 1:
        return tensor
    return _AllReduceSum.apply(tensor, group)
