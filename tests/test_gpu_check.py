"""launch/gpu_check.sh refuses without a CUDA GPU; its reporter turns each part's output into JSON + one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "launch" / "gpu_check_report.py"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible: the check would run")
def test_gpu_check_refuses_clearly_without_a_cuda_gpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "launch" / "gpu_check.sh"), str(out)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 2 and "no CUDA GPU visible" in done.stderr and "launch/test.sh" in done.stderr
    assert not out.exists()


def report(tmp_path: Path, part: str, kind: str, rc: int = 0) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, str(REPORT), part, kind, str(tmp_path), str(rc), "12"],
                          capture_output=True, text=True, check=True)
    return json.loads((tmp_path / f"{part}.json").read_text()), done.stdout.strip()


def test_reporter_reads_junit_json_lines_and_training_metrics(tmp_path):
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase name="a" time="0.5"/><testcase name="b"><failure message="boom"/></testcase>'
        '<testcase name="c"><skipped message="no CUDA"/></testcase></testsuite></testsuites>')
    data, line = report(tmp_path, "tests", "junit", rc=1)
    assert data["status"] == "FAILED rc=1" and data["passed"] == 1 and data["failures"] == 1
    assert {"name": "b", "outcome": "failure", "message": "boom"} in data["cases"]
    assert line.startswith("[gpu_check] tests") and "1 passed, 1 failed, 0 errors, 1 skipped" in line

    rows = [{"num_classes": 10**6, "sample_rate": 0.1, "dtype": "bf16", "step_ms": 2.5, "floor_ms": 1.0,
             "step_over_floor": 2.5, "max_memory_allocated_mb": 4000.0, "planned_mb": 4100.0},
            {"num_classes": 32 * 10**6, "sample_rate": 1.0, "dtype": "fp16", "skipped": "does not fit"},
            {"num_classes": 32 * 10**6, "sample_rate": 1.0, "dtype": "fp16", "weight_dtype": "bf16", "skipped": "no"}]
    (tmp_path / "bench_head.log").write_text("noise\n" + "\n".join(json.dumps(r) for r in rows) + "\n")
    data, line = report(tmp_path, "bench_head", "jsonl", rc=124)
    assert data["status"] == "TIMEOUT" and data["results"] == rows
    assert "step 2.50 ms floor 1.00 ms x2.50 mem 4000/4100 MB" in line and "C=32,000,000 r=1.0 fp16: skipped" in line
    assert "C=32,000,000 r=1.0 fp16 W bf16: skipped" in line

    (tmp_path / "train_fp16").mkdir()
    records = [{"step": 25, "loss": 9.0, "images_per_s": 100.0}, {"step": 50, "loss": 7.0, "images_per_s": 900.0},
               {"step": 75, "loss": 5.0, "images_per_s": 1100.0}, {"step": 75, "val/verification_acc": 0.91}]
    (tmp_path / "train_fp16" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    data, line = report(tmp_path, "train_fp16", "train")
    assert data["steps"] == 75 and data["images_per_s_median"] == 1000.0 and data["verification_accuracy"] == 0.91
    assert "75 steps, 1000 images/s, loss 5.000, verification accuracy 0.910" in line
