"""Softmax cross-entropy over classes sharded across ranks, without ever gathering logits.

Each rank holds the logits of the whole (gathered) batch against its own class rows K:

    l_ij = x_i . W_j * (1 / ||W_j|| if weights are normalised)        non-target entries
    l_iy = target_fn(x_raw_i, W_y)                                      owned target entries

Per rank the logits buffer is turned in place into the LOCAL softmax p_ij = exp(l_ij - m_i) / s_i
(torch's fused softmax kernel; m_i, s_i the local row max and sum). With the global max
M_i = all-reduce MAX of m_i and the rescaled local sums r_i = s_i exp(m_i - M_i):

    S_i, T_i = all-reduce SUM of (r_i, owned target logit)      (one collective)
    loss = mean_i (log S_i + M_i - T_i)

Backward is local: dL/dl_ij = (softmax_ij - [j = y_i]) / N = c_i p_ij - [j = y_i] / N with
c_i = r_i / (N S_i). The row factor c_i is applied to the small [N, D] GEMM operands, not to the
buffer. Target entries are zeroed in the buffer and their gradient c_i p_iy - 1/N goes through the
target function. Through the row normalisation the gradient is analytic: with u_j = sum_i G_ij x_i / ||W_j||
(what GEMM3 gives once the buffer's columns are scaled), dL/dW_j = u_j - W_j (u_j . W_j) / ||W_j||^2.

The target logit is a function of (||x_i||, ||W_y||, x_i . W_y) only, so its gradient with respect to W_y
is a_i x_i + b_i W_y: a_i is folded into the buffer's (zeroed) target entry, b_i into a per-row vector.

The W-rows gradient does not enter autograd: it is handed to ``spec.grad_sink`` in factored form
(largefr.heads.factored_grad.FactoredWeightGrad), so no dense slice-sized gradient is ever accumulated by
autograd and the optimizer can form it block by block while the rows are in cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.distributed import ProcessGroup, ReduceOp

from largefr.distributed.collectives import all_reduce_
from largefr.heads.factored_grad import FactoredWeightGrad

# target logit from (||x||, ||W_y||, x . W_y), each [n]
TargetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ShardedSoftmaxSpec:
    group: ProcessGroup | None
    num_rows: int  # global batch size N; the loss is the mean over it
    normalize_weight: bool
    target_fn: TargetFn
    chunk_rows: int | None  # bound on logits rows held at once (recomputed in backward when set)
    workspace: Any  # largefr.heads.workspace.Workspace (buffers with leases)
    # receives the W-rows gradient and the workspace leases its tensors live in
    grad_sink: Callable[[FactoredWeightGrad, tuple[Any, ...]], None]
    w_inv_norm: torch.Tensor | None = None  # 1/||W_j|| of w_rows when the caller already has it


def _gemm_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the logits GEMMs, or None when autocast is off."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> None:
    """out (fp32) = a @ b, or += when accumulate; a and b may be low precision."""
    if a.dtype == out.dtype and b.dtype == out.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif accumulate:
        out.add_(torch.mm(a, b))
    else:
        out.copy_(torch.mm(a, b))


class _Chunks:
    """Row ranges [a, b) of the gathered batch processed one at a time."""

    def __init__(self, num_rows: int, chunk_rows: int | None) -> None:
        size = num_rows if not chunk_rows or chunk_rows >= num_rows else chunk_rows
        self.size = max(size, 1)
        self.ranges = [(a, min(a + self.size, num_rows)) for a in range(0, num_rows, self.size)]
        self.single = len(self.ranges) == 1


def _target_column(target_col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    owned = target_col >= 0
    return owned, target_col.clamp_min(0).unsqueeze(1)


def _target_stats(x_raw: torch.Tensor, w_rows: torch.Tensor, target_col: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each row's target class row W_y [N, D] and the target function's inputs ||x||, ||W_y||, x . W_y."""
    if w_rows.shape[0] > 0:
        w_target = w_rows.index_select(0, target_col.clamp_min(0))
    else:
        w_target = torch.zeros_like(x_raw)
    return {
        "w_target": w_target,
        "x_norm": torch.linalg.vector_norm(x_raw, dim=1).clamp_min_(1e-12),
        "w_norm": torch.linalg.vector_norm(w_target, dim=1).clamp_min_(1e-12),
        "dot": (x_raw * w_target).sum(dim=1),
    }


def _target_input_grads(
    ctx: Any, a: int, b: int, grad_target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """d(target logit)/d(||x||, ||W_y||, x . W_y) for rows [a, b), times grad_target."""
    with torch.enable_grad():
        inputs = [ctx.stats[k][a:b].detach().requires_grad_(True) for k in ("x_norm", "w_norm", "dot")]
        target = ctx.spec.target_fn(*inputs).float()
        grads = torch.autograd.grad(target, inputs, grad_target, allow_unused=True)
    return tuple(torch.zeros_like(grad_target) if g is None else g for g in grads)  # type: ignore[return-value]


def _local_softmax_(ctx: Any, a: int, b: int, out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` [b-a, K] with the local softmax of rows [a, b); returns their local max m_i."""
    _mm_into(ctx.x_gemm[a:b], ctx.w_gemm.t(), out)
    if ctx.inv_norm is not None:
        out.mul_(ctx.inv_norm)
    if out.shape[1] == 0:
        return torch.full((b - a,), float("-inf"), device=out.device)
    owned, col = _target_column(ctx.target_col[a:b])
    current = out.gather(1, col).squeeze(1)
    out.scatter_(1, col, torch.where(owned, ctx.target_value[a:b], current).unsqueeze(1))
    local_max = out.amax(dim=1)
    # in place is safe: the kernel reads each row for its max and sum before writing it
    torch.ops.aten._softmax.out(out, 1, False, out=out)
    return local_max


class ShardedMarginSoftmaxCE(torch.autograd.Function):
    """forward: local softmax, all-reduce MAX of row maxima, one all-reduce SUM of (rescaled sum, target logit);
    backward: local, no collective (softmax - onehot from the saved/recomputed buffer).

    Inputs: x_op [N, D] (GEMM operand rows), x_raw [N, D] (raw rows for the target function),
    w_rows [K, D] (this rank's sampled class rows), target_col [N] (column of each row's class among
    w_rows, -1 where another rank owns it), anchor (a 0-size tensor that requires grad so the backward
    runs even when the embeddings need no gradient), spec. Output: the global mean loss (same on all ranks).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x_op: torch.Tensor,
        x_raw: torch.Tensor,
        w_rows: torch.Tensor,
        target_col: torch.Tensor,
        anchor: torch.Tensor,
        spec: ShardedSoftmaxSpec,
    ) -> torch.Tensor:
        gemm_dtype = _gemm_dtype(x_op.device)
        with torch.autocast(x_op.device.type, enabled=False):
            return _forward(ctx, x_op, x_raw, w_rows, target_col, spec, gemm_dtype)

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
        with torch.autocast(grad_loss.device.type, enabled=False):
            grad_x_op, grad_x_raw = _backward(ctx, grad_loss)
        return grad_x_op, grad_x_raw, None, None, torch.zeros_like(ctx.anchor_like), None


def _forward(
    ctx: Any,
    x_op: torch.Tensor,
    x_raw: torch.Tensor,
    w_rows: torch.Tensor,
    target_col: torch.Tensor,
    spec: ShardedSoftmaxSpec,
    gemm_dtype: torch.dtype | None,
) -> torch.Tensor:
    num_rows, num_cols = x_op.shape[0], w_rows.shape[0]
    device, ws = x_op.device, spec.workspace
    ctx.spec, ctx.target_col, ctx.x_raw, ctx.w_rows = spec, target_col, x_raw, w_rows
    ctx.anchor_like = torch.empty(0, device=device)
    ctx.inv_norm = None
    if spec.normalize_weight:
        ctx.inv_norm = spec.w_inv_norm
        if ctx.inv_norm is None:
            ctx.inv_norm = torch.linalg.vector_norm(w_rows, dim=1).clamp_min_(1e-12).reciprocal_()
    ctx.x_gemm = x_op if gemm_dtype is None else x_op.to(gemm_dtype)
    ctx.leases = []
    if gemm_dtype is None:
        ctx.w_gemm = w_rows
    else:
        ctx.w_gemm, lease = ws.take("w_gemm", tuple(w_rows.shape), gemm_dtype, device)
        ctx.w_gemm.copy_(w_rows)
        ctx.leases.append(lease)
    ctx.stats = _target_stats(x_raw, w_rows, target_col)
    ctx.target_value = spec.target_fn(ctx.stats["x_norm"], ctx.stats["w_norm"], ctx.stats["dot"]).float()
    # x_raw_i = kappa_i x_op_i: converts the target's "a x_raw" weight gradient to the GEMM operand
    ctx.kappa = ctx.stats["x_norm"] / torch.linalg.vector_norm(x_op, dim=1).clamp_min(1e-12)

    chunks = _Chunks(num_rows, spec.chunk_rows)
    buffer, lease = ws.take("logits", (chunks.size, num_cols), torch.float32, device)
    ctx.leases.append(lease)
    ctx.row_factor = torch.empty(num_rows, device=device)  # r_i / S_i
    loss_sum = torch.zeros((), device=device)
    for a, b in chunks.ranges:
        probs = buffer[: b - a]
        local_max = _local_softmax_(ctx, a, b, probs)
        owned = target_col[a:b] >= 0
        loss_sum += _global_stats(probs, local_max, owned, ctx.target_value[a:b], spec.group, ctx.row_factor[a:b])
    ctx.chunks = chunks
    ctx.probs = buffer if chunks.single else None
    if not chunks.single:
        ctx.leases = ctx.leases[:-1]  # the chunk buffer is reused only inside this call
    return loss_sum / num_rows


def _global_stats(
    probs: torch.Tensor,
    local_max: torch.Tensor,
    owned: torch.Tensor,
    target: torch.Tensor,
    group: ProcessGroup | None,
    row_factor: torch.Tensor,
) -> torch.Tensor:
    """Combine the ranks' local softmax statistics; fills r_i / S_i; returns the chunk's summed loss."""
    global_max = all_reduce_(local_max.clone(), ReduceOp.MAX, group)
    # the local softmax at its own max is exp(0) / s_i, so s_i = 1 / max_j p_ij
    local_sum = probs.amax(dim=1).reciprocal_() if probs.shape[1] else torch.zeros_like(local_max)
    rescaled = torch.where(local_sum > 0, local_sum * torch.exp(local_max - global_max), torch.zeros_like(local_sum))
    stats = torch.stack([rescaled, torch.where(owned, target, torch.zeros_like(target))])
    all_reduce_(stats, ReduceOp.SUM, group)
    row_factor.copy_(rescaled / stats[0])
    return (stats[0].log() + global_max - stats[1]).sum()


def _backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    spec: ShardedSoftmaxSpec = ctx.spec
    num_rows, num_cols = ctx.x_gemm.shape[0], ctx.w_rows.shape[0]
    device, ws = grad_loss.device, spec.workspace
    coef = grad_loss.float() / num_rows
    grad_x_op = torch.empty(ctx.x_gemm.shape, dtype=torch.float32, device=device)
    grad_x_raw = torch.zeros_like(ctx.x_raw)
    beta = torch.zeros(num_cols, device=device)
    leases: tuple[Any, ...] = tuple(ctx.leases)
    dense = None
    if ctx.chunks.single:
        buffer = ctx.probs
    else:  # the buffer is reused per chunk, so the x-side sum must be formed here
        buffer, chunk_lease = ws.take("logits", (ctx.chunks.size, num_cols), torch.float32, device)
        dense, dense_lease = ws.take("grad_w", (num_cols, ctx.x_gemm.shape[1]), torch.float32, device)
        dense.zero_()
        leases = (dense_lease,)
    for a, b in ctx.chunks.ranges:
        probs = buffer[: b - a]
        if not ctx.chunks.single:
            _local_softmax_(ctx, a, b, probs)
        _chunk_backward(ctx, a, b, probs, coef, grad_x_op, grad_x_raw, beta)
        if dense is not None:
            _mm_into(probs.t() if ctx.x_gemm.dtype == torch.float32 else probs.t().to(ctx.x_gemm.dtype),
                     ctx.x_gemm[a:b], dense, accumulate=True)
    factor = buffer if dense is None else None
    weight_grad = FactoredWeightGrad(beta, ctx.inv_norm, factor=factor, x=ctx.x_gemm.detach(), dense=dense)
    _release(ctx)
    spec.grad_sink(weight_grad, leases)
    return grad_x_op, grad_x_raw


def _chunk_backward(
    ctx: Any, a: int, b: int, probs: torch.Tensor, coef: torch.Tensor,
    grad_x_op: torch.Tensor, grad_x_raw: torch.Tensor, beta: torch.Tensor,
) -> None:
    """Rows [a, b): x gradients, and the buffer turned into this chunk's factor G of the W gradient."""
    row_scale = coef * ctx.row_factor[a:b]  # dL/dl_ij = row_scale_i p_ij - coef [j = y_i]
    if probs.shape[1]:
        owned, col = _target_column(ctx.target_col[a:b])
        grad_target = _take_target_entries(ctx, a, b, probs, row_scale, coef)
        d_xnorm, d_wnorm, d_dot = _target_input_grads(ctx, a, b, grad_target)
        stats = ctx.stats
        grad_x_raw[a:b] = d_dot.unsqueeze(1) * stats["w_target"][a:b] + (d_xnorm / stats["x_norm"][a:b]).unsqueeze(
            1
        ) * ctx.x_raw[a:b]
    probs.mul_(row_scale.unsqueeze(1))
    if ctx.inv_norm is not None:
        probs.mul_(ctx.inv_norm)
    grad_logits = probs if ctx.w_gemm.dtype == torch.float32 else probs.to(ctx.w_gemm.dtype)
    _mm_into(grad_logits, ctx.w_gemm, grad_x_op[a:b])
    if probs.shape[1]:
        # the target's W gradient d_dot x_raw + (d_wnorm / ||W_y||) W_y: x part into the zeroed entry
        # (rows owned elsewhere point at column 0 and must keep its value)
        current = probs.gather(1, col).squeeze(1)
        probs.scatter_(1, col, torch.where(owned, d_dot * ctx.kappa[a:b], current).unsqueeze(1))
        beta.index_add_(0, col.squeeze(1), torch.where(owned, d_wnorm / stats["w_norm"][a:b], torch.zeros_like(d_dot)))


def _release(ctx: Any) -> None:
    """Drop every buffer and the spec, so a graph kept alive by the caller pins no workspace slot."""
    ctx.probs = ctx.w_rows = ctx.w_gemm = ctx.x_gemm = ctx.x_raw = ctx.spec = ctx.stats = None
    ctx.leases = []


def _take_target_entries(
    ctx: Any, a: int, b: int, probs: torch.Tensor, row_scale: torch.Tensor, coef: torch.Tensor
) -> torch.Tensor:
    """Zero the owned target entries of the buffer; return their logits' gradient [b - a].

    The gradient row_scale * p - coef goes through the target function instead of the GEMMs
    (zero where another rank owns the target).
    """
    owned, col = _target_column(ctx.target_col[a:b])
    at_target = probs.gather(1, col).squeeze(1)
    zeros = torch.zeros_like(at_target)
    probs.scatter_(1, col, torch.where(owned, zeros, at_target).unsqueeze(1))
    return torch.where(owned, row_scale * at_target - coef, zeros)
