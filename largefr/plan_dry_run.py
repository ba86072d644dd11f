"""``largefr plan --dry-run``: the real head, its optimizer and the backbone at full size, on meta tensors.

For each requested rank of the layout, one process joins torch's fake process group (the "fake" backend
with FakeStore from torch.testing: collectives return at once and move no data) as that rank, builds
:class:`largefr.heads.PartialFC`, its row-sparse optimizer and the backbone with its optimizer under
``torch.device("meta")`` (shapes and dtypes, no memory), and runs one forward, backward and optimizer
step. The bytes of every tensor the step keeps (W slice, optimizer state, the head's workspace slots and
block buffers, backbone parameters, gradients, optimizer state, saved activations) are read from the
objects themselves and set beside the planner's terms.

Where the real code cannot run on meta, this is what is done instead (nothing else differs):
- random draws (W's initial values, Partial FC sampling, stochastic rounding) use no generator: torch
  has no meta generator, and meta tensors hold no values (largefr.heads.weight_store.seeded_generator);
- autocast has no meta device: the head reads the CPU's autocast state for its GEMM dtype, but the
  backbone's own layers are not cast, so under bf16/fp16 its saved activations are counted in fp32;
- host storage is a second meta "device" (``storage_device="meta"``), which takes the same separate
  store code path as host memory;
- torch's fused optimizer kernels have no meta version: the row optimizer gathers, forms the gradient,
  rounds and writes back every block, but skips the in-place update kernel on meta blocks (it allocates
  nothing); the backbone's torch optimizer runs its non-fused path;
- the centre loss (``center_loss``) is built but not run: its forward enters autocast on the embeddings'
  device, and autocast has no meta device;
- a sample smaller than the global batch needs a data-dependent count of distinct positives, which meta
  tensors cannot give: such layouts are refused.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from largefr.memory_plan import AUTOCAST_DTYPES, PlanInput, plan_memory
from largefr.heads.sampling import num_sampled, shard_range

# workspace slot -> planner term
SLOT_TERMS = {
    "logits": "head: logits buffer",
    "w_rows": "head: gathered sampled rows",
    "grad_w": "head: sampled-row gradient",
    "grad_factor": "head: 16-bit gradient factor",
    "sub_scores": "head: sub-centre scores",
    "best_sub": "head: best sub-centre",
    "nontarget_slope": "head: non-target slope",
    "w_gemm": "head: low-precision rows",
}


@dataclass
class DryRun:
    rank: int
    class_range: tuple[int, int]
    sampled_rows: int
    shapes: dict[str, list[int]] = field(default_factory=dict)
    terms: dict[str, int] = field(default_factory=dict)  # device bytes
    host_terms: dict[str, int] = field(default_factory=dict)


@contextmanager
def fake_group(rank: int, world_size: int) -> Iterator[dist.ProcessGroup]:
    """This process as ``rank`` of a fake ``world_size``-rank job (the default group), for the block."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("the dry run needs a process without a process group (it creates a fake one)")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield dist.group.WORLD  # type: ignore[misc]
    finally:
        dist.destroy_process_group()


def check_layout(inp: PlanInput) -> None:
    shard_range(inp.num_classes, inp.world_size, 0)  # fewer classes than ranks: a clear error
    rows = shard_range(inp.num_classes, inp.world_size, inp.world_size - 1)
    smallest = rows[1] - rows[0]
    if inp.sample_rate < 1.0 and num_sampled(inp.sample_rate, smallest) < min(inp.batch_size * inp.world_size, smallest):
        raise ValueError(
            f"sample_rate {inp.sample_rate} keeps {num_sampled(inp.sample_rate, smallest)} of {smallest} rows, fewer than "
            f"the global batch {inp.batch_size * inp.world_size}: the sample size then depends on the labels, which "
            "meta tensors do not have (expected ceil(r * rows) >= global batch for a dry run)"
        )


def dry_run(inp: PlanInput, ranks: Sequence[int] | None = None) -> list[DryRun]:
    """One real step per rank in ``ranks`` (default: the first, largest, and the last) on meta tensors."""
    check_layout(inp)
    chosen = sorted(set(ranks if ranks is not None else (0, inp.world_size - 1)))
    for rank in chosen:
        if not 0 <= rank < inp.world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={inp.world_size})")
    results = []
    for rank in chosen:
        with fake_group(rank, inp.world_size) as group, torch.device("meta"):
            results.append(_one_rank(inp, rank, group))
    return results


def _one_rank(inp: PlanInput, rank: int, group: dist.ProcessGroup) -> DryRun:
    from largefr import PartialFC

    head = PartialFC(
        inp.margin_spec, inp.embedding_size, inp.num_classes, inp.sample_rate, group, chunk_rows=inp.chunk_rows,
        validate=False, weight_dtype=inp.weight_dtype, storage_device="meta" if inp.storage == "host" else None,
    )
    hyper: dict[str, Any] = dict(lr=0.1, momentum=0.9) if inp.head_optimizer == "sgd" else dict(lr=1e-3)
    head_opt = head.optimizer(inp.head_optimizer, state_dtype=inp.state_dtype, **hyper)
    backbone = _Backbone(inp) if inp.backbone else None
    low = AUTOCAST_DTYPES.get(inp.precision)
    with torch.autocast("cpu", dtype=low or torch.bfloat16, enabled=low is not None):
        embeddings = backbone.forward() if backbone else torch.randn(inp.batch_size, inp.embedding_size, requires_grad=True)
        labels = torch.randint(0, inp.num_classes, (inp.batch_size,))
        loss = head(embeddings, labels)
    loss.backward()
    head_opt.step()
    if backbone:
        backbone.step()
    result = DryRun(rank, head.class_range, int(head.sampled_class_ids.numel()))
    stored = result.host_terms if inp.storage == "host" else result.terms
    stored["head: W slice"] = head.weight.nbytes
    stored["head: optimizer state"] = _state_bytes(head_opt)
    for slot, size in head._workspace.slot_bytes().items():
        result.terms[SLOT_TERMS[slot]] = size
    result.terms["head: optimizer block buffers"] = sum(b.nbytes for b in getattr(head_opt, "_blocks", []))
    result.shapes = {"W slice": list(head.weight.shape), "sampled rows": [result.sampled_rows * inp.sub_centers, inp.embedding_size],
                     "global batch": [inp.batch_size * inp.world_size, inp.embedding_size]}
    if inp.center_loss:
        from largefr.heads.center import ShardedCenterLoss

        # built, not run: its forward enters autocast on the embeddings' device, which meta is not; it keeps
        # nothing beyond the centres (the update's temporaries are batch-sized)
        centre_loss = ShardedCenterLoss(inp.num_classes, inp.embedding_size, process_group=group)
        result.terms["center loss: class centres"] = centre_loss.centers.nbytes
    if backbone:
        result.terms.update(backbone.terms())
    return result


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.nbytes for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0)


class _Backbone:
    """The backbone and its torch optimizer on meta; counts the tensors autograd saves for backward."""

    def __init__(self, inp: PlanInput) -> None:
        from largefr.models import build_backbone

        self.inp = inp
        self.model = build_backbone(inp.backbone, inp.embedding_size).train()  # type: ignore[arg-type]
        params = self.model.parameters()
        self.opt = torch.optim.SGD(params, lr=0.1, momentum=0.9) if inp.backbone_optimizer == "sgd" else torch.optim.AdamW(params)
        self.saved: dict[int, int] = {}

    def forward(self) -> torch.Tensor:
        own = {p.untyped_storage()._cdata for p in self.model.parameters()}  # meta storages have no data_ptr

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage._cdata not in own:
                self.saved[storage._cdata] = storage.nbytes()
            return t

        images = torch.randn(self.inp.batch_size, 3, self.inp.image_size, self.inp.image_size)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return self.model(images)

    def step(self) -> None:
        self.opt.step()

    def terms(self) -> dict[str, int]:
        params = list(self.model.parameters())
        return {
            "backbone: parameters": sum(p.nbytes for p in params),
            "backbone: gradients": sum(p.grad.nbytes for p in params if p.grad is not None),
            "backbone: optimizer state": _state_bytes(self.opt),
            "backbone: saved activations": sum(self.saved.values()),
        }


def planned_terms(inp: PlanInput, rank: int) -> tuple[dict[str, int], dict[str, int]]:
    """The planner's (device, host) terms for ``rank``, its two activation terms summed into one."""
    plan = plan_memory(inp, rank)
    terms = dict(plan.terms)
    if inp.backbone:
        terms["backbone: saved activations"] = terms.pop("backbone: activations") + terms.pop(
            "backbone: batch-independent saved tensors", 0)
    return terms, plan.host_terms


def run_dry(inp: PlanInput, ranks: Sequence[int] | None = None) -> list[DryRun]:
    """Run the dry run and print each rank's shapes and bytes beside the planner's terms."""
    results = dry_run(inp, ranks)
    for result in results:
        planned, planned_host = planned_terms(inp, result.rank)
        start, stop = result.class_range
        print(f"rank {result.rank} of {inp.world_size}: classes [{start:,}, {stop:,}), {result.sampled_rows:,} sampled classes; "
              + ", ".join(f"{k} {v}" for k, v in result.shapes.items()))
        for where, measured, want_terms in (("device", result.terms, planned), ("host", result.host_terms, planned_host)):
            for name in dict.fromkeys([*measured, *want_terms]):
                got, want = measured.get(name), want_terms.get(name)
                note = ""
                if got != want:
                    uncast = "activations" in name and inp.precision != "fp32"
                    note = "   (meta: backbone not autocast; planner measured on CPU)" if uncast else "   MISMATCH"
                print(f"  {where}: {name:<34} dry run {_gib(got)}   planner {_gib(want)}{note}")
        print(f"  total device: dry run {_gib(sum(result.terms.values()))}   planner {_gib(sum(planned.values()))}")
    return results


def _gib(value: int | None) -> str:
    return f"{'-':>26}" if value is None else f"{value:>15,} B {value / 2**30:7.3f} GiB"
