"""``largefr plan`` on the command line: a plan, the --max-classes search, the margin's buffers, bad input."""
from __future__ import annotations

import re

import pytest

from largefr.cli import main
from largefr.memory_plan import PlanInput, max_classes, parse_bytes


def _total_gib(text: str) -> float:
    return float(re.search(r"total \(device\)\s+([0-9.]+) GiB", text).group(1))  # type: ignore[union-attr]


def test_sub_centres_triple_the_slice_and_add_their_buffers(capsys: pytest.CaptureFixture[str]) -> None:
    common = ["plan", "--num-classes", "10000000", "--world-size", "8", "--sample-rate", "0.1", "--chunk-rows", "64"]
    assert main(common) == 0
    plain = capsys.readouterr().out
    assert main([*common, "--margin", "subcenter_arcface", "--margin-param", "sub_centers=3"]) == 0
    sub = capsys.readouterr().out
    assert "x 3 sub-centres" in sub and "head: sub-centre scores" in sub and "head: best sub-centre" in sub
    assert _total_gib(sub) > 2.9 * _total_gib(plain)


def test_max_classes_prints_the_planners_boundary(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--world-size", "8", "--sample-rate", "0.1", "--batch-size", "64", "--precision", "fp16",
            "--weight-dtype", "fp16", "--margin", "curricularface"]
    assert main(["plan", "--max-classes", "--device-memory", "16GiB", *args]) == 0
    out = capsys.readouterr().out
    best = int(re.search(r"ranks: ([0-9,]+)", out).group(1).replace(",", ""))  # type: ignore[union-attr]
    template = PlanInput(8, world_size=8, batch_size=64, sample_rate=0.1, precision="fp16", weight_dtype="fp16",
                         margin="curricularface")
    assert best == max_classes(template, parse_bytes("16GiB")) and "head: non-target slope" in out
    assert re.search(rf"\(bound by device memory \([0-9,]+ B over\) at {best + 1:,} classes\)", out)


def test_max_classes_says_when_host_memory_binds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--max-classes", "--device-memory", "32GiB", "--host-memory", "1GiB", "--world-size", "8",
                 "--sample-rate", "0.1", "--storage", "host", "--weight-dtype", "bf16"]) == 0
    assert re.search(r"ranks: ([0-9,]+) \(bound by host memory \([0-9,]+ B over\)", capsys.readouterr().out)


def test_centre_loss_adds_its_centres(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--num-classes", "8000000", "--world-size", "8", "--center-loss"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"center loss: class centres\s+1\.907 GiB", out), out  # 1M x 512 x 4 B


@pytest.mark.parametrize(
    "argv, message",
    [(["--num-classes", "100", "--margin", "arcfcae"], "unknown margin 'arcfcae'"),
     (["--max-classes", "--device-memory", "1MiB", "--margin", "arcfcae"], "unknown margin 'arcfcae'"),
     (["--num-classes", "100", "--margin", "subcenter_arcface", "--margin-param", "centres=3"], "bad parameters"),
     (["--max-classes", "--device-memory", "1KiB"], "fits no layout"),
     (["--num-classes", "3", "--world-size", "4", "--dry-run"], "must be >= world size 4")],
)
def test_bad_input_names_the_value(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        main(["plan", *argv])
