"""Checkpoints on 1 and 2 gloo ranks: exact round trips, resharding 1 -> 2 -> 1 (uneven), atomicity."""
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from largefr.backbone_file import CheckpointMeta, load_backbone_from_checkpoint, read_meta_json
from largefr.models import build_backbone
from largefr.train.checkpoint import (
    OptimizerState,
    PerRank,
    RowShard,
    RowShardedState,
    completed_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from largefr.train.schedule import LRSchedule, ScheduledLR
from multirank import run_ranks

NUM_CLASSES, DIM = 7, 4  # 7 rows on 2 ranks: 4 + 3


def class_range(world: int, rank: int, skew: int = 0) -> tuple[int, int]:
    """Ranks differ by at most one row; ``skew`` moves rows from rank 0 to rank 1 (another layout)."""
    base, extra = divmod(NUM_CLASSES, world)
    start = rank * base + min(rank, extra)
    stop = start + base + (rank < extra)
    return (start - skew * (rank > 0), stop - skew * (rank == 0)) if world == 2 else (start, stop)


def global_rows(salt: float) -> torch.Tensor:
    """The global W of a run: a function of the class index only, so any layout can check its rows."""
    return torch.arange(NUM_CLASSES * DIM, dtype=torch.float32).reshape(NUM_CLASSES, DIM) + salt


class FakeHead(nn.Module):
    def __init__(self, start: int, stop: int, salt: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(global_rows(salt)[start:stop].clone())


class FakeRowOptimizer:
    """Stands in for the head's row-sparse optimizer: row-shaped state plus param_groups."""

    def __init__(self, start: int, stop: int, salt: float) -> None:
        self.momentum = -global_rows(salt)[start:stop].clone()
        self.row_step = torch.arange(start, stop) * int(salt)
        self.param_groups = [{"lr": 0.4}]

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "row_step": self.row_step, "lr": self.param_groups[0]["lr"]}

    def load_state_dict(self, state: dict) -> None:
        self.momentum.copy_(state["momentum"])
        self.row_step.copy_(state["row_step"])
        self.param_groups[0]["lr"] = state["lr"]


def make_state(ctx, salt: float, trained: bool, skew: int = 0) -> dict:
    torch.manual_seed(int(salt))
    model = build_backbone("iresnet18", DIM, base_width=4)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    start, stop = class_range(ctx.world_size, ctx.rank, skew)
    head, head_opt = FakeHead(start, stop, salt), FakeRowOptimizer(start, stop, salt)
    sched = ScheduledLR([sgd, head_opt], LRSchedule(total_steps=100, warmup_steps=5))
    scaler = torch.amp.GradScaler("cpu")
    if trained:  # change every kind of state without running the (slow to start) conv kernels
        for p in model.parameters():
            p.grad = torch.full_like(p, salt) if p.requires_grad else None
        sgd.step()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(salt)
                m.num_batches_tracked.add_(1)
        for _ in range(int(salt)):
            sched.step()
        scaler.scale(torch.ones(()))
        scaler.update(new_scale=2.0**salt)
    return {
        "backbone": model,
        "backbone_optim": OptimizerState(model, sgd),
        "head": RowShardedState(head, (start, stop), NUM_CLASSES),
        "head_optim": RowShardedState(head_opt, (start, stop), NUM_CLASSES),
        "scheduler": sched,
        "scaler": scaler,
        "data": {"epoch": int(salt), "batch_in_epoch": 17},
        "loader": PerRank({"offset": 100 * int(salt) + ctx.rank}),
    }


def assert_same(a: dict, b: dict) -> None:
    """Exact equality of two make_state() results (module and optimizer states, head rows, scalars)."""
    torch.testing.assert_close(a["backbone"].state_dict(), b["backbone"].state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(a["backbone_optim"].optimizer.state_dict(), b["backbone_optim"].optimizer.state_dict(),
                               rtol=0, atol=0)
    for key in ("head", "head_optim"):
        torch.testing.assert_close(a[key].obj.state_dict(), b[key].obj.state_dict(), rtol=0, atol=0, msg=key)
    for key in ("scheduler", "scaler"):
        assert a[key].state_dict() == b[key].state_dict(), key


def assert_rows_from(state: dict, salt: float, start: int, stop: int) -> None:
    torch.testing.assert_close(state["head"].obj.weight.detach(), global_rows(salt)[start:stop], rtol=0, atol=0)
    torch.testing.assert_close(state["head_optim"].obj.momentum, -global_rows(salt)[start:stop], rtol=0, atol=0)
    assert torch.equal(state["head_optim"].obj.row_step, torch.arange(start, stop) * int(salt))


def draw_rng() -> tuple:
    return torch.rand(3).tolist(), float(np.random.rand()), random.random()


def two_ranks_save_load_keep_last_crash_reshard(ctx, root: str) -> None:
    meta = CheckpointMeta("iresnet18", DIM, 112, {"base_width": 4})
    for step, salt in ((10, 4), (20, 5), (30, 6)):
        state = make_state(ctx, salt=salt, trained=True)
        extra = {"config.yaml": f"step: {step}\n".encode()}
        path = save_checkpoint(root, step, state, ctx, keep_last=2, extra_files=extra, backbone_meta=meta)
    after_save = draw_rng()
    assert [s for s, _ in completed_checkpoints(root)] == [20, 30]
    if ctx.is_main:  # a crash in the middle of saving step 40 leaves only a .tmp directory
        (path.parent / "step_00000040.tmp").mkdir()
        (path.parent / "step_00000040.tmp" / "__0_0.distcp").write_bytes(b"partial")
    torch.distributed.barrier(group=ctx.group)
    assert latest_checkpoint(root) == path

    fresh = make_state(ctx, salt=0, trained=False)
    loaded = load_checkpoint(path, fresh, ctx)
    assert draw_rng() == after_save  # each rank's RNG states are back to the moment of saving
    assert_same(fresh, state)
    assert loaded["loader"] == {"offset": 600 + ctx.rank} and loaded["data"] == {"epoch": 6, "batch_in_epoch": 17}
    assert fresh["scheduler"].get_last_lr() == state["scheduler"].get_last_lr()
    assert (path / "config.yaml").read_bytes() == b"step: 30\n"
    assert read_meta_json(path)["step"] == 30 and read_meta_json(path)["world_size"] == 2
    torch.testing.assert_close(load_backbone_from_checkpoint(path).state_dict(), state["backbone"].state_dict(),
                               rtol=0, atol=0)

    # same world, another row layout (rank 0: 2 rows, rank 1: 5): every rank reads across saved shards
    skewed = make_state(ctx, salt=0, trained=False, skew=2)
    load_checkpoint(path, skewed, ctx)
    assert_rows_from(skewed, 6, *class_range(2, ctx.rank, skew=2))


def one_rank_reads_two_rank_checkpoint(ctx, root: str) -> None:
    path = latest_checkpoint(root)
    fresh = make_state(ctx, salt=0, trained=False)
    loaded = load_checkpoint(path, {**fresh, "absent": PerRank(None)}, ctx, restore_rng=False)
    assert_rows_from(fresh, 6, 0, NUM_CLASSES)  # 2 -> 1 ranks: the 4 + 3 rows joined
    assert_same(fresh, make_state(ctx, salt=6, trained=True) | {"head": fresh["head"], "head_optim": fresh["head_optim"]})
    assert loaded["loader"] == {"offset": 600} and loaded["absent"] is None
    with pytest.raises(KeyError, match=r"has no entries \['model'\]; it holds \['_rng', 'backbone'"):
        load_checkpoint(path, {"model": fresh["backbone"]}, ctx)


@pytest.mark.slow
def test_checkpoint_round_trip_keep_last_crash_and_resharding(tmp_path):
    root = str(tmp_path / "ckpt")
    run_ranks(two_ranks_save_load_keep_last_crash_reshard, 2, root)
    run_ranks(one_rank_reads_two_rank_checkpoint, 1, root)


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def save_steps(ctx, root: str, steps: list[int], keep_last: int) -> Path:
    for step in steps:
        path = save_checkpoint(root, step, {"progress": {"step": step}}, ctx, keep_last=keep_last)
    return path


def resume_from_an_earlier_step(ctx, root: str) -> dict:
    """A run reached step 4; it is continued from step 2 and writes step 3 (keep_last 1, then 2)."""
    handler = Collect()
    logging.getLogger("largefr.train").addHandler(handler)
    out = {}
    for keep_last, before in ((1, [2, 4]), (2, [1, 2, 4])):
        run = f"{root}/keep{keep_last}"
        save_steps(ctx, run, before, keep_last=3)
        written = save_steps(ctx, run, [3], keep_last=keep_last)
        resumed = load_checkpoint(latest_checkpoint(run), {"progress": {"step": -1}}, ctx)["progress"]["step"]
        out[keep_last] = ([s for s, _ in completed_checkpoints(run)], latest_checkpoint(run) == written, resumed)
    out["warnings"] = handler.messages
    return out


def test_continuing_from_an_earlier_step_keeps_the_new_checkpoint(tmp_path):
    out = run_ranks(resume_from_an_earlier_step, 1, str(tmp_path))[0]
    assert out[1] == ([3], True, 3)  # step_3 was pruned (step_4 kept) before the fix
    assert out[2] == ([2, 3], True, 3)  # the abandoned step_4 would be auto-resumed instead of step_3
    assert len(out["warnings"]) == 2
    assert all("removing 1 checkpoint(s) past step 3" in m and m.endswith("step_00000004") for m in out["warnings"])


def save_then_add_partial_dirs(ctx, root: str) -> None:
    save_steps(ctx, root, [10, 200], keep_last=3)
    for name, metadata in (("step_00000300.tmp", True), ("step_00000400", False), ("other", True)):
        (Path(root) / name).mkdir()
        if metadata:
            (Path(root) / name / ".metadata").write_bytes(b"x")


def test_latest_checkpoint_ignores_tmp_and_incomplete_dirs(tmp_path):
    assert latest_checkpoint(tmp_path / "absent") is None
    run_ranks(save_then_add_partial_dirs, 1, str(tmp_path))
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000200"
    assert [s for s, _ in completed_checkpoints(tmp_path)] == [10, 200]


def test_row_shard_and_adapter_validation():
    with pytest.raises(ValueError, match=r"row shard \[5, 8\) of shape \[3, 2\] does not fit in 7 global rows"):
        RowShard(torch.zeros(3, 2), 5, 7)
    with pytest.raises(ValueError, match=r"class_range \(3, 3\) must be a non-empty range inside \[0, 7\)"):
        RowShardedState(FakeHead(0, 1, 0), (3, 3), 7)
    adapter = RowShardedState(FakeHead(2, 5, 0), (2, 5), 7)
    wrapped = adapter.state_dict()["weight"]
    assert isinstance(wrapped, RowShard) and (wrapped.start, wrapped.global_rows) == (2, 7)


def test_load_rejects_incomplete_checkpoint(tmp_path):
    (tmp_path / "step_00000001.tmp").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "step_00000001.tmp", {}, ctx=None)  # type: ignore[arg-type]


def test_save_rejects_bad_arguments_before_any_collective(tmp_path):
    with pytest.raises(ValueError, match="keep_last must be >= 1, got 0"):
        save_checkpoint(tmp_path, 1, {}, ctx=None, keep_last=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="state key '_rng' is reserved"):
        save_checkpoint(tmp_path, 1, {"_rng": 1}, ctx=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"extra file 'meta.json' must be a plain file name"):
        save_checkpoint(tmp_path, 1, {}, ctx=None, extra_files={"meta.json": b"{}"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"extra file '../x' must be a plain file name"):
        save_checkpoint(tmp_path, 1, {}, ctx=None, extra_files={"../x": b""})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        save_checkpoint(tmp_path, -1, {}, ctx=None)  # type: ignore[arg-type]
