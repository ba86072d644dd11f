"""``largefr bench scale``: a one-point sweep in fresh ranks writes results.csv/json and both plots."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from largefr.bench.scale import ScalePoint, planned_bytes
from largefr.cli import main as cli_main


@pytest.mark.slow
def test_sweep_writes_results_and_plots(tmp_path: Path) -> None:
    code = cli_main(["bench", "scale", "--num-classes", "2000", "--world-size", "1", "--sample-rate", "0.5",
                     "--weight-dtype", "bf16", "--storage", "host", "--embedding-size", "16", "--batch-size", "8",
                     "--steps", "3", "--warmup", "1", "--out", str(tmp_path)])
    assert code == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    with open(tmp_path / "results.csv") as f:
        assert [int(r["num_classes"]) for r in csv.DictReader(f)] == [2000]
    for row in rows:
        point = ScalePoint(row["num_classes"], 1, 0.5, "bf16", "host", 16, 8)
        device, host = planned_bytes(point)
        assert row["planned_mb"] == pytest.approx((device + host) / 2**20)
        assert host == 2 * row["num_classes"] * 16 * 2  # bf16 W + bf16 momentum in the host store
        assert row["sampled_rows_per_rank"] == row["num_classes"] // 2
        # ru_maxrss is a high-water mark: a head this small may stay under the start-up peak (reads 0)
        assert row["peak_mb"] >= 0 and row["step_ms"] > 0 and row["fp32_floor_ms"] > 0
        q1, q3 = row["step_over_fp32_floor_quartiles"]
        assert 0 < q1 <= row["step_over_fp32_floor"] <= q3
    for name in ("memory_vs_classes.png", "step_vs_sampled_rows.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
