"""The P x K identity-balanced sampler: batch shape, disjoint ranks, determinism, world-size independence,
coverage over an epoch, with-replacement for small identities, and resume in both loaders."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from largefr.data.identity_balanced import IdentityBalancedPlan, read_label_table
from largefr.data.loader import LoaderConfig
from largefr.data.loader_factory import build_loader, dali_available
from largefr.data.manifest import read_manifest
from test_data_loader import KINDS, collect, decode_samples, label_of, make_dataset

K = 3
# identity sizes: several below K (drawn with replacement), one far above
SIZES = [5, 3, 1, 8, 4, 4, 4, 2, 6, 7, 3, 12, 5, 2, 9, 3]
SHARDS = (30, 28, 20)


def _labels() -> np.ndarray:
    labels = np.repeat(np.arange(len(SIZES)), SIZES)
    return np.random.default_rng(0).permutation(labels)  # identities spread over the shards


def _plan(rank: int, world: int, p: int, epoch: int = 0, seed: int = 1) -> IdentityBalancedPlan:
    return IdentityBalancedPlan(SHARDS, _labels(), seed, epoch, rank, world, p * K, K)


def _samples(plan: IdentityBalancedPlan) -> np.ndarray:
    """Global sample ids of the rank's positions, [steps, P, K]."""
    segs = plan.segments(0, plan.block_size)
    starts = np.concatenate([[0], np.cumsum(SHARDS)])
    ids = np.concatenate([starts[s.shard] + s.rows for s in segs])
    return ids.reshape(plan.steps, plan.identities_per_batch, K)


@pytest.mark.parametrize("world, p", [(1, 6), (2, 3), (3, 2)])
def test_batches_are_p_by_k_with_distinct_identities_across_ranks(world: int, p: int) -> None:
    labels = _labels()
    plans = [_plan(r, world, p) for r in range(world)]
    assert len({pl.steps for pl in plans}) == 1 and plans[0].steps > 0
    per_rank = [labels[_samples(pl)] for pl in plans]  # [steps, P, K]
    for lab in per_rank:
        assert (lab == lab[:, :, :1]).all(), "each group of K holds one identity"
    step_ids = np.concatenate([lab[:, :, 0] for lab in per_rank], axis=1)  # [steps, world * P]
    assert all(len(set(row)) == world * p for row in step_ids), "identities repeat inside a global batch"


def test_same_global_batches_for_any_world_size_and_deterministic() -> None:
    one = _samples(_plan(0, 1, 6))
    for world, p in ((2, 3), (3, 2)):
        joined = np.concatenate([_samples(_plan(r, world, p)) for r in range(world)], axis=1)
        assert np.array_equal(joined, one)
    assert np.array_equal(_samples(_plan(0, 1, 6)), one)
    other_epoch = _samples(_plan(0, 1, 6, epoch=1))
    assert other_epoch.shape == one.shape and not np.array_equal(other_epoch, one)
    assert not np.array_equal(_samples(_plan(0, 1, 6, seed=2)), one)


def test_epoch_covers_identities_and_draws_small_ones_with_replacement() -> None:
    labels = _labels()
    width = 4  # 2 ranks x P = 2
    plans = [_plan(r, 2, 2) for r in range(2)]
    seen = np.concatenate([_samples(pl).reshape(-1) for pl in plans])
    groups = np.array([-(-n // K) for n in SIZES])
    rounds = [int((groups > j).sum()) for j in range(groups.max())]
    assert plans[0].steps == sum(m // width for m in rounds), "steps = sum over rounds of floor(m_j / G)"
    assert set(labels[seen]) == set(range(len(SIZES))), "every identity appears in the epoch"
    left_out = sum(m % width for m in rounds) * K
    assert len(set(seen.tolist())) >= len(labels) - left_out
    counts = Counter(seen.tolist())
    for ident in np.flatnonzero(np.array(SIZES) < K):
        members = np.flatnonzero(labels == ident)
        if any(labels[s] == ident for s in seen):
            assert set(members) <= set(counts), "a small identity shows all its images"
            assert sum(counts[m] for m in members) % K == 0 and max(counts[m] for m in members) >= 2


def test_bad_plan_arguments() -> None:
    with pytest.raises(ValueError, match="not a multiple of images_per_identity"):
        IdentityBalancedPlan(SHARDS, _labels(), 0, 0, 0, 1, 7, K)
    with pytest.raises(ValueError, match="identities give no P x K batch"):
        IdentityBalancedPlan(SHARDS, _labels(), 0, 0, 0, 2, 9 * K, K)
    with pytest.raises(ValueError, match="images_per_identity"):
        LoaderConfig(batch_size=8, sampler="pk", images_per_identity=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pk") / "data"
    make_dataset(root)
    return root


def test_label_table_reads_every_label(dataset: Path) -> None:
    table = read_label_table(read_manifest(dataset))
    assert table.tolist() == [label_of(k) for k in range(len(table))]


@pytest.mark.parametrize("kind", KINDS)
def test_loader_pk_batches_and_resume_at_any_step(dataset: Path, kind: str) -> None:
    def make():
        return build_loader(dataset, batch_size=8, rank=1, world_size=2, seed=4, kind=kind, num_threads=1,
                            sampler="pk", images_per_identity=4)

    full = make()
    full.set_epoch(2)
    epoch = collect(full)
    assert len(epoch) == len(full) > 2
    for _, labels in epoch:
        assert len(set(labels[:4])) == 1 and len(set(labels[4:])) == 1 and labels[0] != labels[4]
    partial = make()
    partial.set_epoch(2)
    head = []
    for images, _, _ in partial:
        head.append(decode_samples(images))
        if len(head) == 2:
            break
    resumed = make()
    resumed.load_state_dict(partial.state_dict())
    resumed.set_epoch(2)
    assert head + [s for s, _ in collect(resumed)] == [s for s, _ in epoch]
    uniform = build_loader(dataset, batch_size=8, rank=1, world_size=2, seed=4, kind=kind, num_threads=1)
    with pytest.raises(ValueError, match="sampler"):
        uniform.load_state_dict(partial.state_dict())


@pytest.mark.skipif(not dali_available(), reason="nvidia.dali missing")
def test_torch_and_dali_read_the_same_pk_order(dataset: Path) -> None:
    orders = [collect(build_loader(dataset, batch_size=6, seed=2, kind=kind, num_threads=1, sampler="pk",
                                   images_per_identity=3)) for kind in ("torch", "dali")]
    assert orders[0] == orders[1]
