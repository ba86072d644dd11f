"""What the benchmarks time a step against: its three GEMMs (the floor), the row traffic it cannot avoid,
and a timer that starts all ranks together."""
from __future__ import annotations

import time
from typing import Any

import torch

from largefr.distributed import barrier
from largefr.heads.host_kernel import host_kernels, sgd_rows_
from largefr.heads.row_grad import block_rows
from largefr.heads.weight_store import gather_rows, scatter_rows


class GemmFloor:
    """The step's three GEMMs for the same shapes and dtype, with preallocated outputs."""

    def __init__(self, rows: int, cols: int, dim: int, dtype: torch.dtype | None,
                 device: torch.device = torch.device("cpu")) -> None:
        kw = {"dtype": dtype or torch.float32, "device": device}
        self.x, self.w = torch.randn(rows, dim, **kw), torch.randn(cols, dim, **kw)
        self.g = torch.randn(rows, cols, **kw)
        self.logits = torch.empty(rows, cols, **kw)
        self.grad_x, self.grad_w = torch.empty(rows, dim, **kw), torch.empty(cols, dim, **kw)

    def __call__(self) -> None:
        torch.mm(self.x, self.w.t(), out=self.logits)
        torch.mm(self.g, self.w, out=self.grad_x)
        torch.mm(self.g.t(), self.x, out=self.grad_w)


class RowTraffic:
    """Reads and writes back, unchanged, the sampled rows of W and of each optimizer state, as the head moves them:
    gathered, then scattered (the primitives of largefr.heads.weight_store), or, where the head's SGD runs the
    compiled host kernel, W gathered into fp32 rows as the forward does and written back by that kernel
    with a zero step (lr 0, momentum 1: m = 0 + m * 1 and w + 0 * -m, the same values for finite W and
    momentum; a zero's sign may flip)."""

    def __init__(self, tensors: list[torch.Tensor], ids: torch.Tensor | None, host_kernel: bool = False) -> None:
        self.tensors, self.ids = tensors, ids
        self.library = host_kernels() if host_kernel and ids is not None else None
        if self.library is not None and ids is not None:
            weight = tensors[0]
            block = block_rows(weight.device)
            self.rows = [torch.empty(ids.numel(), weight.shape[1], dtype=weight.dtype), torch.empty(ids.numel(), weight.shape[1])]
            self.zeros = torch.zeros(block, weight.shape[1])
            self.noise = torch.zeros(block * weight.shape[1], dtype=torch.uint16)
        else:
            self.rows = [] if ids is None else [torch.empty(ids.numel(), t.shape[1], dtype=t.dtype, device=t.device) for t in tensors]

    @torch.no_grad()
    def __call__(self) -> None:
        if self.ids is None:
            for t in self.tensors:
                t.mul_(1.0)
            return
        if self.library is not None:
            self._host_kernel_pass(self.ids)
            return
        for t, rows in zip(self.tensors, self.rows):  # the primitives the head's gathers and optimizers use
            gather_rows(t, self.ids, rows)
        for t, rows in zip(self.tensors, self.rows):
            scatter_rows(t, self.ids, rows)

    def _host_kernel_pass(self, ids: torch.Tensor) -> None:
        weight, momentum = self.tensors[0], (self.tensors[1] if len(self.tensors) > 1 else None)
        gathered, rows = self.rows
        gather_rows(weight, ids, gathered)
        step = self.zeros.shape[0]
        for a in range(0, ids.numel(), step):
            b = min(a + step, ids.numel())
            block = rows[a:b].copy_(gathered[a:b])
            sgd_rows_(self.library, ids[a:b], block, self.zeros[: b - a], weight, momentum,
                      self.noise[: block.numel()], lr=0.0, mu=1.0, wd=0.0, nesterov=False)


def sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def timed(fn: Any, group: Any, device: torch.device) -> float:
    """Wall time of ``fn()`` with all ranks starting together and the device idle at both ends."""
    sync(device)
    barrier(group)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start
