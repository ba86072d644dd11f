"""Divergence: a NaN or infinite loss or parameter stops training, and no poisoned checkpoint is resumed.

Before a checkpoint is published every rank checks that its parameters (backbone, its W slice) and
buffers are finite, and the trainer checks the losses of the steps since its last check; a failure is
:class:`TrainingDiverged` and nothing is written. A checkpoint of finite weights can still be poisoned
(weights of 1e33 whose next forward overflows): the loss of step ``s + 1`` is the first evidence that
checkpoint ``s`` is healthy. So when the loss of some step in ``(verified, now]`` is not finite (the
trainer reads losses at log and checkpoint steps), every checkpoint of step ``>= verified`` is moved
aside to ``step_N.diverged/`` (kept for inspection, never picked by auto-resume), and a rerun (e.g. with
a lower lr) resumes from the newest checkpoint whose successor step had a finite loss.
"""
from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Iterable

import torch

from largefr.train.checkpoint import completed_checkpoints

log = logging.getLogger("largefr.train")

QUARANTINE_SUFFIX = ".diverged"


class TrainingDiverged(RuntimeError):
    """The loss or a parameter became NaN or infinite."""


def is_finite_number(value: float) -> bool:
    return math.isfinite(value)


def nonfinite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity (one host read per tensor)."""
    bad = []
    for name, tensor in named:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad.append(name)
    return bad


def quarantine_from(ckpt_root: str | Path, first_suspect_step: int) -> list[Path]:
    """Move every complete checkpoint of step >= ``first_suspect_step`` to ``step_N.diverged``."""
    moved = []
    for step, path in completed_checkpoints(ckpt_root):
        if step >= first_suspect_step:
            target = path.with_name(path.name + QUARANTINE_SUFFIX)
            if target.exists():
                shutil.rmtree(target)
            path.rename(target)
            moved.append(target)
    if moved:
        log.warning("the run diverged after step %d: moved %s aside (auto-resume will not pick them)",
                    first_suspect_step, ", ".join(p.name for p in moved))
    return moved
