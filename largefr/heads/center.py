"""Centre loss (Wen et al., ECCV 2016) with the class centres sharded by class exactly like W.

Rank r owns the centres of classes ``shard_range(C, world, r)`` (the head's ranges, uneven allowed). Per
step the global batch is gathered; each rank scores the rows whose class it owns and the partial sums
are summed over ranks:

    L_c = 1/2 * sum_i ||x_i - c_{y_i}||^2 / B_global          (the config weight is the paper's lambda)

so dL_c/dx_i = (x_i - c_{y_i}) / B_global, as in one process. Centres are not trained by gradient but by
the paper's rule over the global batch, only for the classes present in it (cost follows the batch):

    delta c_j = sum_{i: y_i = j} (c_j - x_i) / (1 + n_j),    c_j <- c_j - alpha * delta c_j

applied in every training-mode forward (each micro-batch under gradient accumulation), after the loss
has read the old centres. Centres start at zero (the same for any world size). ``normalize=True``
measures L2-normalised embeddings instead of raw ones (the paper uses raw features).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from largefr.distributed import all_gather_rows, gather_rows_with_grad, group_rank, group_size, sum_partials_with_grad
from largefr.heads.input_checks import check_embeddings_and_labels
from largefr.heads.sampling import shard_range


class ShardedCenterLoss(nn.Module):
    """``loss = centre_loss(embeddings [B, D], labels [B])``: the global-batch mean above, same on every rank.

    ``centers`` (a buffer, [local classes, D]) is this rank's slice; ``class_range`` its global classes.
    """

    def __init__(self, num_classes: int, embedding_size: int, alpha: float = 0.5, *, normalize: bool = False,
                 process_group: ProcessGroup | None = None) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("embedding_size", embedding_size)):
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"centre update rate alpha must be a number in [0, 1], got {alpha!r}")
        self.num_classes, self.embedding_size, self.alpha = num_classes, embedding_size, float(alpha)
        self.normalize, self.process_group = normalize, process_group
        start, stop = shard_range(num_classes, group_size(process_group), group_rank(process_group))
        self.class_range: tuple[int, int] = (start, stop)
        self.register_buffer("centers", torch.zeros(stop - start, embedding_size))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._check_inputs(embeddings, labels)
        with torch.autocast(embeddings.device.type, enabled=False):
            x_all = gather_rows_with_grad(embeddings.to(torch.promote_types(embeddings.dtype, torch.float32)),
                                          self.process_group)
            if self.normalize:
                x_all = F.normalize(x_all, dim=1)
            labels_all = all_gather_rows(labels.long(), self.process_group)
            start, stop = self.class_range
            owned = (labels_all >= start) & (labels_all < stop)
            local = (labels_all - start).clamp(0, stop - start - 1)  # any row for classes owned elsewhere
            centres = self.centers.index_select(0, local).to(x_all.dtype)  # a copy: the update below is safe
            sq = (x_all - centres).square().sum(1) * owned
            loss = sum_partials_with_grad(0.5 * sq.sum(), self.process_group) / x_all.shape[0]
        if self.training and self.alpha > 0:
            with torch.no_grad():
                self._update(x_all.detach(), labels_all, local, owned, centres)
        return loss

    def _update(self, x: torch.Tensor, labels: torch.Tensor, local: torch.Tensor, owned: torch.Tensor,
                centres: torch.Tensor) -> None:
        """The paper's rule for the owned classes of the batch, without a pass over the whole slice."""
        order = torch.argsort(labels, stable=True)
        sorted_labels = labels[order]
        starts_group = torch.ones_like(sorted_labels, dtype=torch.bool)
        starts_group[1:] = sorted_labels[1:] != sorted_labels[:-1]
        group_sorted = torch.cumsum(starts_group.long(), 0) - 1
        group = torch.empty_like(group_sorted).scatter_(0, order, group_sorted)  # group id of every row
        n = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device).index_add_(0, group, torch.ones_like(x[:, 0]))
        sums = torch.zeros_like(x).index_add_(0, group, x)
        # sum_{i: y_i = j} (c_j - x_i) = n_j c_j - sum x_i, per row of the batch (same value within a class)
        delta = (n[group, None] * centres - sums[group]) / (1.0 + n[group, None])
        first = torch.zeros_like(owned)
        first[order] = starts_group  # one row per class applies its class's update
        weight = (first & owned).to(x.dtype)[:, None]
        self.centers.index_add_(0, local, (-self.alpha * delta * weight).to(self.centers.dtype))

    def _check_inputs(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        check_embeddings_and_labels(embeddings, labels, self.embedding_size)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, class_range={self.class_range}, alpha={self.alpha}, "
                f"normalize={self.normalize}")
