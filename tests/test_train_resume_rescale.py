"""Resuming with another step size (batch size, world size, grad_accum) continues by data consumed.

One rank with batch 2 trains 7 steps of a 2-epoch run (14 of the 32 samples of epoch 0), then the run
is continued with batch 4, and on 2 ranks with grad_accum 2. The continuation must start at the step
of the new setup that has seen those samples (the LR schedule too) and end after the 2 epochs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from largefr.config import load_config
from largefr.train.checkpoint import completed_checkpoints
from largefr.train.run import train
from multirank import run_ranks

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "synthetic_cpu.yaml"
STOP = 7  # steps of the first run: 7 x 2 samples


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from largefr.data.synth import SynthSpec
    from largefr.data.synth_dataset import write_synthetic_dataset

    out = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(out, SynthSpec(identities=8, per_identity=4, seed=3), workers=1, progress=False)  # 32 samples
    return out


def settings(dataset: Path, output_dir: Path, batch_size: int, grad_accum: int = 1) -> list[str]:
    return [
        f"data.path={dataset}", "data.num_workers=0", f"output_dir={output_dir}",
        "model.kwargs={base_width: 4}", "head.embedding_size=16", "head.sample_rate=0.5",
        f"train.batch_size={batch_size}", f"train.grad_accum={grad_accum}", "train.epochs=2",
        "train.precision=fp32", "train.log_every=100", "train.eval_bins=[]", "schedule.warmup_steps=2",
        "checkpoint.every_steps=1", "checkpoint.keep_last=100", "logging.console=false",
    ]


def train_once(ctx, sets: list[str], max_steps: int | None, resume: str) -> None:
    train(load_config(CONFIG, sets), ctx, max_steps=max_steps, resume=resume)


def saved(path: Path, tmp: Path) -> dict[str, Any]:
    out = tmp / f"{path.parent.parent.name}_{path.name}.pt"
    dcp_to_torch_save(path, out)
    return torch.load(out, weights_only=False)


def position(flat: dict[str, Any]) -> dict[str, Any]:
    """Where a checkpoint stands: optimizer step, epoch, LR schedule step, each rank's (epoch, batch)."""
    loaders = {rank: (state["epoch"], state["step"]) for rank, state in sorted(flat["loader"].items())}
    progress = flat["progress"]
    return {"step": progress["step"], "epoch": progress["epoch"], "lr_step": flat["scheduler"]["last_step"],
            "loader": loaders}


@pytest.fixture(scope="module")
def stopped(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint of 1 rank x batch 2 after STOP steps (14 samples of epoch 0)."""
    out = tmp_path_factory.mktemp("first")
    run_ranks(train_once, 1, settings(dataset, out, batch_size=2), STOP, "auto")
    [(step, path)] = completed_checkpoints(out / "checkpoints")[-1:]
    assert step == STOP
    return path


@pytest.mark.slow
def test_larger_batch_continues_at_the_samples_seen(dataset: Path, stopped: Path, tmp_path: Path):
    """Batch 4: 14 samples are 3.5 steps (of 8 per epoch, 16 in all), not 7; the 18 unread samples make
    4 batches, so epoch 0 continues at step 4 and keeps its 8 steps."""
    run_ranks(train_once, 1, settings(dataset, tmp_path, batch_size=4), None, str(stopped))
    written = completed_checkpoints(tmp_path / "checkpoints")
    assert [s for s, _ in written] == list(range(5, 17))
    assert position(saved(written[0][1], tmp_path)) == {"step": 5, "epoch": 0, "lr_step": 5, "loader": {"rank0": (0, 5)}}
    # the run ends with both epochs complete (before the fix: 3 batches of epoch 1 were never trained)
    assert position(saved(written[-1][1], tmp_path)) == {"step": 16, "epoch": 1, "lr_step": 16,
                                                         "loader": {"rank0": (1, 8)}}


@pytest.mark.slow
def test_more_ranks_with_accumulation_continue_at_the_samples_seen(dataset: Path, stopped: Path, tmp_path: Path):
    """2 ranks x batch 2 x grad_accum 2 (8 samples a step, 4 steps per epoch): 14 samples are 1.75 steps;
    the 18 unread samples are dealt as 4 batches per rank (2 steps), so epoch 0 continues at step 2 and
    no sample is read twice."""
    run_ranks(train_once, 2, settings(dataset, tmp_path, batch_size=2, grad_accum=2), None, str(stopped))
    written = completed_checkpoints(tmp_path / "checkpoints")
    assert [s for s, _ in written] == list(range(3, 9))
    both = {"rank0": (0, 6), "rank1": (0, 6)}
    assert position(saved(written[0][1], tmp_path)) == {"step": 3, "epoch": 0, "lr_step": 3, "loader": both}
    both = {"rank0": (1, 8), "rank1": (1, 8)}
    assert position(saved(written[-1][1], tmp_path)) == {"step": 8, "epoch": 1, "lr_step": 8, "loader": both}
