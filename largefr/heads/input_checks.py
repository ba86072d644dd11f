"""The one shape and dtype check of what every loss module takes: embeddings [B, D] and class ids [B]."""
from __future__ import annotations

import torch


def check_embeddings_and_labels(embeddings: torch.Tensor, labels: torch.Tensor, embedding_size: int | None = None) -> None:
    """Raise naming the value unless embeddings are floating [B, D] (D = ``embedding_size`` when given),
    B >= 1, and labels are int64/int32 [B]."""
    width = "D" if embedding_size is None else str(embedding_size)
    if embeddings.dim() != 2 or embeddings.shape[0] == 0 or (
        embedding_size is not None and embeddings.shape[1] != embedding_size
    ):
        raise ValueError(f"embeddings must be [B, {width}] with B >= 1, got {list(embeddings.shape)}")
    if not embeddings.is_floating_point():
        raise TypeError(f"embeddings must be a floating-point tensor, got {embeddings.dtype}")
    check_labels(labels, embeddings.shape[0])


def check_labels(labels: torch.Tensor, batch: int | None = None) -> None:
    """Raise naming the value unless labels are int64/int32 [B] (B = ``batch`` when given, else >= 1)."""
    size = "B" if batch is None else f"B={batch}"
    if labels.dim() != 1 or labels.shape[0] == 0 or (batch is not None and labels.shape[0] != batch):
        raise ValueError(f"labels must be [{size}] with B >= 1, got {list(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 (or int32) class ids, got {labels.dtype}")
