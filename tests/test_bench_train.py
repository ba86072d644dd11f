"""``largefr bench train``: the demo recipe's steps fed by the loader and from memory, in one run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from backbones import one_torch_thread  # noqa: F401  (fixture)
from largefr.cli import main as cli_main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "synthetic_cpu.yaml"


@pytest.mark.slow
def test_bench_train_reports_both_rates_and_their_ratio(tmp_path, capsys, one_torch_thread):
    from largefr.data.synth import SynthSpec
    from largefr.data.synth_dataset import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "synth", SynthSpec(identities=6, per_identity=4, seed=1), workers=1, progress=False)
    sets = [f"data.path={tmp_path / 'synth'}", "data.num_workers=1", "model.kwargs={base_width: 4}",
            "head.embedding_size=16", "train.batch_size=4", "train.grad_accum=2", "schedule.warmup_steps=1"]
    code = cli_main(["bench", "train", str(CONFIG), *[a for s in sets for a in ("--set", s)],
                     "--steps", "2", "--warmup", "1", "--repeats", "1", "--in-memory", "2", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and result["device"] == "cpu" and result["batch_size"] == 4 and result["precision"] == "bf16"
    assert result["loader_images_per_s"] > 0 and result["memory_images_per_s"] > 0
    ratio = result["loader_images_per_s"] / result["memory_images_per_s"]
    assert result["loader_over_memory"] == pytest.approx(ratio, rel=0.01)  # one pair: its ratio
    assert result["ratio_q1"] == result["loader_over_memory"] == result["ratio_q3"]


def test_bench_train_rejects_bad_counts():
    with pytest.raises(ValueError, match="--steps must be >= 1, got 0"):
        cli_main(["bench", "train", str(CONFIG), "--steps", "0"])
