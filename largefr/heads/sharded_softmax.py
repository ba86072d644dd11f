"""Softmax cross-entropy over classes sharded across ranks, without ever gathering logits.

Each rank holds the logits of the whole (gathered) batch against its own K class columns:

    l_ij = x_i . W_j * (1 / ||W_j|| if weights are normalised)        non-target entries
    l_ij <- max_k l_ijk                                                 with S sub-centres per class
    l_ij <- f_i(l_ij)                                                   optional non-target transform
    l_iy = T_i = target_fn(||x_raw_i||, ||W_y||, x_raw_i . W_y)          owned target entries

Per rank the logits buffer is turned in place into the LOCAL softmax p_ij = exp(l_ij - m_i) / s_i
(torch's fused softmax kernel; m_i, s_i the local row max and sum). With the global max
M_i = all-reduce MAX of m_i and the rescaled local sums r_i = s_i exp(m_i - M_i):

    S_i, T_i = all-reduce SUM of (r_i, owned target logit)      (one collective)
    loss = mean_i (log S_i + M_i - T_i)

Backward is local: dL/dl_ij = (softmax_ij - [j = y_i]) / N = c_i p_ij - [j = y_i] / N with
c_i = r_i / (N S_i). The row factor c_i is applied to the small [N, D] GEMM operands, not to the
buffer. Target entries are zeroed in the buffer and their gradient c_i p_iy - 1/N goes through the
target function. A non-target transform multiplies the buffer by its slope f_i'(l_ij) (kept from the
forward); sub-centres route each entry's gradient to its best sub-centre k*_ij. Through the row
normalisation the gradient is analytic: with u_j = sum_i G_ij x_i / ||W_j|| (what GEMM3 gives once the
buffer's columns are scaled), dL/dW_j = u_j - W_j (u_j . W_j) / ||W_j||^2.

The target logit is a function of (||x_i||, ||W_y||, x_i . W_y) only (and of per-row constants such as
AdaFace's or ElasticFace's margins), so its gradient with respect to W_y is a_i x_i + b_i W_y: a_i is
folded into the buffer's (zeroed) target entry, b_i into a per-row vector.

The W-rows gradient does not enter autograd: it is handed to ``spec.grad_sink`` in factored form
(largefr.heads.factored_grad.FactoredWeightGrad), so no dense slice-sized gradient is ever accumulated by
autograd and the optimizer can form it block by block while the rows are in cache. With the logits in
chunks, G is kept in the GEMMs' 16-bit dtype when that is smaller than a summed [S*K, D] fp32 gradient
(2N < 4D). The saved state is a :class:`largefr.heads.softmax_state.SavedSoftmax` (its module docstring
maps these symbols to names).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.distributed import ProcessGroup, ReduceOp

from largefr.distributed.collectives import all_reduce_
from largefr.heads.factored_grad import FactoredWeightGrad, keeps_low_precision_factor
from largefr.heads.softmax_state import (
    ChunkBuffers,
    NontargetPrepare,
    NontargetTransform,
    Operands,
    RowParams,
    SavedSoftmax,
    TargetFn,
    Targets,
    find_targets,
    take_chunk_buffers,
)
from largefr.heads.workspace import Lease, Workspace


@dataclass(frozen=True, kw_only=True, eq=False)
class ShardedSoftmaxSpec:
    group: ProcessGroup | None
    num_rows: int  # global batch size N; the loss is the mean over it
    normalize_weight: bool
    target_fn: TargetFn
    chunk_rows: int | None  # bound on logits rows held at once (recomputed in backward when set)
    workspace: Workspace
    # receives the W-rows gradient and the workspace leases its tensors live in
    grad_sink: Callable[[FactoredWeightGrad, tuple[Lease, ...]], None]
    w_inv_norm: torch.Tensor | None = None  # 1/||W_j|| of w_rows when the caller already has it
    sub_centers: int = 1  # S rows per class, consecutive in w_rows; the class logit is their max
    row_params: RowParams = field(default_factory=dict)  # per-row margin constants, each [N]
    nontarget: NontargetPrepare | None = None  # builds this step's f_i from the global target cosines
    nontarget_needs_target_cosine: bool = False  # all-reduce cos(theta_y) of every row before the softmax


def _autocast_type(device: torch.device) -> str:
    """Meta tensors (the planner's dry run) follow the CPU's autocast state: torch has no meta autocast."""
    return "cpu" if device.type == "meta" else device.type


def gemm_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the logits GEMMs, or None when autocast is off."""
    if torch.is_autocast_enabled(_autocast_type(device)):
        return torch.get_autocast_dtype(_autocast_type(device))
    return None


def compute_rows_dtype(storage_dtype: torch.dtype, gemm: torch.dtype | None) -> torch.dtype:
    """The dtype the sampled W rows are gathered in: the storage dtype when it is the GEMMs' own 16-bit
    dtype (the rows then feed the GEMMs as they are: no fp32 copy and no low-precision copy, k*D*4 bytes
    fewer), else fp32. Both hold the same values: a 16-bit row upcast to fp32 and cast back is exact."""
    return storage_dtype if storage_dtype != torch.float32 and storage_dtype == gemm else torch.float32


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


CPU_TILE_BYTES = 2 << 20


def row_tiles(rows: int, cols: int, device: torch.device) -> list[tuple[int, int]]:
    """Row ranges [a, b) of an fp32 [rows, cols] logits buffer that its elementwise passes take one at a time.

    On the CPU a tile is ~2 MiB, so the passes after a GEMM (column scaling, softmax and row maxima; in the
    backward the row and column factors) run in cache and the buffer crosses memory about once each way
    instead of once per pass. Measured here for [256, 50K] logits: forward passes 30 -> 24 ms, backward
    7.3 -> 5.9 ms, also beside a second process competing for the cache. Whole 2-rank head steps, untiled
    against 2 MiB tiles interleaved: C = 200K, r = 1: 1334 -> 1259 ms (median of 10 rounds); C = 1M, r = 0.1:
    879 -> 828 ms (16 rounds), though alternating `bench head` runs could not separate the two from this VM's
    noise. On an accelerator one tile: each kernel is one pass over memory anyway, and more launches only add
    host time."""
    size = rows if device.type != "cpu" else max(1, min(rows, CPU_TILE_BYTES // max(4 * cols, 1)))
    return [(a, min(a + size, rows)) for a in range(0, rows, size)]


def _chunk_ranges(num_rows: int, chunk_rows: int | None) -> tuple[int, tuple[tuple[int, int], ...]]:
    """(chunk size, row ranges [a, b) of the gathered batch processed one at a time)."""
    size = max(num_rows if not chunk_rows or chunk_rows >= num_rows else chunk_rows, 1)
    return size, tuple((a, min(a + size, num_rows)) for a in range(0, num_rows, size))


def _operands(
    x_op: torch.Tensor, x_raw: torch.Tensor, w_rows: torch.Tensor, spec: ShardedSoftmaxSpec,
    gemm_dtype: torch.dtype | None, leases: dict[str, Lease],
) -> Operands:
    inv_norm = None
    if spec.normalize_weight:
        inv_norm = spec.w_inv_norm
        if inv_norm is None:
            inv_norm = torch.linalg.vector_norm(w_rows, dim=1, dtype=torch.float32).clamp_min_(1e-12).reciprocal_()
    if w_rows.dtype != compute_rows_dtype(w_rows.dtype, gemm_dtype):
        raise TypeError(f"W rows in {w_rows.dtype} need autocast in that dtype (the GEMMs run in {gemm_dtype or torch.float32})")
    x_gemm = x_op if gemm_dtype is None else x_op.to(gemm_dtype)
    w_gemm = w_rows
    if gemm_dtype is not None and w_rows.dtype != gemm_dtype:
        w_gemm, leases["w_gemm"] = spec.workspace.take("w_gemm", tuple(w_rows.shape), gemm_dtype, x_op.device)
        w_gemm.copy_(w_rows)
    return Operands(x_gemm, x_raw, w_rows, w_gemm, inv_norm, spec.sub_centers)


def _local_softmax_(
    ops: Operands, t: Targets, transform: NontargetTransform | None, a: int, b: int, chunk: ChunkBuffers
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill ``chunk.logits`` [b-a, K] with the local softmax of rows [a, b); returns their local max m_i and
    local sum s_i = sum_j exp(l_ij - m_i). The passes after the GEMM run tile by tile (:func:`row_tiles`)."""
    out = chunk.logits
    scores = out if chunk.scores is None else chunk.scores
    _mm_into(ops.x_gemm[a:b], ops.w_gemm.t(), scores)
    if out.shape[1] == 0:
        return torch.full((b - a,), float("-inf"), device=out.device), torch.zeros(b - a, device=out.device)
    col = t.col_or_zero
    local_max, largest_prob = torch.empty(b - a, device=out.device), torch.empty(b - a, device=out.device)
    for ta, tb in row_tiles(b - a, scores.shape[1], out.device):
        tile = out[ta:tb]
        if ops.inv_norm is not None:
            scores[ta:tb].mul_(ops.inv_norm)
        if chunk.scores is not None:
            best = chunk.best_sub[ta:tb]  # type: ignore[index]
            torch.max(scores[ta:tb].view(tb - ta, ops.num_cols, ops.sub_centers), dim=2, out=(tile, best))
        if transform is not None:
            transform(tile, chunk.slope[ta:tb], a + ta, a + tb)  # type: ignore[index]
        current = tile.gather(1, col[ta:tb]).squeeze(1)
        tile.scatter_(1, col[ta:tb], torch.where(t.owned[ta:tb], t.value[ta:tb], current).unsqueeze(1))
        # values only: max(dim) with its indices costs ~5x amax on the CPU; on a GPU the second amax below is
        # one more read of the chunk than an indexed max + gather (a few % of the softmax's own passes)
        torch.amax(tile, dim=1, out=local_max[ta:tb])
        # in place is safe: the kernel reads each row for its max and sum before writing it
        torch.ops.aten._softmax.out(tile, 1, False, out=tile)
        torch.amax(tile, dim=1, out=largest_prob[ta:tb])
    # the largest softmax entry is the one at the row's max, exp(0) / s_i: s_i = 1 / max_j p_ij
    return local_max, largest_prob.reciprocal_()


def _global_stats(
    local_max: torch.Tensor,
    local_sum: torch.Tensor,
    owned: torch.Tensor,
    target: torch.Tensor,
    group: ProcessGroup | None,
    row_factor: torch.Tensor,
) -> torch.Tensor:
    """Combine the ranks' local softmax statistics; fills r_i / S_i; returns the chunk's summed loss."""
    global_max = all_reduce_(local_max.clone(), ReduceOp.MAX, group)
    rescaled = torch.where(local_sum > 0, local_sum * torch.exp(local_max - global_max), torch.zeros_like(local_sum))
    stats = torch.stack([rescaled, torch.where(owned, target, torch.zeros_like(target))])
    all_reduce_(stats, ReduceOp.SUM, group)
    row_factor.copy_(rescaled / stats[0])
    return (stats[0].log() + global_max - stats[1]).sum()


class ShardedMarginSoftmaxCE(torch.autograd.Function):
    """forward: local softmax, all-reduce MAX of row maxima, one all-reduce SUM of (rescaled sum, target logit);
    backward: local, no collective (softmax - onehot from the saved/recomputed buffer).

    Inputs: x_op [N, D] (GEMM operand rows), x_raw [N, D] (raw rows for the target function),
    w_rows [S*K, D] (this rank's sampled class rows, S sub-centres each; fp32, or the autocast dtype), target_col [N] (column of each
    row's class among the K classes, -1 where another rank owns it), anchor (a 0-size tensor that requires
    grad so the backward runs even when the embeddings need no gradient), spec. Output: the global mean
    loss (same on all ranks). A margin asking for the target cosines costs one more all-reduce of [N].
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
        gemm = gemm_dtype(x_op.device)
        with torch.autocast(_autocast_type(x_op.device), enabled=False):
            ctx.saved, loss = _forward(x_op, x_raw, w_rows, target_col, spec, gemm)
        ctx.spec = spec
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
        saved, spec = ctx.saved, ctx.spec
        ctx.saved = ctx.spec = None  # a graph kept alive by the caller pins no workspace slot
        with torch.autocast(_autocast_type(grad_loss.device), enabled=False):
            grad_x_op, grad_x_raw = _backward(saved, spec, grad_loss)
        return grad_x_op, grad_x_raw, None, None, torch.zeros(0, device=grad_loss.device), None


def _forward(
    x_op: torch.Tensor,
    x_raw: torch.Tensor,
    w_rows: torch.Tensor,
    target_col: torch.Tensor,
    spec: ShardedSoftmaxSpec,
    gemm_dtype: torch.dtype | None,
) -> tuple[SavedSoftmax, torch.Tensor]:
    leases: dict[str, Lease] = {}
    ops = _operands(x_op, x_raw, w_rows, spec, gemm_dtype, leases)
    targets = find_targets(x_raw, x_op, w_rows, target_col, spec.sub_centers, spec.row_params, spec.target_fn)
    transform = None
    if spec.nontarget is not None:
        cosine = None
        if spec.nontarget_needs_target_cosine:  # the target lives on one rank: a sum gathers it everywhere
            cosine = all_reduce_(targets.cosine, ReduceOp.SUM, spec.group)
        transform = spec.nontarget(cosine)
    chunk_size, ranges = _chunk_ranges(ops.num_rows, spec.chunk_rows)
    chunk_leases: dict[str, Lease] = {}
    buffers = take_chunk_buffers(spec.workspace, ops, chunk_size, transform is not None, chunk_leases)
    row_factor = torch.empty(ops.num_rows, device=x_op.device)  # r_i / S_i
    loss_sum = torch.zeros((), device=x_op.device)
    for a, b in ranges:
        chunk, t = buffers.rows(b - a), targets.rows(a, b)
        local_max, local_sum = _local_softmax_(ops, t, transform, a, b, chunk)
        loss_sum += _global_stats(local_max, local_sum, t.owned, t.value, spec.group, row_factor[a:b])
    single = len(ranges) == 1
    if single:  # chunked: the buffers are reused only inside this call, their leases end here
        leases.update(chunk_leases)
    saved = SavedSoftmax(ops, targets, row_factor, ranges, chunk_size, transform, buffers if single else None, leases)
    return saved, loss_sum / ops.num_rows


def _backward(saved: SavedSoftmax, spec: ShardedSoftmaxSpec, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ops = saved.ops
    device = grad_loss.device
    coef = grad_loss.float() / ops.num_rows
    grad_x_op = torch.empty(ops.x_gemm.shape, dtype=torch.float32, device=device)
    grad_x_raw = torch.zeros_like(ops.x_raw)
    beta = torch.zeros(ops.w_rows.shape[0], device=device)
    dense: torch.Tensor | None = None
    kept_factor: torch.Tensor | None = None  # G [N, R] in the GEMMs' 16-bit dtype
    sink_leases = dict(saved.leases)
    buffers = saved.kept
    if buffers is None:  # chunked: the buffers are reused per chunk, so G is kept in 16 bits or G^T x summed here
        chunk_leases: dict[str, Lease] = {}
        buffers = take_chunk_buffers(spec.workspace, ops, saved.chunk_size, saved.transform is not None, chunk_leases)
        if keeps_low_precision_factor(ops.num_rows, ops.x_gemm.shape[1], ops.x_gemm.dtype):
            shape = (ops.num_rows, ops.w_rows.shape[0])
            kept_factor, sink_leases["grad_factor"] = spec.workspace.take("grad_factor", shape, ops.x_gemm.dtype, device)
        else:
            dense, sink_leases["grad_w"] = spec.workspace.take("grad_w", tuple(ops.w_rows.shape), torch.float32, device)
            dense.zero_()
    for a, b in saved.chunk_ranges:
        chunk, t = buffers.rows(b - a), saved.targets.rows(a, b)
        if saved.kept is None:
            _local_softmax_(ops, t, saved.transform, a, b, chunk)
        row_scale = coef * saved.row_factor[a:b]  # dL/dl_ij = row_scale_i p_ij - coef [j = y_i]
        factor = _chunk_backward(ops, t, chunk, row_scale, coef, spec.target_fn, a, b, grad_x_op, grad_x_raw, beta)
        if kept_factor is not None:
            kept_factor[a:b].copy_(factor)
        elif dense is not None:
            _mm_into(factor.t() if ops.x_gemm.dtype == torch.float32 else factor.t().to(ops.x_gemm.dtype),
                     ops.x_gemm[a:b], dense, accumulate=True)
    factor = buffers.weight_factor if saved.kept is not None else kept_factor
    weight_grad = FactoredWeightGrad(beta, ops.inv_norm, factor=factor, x=ops.x_gemm.detach(), dense=dense)
    spec.grad_sink(weight_grad, tuple(sink_leases.values()))
    return grad_x_op, grad_x_raw


def _chunk_backward(
    ops: Operands, t: Targets, chunk: ChunkBuffers, row_scale: torch.Tensor, coef: torch.Tensor,
    target_fn: TargetFn, a: int, b: int, grad_x_op: torch.Tensor, grad_x_raw: torch.Tensor, beta: torch.Tensor,
) -> torch.Tensor:
    """Rows [a, b): x gradients; returns the chunk's factor G [b-a, S*K] of the W gradient (in a buffer)."""
    probs = chunk.logits
    has_cols = probs.shape[1] > 0
    if has_cols:
        grad_target = _take_target_entries(probs, t, row_scale, coef)
        d_xnorm, d_wnorm, d_dot = _target_input_grads(target_fn, t, grad_target)
        grad_x_raw[a:b] = d_dot.unsqueeze(1) * t.w_target + (d_xnorm / t.x_norm).unsqueeze(1) * ops.x_raw[a:b]
    grad = probs if chunk.scores is None else chunk.scores
    for ta, tb in row_tiles(b - a, grad.shape[1], grad.device):
        tile = probs[ta:tb]
        if chunk.slope is not None:
            tile.mul_(chunk.slope[ta:tb])  # dL/dl = dL/df f'(l); the target entries are already zero
        tile.mul_(row_scale[ta:tb].unsqueeze(1))
        if chunk.scores is not None:  # each class's gradient goes to its best sub-centre k*_ij only
            best = chunk.best_sub[ta:tb].unsqueeze(2)  # type: ignore[index]
            grad[ta:tb].zero_().view(tb - ta, ops.num_cols, ops.sub_centers).scatter_(2, best, tile.unsqueeze(2))
        if ops.inv_norm is not None:
            grad[ta:tb].mul_(ops.inv_norm)
    grad_logits = grad if ops.w_gemm.dtype == torch.float32 else grad.to(ops.w_gemm.dtype)
    _mm_into(grad_logits, ops.w_gemm, grad_x_op[a:b])
    if has_cols:
        # the target's W gradient d_dot x_raw + (d_wnorm / ||W_y||) W_y: x part into the zeroed entry
        # (rows owned elsewhere point at row 0 and must keep its value)
        row = t.row.unsqueeze(1)
        current = grad.gather(1, row).squeeze(1)
        grad.scatter_(1, row, torch.where(t.owned, d_dot * t.kappa, current).unsqueeze(1))
        beta.index_add_(0, t.row, torch.where(t.owned, d_wnorm / t.w_norm, torch.zeros_like(d_dot)))
    return grad


def _target_input_grads(
    target_fn: TargetFn, t: Targets, grad_target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """d(target logit)/d(||x||, ||W_y||, x . W_y) for the rows of ``t``, times grad_target."""
    with torch.enable_grad():
        inputs = [v.detach().requires_grad_(True) for v in (t.x_norm, t.w_norm, t.dot)]
        target = target_fn(*inputs, t.params).float()
        grads = torch.autograd.grad(target, inputs, grad_target, allow_unused=True)
    return tuple(torch.zeros_like(grad_target) if g is None else g for g in grads)  # type: ignore[return-value]


def _take_target_entries(probs: torch.Tensor, t: Targets, row_scale: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Zero the owned target entries of the buffer; return their logits' gradient [b - a].

    The gradient row_scale * p - coef goes through the target function instead of the GEMMs
    (zero where another rank owns the target).
    """
    col = t.col_or_zero
    at_target = probs.gather(1, col).squeeze(1)
    zeros = torch.zeros_like(at_target)
    probs.scatter_(1, col, torch.where(t.owned, zeros, at_target).unsqueeze(1))
    return torch.where(t.owned, row_scale * at_target - coef, zeros)
