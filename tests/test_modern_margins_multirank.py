"""Modern margins on 1-4 gloo ranks: every step's loss, embedding and W-row gradients equal the float64
single-process reference, the EMA state is identical on every rank and equal to the reference's, and a
checkpoint written at one world size restores W, optimizer rows and margin state at another."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from largefr import PartialFC
from largefr.heads import margins as M
from largefr.heads.sampling import init_weight_rows
from largefr.train.checkpoint import RowShardedState, load_checkpoint, save_checkpoint
from largefr.train.state import HeadWeight
from multirank import run_ranks
from reference import MODERN_MARGINS, initial_reference_state, reference_loss_and_grads

NUM_CLASSES, DIM, BATCH, SEED, STEPS = 23, 16, 4, 7, 2
CASES = [(1.0, None), (0.5, None), (0.5, 4), (0.0, 4)]  # (sample rate, chunk rows)


def global_batch(world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(99 + world_size)
    x = torch.randn(world_size * BATCH, DIM, generator=gen)
    return x, torch.randint(0, NUM_CLASSES, (world_size * BATCH,), generator=gen)


def _run_cases(ctx: Any) -> list[dict[str, Any]]:
    x_all, labels_all = global_batch(ctx.world_size)
    rows = slice(ctx.rank * BATCH, (ctx.rank + 1) * BATCH)
    out = []
    for margin_index, margin in enumerate(MODERN_MARGINS):
        for rate, chunk in CASES:
            head = PartialFC(margin, DIM, NUM_CLASSES, rate, ctx.group, seed=SEED, chunk_rows=chunk)
            for step in range(STEPS):
                x = (x_all[rows] * (1 + 0.2 * step)).requires_grad_(True)
                loss = head(x, labels_all[rows])
                loss.backward()
                out.append(dict(
                    margin=margin_index, rate=rate, chunk=chunk, step=step, loss=loss.item(), x_grad=x.grad,
                    ids=head.sampled_class_ids.clone(), w_grad=head.row_grad().grad.clone(),
                    state={k: v.clone() for k, v in head.margin_state.items()},
                ))
                head.zero_grad()
    return out


def _close(actual: torch.Tensor, expected: torch.Tensor, context: str, rel: float = 2e-4) -> None:
    err = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert err <= rel * scale + 1e-7, f"{context}: max abs error {err:.3e} vs scale {scale:.3e}"


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3, 4])  # world 1: tests/test_modern_margins.py
def test_modern_margins_match_reference(world_size: int) -> None:
    per_rank = run_ranks(_run_cases, world_size)
    x_all, labels_all = global_batch(world_size)
    states: dict[tuple[int, float, Any], dict[str, float]] = {}
    for index in range(len(per_rank[0])):
        cases = [rank_cases[index] for rank_cases in per_rank]
        first = cases[0]
        margin = MODERN_MARGINS[first["margin"]]
        key = (first["margin"], first["rate"], first["chunk"])
        state = states.setdefault(key, initial_reference_state(margin))
        context = f"world={world_size} {margin} rate={first['rate']} chunk={first['chunk']} step={first['step']}"
        ids = torch.cat([c["ids"] for c in cases])
        assert torch.equal(ids, torch.unique(ids)) and torch.isin(labels_all, ids).all(), context
        sub = margin.num_sub_centers
        full_w = init_weight_rows(0, NUM_CLASSES * sub, DIM, SEED)
        w_rows = full_w[(ids[:, None] * sub + torch.arange(sub)).reshape(-1)]
        x = x_all * (1 + 0.2 * first["step"])
        loss, x_grad, w_grad = reference_loss_and_grads(
            margin, x, w_rows, torch.searchsorted(ids, labels_all), first["step"], state, SEED
        )
        offset = 0
        for rank, c in enumerate(cases):
            assert abs(c["loss"] - loss) <= 1e-5 * max(1.0, abs(loss)), f"{context} rank {rank}: {c['loss']} vs {loss}"
            _close(c["x_grad"], x_grad[rank * BATCH : (rank + 1) * BATCH], f"{context} rank {rank} x")
            n = c["ids"].numel() * sub
            _close(c["w_grad"], w_grad[offset : offset + n], f"{context} rank {rank} W")
            offset += n
            for name, value in c["state"].items():  # the same bits on every rank, the reference's value
                assert torch.equal(value, cases[0]["state"][name]), f"{context}: {name} differs on rank {rank}"
                assert value.item() == pytest.approx(state[name], rel=1e-6, abs=1e-7), f"{context}: {name}"


RESTORE_MARGINS = [M.CurricularFace(16.0, 0.5), M.AdaFace(16.0), M.SubCenterArcFace(16.0, 0.5, 3)]
RESTORE_BATCH = 12  # global rows: divisible by 1, 2 and 3 ranks


def _train(ctx: Any, steps: range, save_to: str | None, load_from: str | None) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(5)
    x_all, labels_all = torch.randn(RESTORE_BATCH, DIM, generator=gen), torch.randint(0, NUM_CLASSES, (RESTORE_BATCH,), generator=gen)
    per_rank = RESTORE_BATCH // ctx.world_size
    rows = slice(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)
    heads = [PartialFC(m, DIM, NUM_CLASSES, 1.0, ctx.group, seed=SEED) for m in RESTORE_MARGINS]
    opts = [h.optimizer("sgd", lr=0.5, momentum=0.9) for h in heads]
    state = {}
    for i, (head, opt) in enumerate(zip(heads, opts)):
        num_rows = NUM_CLASSES * head.sub_centers
        state[f"head{i}"] = RowShardedState(HeadWeight(head), head.row_range, num_rows)
        state[f"opt{i}"] = RowShardedState(opt, head.row_range, num_rows)
    if load_from is not None:
        load_checkpoint(load_from, state, ctx)
        for head in heads:
            head.training_forwards = steps.start  # the trainer restores it from its progress record
    losses = []
    for step in steps:
        x = (x_all[rows] * (1 + 0.2 * step)).requires_grad_(True)
        step_losses = []
        for head, opt in zip(heads, opts):
            loss = head(x, labels_all[rows])
            loss.backward()
            opt.step()
            opt.zero_grad()
            step_losses.append(loss.item())
        losses.append(step_losses)
    if save_to is not None:
        save_checkpoint(save_to, steps.stop, state, ctx)
    return dict(losses=losses, weights=[h.weight.detach().clone() for h in heads],
                states=[{k: v.clone() for k, v in h.margin_state.items()} for h in heads])


@pytest.mark.slow
def test_margin_state_and_sub_centre_rows_restore_at_another_world_size(tmp_path: Path) -> None:
    whole = _train(SimpleNamespace(group=None, rank=0, world_size=1), range(0, 3), None, None)
    run_ranks(_train, 2, range(0, 2), str(tmp_path), None)
    resumed = run_ranks(_train, 3, range(2, 3), None, str(tmp_path / "step_00000002"))
    for i, margin in enumerate(RESTORE_MARGINS):
        for rank in resumed:
            assert rank["losses"][0][i] == pytest.approx(whole["losses"][2][i], rel=1e-5), margin
            for name, value in rank["states"][i].items():
                assert torch.equal(value, resumed[0]["states"][i][name]), (margin, name)
                assert value.item() == pytest.approx(whole["states"][i][name].item(), rel=1e-5), (margin, name)
        weight = torch.cat([rank["weights"][i] for rank in resumed])
        assert weight.shape == whole["weights"][i].shape
        torch.testing.assert_close(weight, whole["weights"][i], rtol=1e-4, atol=1e-6)
