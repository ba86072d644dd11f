"""SIGTERM ends training at the next step boundary with a checkpoint on every rank (the ranks agree by
an all-reduce of the flag), then Preempted / exit code 75; a rerun continues from that checkpoint."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from faults_common import CONFIG, REPO, tiny_run, write_dataset
from largefr.config import load_config
from largefr.train.checkpoint import completed_checkpoints, latest_checkpoint
from largefr.backbone_file import read_meta_json as read_meta
from multirank import run_ranks

TOTAL = 400  # far more steps than run before the signal lands


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("synth"))


def sigterm_when(path: Path, pid: int) -> threading.Thread:
    """A thread that sends SIGTERM to ``pid`` (< 0: a process group) as soon as ``path`` exists."""
    def watch() -> None:
        deadline = time.monotonic() + 120
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        if pid < 0:
            os.killpg(-pid, signal.SIGTERM)
        else:
            os.kill(pid, signal.SIGTERM)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def preempted_run(ctx, sets: list[str], first_checkpoint: str) -> tuple[int, str]:
    from largefr.train.preemption import Preempted
    from largefr.train.run import train

    if ctx.rank == 1:  # only one rank is signalled: the others must still stop at the same step
        sigterm_when(Path(first_checkpoint), os.getpid())
    try:
        train(load_config(CONFIG, sets), ctx)
    except Preempted as exc:
        return exc.step, exc.checkpoint
    return -1, ""


@pytest.mark.slow
def test_sigterm_on_one_rank_checkpoints_every_rank_at_the_same_step(dataset, tmp_path):
    out = tmp_path / "run"
    sets = tiny_run(dataset, out, "checkpoint.every_steps=3", total_steps=TOTAL)
    first = out / "checkpoints" / "step_00000003"
    (step0, ckpt0), (step1, ckpt1) = run_ranks(preempted_run, 2, sets, str(first))
    assert step0 == step1 and 3 <= step0 < TOTAL, (step0, step1)  # before: SIGTERM killed rank 1 outright
    assert ckpt0 == ckpt1 and Path(ckpt0) == latest_checkpoint(out / "checkpoints")
    assert read_meta(ckpt0)["step"] == step0 and read_meta(ckpt0)["world_size"] == 2
    assert not (out / "run.lock").exists()


@pytest.mark.slow
def test_cli_exits_with_the_preemption_code_after_its_checkpoint(dataset, tmp_path):
    """SIGTERM to the whole process group, as torchrun and SLURM send it: the DataLoader worker ignores it."""
    out = tmp_path / "run"
    sets = [a for s in tiny_run(dataset, out, "data.num_workers=1", total_steps=TOTAL) for a in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "largefr", "train", str(CONFIG), *sets], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    sigterm_when(out / "checkpoints" / "step_00000002", -proc.pid)  # a negative pid: the process group
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 75, output[-3000:]
    steps = [s for s, _ in completed_checkpoints(out / "checkpoints")]
    assert steps[-1] >= 2 and f"stopped on SIGTERM at step {steps[-1]}" in output


def child_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                    pids.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return pids


@pytest.mark.timeout(120)
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker through /proc")
def test_loader_workers_survive_the_sigterm_meant_for_the_training_process(dataset):
    from largefr.data.loader_factory import build_loader

    loader = build_loader(dataset, batch_size=2, kind="torch", num_threads=1, prefetch=1)
    batches = iter(loader)
    try:
        next(batches)
        workers = child_pids()
        assert workers, "no DataLoader worker"
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)
        rest = sum(1 for _ in batches)  # before: "DataLoader worker ... exited unexpectedly"
    finally:
        batches.close()
    assert rest == len(loader) - 1
