"""Memory planner: bytes per rank of a training configuration, before any of it is allocated.

Head terms follow the head's own buffers (largefr.heads): the W slice and its optimizer state on the
largest rank (in their storage dtypes; in host memory when ``storage="host"``), the sampled rows gathered for
the GEMMs (in 16 bits when W is stored in the autocast dtype), their gradient, the logits buffer (bounded by
``chunk_rows``) and, under autocast of fp32 rows, their low-precision copy; with sub-centres (``margin``) S rows
per class and the sub-centre scores, with a non-target transform (CurricularFace, an inter-class filter) its
slope. Backbone terms count parameters on
the meta device (no memory), their gradients and optimizer state, and activations saved for backward,
measured by running one 112x112 sample through the backbone with saved-tensor hooks.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from typing import Literal

import torch

from largefr.heads.factored_grad import keeps_low_precision_factor
from largefr.heads.margins import Margin, build_margin, transforms_nontargets
from largefr.heads.row_grad import block_rows
from largefr.heads.sampling import num_sampled, shard_range

Precision = Literal["fp32", "bf16", "fp16"]
Storage = Literal["device", "host"]
OPTIMIZER_STATES = {"sgd": 1, "adamw": 2}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
    weight_dtype: Precision = "fp32"  # storage of the W slice
    state_dtype: Precision | None = None  # head optimizer state; None: weight_dtype
    storage: Storage = "device"  # "host": W and its state in host memory, only sampled rows on the device
    margin: str = "arcface"  # largefr.heads.margins registry name: sub-centres and a non-target slope add buffers
    margin_params: tuple[tuple[str, float], ...] = ()
    center_loss: bool = False  # a centre-loss term beside the head: fp32 class centres sharded like W, on the device
    compute_device: str = "cuda"  # "cuda" or "cpu": sizes the row blocks (largefr.heads.row_grad.block_rows)

    @functools.cached_property
    def margin_spec(self) -> Margin:
        """The margin the head is built with (largefr.heads.margins.build_margin)."""
        return build_margin(self.margin, **dict(self.margin_params))

    @property
    def sub_centers(self) -> int:
        """W rows per class (sub-centre ArcFace's S; 1 otherwise)."""
        return self.margin_spec.num_sub_centers

    @property
    def nontarget_slope(self) -> bool:
        """The margin transforms non-target logits (CurricularFace, an inter-class filter): an [n, K] fp32 slope
        buffer per chunk."""
        return transforms_nontargets(self.margin_spec)

    @property
    def head_state_dtype(self) -> Precision:
        return self.state_dtype or self.weight_dtype

    @property
    def rows_dtype(self) -> Precision:
        """dtype of the gathered rows: W's 16-bit dtype when the GEMMs run in it, else fp32
        (largefr.heads.sharded_softmax.compute_rows_dtype)."""
        return self.weight_dtype if self.weight_dtype != "fp32" and self.weight_dtype == self.precision else "fp32"

    @property
    def direct(self) -> bool:
        """W is used in place (on the device, in the rows' dtype): nothing is gathered at r = 1."""
        return self.weight_dtype == self.rows_dtype and self.storage == "device"

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
        for name in ("precision", "weight_dtype", "state_dtype"):
            value = getattr(self, name)
            if value not in DTYPE_BYTES and not (name == "state_dtype" and value is None):
                raise ValueError(f"{name} must be fp32, bf16 or fp16, got {value!r}")
        if self.storage not in ("device", "host"):
            raise ValueError(f"storage must be 'device' or 'host', got {self.storage!r}")
        if self.compute_device not in ("cuda", "cpu"):
            raise ValueError(f"compute_device must be 'cuda' or 'cpu', got {self.compute_device!r}")
        object.__setattr__(self, "margin_params", tuple((str(k), v) for k, v in self.margin_params))  # hashable
        self.margin_spec  # an unknown margin or bad parameters: build_margin's ValueError names them


@dataclass
class MemoryPlan:
    terms: dict[str, int] = field(default_factory=dict)  # device memory per rank
    host_terms: dict[str, int] = field(default_factory=dict)  # host memory per rank (host-resident W)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    @property
    def host_total(self) -> int:
        return sum(self.host_terms.values())


def sampled_rows(inp: PlanInput, rank: int = 0) -> int:
    """Rows of ``rank``'s slice (rank 0: the largest) used per step: ceil(r*rows), or all positives if that is more."""
    rows = _slice_rows(inp, rank)
    size = num_sampled(inp.sample_rate, rows)
    if size < min(inp.batch_size * inp.world_size, rows):
        size = min(rows, inp.batch_size * inp.world_size)  # worst case: every positive distinct and here
    return size


def head_workspace_bytes(inp: PlanInput, rank: int = 0) -> dict[str, int]:
    """The head's per-step temporaries (largefr.heads.workspace slots) on ``rank`` (0: the largest).

    k sampled classes have R = S k rows (S sub-centres); a chunk of c batch rows holds [c, k] logits and,
    with sub-centres, [c, R] sub-centre scores and the [c, k] int64 best sub-centre."""
    k, d = sampled_rows(inp, rank), inp.embedding_size
    rows = k * inp.sub_centers
    n = inp.batch_size * inp.world_size
    chunk = min(inp.chunk_rows or n, n)
    terms = {"head: logits buffer": chunk * k * 4}
    if inp.sub_centers > 1:
        terms["head: sub-centre scores"] = chunk * rows * 4
        terms["head: best sub-centre"] = chunk * k * 8
    if inp.nontarget_slope:
        terms["head: non-target slope"] = chunk * k * 4
    if inp.sample_rate < 1.0 or not inp.direct:  # compute rows gathered from the store
        terms["head: gathered sampled rows"] = rows * d * DTYPE_BYTES[inp.rows_dtype]
    if chunk == n:
        pass  # the gradient stays factored: the logits (or scores) buffer x the embeddings
    elif keeps_low_precision_factor(n, d, AUTOCAST_DTYPES.get(inp.precision)):
        terms["head: 16-bit gradient factor"] = n * rows * 2
    else:
        terms["head: sampled-row gradient"] = rows * d * 4
    if inp.precision != inp.rows_dtype:  # the GEMMs' copy of fp32 rows
        terms["head: low-precision rows"] = rows * d * 2
    return terms


def plan_memory(inp: PlanInput, rank: int = 0) -> MemoryPlan:
    """Memory of ``rank`` (default 0, which holds the largest slice)."""
    rows, d = _slice_rows(inp, rank) * inp.sub_centers, inp.embedding_size
    plan = MemoryPlan()
    stored = plan.host_terms if inp.storage == "host" else plan.terms
    stored["head: W slice"] = rows * d * DTYPE_BYTES[inp.weight_dtype]
    stored["head: optimizer state"] = OPTIMIZER_STATES[inp.head_optimizer] * rows * d * DTYPE_BYTES[inp.head_state_dtype]
    plan.terms.update(head_workspace_bytes(inp, rank))
    if inp.center_loss:  # largefr.heads.center.ShardedCenterLoss: one fp32 centre per class of the slice
        plan.terms["center loss: class centres"] = _slice_rows(inp, rank) * d * 4
    # allocated once at full block size (rows, gradient, scratch, one per state), whatever the sample size
    block = block_rows(torch.device(inp.compute_device))
    plan.terms["head: optimizer block buffers"] = (OPTIMIZER_STATES[inp.head_optimizer] + 3) * block * d * 4
    if inp.backbone:
        _add_backbone(plan, inp)
    else:
        plan.notes.append("no backbone given: head only")
    return plan


def largest_slice(inp: PlanInput) -> int:
    return _slice_rows(inp, 0)


def _slice_rows(inp: PlanInput, rank: int) -> int:
    start, stop = shard_range(inp.num_classes, inp.world_size, rank)
    return stop - start


def _add_backbone(plan: MemoryPlan, inp: PlanInput) -> None:
    from largefr.models import build_backbone

    with torch.device("meta"):
        model = build_backbone(inp.backbone, inp.embedding_size)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # e.g. iresnet's fixed BN1d scale
    plan.terms["backbone: parameters"] = params * 4
    plan.terms["backbone: gradients"] = trainable * 4
    plan.terms["backbone: optimizer state"] = OPTIMIZER_STATES[inp.backbone_optimizer] * trainable * 4
    per_sample, constant = saved_activation_bytes(inp.backbone, inp.embedding_size, inp.image_size, inp.precision)  # cached
    plan.terms["backbone: activations"] = per_sample * inp.batch_size
    if constant:
        plan.terms["backbone: batch-independent saved tensors"] = constant
    plan.notes.append(f"activations measured at two batch sizes: {per_sample / 2**20:.1f} MiB per sample saved for backward")


@functools.lru_cache(maxsize=None)
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


def max_classes(inp: PlanInput, device_bytes: int, host_bytes: int | None = None) -> int:
    """The largest class count whose plan fits ``device_bytes`` per rank (and ``host_bytes`` of host
    memory per rank when W is host-resident); every other field of ``inp`` is kept. Bisection: the
    plan grows with the class count."""
    def fits(num_classes: int) -> bool:
        plan = plan_memory(dataclasses.replace(inp, num_classes=num_classes))
        return plan.total <= device_bytes and (host_bytes is None or plan.host_total <= host_bytes)

    low = inp.world_size  # every rank owns a class
    if not fits(low):
        need = plan_memory(dataclasses.replace(inp, num_classes=low)).total
        raise ValueError(
            f"device memory {format_bytes(device_bytes)} fits no layout: {inp.world_size} classes on {inp.world_size} ranks "
            f"already need {format_bytes(need)} per rank (expected at least that much)"
        )
    high = low * 2
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'32GiB', '2TB', '512MiB' or a plain byte count."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"memory size {text!r}: expected a positive number with a unit such as 32GiB, 2TB, 512MiB")
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(size: int) -> str:
    return f"{size / 2**30:.3f} GiB"
