"""PartialFC.prefetch(labels): the rows chosen (and, with separate storage, gathered on a worker thread)
before the embeddings exist give the same bits as a forward that does it all itself."""
from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch

from largefr import PartialFC
from multirank import run_ranks
from reference import ALL_MARGINS

NUM_CLASSES, DIM, BATCH, SEED = 31, 16, 5, 5
# (sample rate, W dtype, storage device, autocast dtype): 16-bit rows under matching autocast included
CASES = [(1.0, "fp32", None, None), (0.4, "fp32", "cpu", None), (0.4, "bf16", "cpu", torch.bfloat16),
         (1.0, "bf16", "cpu", None), (0.4, "bf16", None, torch.bfloat16)]


def train_steps(ctx: Any, case: tuple[Any, ...], prefetch: bool, margin: Any = ALL_MARGINS[6],
                num_classes: int = NUM_CLASSES, batch: int = BATCH) -> dict[str, Any]:
    """Three SGD steps of a head on ``ctx.device`` for ``case`` = (rate, W dtype, storage device, autocast)."""
    rate, name, storage, autocast = case
    head = PartialFC(margin, DIM, num_classes, rate, ctx.group, seed=SEED, weight_dtype=name,
                     storage_device=storage).to(ctx.device)
    opt = head.optimizer("sgd", lr=0.3, momentum=0.9)
    gen = torch.Generator().manual_seed(100 + ctx.rank)
    losses, grads = [], []
    for _ in range(3):
        x = torch.randn(batch, DIM, generator=gen).to(ctx.device).requires_grad_(True)
        labels = torch.randint(0, num_classes, (batch,), generator=gen).to(ctx.device)
        amp = torch.autocast(ctx.device.type, dtype=autocast) if autocast else contextlib.nullcontext()
        with amp:
            if prefetch:
                head.prefetch(labels)
            loss = head(x, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        grads.append(x.grad.cpu())
    return dict(losses=losses, grads=grads, weight=head.weight.detach().cpu().clone(),
                momentum=opt.state[head.weight]["momentum_buffer"].cpu().clone())


def _both(ctx: Any) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(train_steps(ctx, case, False), train_steps(ctx, case, True)) for case in CASES]


@pytest.mark.parametrize("world_size", [1, 2])
def test_prefetched_rows_give_the_same_bits(world_size: int) -> None:
    for per_rank in run_ranks(_both, world_size):
        for case, (inline, early) in zip(CASES, per_rank):
            assert_same_run(inline, early, case)


def assert_same_run(a: dict[str, Any], b: dict[str, Any], case: Any) -> None:
    assert a["losses"] == b["losses"], case
    for x, y in zip(a["grads"], b["grads"]):
        assert torch.equal(x, y), case
    assert torch.equal(a["weight"], b["weight"]), case
    assert torch.equal(a["momentum"], b["momentum"]), case


def test_prefetch_misuse_is_a_clear_error() -> None:
    head = PartialFC(ALL_MARGINS[0], DIM, NUM_CLASSES, 0.5, storage_device="cpu")
    labels = torch.tensor([1, 2, 3])
    with pytest.raises(TypeError, match="labels must be int64"):
        head.prefetch(labels.float())
    with pytest.raises(ValueError, match=r"labels must be \[B\] with B >= 1, got \[3, 1\]"):
        head.prefetch(labels[:, None])
    head.prefetch(labels)
    with pytest.raises(RuntimeError, match="prefetch\\(\\) was called twice"):
        head.prefetch(labels)
    with pytest.raises(ValueError, match="another labels tensor"):
        head(torch.randn(3, DIM), labels.clone())
    head.prefetch(labels)  # the failed forward dropped the selection; a new step starts cleanly
    assert head(torch.randn(3, DIM), labels).isfinite()
    with pytest.raises(ValueError, match="outside \\[0, num_classes=31\\)"):
        head.prefetch(torch.tensor([0, 31]))
