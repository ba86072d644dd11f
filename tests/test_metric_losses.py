"""Contrastive, triplet (3 mining modes) and sharded centre loss: loss and embedding gradients at world
sizes 1-4 equal a float64 single-process reference over the concatenated batch; the centre update
equals Wen et al.'s rule."""
from __future__ import annotations

from typing import Any

import pytest
import torch

import metric_reference as ref
from largefr.heads.center import ShardedCenterLoss
from largefr.heads.metric import ContrastiveLoss, TripletLoss
from multirank import run_ranks

DIM, BATCH, CLASSES, ALPHA = 6, 6, 7, 0.5
CASES: list[tuple[str, dict[str, Any]]] = [
    ("contrastive", dict(margin=1.2, negatives="all")),
    ("contrastive", dict(margin=1.2, negatives="hardest", hardest_k=2)),
    ("contrastive", dict(margin=4.0, negatives="all", normalize=False)),
    ("triplet", dict(margin=0.5, mining="batch_all")),
    ("triplet", dict(margin=0.5, mining="batch_hard")),
    ("triplet", dict(margin=0.8, mining="semi_hard")),
]


def global_batch(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels in groups of 2-3 (identity-balanced like a P x K batch) so that positives exist."""
    gen = torch.Generator().manual_seed(99 + world)
    labels = torch.randint(0, CLASSES, (world * BATCH // 2,), generator=gen).repeat_interleave(2)
    labels = labels[torch.randperm(labels.numel(), generator=gen)]
    return torch.randn(world * BATCH, DIM, generator=gen, dtype=torch.float64), labels


def _build(kind: str, params: dict[str, Any], group: Any) -> torch.nn.Module:
    cls = ContrastiveLoss if kind == "contrastive" else TripletLoss
    return cls(**params, process_group=group)


def _rank_cases(group: Any, rank: int, world: int) -> dict[str, Any]:
    x_all, y_all = global_batch(world)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    out: dict[str, Any] = {"pairs": []}
    for kind, params in CASES:
        x = x_all[rows].clone().requires_grad_(True)
        loss_fn = _build(kind, params, group)
        loss = loss_fn(x, y_all[rows])
        loss.backward()
        out["pairs"].append((loss.item(), x.grad.clone(), {k: float(v) for k, v in loss_fn.last_stats.items()}))
    centre = ShardedCenterLoss(CLASSES, DIM, ALPHA, process_group=group).double()
    start, stop = centre.class_range
    centre.centers.copy_(_initial_centres()[start:stop])
    x = x_all[rows].clone().requires_grad_(True)
    loss = centre(x, y_all[rows])
    loss.backward()
    out["centre"] = (loss.item(), x.grad.clone(), centre.centers.clone(), centre.class_range)
    return out


def _worlds_2_3_4(ctx: Any) -> dict[int, dict[str, Any]]:
    """One spawn of 4 ranks: groups of the first 2, 3 and all 4 ranks (uneven class shards at 3 and 4)."""
    import torch.distributed as dist

    out = {}
    for world in (2, 3, 4):
        group = dist.new_group(list(range(world))) if world < ctx.world_size else ctx.group
        if ctx.rank < world:
            out[world] = _rank_cases(group, ctx.rank, world)
    return out


def _initial_centres() -> torch.Tensor:
    return torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-11, msg=lambda m: f"{what}: {m}")


def _check_world(world: int, per_rank: list[dict[str, Any]]) -> None:
    x_all, y_all = global_batch(world)
    for index, (kind, params) in enumerate(CASES):
        what = f"world={world} {kind} {params}"
        x = x_all.clone().requires_grad_(True)
        if kind == "contrastive":
            expected = ref.contrastive(x, y_all, params["margin"], params["negatives"], params.get("hardest_k", 1),
                                       params.get("normalize", True))
            fraction = None
        else:
            expected, fraction = ref.triplet(x, y_all, params["margin"], params["mining"])
        expected.backward()
        losses = [r["pairs"][index][0] for r in per_rank]
        assert all(abs(v - expected.item()) < 1e-10 for v in losses), f"{what}: {losses} vs {expected.item()}"
        assert expected.item() > 0, f"{what}: a zero loss tests nothing"
        _close(torch.cat([r["pairs"][index][1] for r in per_rank]), x.grad, what)
        if fraction is not None:
            assert abs(per_rank[0]["pairs"][index][2]["active_fraction"] - fraction) < 1e-12, what
    x = x_all.clone().requires_grad_(True)
    centres = _initial_centres()
    expected = ref.center_loss(x, y_all, centres)
    expected.backward()
    assert all(abs(r["centre"][0] - expected.item()) < 1e-10 for r in per_rank), f"world={world} centre loss"
    _close(torch.cat([r["centre"][1] for r in per_rank]), x.grad, f"world={world} centre grad")
    ranges = [r["centre"][3] for r in per_rank]
    assert ranges[0][0] == 0 and ranges[-1][1] == CLASSES and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    updated = torch.cat([r["centre"][2] for r in per_rank])
    _close(updated, ref.center_update(x_all, y_all, centres, ALPHA), f"world={world} centre update")
    absent = sorted(set(range(CLASSES)) - set(y_all.tolist()))
    assert torch.equal(updated[absent], centres[absent]), "centres of classes absent from the batch must not move"


def test_single_process_matches_reference() -> None:
    _check_world(1, [_rank_cases(None, 0, 1)])


@pytest.mark.slow
def test_multi_rank_matches_reference() -> None:
    per_rank = run_ranks(_worlds_2_3_4, 4)
    for world in (2, 3, 4):
        _check_world(world, [per_rank[r][world] for r in range(world)])


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="mining must be one of"):
        TripletLoss(0.2, mining="hardest")
    with pytest.raises(ValueError, match="negatives must be one of"):
        ContrastiveLoss(1.0, negatives="some")
    with pytest.raises(ValueError, match="alpha"):
        ShardedCenterLoss(10, 4, alpha=2.0)
    with pytest.raises(ValueError, match="labels must be"):
        TripletLoss()(torch.randn(4, 3), torch.zeros(3, dtype=torch.long))
