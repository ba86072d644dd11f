"""``largefr bench head``: its JSON on a small config, and the row-traffic timing leaving W and state intact."""
from __future__ import annotations

import json

import pytest
import torch

from largefr.bench.head import _RowTraffic
from largefr.cli import main as cli_main


@pytest.mark.parametrize("ids", [None, torch.tensor([0, 3, 4, 9])])
def test_row_traffic_moves_rows_without_changing_them(ids):
    weight, momentum = torch.randn(10, 6), torch.randn(10, 6)
    before = [weight.clone(), momentum.clone()]
    traffic = _RowTraffic([weight, momentum], ids)
    traffic()
    traffic()
    assert torch.equal(weight, before[0]) and torch.equal(momentum, before[1])
    if ids is not None:
        assert torch.equal(traffic.rows[1], momentum[ids])


@pytest.mark.slow
def test_bench_head_json_has_both_ratios(capsys):
    code = cli_main(["bench", "head", "--num-classes", "3000", "--embedding-size", "32", "--batch-size", "16",
                     "--sample-rate", "0.5", "--world-size", "2", "--steps", "2", "--warmup", "1", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and result["num_classes"] == 3000 and result["sampled_rows_per_rank"] >= 750
    assert result["step_ms"] > 0 and result["floor_ms"] > 0 and result["row_traffic_ms"] > 0
    assert 0 < result["step_over_floor_plus_traffic"] < result["step_over_floor"]
    assert result["slice_plus_state_mb"] == pytest.approx(2 * 1500 * 32 * 4 / 2**20)


@pytest.mark.slow
def test_bench_head_runs_a_modern_margin_and_states_its_cost(capsys):
    code = cli_main(["bench", "head", "--margin", "curricularface", "--margin-param", "scale=32", "--num-classes", "400",
                     "--embedding-size", "16", "--batch-size", "8", "--world-size", "1", "--steps", "1", "--warmup", "1",
                     "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and result["margin"] == "curricularface" and result["margin_params"] == {"scale": 32.0}
    assert "extra passes over the logits" in result["margin_extra_cost"]
