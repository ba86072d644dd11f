"""Contrastive and triplet losses over the GLOBAL batch, sharded by anchor.

Every rank gathers the embeddings of all ranks (all-gather whose backward is a reduce-scatter) and the
labels, and scores only its own B rows as anchors against the N = world * B gathered rows: the work and
memory per rank are B x N, never N x N. Each rank's partial sum of pair/triplet terms is summed over
ranks (all-reduce whose backward is the identity) and divided by the global number of terms used, so
the loss and ``embeddings.grad`` equal those of one process over the concatenated batch.

Pairs and triplets are *ordered*: anchor a, partner j != a. For the contrastive loss with all negatives
this is the mean over unordered pairs (each counted twice); with ``negatives="hardest"`` each anchor
takes its k nearest negatives. Distances are Euclidean on L2-normalised embeddings (contrastive: raw
embeddings with ``normalize=False``), computed in fp32 (fp64 for fp64 input) outside autocast.

Triplet mining (D = squared distance, h = D(a,p) - D(a,n) + alpha, FaceNet):
- ``batch_all``: every (a, p, n); the loss is the mean of h over the ACTIVE triplets (h > 0, Hermans et
  al. 2017 "BA != 0"); 0 when none is active.
- ``batch_hard``: per anchor its farthest positive and nearest negative; mean of max(h, 0) over the
  anchors that have a positive and a negative.
- ``semi_hard``: per (a, p), the nearest negative with D(a,p) < D(a,n) < D(a,p) + alpha (FaceNet's
  semi-hard band); mean of h over the (a, p) pairs that have one.
``active_fraction``: active triplets / candidates (batch_all: all triplets; batch_hard: anchors;
semi_hard: (a, p) pairs with at least one negative).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup, ReduceOp

from largefr.distributed import all_gather_rows, all_reduce_, gather_rows_with_grad, group_rank, sum_partials_with_grad
from largefr.heads.input_checks import check_embeddings_and_labels

MINING_MODES = ("batch_all", "batch_hard", "semi_hard")
NEGATIVE_MODES = ("all", "hardest")
# anchors per chunk of the [chunk, N, N] triplet masks: at most this many elements at once
_TRIPLET_CHUNK_ELEMENTS = 1 << 22


@dataclass
class PairView:
    """This rank's anchors against the global batch: squared distances [B, N] (autograd) and masks."""

    sq_dist: torch.Tensor
    positive: torch.Tensor  # same label, partner != anchor
    negative: torch.Tensor  # other label


def pair_view(embeddings: torch.Tensor, labels: torch.Tensor, group: ProcessGroup | None, normalize: bool) -> PairView:
    """Gather the batch and form this rank's anchor rows of the distance matrix (see module doc)."""
    check_embeddings_and_labels(embeddings, labels)
    dtype = torch.promote_types(embeddings.dtype, torch.float32)
    with torch.autocast(embeddings.device.type, enabled=False):
        x_all = gather_rows_with_grad(embeddings.to(dtype), group)
        labels_all = all_gather_rows(labels.long(), group)
        e_all = F.normalize(x_all, dim=1) if normalize else x_all
        batch, first = embeddings.shape[0], group_rank(group) * embeddings.shape[0]
        anchors = e_all[first : first + batch]
        # ||a - j||^2 = ||a||^2 + ||j||^2 - 2 a.j, clamped at 0 against rounding
        sq = (anchors.square().sum(1, keepdim=True) + e_all.square().sum(1)[None, :] - 2.0 * anchors @ e_all.T).clamp_min(0.0)
    same = labels_all[first : first + batch, None] == labels_all[None, :]
    not_self = torch.arange(batch, device=sq.device)[:, None] + first != torch.arange(sq.shape[1], device=sq.device)[None, :]
    return PairView(sq, same & not_self, ~same)


def _global_counts(values: list[torch.Tensor], group: ProcessGroup | None, like: torch.Tensor) -> torch.Tensor:
    """Sum of per-rank counts over the group, one all-reduce (no gradient)."""
    counts = torch.stack([v.to(like.dtype) for v in values]).detach()
    return all_reduce_(counts, ReduceOp.SUM, group)


class ContrastiveLoss(nn.Module):
    """L = y d^2 + (1 - y) max(0, m - d)^2, mean over the pairs used (Hadsell et al. 2006; DeepID2).

    Positive pairs: all. Negative pairs: ``"all"``, or the ``hardest_k`` nearest negatives of each anchor.
    ``last_stats``: {"active_negatives": fraction of the used negative pairs with d < m} (a device tensor).
    """

    def __init__(self, margin: float = 1.0, *, negatives: Literal["all", "hardest"] = "all", hardest_k: int = 1,
                 normalize: bool = True, process_group: ProcessGroup | None = None) -> None:
        super().__init__()
        if not (isinstance(margin, (int, float)) and margin > 0):
            raise ValueError(f"contrastive margin must be a number > 0, got {margin!r}")
        if negatives not in NEGATIVE_MODES:
            raise ValueError(f"negatives must be one of {NEGATIVE_MODES}, got {negatives!r}")
        if not (isinstance(hardest_k, int) and hardest_k >= 1):
            raise ValueError(f"hardest_k must be an int >= 1, got {hardest_k!r}")
        self.margin, self.negatives, self.hardest_k = float(margin), negatives, hardest_k
        self.normalize, self.process_group = normalize, process_group
        self.last_stats: dict[str, torch.Tensor] = {}

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        view = pair_view(embeddings, labels, self.process_group, self.normalize)
        dist = view.sq_dist.clamp_min(1e-12).sqrt()
        used_neg = view.negative if self.negatives == "all" else self._hardest(dist.detach(), view.negative)
        hinge = (self.margin - dist).clamp_min(0.0).square()
        partial = (view.sq_dist * view.positive).sum() + (hinge * used_neg).sum()
        active = (used_neg & (dist.detach() < self.margin)).sum()
        counts = _global_counts([view.positive.sum() + used_neg.sum(), used_neg.sum(), active], self.process_group, dist)
        self.last_stats = {"active_negatives": counts[2] / counts[1].clamp_min(1.0)}
        return sum_partials_with_grad(partial, self.process_group) / counts[0].clamp_min(1.0)

    def _hardest(self, dist: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        k = min(self.hardest_k, dist.shape[1])
        scores = torch.where(negative, dist, torch.full_like(dist, float("inf")))
        values, index = torch.topk(scores, k, dim=1, largest=False)
        chosen = torch.zeros_like(negative)
        return chosen.scatter_(1, index, torch.isfinite(values))

    def extra_repr(self) -> str:
        return f"margin={self.margin}, negatives={self.negatives}, hardest_k={self.hardest_k}, normalize={self.normalize}"


@dataclass
class Mined:
    """Weights of D(a, j) in the loss (how many active triplets use (a, j) as positive / negative) and
    this rank's counts of active triplets, triplets used (the mean's denominator) and candidates."""

    positive_weight: torch.Tensor
    negative_weight: torch.Tensor
    active: torch.Tensor
    used: torch.Tensor
    candidates: torch.Tensor


def _anchor_chunks(view: PairView) -> list[slice]:
    n = view.sq_dist.shape[1]
    step = max(1, _TRIPLET_CHUNK_ELEMENTS // (n * n))
    return [slice(a, a + step) for a in range(0, view.sq_dist.shape[0], step)]


def mine_batch_all(view: PairView, alpha: float) -> Mined:
    sq = view.sq_dist.detach()
    pos_w, neg_w = torch.zeros_like(sq), torch.zeros_like(sq)
    active = torch.zeros((), dtype=torch.int64, device=sq.device)
    candidates = torch.zeros_like(active)
    for rows in _anchor_chunks(view):
        valid = view.positive[rows, :, None] & view.negative[rows, None, :]
        act = valid & (sq[rows, :, None] - sq[rows, None, :] + alpha > 0)
        pos_w[rows] = act.sum(2).to(sq.dtype)
        neg_w[rows] = act.sum(1).to(sq.dtype)
        active += act.sum()
        candidates += valid.sum()
    return Mined(pos_w, neg_w, active, active, candidates)


def mine_batch_hard(view: PairView, alpha: float) -> Mined:
    sq = view.sq_dist.detach()
    far_pos, pos_index = torch.where(view.positive, sq, torch.full_like(sq, -float("inf"))).max(1)
    near_neg, neg_index = torch.where(view.negative, sq, torch.full_like(sq, float("inf"))).min(1)
    has = view.positive.any(1) & view.negative.any(1)
    act = (has & (far_pos - near_neg + alpha > 0)).to(sq.dtype)
    pos_w = torch.zeros_like(sq).scatter_(1, pos_index[:, None], act[:, None])
    neg_w = torch.zeros_like(sq).scatter_(1, neg_index[:, None], act[:, None])
    return Mined(pos_w, neg_w, act.sum(), has.sum(), has.sum())


def mine_semi_hard(view: PairView, alpha: float) -> Mined:
    sq = view.sq_dist.detach()
    pos_w, neg_w = torch.zeros_like(sq), torch.zeros_like(sq)
    for rows in _anchor_chunks(view):
        d_ap, d_an = sq[rows, :, None], sq[rows, None, :]
        band = view.positive[rows, :, None] & view.negative[rows, None, :] & (d_an > d_ap) & (d_an < d_ap + alpha)
        nearest, index = torch.where(band, d_an, torch.full_like(band, float("inf"), dtype=sq.dtype)).min(2)
        chosen = torch.isfinite(nearest).to(sq.dtype)  # [chunk, N]: (a, p) pairs with a semi-hard negative
        pos_w[rows] = chosen
        neg_w[rows] = torch.zeros_like(chosen).scatter_add_(1, index, chosen)
    used = pos_w.sum().to(torch.int64)
    candidates = (view.positive & view.negative.any(1, keepdim=True)).sum()
    return Mined(pos_w, neg_w, used, used, candidates)


MINERS: dict[str, Callable[[PairView, float], Mined]] = {
    "batch_all": mine_batch_all,
    "batch_hard": mine_batch_hard,
    "semi_hard": mine_semi_hard,
}


class TripletLoss(nn.Module):
    """L = max(0, D(a,p) - D(a,n) + alpha) on L2-normalised embeddings, mined over the global batch.

    The hinge is linear where it is active, so the loss is a weighted sum of the anchor rows' squared
    distances with weights counted by the miner (no [N, N, N] tensor is kept for autograd).
    ``last_stats``: {"active_fraction": active / candidates} (a device tensor; see the module doc).
    """

    def __init__(self, margin: float = 0.2, *, mining: Literal["batch_all", "batch_hard", "semi_hard"] = "semi_hard",
                 process_group: ProcessGroup | None = None) -> None:
        super().__init__()
        if not (isinstance(margin, (int, float)) and margin > 0):
            raise ValueError(f"triplet margin must be a number > 0, got {margin!r}")
        if mining not in MINERS:
            raise ValueError(f"mining must be one of {MINING_MODES}, got {mining!r}")
        self.margin, self.mining, self.process_group = float(margin), mining, process_group
        self.last_stats: dict[str, torch.Tensor] = {}

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        view = pair_view(embeddings, labels, self.process_group, normalize=True)
        with torch.no_grad():
            mined = MINERS[self.mining](view, self.margin)
        sq = view.sq_dist
        active = mined.active.to(sq.dtype)  # an int tensor times a float would be float32
        partial = (mined.positive_weight * sq).sum() - (mined.negative_weight * sq).sum() + self.margin * active
        counts = _global_counts([mined.active, mined.used, mined.candidates], self.process_group, sq)
        self.last_stats = {"active_fraction": counts[0] / counts[2].clamp_min(1.0)}
        return sum_partials_with_grad(partial, self.process_group) / counts[1].clamp_min(1.0)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, mining={self.mining}"
