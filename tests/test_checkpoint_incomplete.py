"""A checkpoint that lost a file after it was published (``.metadata`` present, a ``__r_0.distcp`` shard
gone or cut short) is recognised as incomplete: auto-resume takes the previous one, with a warning."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from largefr.train.checkpoint import (
    PerRank,
    checkpoint_problem,
    completed_checkpoints,
    latest_checkpoint,
    save_checkpoint,
)
from multirank import run_ranks


def save_two_steps(ctx, root: str) -> None:
    for step in (2, 4):
        state = {"progress": {"step": step}, "rows": PerRank(torch.full((64,), float(step + ctx.rank)))}
        save_checkpoint(root, step, state, ctx, keep_last=2)


@pytest.fixture(scope="module")
def two_rank_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    run_ranks(save_two_steps, 2, str(root))
    return root


def copy_of(root: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(root, tmp_path / "copy"))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_auto_resume_skips_a_checkpoint_with_a_lost_shard_file(two_rank_checkpoints, tmp_path, caplog, damage):
    root = copy_of(two_rank_checkpoints, tmp_path)
    newest = root / "step_00000004"
    assert latest_checkpoint(root) == newest and checkpoint_problem(newest) == ""
    shard = newest / "__1_0.distcp"
    assert shard.is_file()
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:10])
    assert (newest / ".metadata").is_file() and [s for s, _ in completed_checkpoints(root)] == [2, 4]
    with caplog.at_level(logging.WARNING, logger="largefr.train"):
        assert latest_checkpoint(root) == root / "step_00000002"  # was step 4, then FileNotFoundError on load
    expected = "is missing" if damage == "missing" else "has 10 bytes, .metadata needs"
    assert "step_00000004 is incomplete (shard file __1_0.distcp " in caplog.text and expected in caplog.text


def test_checkpoint_problem_names_what_is_missing(tmp_path):
    assert checkpoint_problem(tmp_path) == "no .metadata"
    (tmp_path / ".metadata").write_bytes(b"not a pickle")
    assert checkpoint_problem(tmp_path) == "no meta.json"
    (tmp_path / "meta.json").write_text("{}")
    assert checkpoint_problem(tmp_path).startswith("unreadable .metadata")
