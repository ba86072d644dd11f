"""Exact resume at the same world size: N steps, save, resume in fresh processes, M steps == N+M steps.

2 gloo ranks, fp32, an epoch boundary inside the resumed part, Partial FC sampling (the head's RNG),
dropout (the torch RNG, which the DataLoader also draws from), AdamW on both sides, gradient checkpointing. The final checkpoints of both runs are
compared entry by entry with zero tolerance: backbone, head slices, both optimizers, LR schedule, loss
scaler, data position, loader states and every RNG state.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from largefr.config import load_config
from largefr.backbone_file import read_meta_json
from largefr.train.checkpoint import completed_checkpoints, latest_checkpoint
from largefr.train.run import train
from multirank import run_ranks

N_STEPS, TOTAL_STEPS = 5, 11  # 8 steps per epoch on 2 ranks: the resumed part crosses into epoch 1


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from largefr.data.synth import SynthSpec
    from largefr.data.synth_dataset import write_synthetic_dataset

    out = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(out, SynthSpec(identities=8, per_identity=4, seed=3), workers=1, progress=False)
    return out


def overrides(dataset: Path, output_dir: Path) -> list[str]:
    return [
        f"data.path={dataset}", "data.num_workers=0", f"output_dir={output_dir}",
        "model.kwargs={base_width: 4}", "model.dropout=0.2", "head.embedding_size=16", "head.sample_rate=0.5",
        "train.batch_size=2", "train.precision=fp32", "train.log_every=4", "train.eval_bins=[]",
        "schedule.warmup_steps=2", f"schedule.total_steps={TOTAL_STEPS}", "checkpoint.every_steps=100",
        "model.grad_checkpoint=true",
        "logging.console=false",
    ]


def train_runs(ctx, plans: list[tuple[list[str], int | None]]) -> None:
    config = Path(__file__).resolve().parents[1] / "configs" / "synthetic_cpu.yaml"
    for sets, max_steps in plans:
        train(load_config(config, sets), ctx, max_steps=max_steps)


def flat_checkpoint(path: Path, tmp: Path) -> dict[str, Any]:
    out = tmp / f"{path.parent.parent.name}.pt"
    dcp_to_torch_save(path, out)
    return torch.load(out, weights_only=False)


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def runs(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An uninterrupted run, and one stopped after N_STEPS and resumed in fresh processes (2 ranks each)."""
    root = tmp_path_factory.mktemp("runs")
    whole, split = root / "whole", root / "split"
    run_ranks(train_runs, 2, [(overrides(dataset, whole), None), (overrides(dataset, split), N_STEPS)])
    stopped = latest_checkpoint(split / "checkpoints")
    assert stopped is not None and read_meta_json(stopped)["step"] == N_STEPS
    run_ranks(train_runs, 2, [(overrides(dataset, split), None)])  # resumes from the newest checkpoint
    return whole, split


@pytest.mark.slow
def test_resume_continues_exactly(runs: tuple[Path, Path], tmp_path: Path):
    whole, split = runs
    a, b = latest_checkpoint(whole / "checkpoints"), latest_checkpoint(split / "checkpoints")
    assert read_meta_json(a)["step"] == read_meta_json(b)["step"] == TOTAL_STEPS
    flat_a, flat_b = flat_checkpoint(a, tmp_path), flat_checkpoint(b, tmp_path)
    assert flat_a["progress"] == {"step": TOTAL_STEPS, "epoch": 1, "head_training_forwards": TOTAL_STEPS}
    assert_identical(flat_a, flat_b)
    exported = [torch.load(Path(p) / "backbone.pt", weights_only=True) for p in (a, b)]
    assert_identical(exported[0], exported[1])


@pytest.mark.slow
def test_single_process_cli_resumes_a_two_rank_checkpoint(runs: tuple[Path, Path], dataset: Path, tmp_path: Path):
    """`largefr train` without torchrun, from the 2-rank step-N checkpoint: the head is resharded onto one
    rank, and the loader position, the step and the LR schedule are rescaled (2 ranks x 2 images per
    step -> 1 rank x 2 images)."""
    from largefr.cli import main

    _, split = runs
    start = [p for s, p in completed_checkpoints(split / "checkpoints") if s == N_STEPS][0]
    config = Path(__file__).resolve().parents[1] / "configs" / "synthetic_cpu.yaml"
    sets = [a for s in overrides(dataset, tmp_path / "one") for a in ("--set", s)]
    # 5 steps x 2 ranks x 2 images = 20 samples of epoch 0: 10 one-rank steps; then one more (the schedule's end)
    resumed = 2 * N_STEPS
    assert main(["train", str(config), *sets, "--resume", str(start), "--max-steps", str(resumed + 1)]) == 0
    final = latest_checkpoint(tmp_path / "one" / "checkpoints")
    assert read_meta_json(final)["step"] == resumed + 1 == TOTAL_STEPS and read_meta_json(final)["world_size"] == 1
    flat = flat_checkpoint(final, tmp_path)
    assert flat["head"]["weight"].shape[0] == 8  # every class on the one rank
    assert flat["loader"]["rank0"]["step"] == resumed + 1 and flat["progress"]["epoch"] == 0
    assert flat["progress"]["step"] == flat["scheduler"]["last_step"] == resumed + 1
