"""Partial FC: the class-weight matrix sharded over ranks, with optional sampling of class centres.

Step (see shared DESIGN): all-gather embeddings (autograd; backward reduce-scatter) and labels; choose
this rank's class rows (all, or positives + uniform negatives); logits of the global batch against them;
the margin on targets this rank owns; softmax cross-entropy with all-reduces of max and sum
(largefr.heads.sharded_softmax). The W gradient is row-sparse: it is recorded per step as
(row ids, rows) and consumed by the head's own optimizers (largefr.heads.row_optim).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed import ProcessGroup

from largefr.distributed import (
    all_gather_rows,
    gather_rows_with_grad,
    group_rank,
    group_size,
)
from largefr.heads.input_checks import check_embeddings_and_labels, check_labels
from largefr.heads.factored_grad import FactoredWeightGrad
from largefr.heads.margin_base import Margin
from largefr.heads.margin_runtime import (
    STATE_PREFIX,
    expand_sub_center_rows,
    margin_step,
    sample_regularizer_loss,
    state_buffers,
)
from largefr.heads.row_grad import SparseRowGrad, block_rows, merge_row_grads
from largefr.heads.row_optim import build_row_optimizer
from largefr.heads.row_selection import RowGatherer, RowSelection
from largefr.heads.sharded_softmax import ShardedMarginSoftmaxCE, ShardedSoftmaxSpec, compute_rows_dtype, gemm_dtype
from largefr.heads.sampling import init_weight_rows, sample_classes, shard_range
from largefr.heads.weight_store import WeightStore, resolve_device, resolve_dtype, seeded_generator
from largefr.heads.workspace import Lease, Workspace
from largefr.seeding import derive_seed


class PartialFC(nn.Module):
    """Model-parallel margin-softmax head. ``loss = head(embeddings [B, D], labels [B])``.

    Args:
        margin: a largefr.margins object (normalisations, scale, target transform).
        embedding_size: D.
        num_classes: C, split over the ranks of ``process_group`` (uneven sizes allowed).
        sample_rate: fraction r of this rank's classes used per step (positives always kept).
            1 uses every class; 0 uses only the positives of the global batch.
        process_group: the group W is sharded over and the batch is gathered over; None when the job
            is not distributed.
        seed: seeds W's initial value (identical global matrix for any world size) and the sampling.
        chunk_rows: if set, at most this many batch rows of fp32 logits are held at once (the logits are
            recomputed in backward; results are the same); the W gradient's factor G [N, S*k] is then kept
            whole in the GEMMs' 16-bit dtype when that is smaller than an fp32 [S*k, D] gradient (2N < 4D).
        validate: each step, check that every rank brings the same batch size (a tiny all-gather), and
            the label range and finiteness of the gathered batch (host syncs). Without it, unequal batch
            sizes fail inside the collective. Shape and dtype checks always run.
        weight_dtype: storage dtype of the W slice (torch.float32, bfloat16 or float16, or "fp32"/"bf16"/"fp16").
            Sampled rows are gathered in fp32 (kept in 16 bits when autocast runs the GEMMs in W's own dtype),
            updated in fp32 and written back by the optimizer with stochastic rounding.
        storage_device: where W (and its optimizer state) lives, e.g. "cpu" for host-resident weights
            while the module (the compute device) is moved elsewhere with ``.to()``; pinned when the compute
            device is an accelerator. Only the sampled rows travel (largefr.heads.weight_store). None: W
            lives on the module's device.

    ``head.training_forwards`` counts training-mode forwards (micro-batches under gradient accumulation); margins
    that anneal (SphereFace's lambda) follow it.
    """

    def __init__(
        self,
        margin: Margin,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        process_group: ProcessGroup | None = None,
        seed: int = 0,
        chunk_rows: int | None = None,
        validate: bool = True,
        weight_dtype: torch.dtype | str = torch.float32,
        storage_device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        _check_args(margin, embedding_size, num_classes, sample_rate, chunk_rows)
        self.margin, self.embedding_size, self.num_classes = margin, embedding_size, num_classes
        self.sample_rate, self.process_group, self.seed = float(sample_rate), process_group, seed
        self.chunk_rows, self.validate = chunk_rows, validate
        self.rank, self.world_size = group_rank(process_group), group_size(process_group)
        start, stop = shard_range(num_classes, self.world_size, self.rank)
        self.class_range: tuple[int, int] = (start, stop)
        self.sub_centers = margin.num_sub_centers  # S rows of W per class, consecutive
        rows = self.row_range
        self.store = WeightStore(resolve_dtype(weight_dtype, "weight_dtype"), resolve_device(storage_device))
        initial = init_weight_rows(rows[0], rows[1], embedding_size, seed, self.store.dtype)
        if self.store.device is not None:
            initial = initial.to(self.store.device)
        self.weight = nn.Parameter(initial, requires_grad=False)
        for name, value in state_buffers(margin).items():  # EMAs: identical on every rank, checkpointed
            self.register_buffer(name, value)
        # a 0-size leaf that makes the loss require grad, so backward runs even for frozen embeddings
        self.grad_anchor = nn.Parameter(torch.zeros(0))
        self.training_forwards = 0
        self.sampled_class_ids: torch.Tensor | None = None
        self._generator: torch.Generator | None = None
        self._pending: list[SparseRowGrad] = []
        self._workspace = Workspace()
        self._prefetched: RowSelection | None = None
        self._gatherer = RowGatherer()

    @property
    def compute_device(self) -> torch.device:
        """The device the step runs on (the module's device; W's own when it is not stored separately)."""
        return self.grad_anchor.device

    def _apply(self, fn: Any, recurse: bool = True) -> "PartialFC":
        # .to() moves the module (the compute device) but not separately stored weights
        if not self.store.separate:
            return super()._apply(fn, recurse)
        weight = self._parameters.pop("weight")
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = weight
        self.weight.data = self.store.pin(self.weight.data, self.compute_device)
        return self

    @property
    def num_local_classes(self) -> int:
        return self.class_range[1] - self.class_range[0]

    @property
    def row_range(self) -> tuple[int, int]:
        """[start, stop) of this rank's rows of the global W [S * num_classes, D] (S sub-centres per class)."""
        return self.class_range[0] * self.sub_centers, self.class_range[1] * self.sub_centers

    @property
    def margin_state(self) -> dict[str, torch.Tensor]:
        """The margin's state (EMAs) by name: the head's ``margin_<name>`` buffers."""
        return {n[len(STATE_PREFIX):]: b for n, b in self.named_buffers(recurse=False) if n.startswith(STATE_PREFIX)}

    def prefetch(self, labels: torch.Tensor) -> None:
        """Choose this step's W rows from its labels before the embeddings exist (e.g. before the backbone's
        forward): gathers the labels over the group and draws the sample now; with a separately stored W
        the rows are gathered on a worker thread while the caller goes on (largefr.heads.row_selection).
        The next ``forward`` must get this same labels tensor; results are those of a forward without it."""
        if self._prefetched is not None:
            raise RuntimeError("prefetch() was called twice without a forward in between")
        check_labels(labels)
        if labels.device != self.compute_device:
            raise ValueError(f"labels ({labels.device}) must be on the head's compute device {self.compute_device}")
        self._prefetched = self._select(labels, background=self.store.separate)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._check_inputs(embeddings, labels)
        selection, self._prefetched = self._prefetched, None
        if selection is not None and selection.labels is not labels:
            raise ValueError("forward() got another labels tensor than the one given to prefetch() for this step")
        if selection is None:
            selection = self._select(labels, background=False)
        x_all = gather_rows_with_grad(embeddings.float(), self.process_group)
        if x_all.data_ptr() == embeddings.data_ptr():
            # one rank, fp32: the factored W gradient keeps x until the optimizer step, so it must not
            # alias a tensor the caller may change first (e.g. embeddings updated by their own optimizer)
            x_all = x_all.clone()
        if self.validate and not bool(torch.isfinite(x_all).all()):  # host sync, same verdict on every rank
            raise ValueError("embeddings contain NaN or Inf")
        x_op = x_all
        if self.margin.normalize_features:
            x_op = x_all * (self.margin.feature_scale / torch.linalg.vector_norm(x_all, dim=1, keepdim=True).clamp_min(1e-12))
        hooks = margin_step(self.margin, x_all, self.training_forwards, self.seed, self.training, self.margin_state)
        selection.wait()
        ids, w_rows = selection.ids, selection.rows
        sink = functools.partial(self._record_grad, ids, w_rows if ids is not None else None, selection.leases)
        spec = ShardedSoftmaxSpec(
            group=self.process_group, num_rows=x_all.shape[0], normalize_weight=self.margin.normalize_weight,
            target_fn=hooks.target_fn, chunk_rows=self.chunk_rows, workspace=self._workspace, grad_sink=sink,
            w_inv_norm=selection.inv_norm, sub_centers=self.sub_centers, row_params=hooks.row_params,
            nontarget=hooks.nontarget, nontarget_needs_target_cosine=hooks.needs_target_cosine,
        )
        loss = ShardedMarginSoftmaxCE.apply(x_op, x_all, w_rows, selection.cols, self.grad_anchor, spec)
        regularizer = sample_regularizer_loss(self.margin, embeddings, x_all)
        if regularizer is not None:
            loss = loss + regularizer
        if self.training:
            self.training_forwards += 1
        return loss

    def _select(self, labels: torch.Tensor, background: bool) -> RowSelection:
        """Gather the labels, check them, draw this rank's rows and gather them (inline or in the background)."""
        if self.validate:
            _check_batch_sizes(labels.shape[0], labels.device, self.process_group)
        labels_all = all_gather_rows(labels.long(), self.process_group)
        if self.validate:
            _check_label_range(labels_all, self.num_classes)
        start, stop = self.class_range
        owned = (labels_all >= start) & (labels_all < stop)
        local_labels = labels_all - start
        weight, device = self.weight.detach(), self.compute_device
        rows_dtype = compute_rows_dtype(self.store.dtype, gemm_dtype(device))
        no_target = torch.full_like(local_labels, -1)
        if self.sample_rate >= 1.0 and self.store.is_direct(weight, device, rows_dtype):
            self.sampled_class_ids = torch.arange(start, stop, device=device)
            return RowSelection(labels, None, torch.where(owned, local_labels, no_target), weight, None)
        if self.sample_rate >= 1.0:  # every row, gathered from the store into compute rows
            class_ids = torch.arange(self.num_local_classes, device=device)
            cols = torch.where(owned, local_labels, no_target)
        else:
            # in eval mode the draw comes from a generator of its own: evaluating never shifts the training draws
            rng = self._rng(device) if self.training else self._eval_rng(device)
            class_ids, cols = sample_classes(local_labels, owned, self.num_local_classes, self.sample_rate, rng)
        self.sampled_class_ids = class_ids + start
        ids = expand_sub_center_rows(class_ids, self.sub_centers)  # Partial FC samples classes, not sub-centres
        rows, lease = self._workspace.take("w_rows", (ids.numel(), self.embedding_size), rows_dtype, device)
        inv_norm = torch.empty(ids.numel(), device=device) if self.margin.normalize_weight else None
        selection = RowSelection(labels, ids, cols, rows, inv_norm, (lease,))
        gather = functools.partial(self._gather_rows, weight, ids, rows, inv_norm)
        if background:
            selection.pending, selection.stream = self._gatherer.start(gather, device)
        else:
            gather()
        return selection

    def _gather_rows(self, weight: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, inv_norm: torch.Tensor | None) -> None:
        """W rows ``ids`` into ``rows`` (fp32, or W's 16-bit dtype when the GEMMs run in it: compute_rows_dtype)
        and their 1/||row||, in blocks so each block's norms are taken while it is still in cache."""
        step = block_rows(rows.device)
        for a in range(0, ids.numel(), step):
            block = rows[a : a + step]
            self.store.read_rows(weight, ids, a, a + step, block)
            if inv_norm is not None:
                torch.linalg.vector_norm(block, dim=1, dtype=torch.float32, out=inv_norm[a : a + step])
        if inv_norm is not None:
            inv_norm.clamp_min_(1e-12).reciprocal_()

    def _rng(self, device: torch.device) -> torch.Generator | None:
        if self._generator is None or self._generator.device != device:
            self._generator = seeded_generator(device, derive_seed(self.seed, "head_sampling", self.rank))
        return self._generator

    def _eval_rng(self, device: torch.device) -> torch.Generator | None:
        """Seeded by (seed, rank, training step): the same eval draw for the same model state."""
        return seeded_generator(device, derive_seed(self.seed, "head_eval_sampling", self.rank, self.training_forwards))

    def _record_grad(
        self, ids: torch.Tensor | None, rows: torch.Tensor | None, leases: tuple[Lease, ...],
        weight_grad: FactoredWeightGrad, grad_leases: tuple[Lease, ...],
    ) -> None:
        self._pending.append(SparseRowGrad(ids, rows, factored=weight_grad, leases=(*leases, *grad_leases)))

    def row_grad(self) -> SparseRowGrad | None:
        """The W gradient accumulated since the last zero_grad, merged over backward passes and formed."""
        if not self._pending:
            return None
        if len(self._pending) > 1:
            self._pending = [merge_row_grads(self._pending, self.weight.detach())]
        self._pending[0].materialize(self.weight.detach())
        return self._pending[0]

    def take_row_grad(self) -> SparseRowGrad | None:
        """Hand the pending gradient to an optimizer (still factored when there was one backward pass)."""
        if len(self._pending) > 1:
            self._pending = [merge_row_grads(self._pending, self.weight.detach())]
        grad = self._pending[0] if self._pending else None
        self._pending = []
        return grad

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._pending = []

    def optimizer(self, name: str, **hyper: Any) -> "torch.optim.Optimizer":
        """Row-sparse optimizer for W: ``"sgd"`` (lr, momentum, weight_decay, nesterov) or ``"adamw"``."""
        return build_row_optimizer(self, name, **hyper)

    def load_margin_state(self, state: dict[str, torch.Tensor]) -> None:
        """Set the margin's state (replicated: the same at any world size); every name must be known."""
        own = self.margin_state
        unknown = set(state) - set(own)
        if unknown or (state and set(state) != set(own)):
            raise ValueError(f"margin state {sorted(state)} does not match {type(self.margin).__name__}'s {sorted(own)}")
        with torch.no_grad():
            for name, value in state.items():
                own[name].copy_(value)

    def get_extra_state(self) -> dict[str, Any]:
        rng = None if self._generator is None else self._generator.get_state()
        return {"training_forwards": self.training_forwards, "class_range": self.class_range, "num_classes": self.num_classes, "rng": rng}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if tuple(state["class_range"]) != self.class_range or state["num_classes"] != self.num_classes:
            raise ValueError(
                f"checkpoint slice {tuple(state['class_range'])} of {state['num_classes']} classes does not match "
                f"this head's {self.class_range} of {self.num_classes}"
            )
        self.training_forwards = int(state.get("training_forwards", state.get("step", 0)))
        if state.get("rng") is not None:
            self._rng(self.compute_device).set_state(state["rng"])

    def _check_inputs(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        check_embeddings_and_labels(embeddings, labels, self.embedding_size)
        if embeddings.device != self.compute_device or labels.device != self.compute_device:
            raise ValueError(
                f"embeddings ({embeddings.device}) and labels ({labels.device}) must be on the head's "
                f"compute device {self.compute_device}"
            )

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"class_range={self.class_range}, sample_rate={self.sample_rate}, world_size={self.world_size}, "
            f"weight_dtype={self.store.dtype}, storage_device={self.store.device}"
        )


def _check_args(margin: Margin, embedding_size: int, num_classes: int, sample_rate: float, chunk_rows: int | None) -> None:
    if not isinstance(margin, Margin):
        raise TypeError(f"margin must be a largefr margin object (e.g. margins.ArcFace()), got {margin!r}")
    if not (isinstance(embedding_size, int) and embedding_size > 0):
        raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
    if not (isinstance(num_classes, int) and num_classes > 0):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not 0.0 <= float(sample_rate) <= 1.0:
        raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate!r}")
    if chunk_rows is not None and not (isinstance(chunk_rows, int) and chunk_rows > 0):
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")


def _check_batch_sizes(batch: int, device: torch.device, group: ProcessGroup | None) -> None:
    """Every rank must bring the same batch size: the row all-gather has no other way to tell them apart."""
    sizes = all_gather_rows(torch.tensor([batch], device=device), group)
    if (sizes != batch).any():
        raise ValueError(
            f"ranks hold different batch sizes {sizes.tolist()}; the head needs the same B on every rank "
            "(drop or pad the last batch)"
        )


def _check_label_range(labels: torch.Tensor, num_classes: int) -> None:
    """Range check on the gathered labels (same verdict on every rank; one host sync)."""
    low, high = (int(v) for v in torch.aminmax(labels))
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(f"label {bad} is outside [0, num_classes={num_classes})")
