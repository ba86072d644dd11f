"""The W-rows gradient of the sharded margin softmax, kept factored until it is consumed.

For this rank's K rows the gradient is

    g_j = P_j ( sum_i G_ij x_i  +  beta_j W_j )        P_j = I - W_j W_j^T / ||W_j||^2 when W is normalised

where G [N, K] is the backward's buffer (softmax - onehot, with the row factor, the column factor
1/||W_j|| and the target entries' "a x" part folded in), x [N, D] the GEMM operand rows, and beta [K] the
target entries' "b W" part. That part is radial (P_j W_j = 0), so it is only added when W is not
normalised. Keeping G and x (already in memory) instead of a [K, D] gradient lets the optimizer compute
g block by block, right before updating those rows, while they are in cache: no [K, D] gradient buffer
and no second pass over it. ``dense`` holds an already summed sum_i G_ij x_i when the logits were
processed in chunks in fp32, or ``factor`` holds G in the GEMMs' 16-bit dtype when that is smaller
(:func:`keeps_low_precision_factor`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def project_out_radial(
    grad_w: torch.Tensor, w_rows: torch.Tensor, inv_norm: torch.Tensor, scratch: torch.Tensor | None = None
) -> None:
    """grad_w_j -= w_j (grad_w_j . w_j) / ||w_j||^2 in place: the chain rule through w / ||w||.

    Given u_j = dL/d(w_j/||w_j||) / ||w_j||, this yields dL/dw_j = (I - w_j w_j^T / ||w_j||^2) u_j.
    Callers pass row blocks that fit in cache, and optionally a scratch tensor of grad_w's shape.
    """
    product = torch.mul(grad_w, w_rows, out=scratch) if scratch is not None else grad_w * w_rows
    dots = product.sum(dim=1)
    grad_w.addcmul_(w_rows, (dots * inv_norm.square()).unsqueeze(1), value=-1.0)


def keeps_low_precision_factor(num_rows: int, dim: int, gemm_dtype: torch.dtype | None) -> bool:
    """With the logits in chunks, keep the W gradient as G [N, R] in the GEMMs' 16-bit dtype rather than a
    summed [R, D] fp32 gradient when it is smaller (2N < 4D bytes per row). G is cast to that dtype for
    the GEMM G^T x in either case, so the gradient is the one the unchunked head forms."""
    return gemm_dtype in (torch.float16, torch.bfloat16) and 2 * num_rows < 4 * dim


@dataclass
class FactoredWeightGrad:
    """Factored dL/dW_rows (see the module docstring). Exactly one of ``factor`` or ``dense`` is set."""

    beta: torch.Tensor  # [K]
    inv_norm: torch.Tensor | None  # [K] 1/||W_j|| when W rows are normalised (projection needed)
    factor: torch.Tensor | None = None  # G [N, K] fp32, or in x's 16-bit dtype
    x: torch.Tensor | None = None  # [N, D], fp32 or the autocast dtype
    dense: torch.Tensor | None = None  # [K, D] fp32

    @property
    def num_rows(self) -> int:
        return self.beta.shape[0]

    def block(
        self, a: int, b: int, w_rows: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Gradient rows [a, b) into ``out`` [b - a, D] (fp32); ``w_rows`` are the W rows [a, b) (any float dtype)."""
        if w_rows.dtype != out.dtype:
            w_rows = w_rows.to(out.dtype)
        if self.dense is not None:
            out.copy_(self.dense[a:b])
        else:
            assert self.factor is not None and self.x is not None
            g = self.factor[:, a:b].t()
            if self.x.dtype == out.dtype:
                torch.mm(g, self.x, out=out)
            else:
                out.copy_(torch.mm(g.to(self.x.dtype), self.x))
        if self.inv_norm is None:
            out.addcmul_(w_rows, self.beta[a:b].unsqueeze(1))
        else:
            # beta_j W_j is radial and P_j W_j = 0: the projection would remove it exactly, so it is skipped
            project_out_radial(out, w_rows, self.inv_norm[a:b], scratch)
        return out
