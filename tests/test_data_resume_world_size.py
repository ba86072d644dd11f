"""Resuming mid-epoch at another world size reads exactly the samples not yet read (no duplicate, and
none left out beyond the new plan's own tail), for 2 -> 1, 1 -> 3 and a chain 2 -> 1 -> 3; checkpoints of
runs with different step sizes are ordered by samples consumed, not by step number."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from largefr.data.loader_factory import build_loader
from largefr.data.manifest import Manifest, ShardInfo, write_manifest
from largefr.data.shards import ShardWriter, shard_names
from largefr.train.checkpoint import completed_checkpoints, latest_checkpoint, save_checkpoint
from multirank import run_ranks

SIZE, COUNTS, BATCH = 16, (37, 30, 33), 3
N = sum(COUNTS)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three shards; sample k (over all shards) has label k, so a label names its sample."""
    out = tmp_path_factory.mktemp("numbered")
    buf = io.BytesIO()
    Image.fromarray(np.full((SIZE, SIZE, 3), 128, np.uint8)).save(buf, "JPEG")
    shards, k = [], 0
    for i, count in enumerate(COUNTS):
        tar, idx = shard_names(i)
        writer = ShardWriter(out / tar, out / idx)
        for _ in range(count):
            writer.add(f"{k:06d}", buf.getvalue(), k)
            k += 1
        result = writer.close()
        shards.append(ShardInfo(tar, idx, result.num_samples, result.bytes))
    write_manifest(out, Manifest(N, N, (SIZE, SIZE), tuple(shards), "test", {}, out))
    return out


def loaders(root: Path, world: int, batch: int = BATCH) -> list:
    return [build_loader(root, batch_size=batch, rank=r, world_size=world, seed=5, kind="torch", num_threads=0,
                         flip=False) for r in range(world)]


def read(loader, batches: int | None) -> list[int]:
    """Labels of the next ``batches`` batches (None: the rest of the epoch); the loader keeps its position."""
    out: list[int] = []
    it = iter(loader)
    try:
        for i, (_, labels, _) in enumerate(it):
            out += labels.tolist()
            if batches is not None and i + 1 == batches:
                break
    finally:
        it.close()
    return out


def resume(root: Path, states: list[dict], world: int) -> tuple[list, list[int]]:
    new = loaders(root, world)
    for loader in new:
        loader.load_rank_states(states)
    left = {loader.batches_left() for loader in new}
    assert len(left) == 1, left  # every new rank has the same number of batches
    return new, [len(left) and left.pop()]


def check_exact(seen: list[int], world: int) -> None:
    assert len(seen) == len(set(seen)), f"{len(seen) - len(set(seen))} samples read twice"
    assert N - len(seen) < world * (BATCH + 1), f"{N - len(seen)} samples never read"  # the new plan's tail


@pytest.mark.parametrize("before, after, steps", [(2, 1, 5), (1, 3, 7), (3, 2, 4)])
def test_resume_at_another_world_size_reads_each_remaining_sample_once(dataset, before, after, steps):
    old = loaders(dataset, before)
    seen = [k for loader in old for k in read(loader, steps)]
    new, (left,) = resume(dataset, [loader.state_dict() for loader in old], after)
    rest = [read(loader, None) for loader in new]
    assert all(len(r) == left * BATCH for r in rest)
    check_exact(seen + [k for r in rest for k in r], after)  # before: 2 -> 1 read ~30% twice


def test_a_resumed_epoch_can_be_resumed_again_elsewhere(dataset):
    first = loaders(dataset, 2)
    seen = [k for loader in first for k in read(loader, 4)]
    (middle,), _ = resume(dataset, [loader.state_dict() for loader in first], 1)
    seen += read(middle, 6)
    last, _ = resume(dataset, [middle.state_dict()], 3)
    seen += [k for loader in last for k in read(loader, None)]
    check_exact(seen, 3)


def test_same_sizes_resume_exactly_and_a_finished_epoch_stays_finished(dataset):
    old = loaders(dataset, 2)
    for loader in old:
        read(loader, 3)
    again = loaders(dataset, 2)
    for loader in again:
        loader.load_rank_states([o.state_dict() for o in old])
    assert [a.state_dict() for a in again] == [o.state_dict() for o in old]
    (one,) = loaders(dataset, 1)
    read(one, len(one))  # the last batch of epoch 0, then closed (as the trainer does)
    state = one.state_dict()
    assert (state["epoch"], state["step"]) == (0, len(one))
    new, (left,) = resume(dataset, [state], 2)
    assert left == 0 and read(new[0], None) == [] and new[0].epoch == 1  # epoch 0 is not read again


def save_with_samples(ctx, root: str, plan: list[tuple[int, int]]) -> None:
    for step, samples in plan:
        save_checkpoint(root, step, {"progress": {"step": step}}, ctx, keep_last=3, meta={"samples_consumed": samples})


def test_pruning_compares_samples_consumed_not_step_numbers(tmp_path):
    # a 1-rank run saved steps 30 and 60 (2 samples a step); resumed on 3 ranks from step 30 (6 samples a
    # step) it writes step 12 (72 samples): step 60 (120 samples) is the abandoned continuation, step 30 is
    # older and kept. Before: both had larger step numbers, so both were removed.
    run_ranks(save_with_samples, 1, str(tmp_path), [(30, 60), (60, 120), (12, 72)])
    assert [s for s, _ in completed_checkpoints(tmp_path)] == [30, 12]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000012"


def test_states_written_before_pools_existed_still_resume(dataset):
    old = loaders(dataset, 2)
    seen = [k for loader in old for k in read(loader, 2)]
    states = [{k: v for k, v in loader.state_dict().items() if k not in ("pool", "step_offset")} for loader in old]
    new, _ = resume(dataset, states, 1)
    check_exact(seen + read(new[0], None), 1)
