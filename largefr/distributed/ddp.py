"""Data-parallel wrapping of a backbone trained under a loss that is already global.

The Partial FC head all-gathers the embeddings of every rank and returns the mean loss over the GLOBAL
batch, so the backbone gradient each rank computes is already a partial derivative of that one loss
(through its own embeddings). The full gradient is the SUM over ranks. DDP's default hook averages
(divides by the world size); :func:`allreduce_sum_hook` replaces it. Scaling the loss by the world size
instead would also scale the head's gradient, which the head computes exactly.
"""
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup, ReduceOp
from torch.nn.parallel import DistributedDataParallel

from largefr.distributed.env import DistContext


# No ``from __future__ import annotations`` here: DDP checks the hook's annotations as objects.
def allreduce_sum_hook(group: ProcessGroup, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: all-reduce SUM of the gradient bucket over ``group`` (no division by world size)."""
    work = dist.all_reduce(bucket.buffer(), op=ReduceOp.SUM, group=group, async_op=True)
    assert work is not None
    return work.get_future().then(lambda fut: fut.value()[0])


def wrap_ddp_sum(model: nn.Module, ctx: DistContext) -> DistributedDataParallel:
    """``model`` (already on ``ctx.device``) in DDP over ``ctx.group``, gradients summed over ranks.

    DDP's default buffer sync is kept: rank 0's buffers (BatchNorm running statistics) are copied to
    every rank at each forward, so all ranks hold the same network as a checkpoint of rank 0.
    """
    device_ids = None if ctx.device.type == "cpu" else [ctx.device]
    ddp = DistributedDataParallel(model, device_ids=device_ids, process_group=ctx.group)
    ddp.register_comm_hook(ctx.group, allreduce_sum_hook)
    return ddp


def broadcast_buffers(model: nn.Module, group: ProcessGroup) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank of ``group``.

    Each rank updates its own running statistics in its forward; DDP copies rank 0's over them at the
    next forward. Call this before anything that must see one network on all ranks (a checkpoint of
    replicated state, evaluation): it changes nothing DDP would not overwrite anyway.
    """
    if dist.get_world_size(group) > 1:
        for buf in model.buffers():
            dist.broadcast(buf, group=group, group_src=0)
