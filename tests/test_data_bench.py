"""``largefr bench data`` on a tiny synthetic dataset, and the DALI device choice."""
from __future__ import annotations

import json

import pytest
import torch

from largefr.cli import main as cli_main
from largefr.data.loader_factory import dali_available
from largefr.data.synth import SynthSpec
from largefr.data.synth_dataset import write_synthetic_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench") / "synth"
    write_synthetic_dataset(root, SynthSpec(identities=8, per_identity=8, seed=0), workers=1, progress=False)
    return root


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_bench_data_prints_json_with_both_rates(tiny, kind, capsys):
    if kind == "dali" and not dali_available():
        pytest.skip("nvidia.dali missing")
    code = cli_main(["bench", "data", "--source", str(tiny), "--loader", kind, "--threads", "1", "--batch-size", "8",
                     "--batches", "3", "--warmup", "1", "--repeats", "1", "--device", "cpu", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and result["loader"] == kind and result["num_samples"] == 64
    assert result["images_per_s"] > 0 and result["decode_only_images_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["images_per_s"] / result["decode_only_images_per_s"], rel=0.01)
    assert result["ratio_q1"] == result["ratio"] == result["ratio_q3"]  # one pair


def test_dali_device_follows_the_torch_device():
    pytest.importorskip("nvidia.dali")
    from largefr.data.dali_loader import dali_device_id

    assert dali_device_id(torch.device("cpu")) is None
    assert dali_device_id(torch.device("xpu", 1)) == 1
