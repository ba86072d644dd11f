"""Training faults (issue 14 part 2): the run-directory lock, a changed config on resume (lr applied,
unhonourable fields refused), divergence (no poisoned checkpoint is resumed), skipped-sample summaries."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from faults_common import CONFIG, metrics, tiny_run, write_dataset
from largefr.config import ConfigError, load_config
from largefr.train.checkpoint import completed_checkpoints, latest_checkpoint
from largefr.train.run_lock import LOCK_NAME, LockOwner, RunDirectoryLocked, RunLock, is_stale
from multirank import run_ranks


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("synth"))


def train_plans(ctx, plans: list[tuple[list[str], int | None]]) -> list[str]:
    """Runs ``train`` for each (overrides, max_steps); returns what each one raised ('' if nothing)."""
    from largefr.train.run import train

    outcomes = []
    for sets, max_steps in plans:
        try:
            train(load_config(CONFIG, sets), ctx, max_steps=max_steps)
            outcomes.append("")
        except (ConfigError, RunDirectoryLocked, RuntimeError) as exc:
            outcomes.append(f"{type(exc).__name__}: {exc}")
    return outcomes


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------------ lock


def test_lock_is_exclusive_records_its_owner_and_is_released(tmp_path):
    first = RunLock(tmp_path)
    owner = first.acquire()
    recorded = json.loads((tmp_path / LOCK_NAME).read_text())
    assert recorded == {"pid": os.getpid(), "host": socket.gethostname(), "started": owner.started}
    with pytest.raises(RunDirectoryLocked, match=rf"in use by another job: pid {os.getpid()} on host"):
        RunLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    assert RunLock(tmp_path).acquire().pid == os.getpid()


def test_stale_lock_of_a_dead_pid_is_replaced_but_another_hosts_lock_is_not(tmp_path, caplog):
    lock_file = tmp_path / LOCK_NAME
    crashed = LockOwner(dead_pid(), socket.gethostname(), time.time() - 60)
    assert is_stale(crashed)
    lock_file.write_text(json.dumps(crashed.__dict__))
    with caplog.at_level(logging.WARNING, logger="largefr.train"):
        owner = RunLock(tmp_path).acquire()
    assert owner.pid == os.getpid() and "removing the stale lock" in caplog.text
    lock_file.write_text(json.dumps(LockOwner(crashed.pid, "some-other-node", time.time()).__dict__))
    assert not is_stale(read := LockOwner(crashed.pid, "some-other-node", 0.0))
    with pytest.raises(RunDirectoryLocked, match=rf"pid {read.pid} on host 'some-other-node'.*remove .*run.lock"):
        RunLock(tmp_path).acquire()


@pytest.mark.slow
def test_second_job_on_a_locked_run_directory_fails_clearly_on_every_rank(dataset, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:  # a live job of this host holds the directory
        (out / LOCK_NAME).write_text(json.dumps(LockOwner(holder.pid, socket.gethostname(), time.time()).__dict__))
        outcomes = run_ranks(train_plans, 2, [(tiny_run(dataset, out), 2)])
    finally:
        holder.kill()
        holder.wait()
    for (outcome,) in outcomes:
        assert outcome.startswith("RunDirectoryLocked") and f"pid {holder.pid}" in outcome, outcome
    assert completed_checkpoints(out / "checkpoints") == []  # it wrote nothing (before: it trained)
    assert not (out / "config.yaml").exists()


# ------------------------------------------------------------------------------- config on resume


def flat(path: Path, tmp: Path) -> dict:
    target = tmp / f"{path.name}.pt"
    dcp_to_torch_save(path, target)
    return torch.load(target, weights_only=False)


@pytest.mark.slow
def test_resume_applies_a_new_lr_and_refuses_fields_it_cannot_honour(dataset, tmp_path):
    out = tmp_path / "run"
    base = tiny_run(dataset, out, "optim.backbone.lr=3e-3", "optim.head.lr=3e-3")
    lower = [*base, "optim.backbone.lr=1e-5", "optim.head.lr=2e-5", "optim.backbone.weight_decay=0.01"]
    plans = [(base, 4), (lower, 6), ([*base, "head.embedding_size=32"], 8), ([*base, "head.margin=arcface"], 8)]
    outcomes = run_ranks(train_plans, 1, plans)[0]
    assert outcomes[:2] == ["", ""]
    assert outcomes[2].startswith("ConfigError: config field head.embedding_size: is 32, but checkpoint")
    assert "trained with 16" in outcomes[2]
    assert outcomes[3].startswith("ConfigError: config field head.margin: is 'arcface'") and "'cosface'" in outcomes[3]
    from largefr.train.schedule import LRSchedule

    schedule = LRSchedule(12, 2, "cosine")
    logged = {m["step"]: m for m in metrics(out)}
    for step in (5, 6):  # logged after the scheduler stepped: the lr of the next step, base * schedule(s)
        assert logged[step]["lr"] == pytest.approx(1e-5 * schedule(step), rel=1e-12)  # before: 3e-3 * ...
        assert logged[step]["lr_head"] == pytest.approx(2e-5 * schedule(step), rel=1e-12)
    saved = flat(latest_checkpoint(out / "checkpoints"), tmp_path)
    group = saved["backbone_optim"]["param_groups"][0]
    assert group["initial_lr"] == 1e-5 and group["weight_decay"] == 0.01


# ------------------------------------------------------------------------------------- divergence


def all_finite(path: Path, tmp: Path) -> bool:
    state = flat(path, tmp)
    tensors = [*state["backbone"].values(), state["head"]["weight"]]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


@pytest.mark.slow
def test_divergence_leaves_no_poisoned_checkpoint_and_a_rerun_resumes_a_healthy_one(dataset, tmp_path):
    out = tmp_path / "run"
    wild = tiny_run(dataset, out, "optim.backbone.lr=1e4", "optim.head.lr=1e4", "train.clip_grad_norm=null",
                    "train.log_every=4", "schedule.warmup_steps=0", total_steps=8)
    sane = [*wild, "optim.backbone.lr=1e-3", "optim.head.lr=1e-3"]
    (diverged, rerun), = run_ranks(train_plans, 1, [(wild, None), (sane, None)])
    assert diverged.startswith("TrainingDiverged") and rerun == "", (diverged, rerun)
    assert list((out / "checkpoints").glob("*.diverged")), "the suspect checkpoints were moved aside"
    kept = completed_checkpoints(out / "checkpoints")
    assert all(all_finite(path, tmp_path) for _, path in kept)
    assert kept[-1][0] == 8  # the rerun finished from the last healthy checkpoint (before: diverged again)
    assert not any("loss" in m and m["loss"] != m["loss"] for m in metrics(out))


# --------------------------------------------------------------------------------- skipped samples


def corrupt_first_image(dataset: Path, out: Path) -> str:
    """A copy of ``dataset`` whose first JPEG is zeroed in place (undecodable); returns its member name."""
    import shutil

    shutil.copytree(dataset, out)
    idx = next(out.glob("*.idx"))
    first = idx.read_text().splitlines()[1].split()
    offset, size = int(first[1]), int(first[2])
    with open(next(out.glob("*.tar")), "r+b") as tar:
        tar.seek(offset)
        tar.write(b"\0" * size)
    return first[3]


def train_collecting_warnings(ctx, sets: list[str]) -> list[str]:
    from largefr.train.run import train

    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("largefr").addHandler(handler)
    logging.getLogger("largefr").setLevel(logging.INFO)
    train(load_config(CONFIG, sets), ctx)
    return messages


@pytest.mark.slow
def test_corrupt_samples_are_summarised_every_epoch_in_the_logs_and_metrics(dataset, tmp_path):
    data = tmp_path / "data"
    member = corrupt_first_image(dataset, data)
    out = tmp_path / "run"
    # 1 rank x batch 4: 8 steps per epoch; 9 steps end epoch 0 (its generator is closed early, as always)
    messages = run_ranks(train_collecting_warnings, 1, tiny_run(data, out, "checkpoint.every_steps=100",
                                                                "train.batch_size=4", total_steps=9))
    assert any(member.split(".")[0] in m and "skipping corrupt sample" in m for rank in messages for m in rank)
    assert "epoch 0: skipped 1 corrupt samples (1 in total)" in messages[0]  # before: no summary at all
    summaries = [m for m in metrics(out) if "skipped_samples" in m]
    assert [(m["step"], m["skipped_samples"], m["skipped_samples_epoch"]) for m in summaries] == [(8, 1, 1)]
