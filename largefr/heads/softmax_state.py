"""The sharded softmax's named state: its operands, each row's target, the per-chunk buffers.

Glossary (symbols of largefr.heads.sharded_softmax's docstring -> names here):

    x_i (GEMM operand)      Operands.x_gemm          x_raw_i    Operands.x_raw
    W_j (sampled rows)      Operands.w_rows / w_gemm 1/||W_j||  Operands.inv_norm
    y_i (column of class)   Targets.col              W_y        Targets.w_target (row Targets.row)
    ||x_i||, ||W_y||, x.W_y Targets.x_norm / w_norm / dot
    T_i (target logit)      Targets.value            kappa_i    Targets.kappa = ||x_raw_i|| / ||x_i||
    f_i, f_i' (non-target)  ChunkBuffers.logits transformed in place, ChunkBuffers.slope
    r_i / S_i               SavedSoftmax.row_factor  P_ij       ChunkBuffers.logits after the softmax
    k*_ij (best sub-centre) ChunkBuffers.best_sub    l_ijk      ChunkBuffers.scores (sub-centre scores)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from largefr.heads.margin_base import NontargetPrepare, NontargetTransform, RowParams
from largefr.heads.workspace import Lease, Workspace

__all__ = ["ChunkBuffers", "NontargetPrepare", "NontargetTransform", "Operands", "RowParams", "SavedSoftmax",
           "TargetFn", "Targets", "find_targets", "take_chunk_buffers"]

# target logit T_i from (||x_i||, ||W_y||, x_i . W_y, row params), each [n]
TargetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, RowParams], torch.Tensor]


@dataclass(frozen=True)
class Operands:
    """The step's GEMM operands (x_gemm / w_gemm in the autocast dtype when autocast is on)."""

    x_gemm: torch.Tensor  # [N, D]
    x_raw: torch.Tensor  # [N, D] raw embeddings (the target function's input)
    w_rows: torch.Tensor  # [R, D], R = sub_centers * K
    w_gemm: torch.Tensor  # [R, D]
    inv_norm: torch.Tensor | None  # [R] 1/||W_j|| when W rows are normalised
    sub_centers: int

    @property
    def num_rows(self) -> int:
        return self.x_gemm.shape[0]

    @property
    def num_cols(self) -> int:
        """K: class columns of the logits (R / sub_centers)."""
        return self.w_rows.shape[0] // self.sub_centers


@dataclass(frozen=True)
class Targets:
    """Each global row's target among this rank's columns, and the target function's inputs."""

    col: torch.Tensor  # [N] column of y_i among the K classes, -1 where another rank owns it
    owned: torch.Tensor  # [N] bool
    row: torch.Tensor  # [N] row of W_y among the R rows (the nearest sub-centre), 0 where not owned
    w_target: torch.Tensor  # [N, D]
    x_norm: torch.Tensor  # [N]
    w_norm: torch.Tensor  # [N]
    dot: torch.Tensor  # [N]
    value: torch.Tensor  # [N] T_i (fp32)
    kappa: torch.Tensor  # [N] ||x_raw_i|| / ||x_op_i||
    params: RowParams

    @property
    def col_or_zero(self) -> torch.Tensor:
        """[N, 1] index usable by gather/scatter (rows owned elsewhere point at column 0)."""
        return self.col.clamp_min(0).unsqueeze(1)

    @property
    def cosine(self) -> torch.Tensor:
        """cos(theta_y) [N], 0 where another rank owns the target."""
        cos = self.dot / (self.x_norm * self.w_norm).clamp_min(1e-12)
        return torch.where(self.owned, cos, torch.zeros_like(cos))

    def rows(self, a: int, b: int) -> "Targets":
        return Targets(
            self.col[a:b], self.owned[a:b], self.row[a:b], self.w_target[a:b], self.x_norm[a:b],
            self.w_norm[a:b], self.dot[a:b], self.value[a:b], self.kappa[a:b],
            {k: v[a:b] for k, v in self.params.items()},
        )


def find_targets(
    x_raw: torch.Tensor, x_op: torch.Tensor, w_rows: torch.Tensor, target_col: torch.Tensor,
    sub_centers: int, params: RowParams, target_fn: TargetFn,
) -> Targets:
    """W_y of each row (the sub-centre nearest to x_i when there are several) and T_i."""
    owned = target_col >= 0
    col = target_col.clamp_min(0)
    x_norm = torch.linalg.vector_norm(x_raw, dim=1).clamp_min_(1e-12)
    if w_rows.shape[0] == 0:
        row, w_target = col, torch.zeros_like(x_raw)
    elif sub_centers == 1:
        row, w_target = col, w_rows.index_select(0, col).float()
    else:  # sub-centre ArcFace: the class logit is the max over its sub-centres, so is the target's
        candidates = w_rows.view(-1, sub_centers, w_rows.shape[1]).index_select(0, col).float()  # [N, S, D]
        cos = (candidates @ x_raw.unsqueeze(2)).squeeze(2) / torch.linalg.vector_norm(candidates, dim=2).clamp_min(1e-12)
        best = cos.argmax(dim=1)
        row = col * sub_centers + best
        w_target = candidates[torch.arange(col.numel(), device=col.device), best]
    w_norm = torch.linalg.vector_norm(w_target, dim=1).clamp_min_(1e-12)
    dot = (x_raw * w_target).sum(dim=1)
    value = target_fn(x_norm, w_norm, dot, params).float()
    kappa = x_norm / torch.linalg.vector_norm(x_op, dim=1).clamp_min(1e-12)
    return Targets(target_col, owned, row, w_target, x_norm, w_norm, dot, value, kappa, params)


@dataclass(frozen=True)
class ChunkBuffers:
    """One chunk's [n, K] logits (then softmax, then gradient) and, when needed, its side buffers."""

    logits: torch.Tensor  # [n, K]
    scores: torch.Tensor | None  # [n, R] per-sub-centre logits (sub_centers > 1)
    best_sub: torch.Tensor | None  # [n, K] int64 argmax sub-centre (sub_centers > 1)
    slope: torch.Tensor | None  # [n, K] f_i'(l_ij) of the non-target transform

    def rows(self, n: int) -> "ChunkBuffers":
        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[:n]

        return ChunkBuffers(self.logits[:n], cut(self.scores), cut(self.best_sub), cut(self.slope))

    @property
    def weight_factor(self) -> torch.Tensor:
        """The buffer that ends up holding G over the R rows (scores with sub-centres, else logits)."""
        return self.logits if self.scores is None else self.scores


def take_chunk_buffers(
    ws: Workspace, ops: Operands, rows: int, with_slope: bool, leases: dict[str, Lease]
) -> ChunkBuffers:
    """Chunk buffers from the workspace; their leases are added to ``leases`` by slot name."""
    device, cols = ops.x_gemm.device, ops.num_cols

    def take(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        tensor, leases[name] = ws.take(name, shape, dtype, device)
        return tensor

    logits = take("logits", (rows, cols), torch.float32)
    scores = best = None
    if ops.sub_centers > 1:
        scores = take("sub_scores", (rows, ops.w_rows.shape[0]), torch.float32)
        best = take("best_sub", (rows, cols), torch.int64)
    slope = take("nontarget_slope", (rows, cols), torch.float32) if with_slope else None
    return ChunkBuffers(logits, scores, best, slope)


@dataclass(frozen=True)
class SavedSoftmax:
    """Everything the backward reads (set once by the forward, dropped by the backward)."""

    ops: Operands
    targets: Targets
    row_factor: torch.Tensor  # [N] r_i / S_i
    chunk_ranges: tuple[tuple[int, int], ...]
    chunk_size: int
    transform: NontargetTransform | None
    kept: ChunkBuffers | None  # the single chunk's buffers, kept from the forward; None when chunked
    leases: dict[str, Lease] = field(default_factory=dict)  # by workspace slot name
