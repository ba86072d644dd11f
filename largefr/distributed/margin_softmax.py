"""Softmax cross-entropy over classes sharded across ranks, without ever gathering logits.

Each rank holds the logits of the whole (gathered) batch against its own class rows K:

    l_ij = x_i . W_j * (1 / ||W_j|| if weights are normalised)        non-target entries
    l_iy = target_fn(x_raw_i, W_y)                                      owned target entries

    m_i  = all-reduce MAX over ranks of max_j l_ij
    S_i, T_i = all-reduce SUM of (sum_j exp(l_ij - m_i), owned target logit)   (one collective)
    loss = mean_i (log S_i + m_i - T_i)

Backward is local: dL/dl_ij = (softmax_ij - [j = y_i]) / N. The logits buffer is turned into the softmax
in place; the target entries' gradient goes to the target function's inputs; gradients through the
row normalisation are analytic: with u_j = sum_i G_ij x_i / ||W_j|| and d_j = sum_i G_ij l_ij,
dL/dW_j = u_j - W_j d_j / ||W_j||^2 (d/dW of W/||W|| = (I - W W^T/||W||^2) / ||W||).

The W-rows gradient does not enter autograd: it is handed to ``spec.grad_sink`` (the head's row-sparse
gradient record), so no dense slice-sized gradient is ever accumulated by autograd. For weight-normalised
margins it is handed over before the radial projection (u_j above, plus the target rows' gradient), with
1/||W_j||, so the optimizer can apply ``project_out_radial`` block by block while the rows are in cache.
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
    group: ProcessGroup
    num_rows: int  # global batch size N; the loss is the mean over it
    normalize_weight: bool
    target_fn: TargetFn | None  # None: the target logit is the plain non-target formula
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


def _logits(ctx: Any, a: int, b: int, out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` [b-a, K] with the fp32 logits of rows [a, b), targets replaced."""
    _mm_into(ctx.x_gemm[a:b], ctx.w_gemm.t(), out)
    if ctx.inv_norm is not None:
        out.mul_(ctx.inv_norm)
    if ctx.has_target_fn and out.shape[1] > 0:
        owned, col = _target_column(ctx.target_col[a:b])
        current = out.gather(1, col).squeeze(1)
        out.scatter_(1, col, torch.where(owned, ctx.target_value[a:b], current).unsqueeze(1))
    return out


def _target_graph(
    target_fn: TargetFn, x_raw: torch.Tensor, w_rows: torch.Tensor, target_col: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Target logits [N] with their (detached leaf) inputs, for forward values or backward grads."""
    with torch.enable_grad():
        x = x_raw.detach().requires_grad_(True)
        if w_rows.shape[0] > 0:
            w = w_rows.index_select(0, target_col.clamp_min(0)).requires_grad_(True)
        else:
            w = w_rows.new_zeros(x.shape).requires_grad_(True)
        return target_fn(x, w).float(), x, w


class ShardedMarginSoftmaxCE(torch.autograd.Function):
    """forward: local logits, all-reduce MAX of row maxima, one all-reduce SUM of (sum exp, target logit);
    backward: local, no collective (softmax - onehot from the saved/recomputed logits).

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
    ctx.has_target_fn = spec.target_fn is not None
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
    if ctx.has_target_fn:
        ctx.target_value = _target_graph(spec.target_fn, x_raw, w_rows, target_col)[0].detach()

    chunks = _Chunks(num_rows, spec.chunk_rows)
    logits, lease = ws.take("logits", (chunks.size, num_cols), torch.float32, device)
    ctx.leases.append(lease)
    row_max = torch.empty(num_rows, device=device)
    row_sum = torch.empty(num_rows, device=device)
    loss_sum = torch.zeros((), device=device)
    for a, b in chunks.ranges:
        buf = _logits(ctx, a, b, logits[: b - a])
        owned, col = _target_column(target_col[a:b])
        target = buf.gather(1, col).squeeze(1) if num_cols else torch.zeros(b - a, device=device)
        loss_sum += _softmax_stats(buf, owned, target, spec.group, row_max[a:b], row_sum[a:b])
    ctx.row_max, ctx.row_sum, ctx.chunks = row_max, row_sum, chunks
    ctx.logits = logits if chunks.single else None
    if not chunks.single:
        ctx.leases = ctx.leases[:-1]  # the chunk buffer is reused only inside this call
    return loss_sum / num_rows


def _softmax_stats(
    logits: torch.Tensor,
    owned: torch.Tensor,
    target: torch.Tensor,
    group: ProcessGroup,
    row_max: torch.Tensor,
    row_sum: torch.Tensor,
) -> torch.Tensor:
    """exp(logits - global max) in place; fills global max and sum; returns the chunk's summed loss."""
    if logits.shape[1]:
        torch.amax(logits, dim=1, out=row_max)
    else:
        row_max.fill_(float("-inf"))
    all_reduce_(row_max, ReduceOp.MAX, group)
    logits.sub_(row_max.unsqueeze(1)).exp_()
    stats = torch.stack([logits.sum(dim=1), torch.where(owned, target, torch.zeros_like(target))])
    all_reduce_(stats, ReduceOp.SUM, group)
    row_sum.copy_(stats[0])
    return (stats[0].log() + row_max - stats[1]).sum()


def _backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    spec: ShardedSoftmaxSpec = ctx.spec
    num_rows, num_cols = ctx.x_gemm.shape[0], ctx.w_rows.shape[0]
    device, ws = grad_loss.device, spec.workspace
    coef = grad_loss.float() / num_rows
    grad_x_op = torch.empty(ctx.x_gemm.shape, dtype=torch.float32, device=device)
    grad_x_raw = torch.zeros_like(ctx.x_raw) if ctx.has_target_fn else None
    target_grads = []
    # With one chunk and scratch rows, the weight gradient overwrites the gathered rows after their
    # last use (GEMM2): one [K, D] buffer instead of two.
    reuse_rows = spec.rows_are_scratch and ctx.chunks.single and num_rows > 0
    if reuse_rows:
        grad_w, grad_w_lease = ctx.w_rows, None
    else:
        grad_w, grad_w_lease = ws.take("grad_w", tuple(ctx.w_rows.shape), torch.float32, device)
    if ctx.chunks.single:
        chunk_buf = ctx.logits
    else:
        chunk_buf, chunk_lease = ws.take("logits", (ctx.chunks.size, num_cols), torch.float32, device)
    for i, (a, b) in enumerate(ctx.chunks.ranges):
        exps = chunk_buf[: b - a]
        if not ctx.chunks.single:
            _logits(ctx, a, b, exps)
            exps.sub_(ctx.row_max[a:b].unsqueeze(1)).exp_()
        # dL/dl_ij = row_scale_i * e_ij - coef [j = y_i]; the row scale is applied to the small [n, D]
        # GEMM operands instead of a pass over the [n, K] buffer.
        row_scale = coef / ctx.row_sum[a:b]
        if num_cols:
            grad_target = _subtract_onehot(ctx, a, b, exps, row_scale, coef)
            if ctx.has_target_fn:
                target_grads.append(_target_backward(ctx, a, b, grad_target, grad_x_raw))
        if ctx.inv_norm is not None:
            exps.mul_(ctx.inv_norm)
        grad_logits = exps if ctx.w_gemm.dtype == torch.float32 else exps.to(ctx.w_gemm.dtype)
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
    ctx.logits = ctx.w_rows = ctx.w_gemm = ctx.x_gemm = ctx.x_raw = ctx.spec = None
    ctx.leases = []


def project_out_radial(grad_w: torch.Tensor, w_rows: torch.Tensor, inv_norm: torch.Tensor) -> None:
    """grad_w_j -= w_j (grad_w_j . w_j) / ||w_j||^2 in place: the chain rule through w / ||w||.

    Given u_j = dL/d(w_j/||w_j||) / ||w_j|| (what backward leaves for weight-normalised margins), this
    yields dL/dw_j = (I - w_j w_j^T / ||w_j||^2) u_j. Callers pass row blocks that fit in cache.
    """
    dots = (grad_w * w_rows).sum(dim=1)
    grad_w.addcmul_(w_rows, (dots * inv_norm.square()).unsqueeze(1), value=-1.0)


def _subtract_onehot(
    ctx: Any, a: int, b: int, exps: torch.Tensor, row_scale: torch.Tensor, coef: torch.Tensor
) -> torch.Tensor:
    """Put the one-hot term into the exp buffer (in units of row_scale) at owned targets.

    With a margin target function the target entry's gradient row_scale*e - coef is returned (for the
    target function's inputs) and the entry is zeroed; otherwise the entry becomes e - coef/row_scale
    = e - S. Returns the target logits' gradient [b - a] (zero where another rank owns the target).
    """
    owned, col = _target_column(ctx.target_col[a:b])
    at_target = exps.gather(1, col).squeeze(1)
    zeros = torch.zeros_like(at_target)
    if ctx.has_target_fn:
        grad_target = torch.where(owned, row_scale * at_target - coef, zeros)
        replaced = torch.where(owned, zeros, at_target)
    else:
        grad_target = zeros
        replaced = torch.where(owned, at_target - ctx.row_sum[a:b], at_target)
    exps.scatter_(1, col, replaced.unsqueeze(1))
    return grad_target


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
