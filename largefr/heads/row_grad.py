"""The head's row-sparse W gradient: which rows, their values (factored or materialised), and merging."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from largefr.heads.factored_grad import FactoredWeightGrad
from largefr.heads.weight_store import gather_rows
from largefr.heads.workspace import Lease

BLOCK_ROWS = 2048  # CPU: rows per cache-sized block (4 MiB of fp32 at D = 512)
ACCELERATOR_BLOCK_ROWS = 32768  # GPU (and the meta device of dry runs, which model one)


def block_rows(device: torch.device) -> int:
    """Rows per block when gathering W rows and forming or applying their gradient on ``device``.

    Each block costs ~0.5-0.8 ms of host time (Python, dispatch, ~30 small ops: measured on this CPU with
    D = 4). On the CPU a block is sized for the cache; on an accelerator its kernels take microseconds, so
    blocks must be large for that host cost to stay small: 1.25M sampled rows per rank (100M classes, 8
    ranks, r 0.1) are 610 blocks of 2048 (~0.4 s of host time per step) but 39 of 32768 (~25 ms), with
    block buffers of 64 MiB each at D = 512."""
    return BLOCK_ROWS if device.type == "cpu" else ACCELERATOR_BLOCK_ROWS


@dataclass
class SparseRowGrad:
    """Gradient of the loss for some rows of this rank's W slice.

    ids: local row indices (sorted), or None for every row of the slice.
    rows: the W rows at ``ids`` gathered in the forward (still equal to W's rows until an optimizer
        updates them), or None (every row, or gathered again when needed).
    factored / grad: the gradient, either factored (largefr.heads.factored_grad.FactoredWeightGrad, formed block by block
        by the optimizer) or materialised [len(ids), D] fp32. Exactly one is set.
    """

    ids: torch.Tensor | None
    rows: torch.Tensor | None
    factored: FactoredWeightGrad | None = None
    grad: torch.Tensor | None = None
    leases: tuple[Lease, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if (self.factored is None) == (self.grad is None):
            raise ValueError("a SparseRowGrad holds exactly one of a factored or a materialised gradient")

    @property
    def num_rows(self) -> int:
        return self.grad.shape[0] if self.grad is not None else self.factored.num_rows  # type: ignore[union-attr]

    def weight_rows(self, weight: torch.Tensor, a: int, b: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """W rows [a, b) of this gradient: a view when possible, else gathered into ``out``."""
        if self.rows is not None:
            return self.rows[a:b]
        if self.ids is None:
            return weight[a:b]
        return gather_rows(weight, self.ids[a:b], out)

    def grad_block(
        self, a: int, b: int, rows: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Gradient rows [a, b) (``rows`` are the matching W rows); ``out`` is used when it must be formed."""
        if self.grad is not None:
            return self.grad[a:b]
        assert self.factored is not None
        return self.factored.block(a, b, rows, out, scratch)

    def materialize(self, weight: torch.Tensor) -> None:
        """Form the whole gradient (for inspection, loss scaling or merging)."""
        if self.grad is not None:
            return
        device = self.rows.device if self.rows is not None else weight.device  # the compute device
        grad = torch.empty(self.num_rows, weight.shape[1], dtype=torch.float32, device=device)
        step = block_rows(device)
        for a in range(0, self.num_rows, step):
            b = min(a + step, self.num_rows)
            self.grad_block(a, b, self.weight_rows(weight, a, b), grad[a:b])
        self.grad, self.factored = grad, None


def merge_row_grads(grads: list[SparseRowGrad], weight: torch.Tensor) -> SparseRowGrad:
    """Sum several backward passes' row gradients (gradient accumulation) into one record."""
    for g in grads:
        g.materialize(weight)
    if all(g.ids is None for g in grads):
        total = grads[0].grad.clone()  # type: ignore[union-attr]
        for g in grads[1:]:
            total.add_(g.grad)  # type: ignore[arg-type]
        return SparseRowGrad(None, None, grad=total)
    device = grads[0].grad.device  # type: ignore[union-attr]
    ids = torch.cat([g.ids if g.ids is not None else torch.arange(weight.shape[0], device=device) for g in grads])
    unique_ids, inverse = torch.unique(ids, return_inverse=True)
    total = torch.zeros(unique_ids.numel(), weight.shape[1], device=device)
    total.index_add_(0, inverse, torch.cat([g.grad for g in grads]))  # type: ignore[misc]
    return SparseRowGrad(unique_ids, None, grad=total)
