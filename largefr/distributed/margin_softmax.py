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

The W-rows gradient does not enter autograd: it is handed to ``spec.grad_sink`` (the head's row-sparse
gradient record), so no dense slice-sized gradient is ever accumulated by autograd. For weight-normalised
margins it is handed over before the radial projection (u_j plus the target rows' gradient, which is
already orthogonal to W_j), with 1/||W_j||, so the optimizer can apply ``project_out_radial`` block by
block while the rows are in cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.distributed import ProcessGroup, ReduceOp

from largefr.distributed.collectives import all_reduce_

TargetFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ShardedSoftmaxSpec:
    group: ProcessGroup | None
    num_rows: int  # global batch size N; the loss is the mean over it
    normalize_weight: bool
    target_fn: TargetFn  # target logit of raw rows (x [n, D], W_y [n, D]) -> [n]
    chunk_rows: int | None  # bound on logits rows held at once (recomputed in backward when set)
    workspace: Any  # largefr.heads.workspace.Workspace (buffers with leases)
    # receives (gradient rows [K, D] fp32, their lease, 1/||W_j|| or None). When the third argument is
    # set, the rows still need project_out_radial (deferred so the optimizer can fuse it with its update).
    grad_sink: Callable[[torch.Tensor, Any, torch.Tensor | None], None]
    w_inv_norm: torch.Tensor | None = None  # 1/||W_j|| of w_rows when the caller already has it
    rows_are_scratch: bool = False  # w_rows is a gathered copy that backward may overwrite


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


def _target_graph(
    target_fn: TargetFn, x_raw: torch.Tensor, w_rows: torch.Tensor, target_col: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Target logits [n] with their (detached leaf) inputs, for forward values or backward grads."""
    with torch.enable_grad():
        x = x_raw.detach().requires_grad_(True)
        if w_rows.shape[0] > 0:
            w = w_rows.index_select(0, target_col.clamp_min(0)).requires_grad_(True)
        else:
            w = w_rows.new_zeros(x.shape).requires_grad_(True)
        return target_fn(x, w).float(), x, w


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
    ctx.target_value = _target_graph(spec.target_fn, x_raw, w_rows, target_col)[0].detach()

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
    target_grads = []
    # With one chunk and scratch rows, the weight gradient overwrites the gathered rows after their
    # last use (GEMM2): one [K, D] buffer instead of two.
    if spec.rows_are_scratch and ctx.chunks.single and num_rows > 0:
        grad_w, grad_w_lease = ctx.w_rows, None
    else:
        grad_w, grad_w_lease = ws.take("grad_w", tuple(ctx.w_rows.shape), torch.float32, device)
    if ctx.chunks.single:
        buffer = ctx.probs
    else:
        buffer, chunk_lease = ws.take("logits", (ctx.chunks.size, num_cols), torch.float32, device)
    for i, (a, b) in enumerate(ctx.chunks.ranges):
        probs = buffer[: b - a]
        if not ctx.chunks.single:
            _local_softmax_(ctx, a, b, probs)
        row_scale = coef * ctx.row_factor[a:b]  # dL/dl_ij = row_scale_i p_ij - coef [j = y_i]
        if num_cols:
            grad_target = _take_target_entries(ctx, a, b, probs, row_scale, coef)
            target_grads.append(_target_backward(ctx, a, b, grad_target, grad_x_raw))
        if ctx.inv_norm is not None:
            probs.mul_(ctx.inv_norm)
        grad_logits = probs if ctx.w_gemm.dtype == torch.float32 else probs.to(ctx.w_gemm.dtype)
        _mm_into(grad_logits, ctx.w_gemm, grad_x_op[a:b])
        grad_x_op[a:b].mul_(row_scale.unsqueeze(1))
        x_scaled = ctx.x_gemm[a:b] * row_scale.unsqueeze(1).to(ctx.x_gemm.dtype)
        _mm_into(grad_logits.t(), x_scaled, grad_w, accumulate=i > 0)
    if num_rows == 0:
        grad_w.zero_()
    for cols, rows_grad in target_grads:
        grad_w.index_add_(0, cols, rows_grad)
    inv_norm = ctx.inv_norm
    _release(ctx)
    spec.grad_sink(grad_w, grad_w_lease, inv_norm)
    return grad_x_op, grad_x_raw


def _release(ctx: Any) -> None:
    """Drop every buffer and the spec, so a graph kept alive by the caller pins no workspace slot."""
    ctx.probs = ctx.w_rows = ctx.w_gemm = ctx.x_gemm = ctx.x_raw = ctx.spec = None
    ctx.leases = []


def project_out_radial(
    grad_w: torch.Tensor, w_rows: torch.Tensor, inv_norm: torch.Tensor, scratch: torch.Tensor | None = None
) -> None:
    """grad_w_j -= w_j (grad_w_j . w_j) / ||w_j||^2 in place: the chain rule through w / ||w||.

    Given u_j = dL/d(w_j/||w_j||) / ||w_j|| (what backward leaves for weight-normalised margins), this
    yields dL/dw_j = (I - w_j w_j^T / ||w_j||^2) u_j. Callers pass row blocks that fit in cache, and
    optionally a scratch tensor of grad_w's shape for the elementwise product.
    """
    product = torch.mul(grad_w, w_rows, out=scratch) if scratch is not None else grad_w * w_rows
    dots = product.sum(dim=1)
    grad_w.addcmul_(w_rows, (dots * inv_norm.square()).unsqueeze(1), value=-1.0)


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


def _target_backward(
    ctx: Any, a: int, b: int, grad_target: torch.Tensor, grad_x_raw: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Back-propagate rows [a, b) of the target logits; returns (columns, W-row grads) to add later.

    For weight-normalised margins the target depends on W_y only through its direction, so its
    gradient is already orthogonal to W_y and the later radial projection leaves it unchanged.
    """
    cols = ctx.target_col[a:b].clamp_min(0)
    target, x, w = _target_graph(ctx.spec.target_fn, ctx.x_raw[a:b], ctx.w_rows, ctx.target_col[a:b])
    grad_x, grad_wt = torch.autograd.grad(target, (x, w), grad_target)
    grad_x_raw[a:b] = grad_x
    return cols, grad_wt
