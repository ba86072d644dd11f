"""Memory planner: bytes per rank of a training configuration, before any of it is allocated.

Head terms follow the head's own buffers (largefr.heads): the W slice and its optimizer state on the
largest rank, the sampled rows gathered for the GEMMs, their gradient, the logits buffer (bounded by
``chunk_rows``) and, under autocast, the low-precision copy of the rows. Backbone terms count parameters on
the meta device (no memory), their gradients and optimizer state, and activations saved for backward,
measured by running one 112x112 sample through the backbone with saved-tensor hooks.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from largefr.heads.row_grad import BLOCK_ROWS
from largefr.heads.sampling import num_sampled, shard_range

Precision = Literal["fp32", "bf16", "fp16"]
OPTIMIZER_STATES = {"sgd": 1, "adamw": 2}


@dataclass(frozen=True)
class PlanInput:
    num_classes: int
    embedding_size: int = 512
    world_size: int = 8
    batch_size: int = 128  # per rank
    sample_rate: float = 1.0
    head_optimizer: str = "sgd"
    precision: Precision = "fp32"
    chunk_rows: int | None = None
    backbone: str | None = None
    backbone_optimizer: str = "sgd"
    image_size: int = 112

    def __post_init__(self) -> None:
        for name in ("num_classes", "embedding_size", "world_size", "batch_size", "image_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 <= self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in [0, 1], got {self.sample_rate!r}")
        for name in ("head_optimizer", "backbone_optimizer"):
            if getattr(self, name) not in OPTIMIZER_STATES:
                raise ValueError(f"{name} must be one of {sorted(OPTIMIZER_STATES)}, got {getattr(self, name)!r}")
        if self.chunk_rows is not None and not (isinstance(self.chunk_rows, int) and self.chunk_rows > 0):
            raise ValueError(f"chunk_rows must be a positive int or None, got {self.chunk_rows!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")


@dataclass
class MemoryPlan:
    terms: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.terms.values())


def sampled_rows(inp: PlanInput) -> int:
    """Rows of the largest slice used per step: ceil(r*rows), or all positives if that is more."""
    rows = _largest_slice(inp)
    size = num_sampled(inp.sample_rate, rows)
    if size < min(inp.batch_size * inp.world_size, rows):
        size = min(rows, inp.batch_size * inp.world_size)  # worst case: every positive distinct and here
    return size


def head_workspace_bytes(inp: PlanInput) -> dict[str, int]:
    """The head's per-step temporaries (largefr.heads.workspace slots) on the largest rank."""
    k, d = sampled_rows(inp), inp.embedding_size
    n = inp.batch_size * inp.world_size
    single_chunk = inp.chunk_rows is None or inp.chunk_rows >= n
    terms = {"head: logits buffer": min(inp.chunk_rows or n, n) * k * 4}
    if inp.sample_rate < 1.0:
        terms["head: gathered sampled rows"] = k * d * 4
    if not single_chunk:  # one chunk: the gradient stays factored (logits buffer x embeddings)
        terms["head: sampled-row gradient"] = k * d * 4
    if inp.precision != "fp32":
        terms["head: low-precision rows"] = k * d * 2
    return terms


def plan_memory(inp: PlanInput) -> MemoryPlan:
    rows, d = _largest_slice(inp), inp.embedding_size
    plan = MemoryPlan()
    plan.terms["head: W slice"] = rows * d * 4
    plan.terms["head: optimizer state"] = OPTIMIZER_STATES[inp.head_optimizer] * rows * d * 4
    plan.terms.update(head_workspace_bytes(inp))
    block_rows = min(BLOCK_ROWS, sampled_rows(inp))
    plan.terms["head: optimizer block buffers"] = (OPTIMIZER_STATES[inp.head_optimizer] + 3) * block_rows * d * 4
    if inp.backbone:
        _add_backbone(plan, inp)
    else:
        plan.notes.append("no backbone given: head only")
    return plan


def _largest_slice(inp: PlanInput) -> int:
    start, stop = shard_range(inp.num_classes, inp.world_size, 0)
    return stop - start


def _add_backbone(plan: MemoryPlan, inp: PlanInput) -> None:
    from largefr.models import build_backbone

    with torch.device("meta"):
        params = sum(p.numel() for p in build_backbone(inp.backbone, inp.embedding_size).parameters())
    plan.terms["backbone: parameters"] = params * 4
    plan.terms["backbone: gradients"] = params * 4
    plan.terms["backbone: optimizer state"] = OPTIMIZER_STATES[inp.backbone_optimizer] * params * 4
    per_sample, constant = saved_activation_bytes(inp.backbone, inp.embedding_size, inp.image_size, inp.precision)
    plan.terms["backbone: activations"] = per_sample * inp.batch_size
    if constant:
        plan.terms["backbone: batch-independent saved tensors"] = constant
    plan.notes.append(f"activations measured at two batch sizes: {per_sample / 2**20:.1f} MiB per sample saved for backward")


def saved_activation_bytes(name: str, embedding_size: int, image_size: int, precision: Precision) -> tuple[int, int]:
    """(bytes per image, batch-independent bytes) that autograd saves for backward, not counting the
    parameters themselves (run on CPU, counted by saved-tensor hooks at batch 2 and 4; the part that
    does not grow with the batch is mostly autocast's low-precision weight copies, plus BatchNorm's
    per-channel statistics)."""
    small, large = (_saved_bytes(name, embedding_size, image_size, precision, batch) for batch in (2, 4))
    per_sample = math.ceil(max(0, large - small) / 2)
    return per_sample, max(0, small - 2 * per_sample)


def _saved_bytes(name: str, embedding_size: int, image_size: int, precision: Precision, batch: int) -> int:
    from largefr.models import build_backbone

    torch.manual_seed(0)
    model = build_backbone(name, embedding_size).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    low = {"bf16": torch.bfloat16, "fp16": torch.bfloat16}.get(precision)  # CPU autocast runs bf16
    x = torch.randn(batch, 3, image_size, image_size)  # >= 2: BatchNorm needs more than one value per channel
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=low or torch.float32, enabled=low is not None):
            model(x)
    return sum(seen.values())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-classes", type=int, required=True)
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128, help="per rank")
    parser.add_argument("--sample-rate", type=float, default=1.0)
    parser.add_argument("--head-optimizer", choices=sorted(OPTIMIZER_STATES), default="sgd")
    parser.add_argument("--backbone-optimizer", choices=sorted(OPTIMIZER_STATES), default="sgd")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--chunk-rows", type=int, default=None)
    parser.add_argument("--backbone", default=None, help="e.g. iresnet100 (adds parameters and activations)")


def run(args: argparse.Namespace) -> int:
    inp = PlanInput(
        args.num_classes, args.embedding_size, args.world_size, args.batch_size, args.sample_rate,
        args.head_optimizer, args.precision, args.chunk_rows, args.backbone, args.backbone_optimizer,
    )
    plan = plan_memory(inp)
    width = max(len(k) for k in plan.terms)
    print(f"per-rank memory, {inp.num_classes:,} classes on {inp.world_size} ranks "
          f"({_largest_slice(inp):,} rows on the largest), {sampled_rows(inp):,} sampled rows per step")
    for name, size in plan.terms.items():
        print(f"  {name.ljust(width)}  {size / 2**30:9.3f} GiB")
    print(f"  {'total'.ljust(width)}  {plan.total / 2**30:9.3f} GiB")
    for note in plan.notes:
        print(f"  note: {note}")
    return 0
