"""Elastic restart through launch/single_node.sh: kill -9 of one worker mid-run under MAX_RESTARTS=1; torchrun
restarts both ranks, they resume from the newest complete checkpoint and end with the weights, optimizer
states and data position of an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from faults_common import CONFIG, REPO, tiny_run, write_dataset
from largefr.config import load_config
from largefr.train.checkpoint import latest_checkpoint
from largefr.backbone_file import read_meta_json as read_meta
from multirank import run_ranks

TOTAL = 24


def uninterrupted(ctx, sets: list[str]) -> None:
    from largefr.train.run import train

    train(load_config(CONFIG, sets), ctx)


def worker_pids(agent: int) -> dict[int, int]:
    """LOCAL_RANK -> pid of the torchrun agent's worker processes."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != agent:
                continue
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if "LOCAL_RANK" in env:
            found[int(env["LOCAL_RANK"])] = int(entry.name)
    return found


def flat(path: Path, out: Path) -> dict:
    dcp_to_torch_save(path, out)
    return torch.load(out, weights_only=False)


def assert_same(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc")
def test_killed_rank_restarts_under_torchrun_and_ends_as_an_uninterrupted_run(tmp_path):
    dataset = write_dataset(tmp_path / "synth")
    extra = ("checkpoint.every_steps=4", "train.log_every=4", "train.collective_timeout_s=60")
    elastic, whole = tmp_path / "elastic", tmp_path / "whole"
    sets = [a for s in tiny_run(dataset, elastic, *extra, total_steps=TOTAL) for a in ("--set", s)]
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "NPROC_PER_NODE": "2", "MAX_RESTARTS": "1"}
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)  # the launcher sets it
    proc = subprocess.Popen(["bash", str(REPO / "launch" / "single_node.sh"), str(CONFIG), *sets], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 150
        while latest_checkpoint(elastic / "checkpoints") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        killed_after = latest_checkpoint(elastic / "checkpoints")
        workers = worker_pids(proc.pid)
        assert killed_after is not None and 1 in workers, "no checkpoint / workers to kill"
        os.kill(workers[1], signal.SIGKILL)
        output, _ = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, output[-6000:]
    assert "Restarting" in output or "restart" in output.lower(), output[-3000:]  # torchrun did restart
    assert "resumed from" in output, output[-3000:]
    final = latest_checkpoint(elastic / "checkpoints")
    assert read_meta(final)["step"] == TOTAL and read_meta(killed_after)["step"] < TOTAL

    run_ranks(uninterrupted, 2, tiny_run(dataset, whole, *extra, total_steps=TOTAL))
    reference = latest_checkpoint(whole / "checkpoints")
    assert_same(flat(final, tmp_path / "a.pt"), flat(reference, tmp_path / "b.pt"))
