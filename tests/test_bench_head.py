"""``largefr bench head``: its JSON on a small config, and the row-traffic timing leaving W and state intact."""
from __future__ import annotations

import json

import pytest
import torch

from largefr.bench.baselines import RowTraffic
from largefr.heads.host_kernel import host_kernels
from largefr.cli import main as cli_main


@pytest.mark.parametrize("ids", [None, torch.tensor([0, 3, 4, 9])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("host_kernel", [False, True])
def test_row_traffic_moves_rows_without_changing_them(ids, dtype, host_kernel):
    if host_kernel and host_kernels() is None:
        pytest.skip("no working C compiler for the host SGD kernel")
    weight, momentum = torch.randn(10, 6).to(dtype), torch.randn(10, 6).to(dtype)
    before = [weight.clone(), momentum.clone()]
    traffic = RowTraffic([weight, momentum], ids, host_kernel=host_kernel)
    assert (traffic.library is not None) == (host_kernel and ids is not None)
    traffic()
    traffic()
    assert torch.equal(weight, before[0]) and torch.equal(momentum, before[1])
    if ids is not None and not host_kernel:
        assert torch.equal(traffic.rows[1], momentum[ids])


@pytest.mark.slow
def test_bench_head_json_has_both_ratios_for_each_storage_dtype(capsys):
    code = cli_main(["bench", "head", "--num-classes", "3000", "--embedding-size", "32", "--batch-size", "16",
                     "--sample-rate", "0.5", "--world-size", "2", "--steps", "2", "--warmup", "1",
                     "--weight-dtype", "fp32", "bf16", "--json"])
    results = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert code == 0 and [r["weight_dtype"] for r in results] == ["fp32", "bf16"]
    for result, size in zip(results, (4, 2)):
        assert result["num_classes"] == 3000 and result["sampled_rows_per_rank"] >= 750
        assert result["step_ms"] > 0 and result["floor_ms"] > 0 and result["row_traffic_ms"] > 0
        assert 0 < result["step_over_floor_plus_traffic"] < result["step_over_floor"]
        q1, q3 = result["step_over_floor_plus_traffic_quartiles"]
        assert q1 <= result["step_over_floor_plus_traffic"] <= q3
        assert result["slice_plus_state_mb"] == pytest.approx(2 * 1500 * 32 * size / 2**20)


@pytest.mark.slow
def test_bench_head_runs_several_configs_in_one_spawn_with_the_planner_beside(capsys):
    code = cli_main(["bench", "head", "--num-classes", "2000", "--embedding-size", "16", "--batch-size", "8",
                     "--sample-rate", "0.25", "1", "--dtype", "fp32", "fp16", "--world-size", "1", "--steps", "1",
                     "--warmup", "1", "--json"])
    results = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert code == 0 and [(r["sample_rate"], r["dtype"]) for r in results] == [
        (0.25, "fp32"), (0.25, "fp16"), (1.0, "fp32"), (1.0, "fp16")]
    for r in results:
        assert r["device"] == "cpu" and r["step_ms"] > 0 and r["planned_mb"] > r["slice_plus_state_mb"]
        assert "max_memory_allocated_mb" not in r  # an accelerator's allocator statistic only


def test_a_config_the_planner_says_does_not_fit_is_skipped_with_the_numbers(monkeypatch):
    from largefr.bench.head import HeadBenchConfig, _does_not_fit, planned_bytes

    cfg = HeadBenchConfig(num_classes=32_000_000, embedding_size=512, batch_size=128, sample_rate=1.0, world_size=1)
    assert planned_bytes(cfg) > 2 * 32_000_000 * 512 * 4  # W slice + momentum at least
    monkeypatch.setattr(torch.accelerator, "get_memory_info", lambda device: (139 * 2**30, 141 * 2**30), raising=False)
    reason = _does_not_fit(cfg, torch.device("cuda", 0))
    assert reason.startswith("does not fit: the planner predicts 137.3 GiB for the head") and "139.0 GiB free on cuda:0" in reason
    small = HeadBenchConfig(num_classes=1_000_000, embedding_size=512, batch_size=128, sample_rate=0.1, world_size=1)
    assert _does_not_fit(small, torch.device("cuda", 0)) == "" and _does_not_fit(cfg, torch.device("cpu")) == ""


@pytest.mark.slow
def test_bench_head_runs_a_modern_margin_and_states_its_cost(capsys):
    code = cli_main(["bench", "head", "--margin", "curricularface", "--margin-param", "scale=32", "--num-classes", "400",
                     "--embedding-size", "16", "--batch-size", "8", "--world-size", "1", "--steps", "1", "--warmup", "1",
                     "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and result["margin"] == "curricularface" and result["margin_params"] == {"scale": 32.0}
    assert "extra passes over the logits" in result["margin_extra_cost"]
