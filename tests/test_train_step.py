"""The training step's gradient scale: world size and gradient accumulation do not change the update.

Reference: 1 rank, one batch of 4 images, SGD with momentum and weight decay, 3 steps, with and
without (active) gradient clipping. The same data split as 1 rank x 2 micro-batches, 2 ranks x 2 images,
2 ranks x 2 micro-batches x 1 image: backbone parameters and the global W must match. BatchNorm runs in eval mode (running statistics):
in training mode BN normalises each rank's / micro-batch's images by their own batch statistics, so the
function itself differs with the split, by design (as in any DDP training without SyncBatchNorm).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from largefr.config import config_from_dict
from largefr.distributed import DistContext, allreduce_sum_hook
from largefr.train.build import build_parts
from largefr.train.step import train_step
from multirank import run_ranks

GLOBAL_BATCH, NUM_CLASSES, STEPS = 4, 10, 3


CLIP = 2.0  # below the gradient norms of these steps: clipping is active


def tiny_config(**train: object) -> object:
    return config_from_dict({
        "model": {"name": "iresnet18", "kwargs": {"base_width": 4}},
        "head": {"embedding_size": 16, "num_classes": NUM_CLASSES, "sample_rate": 1.0,
                 "margin": "cosface", "margin_params": {"scale": 16.0, "margin": 0.2}},
        "optim": {"backbone": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
                  "head": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}},
        "schedule": {"warmup_steps": 1, "total_steps": 10},
        "train": {"precision": "fp32", "seed": 7, **train},
    })


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    return [(torch.randint(0, 256, (GLOBAL_BATCH, 3, 112, 112), dtype=torch.uint8, generator=g),
             torch.randint(0, NUM_CLASSES, (GLOBAL_BATCH,), generator=g))
            for _ in range(STEPS)]


def run_split(ctx, accum: int, clip: float | None) -> dict:
    """Train STEPS steps on this rank's share of every global batch, cut into ``accum`` micro-batches."""
    parts = build_parts(tiny_config(grad_accum=accum, clip_grad_norm=clip), ctx, steps_per_epoch=10)
    parts.ddp.eval()  # frozen BN statistics, see module doc
    initial = {k: v.clone() for k, v in parts.model.state_dict().items()}
    per_rank = GLOBAL_BATCH // ctx.world_size
    losses, norms = [], []
    for images, labels in global_batches():
        mine = slice(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)
        x, y = images[mine], labels[mine]
        micro = [(x[i::accum], y[i::accum]) for i in range(accum)]
        result = train_step(parts, micro)
        losses.append(float(result.loss))
        norms.append(float(result.grad_norm))
    return {
        "backbone": {k: v.clone() for k, v in parts.model.state_dict().items()},
        "initial": initial,
        "weight": parts.head.weight.detach().clone(),
        "class_range": parts.head.class_range,
        "losses": losses,
        "grad_norms": norms,
    }


def splits(ctx) -> dict:
    return {(accum, clip): run_split(ctx, accum, clip) for accum in (1, 2) for clip in (None, CLIP)}


def one_and_two_ranks(ctx) -> dict:
    """The 2-rank runs, then (one process spawn less) the 1-rank runs on rank 0 in a group of its own."""
    runs = {"two": splits(ctx), "mean_hook": mean_hook_run(ctx), "fp16": fp16_overflow_run(ctx)}
    solo_group = dist.new_group([0])  # collective: every rank calls it
    if ctx.rank == 0:
        solo = DistContext(0, 1, 0, ctx.backend, ctx.device, solo_group)
        runs["one"] = splits(solo)
    dist.barrier(group=ctx.group)
    return runs


def assert_same_training(ref: dict, ranks: list[dict], what: str) -> None:
    torch.testing.assert_close(ranks[0]["backbone"], ref["backbone"], rtol=1e-4, atol=3e-5, msg=what)
    weight = torch.cat([r["weight"] for r in sorted(ranks, key=lambda r: r["class_range"])])
    torch.testing.assert_close(weight, ref["weight"], rtol=1e-4, atol=3e-5, msg=what)
    # the mean loss of a step is the mean over the global batch, however it is split
    assert ranks[0]["losses"] == pytest.approx(ref["losses"], rel=1e-5), what


@pytest.fixture(scope="module")
def results() -> list[dict]:
    """Everything trained once, in one spawn of 2 ranks (the 1-rank runs included)."""
    return run_ranks(one_and_two_ranks, 2)


@pytest.mark.slow
def test_world_size_and_accumulation_give_the_same_update(results):
    one, two = results[0]["one"], [r["two"] for r in results]
    for clip in (None, CLIP):
        ref = one[1, clip]
        moved = max((ref["backbone"][k] - ref["initial"][k]).abs().max().item() for k in ref["initial"])
        assert moved > 1e-3  # the steps changed the network far beyond the tolerance
        assert_same_training(ref, [one[2, clip]], f"1 rank, 2 micro-batches, clip {clip}")
        assert_same_training(ref, [two[0][1, clip], two[1][1, clip]], f"2 ranks, clip {clip}")
        assert_same_training(ref, [two[0][2, clip], two[1][2, clip]], f"2 ranks, 2 micro-batches, clip {clip}")
        torch.testing.assert_close(two[0][2, clip]["backbone"], two[1][2, clip]["backbone"], rtol=0, atol=0)
    assert min(one[1, CLIP]["grad_norms"]) > CLIP  # clipping was active in every step
    assert one[1, None]["grad_norms"] == [0.0] * STEPS  # no norm is computed without clipping
    # DDP's default hook (average over ranks) would give half the backbone gradient: detected
    averaged = results[0]["mean_hook"]
    assert max((averaged[k] - one[1, None]["backbone"][k]).abs().max().item() for k in averaged) > 1e-3


def mean_hook_run(ctx) -> dict:
    """2-rank training as in run_split but with DDP's default (averaging) hook: must NOT match."""
    parts = build_parts(tiny_config(clip_grad_norm=None), ctx, steps_per_epoch=10)
    from torch.nn.parallel import DistributedDataParallel

    parts.ddp = DistributedDataParallel(parts.model, process_group=ctx.group)
    parts.ddp.eval()
    per_rank = GLOBAL_BATCH // ctx.world_size
    for images, labels in global_batches():
        mine = slice(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)
        train_step(parts, [(images[mine], labels[mine])])
    return {k: v.clone() for k, v in parts.model.state_dict().items()}


def fp16_overflow_run(ctx) -> dict:
    """fp16 with a loss scale so large that the gradients overflow, then a normal one."""
    parts = build_parts(tiny_config(precision="fp16"), ctx, steps_per_epoch=10)
    scaler = parts.precision.scaler
    scaler.load_state_dict({"enabled": True, "scale": 2.0**100, "growth_tracker": 0})
    weights = lambda: [p.detach().clone() for p in parts.model.parameters()] + [parts.head.weight.detach().clone()]
    before = weights()
    (x, y), = global_batches()[:1]
    mine = slice(ctx.rank * 2, ctx.rank * 2 + 2)
    first = train_step(parts, [(x[mine], y[mine])])
    after_overflow, scale_after_overflow = weights(), scaler.get_scale()
    scaler.load_state_dict({"enabled": True, "scale": 2.0**8, "growth_tracker": 0})
    second = train_step(parts, [(x[mine], y[mine])])
    return {
        "skipped": (float(first.skipped), float(second.skipped)),
        "unchanged_after_overflow": all(torch.equal(a, b) for a, b in zip(before, after_overflow)),
        "changed_after_normal_step": sum(not torch.equal(a, b) for a, b in zip(after_overflow, weights())),
        "scales": (scale_after_overflow, scaler.get_scale()),
        "loss": float(second.loss),
    }


@pytest.mark.slow
def test_fp16_overflow_skips_the_step_on_every_rank(results):
    for r in (r["fp16"] for r in results):
        assert r["skipped"] == (1.0, 0.0) and r["unchanged_after_overflow"]
        assert r["changed_after_normal_step"] > 10 and r["scales"] == (2.0**99, 2.0**8)
        assert 0 < r["loss"] < 100


def test_sum_hook_has_the_signature_ddp_checks():
    import inspect

    sig = inspect.signature(allreduce_sum_hook)
    assert sig.parameters["bucket"].annotation is torch.distributed.GradBucket
