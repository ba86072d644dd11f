"""PartialFC on 1-4 gloo ranks equals the float64 single-process reference: loss, embedding and W grads."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from largefr import PartialFC
from largefr.heads.sampling import init_weight_rows
from multirank import run_ranks
from reference import ALL_MARGINS, reference_loss_and_grads

NUM_CLASSES, DIM, BATCH, SEED = 23, 16, 5, 7
RATES = (1.0, 0.5, 0.0)


def global_batch(world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234 + world_size)
    x = torch.randn(world_size * BATCH, DIM, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (world_size * BATCH,), generator=gen)
    return x, labels


def _run_head_cases(ctx: Any) -> list[dict[str, Any]]:
    from largefr.heads import sharded_softmax

    default_tile = sharded_softmax.CPU_TILE_BYTES
    x_all, labels_all = global_batch(ctx.world_size)
    rows = slice(ctx.rank * BATCH, (ctx.rank + 1) * BATCH)
    out = []
    for margin_index, margin in enumerate(ALL_MARGINS):
        for rate in RATES:
            for chunk in (None, 4):
                # chunked cases also run the logits' elementwise passes in one-row tiles (one tile otherwise)
                sharded_softmax.CPU_TILE_BYTES = 1 if chunk else default_tile
                head = PartialFC(margin, DIM, NUM_CLASSES, rate, ctx.group, seed=SEED, chunk_rows=chunk)
                x = x_all[rows].clone().requires_grad_(True)
                loss = head(x, labels_all[rows])
                loss.backward()
                grad = head.row_grad()
                dense_ids = grad.ids is None
                out.append(dict(
                    margin=margin_index, rate=rate, chunk=chunk, loss=loss.item(), x_grad=x.grad,
                    ids=head.sampled_class_ids.clone(), w_grad=grad.grad.clone(), dense=dense_ids,
                    weight=head.weight.detach().clone(), class_range=head.class_range,
                ))
    return out


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 2e-4) -> None:
    err = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert err <= rel * scale + 1e-7, f"max abs error {err:.3e} vs scale {scale:.3e}"


def _check_world(world_size: int) -> None:
    per_rank = run_ranks(_run_head_cases, world_size)
    x_all, labels_all = global_batch(world_size)
    full_w = init_weight_rows(0, NUM_CLASSES, DIM, SEED)
    for case_index in range(len(per_rank[0])):
        cases = [rank_cases[case_index] for rank_cases in per_rank]
        margin = ALL_MARGINS[cases[0]["margin"]]
        context = f"world={world_size} margin={margin} rate={cases[0]['rate']} chunk={cases[0]['chunk']}"
        ids = torch.cat([c["ids"] for c in cases])
        assert torch.equal(ids, torch.unique(ids)), context  # rank slices are disjoint and sorted
        assert torch.isin(labels_all, ids).all(), f"{context}: a positive was not sampled"
        columns = torch.searchsorted(ids, labels_all)
        loss, x_grad, w_grad = reference_loss_and_grads(margin, x_all, full_w[ids], columns)
        offset = 0
        for rank, c in enumerate(cases):
            start, stop = c["class_range"]
            assert torch.equal(c["weight"], full_w[start:stop]), f"{context}: initial W slice differs"
            assert abs(c["loss"] - loss) <= 1e-5 * max(1.0, abs(loss)), f"{context} rank {rank}: {c['loss']} vs {loss}"
            _close(c["x_grad"], x_grad[rank * BATCH : (rank + 1) * BATCH])
            n = c["ids"].numel()
            _close(c["w_grad"], w_grad[offset : offset + n])
            offset += n


@pytest.mark.parametrize("world_size", [1, 2])
def test_matches_reference_small_worlds(world_size: int) -> None:
    _check_world(world_size)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [3, 4])
def test_matches_reference_uneven_and_four_ranks(world_size: int) -> None:
    _check_world(world_size)


def _run_sgd_steps(ctx: Any, batch_world: int, steps: int, rate: float) -> dict[str, Any]:
    """SGD steps on the global batch of ``batch_world`` ranks, split evenly over this job's ranks."""
    x_all, labels_all = global_batch(batch_world)
    per_rank = x_all.shape[0] // ctx.world_size
    rows = slice(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)
    head = PartialFC(ALL_MARGINS[6], DIM, NUM_CLASSES, rate, ctx.group, seed=SEED)
    opt = head.optimizer("sgd", lr=0.5, momentum=0.9, weight_decay=5e-4)
    losses = []
    for step in range(steps):
        x = (x_all[rows] * (1 + 0.1 * step)).requires_grad_(True)
        loss = head(x, labels_all[rows])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return dict(losses=losses, weight=head.weight.detach().clone())


@pytest.mark.slow
def test_training_steps_identical_across_world_sizes() -> None:
    """Three SGD steps at r = 1 give the same W and losses on 1 and 3 ranks (same global batch)."""
    one = run_ranks(_run_sgd_steps, 1, 3, 3, 1.0)[0]
    three = run_ranks(_run_sgd_steps, 3, 3, 3, 1.0)
    torch.testing.assert_close(torch.cat([r["weight"] for r in three]), one["weight"], rtol=1e-4, atol=1e-6)
    for r in three:
        assert r["losses"] == pytest.approx(one["losses"], rel=1e-5)


def _unequal_batches_and_wrong_rank(ctx: Any) -> list[str]:
    from largefr.distributed import init_distributed

    head = PartialFC(ALL_MARGINS[0], DIM, NUM_CLASSES, 1.0, ctx.group)
    batch = BATCH + ctx.rank  # rank 1 brings one more row
    messages = []
    with pytest.raises(ValueError, match="different batch sizes") as info:
        head(torch.randn(batch, DIM), torch.zeros(batch, dtype=torch.long))
    messages.append(str(info.value))
    with pytest.raises(RuntimeError, match="already initialised as rank") as info:
        init_distributed(1 - ctx.rank, ctx.world_size, "env://")
    messages.append(str(info.value))
    return messages


def test_unequal_batch_sizes_and_a_mismatched_group_raise_on_every_rank() -> None:
    for rank, (sizes, group) in enumerate(run_ranks(_unequal_batches_and_wrong_rank, 2)):
        assert f"[{BATCH}, {BATCH + 1}]" in sizes
        assert f"rank {rank} of 2" in group
