"""Preemption: SIGTERM (what SLURM, Kubernetes and torchrun send before stopping a job) ends the run
with a checkpoint at the next step boundary on every rank, then :class:`Preempted` (exit code
:data:`EXIT_PREEMPTED` from ``largefr train``).

The signal may reach one rank only (or the ranks at different steps), so the ranks agree: every
``train.preempt_check_every`` optimizer steps each rank all-reduces its flag (MAX of one int, one host
read); when any rank was signalled, all of them stop after that same step and write the checkpoint
together. With the default of 1 a stop costs at most one step plus the checkpoint write; the caller
must allow that much time between SIGTERM and SIGKILL (SLURM: ``--signal``'s lead time; torchrun
forwards SIGTERM to its workers and kills them 30 s later).
"""
from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

import torch
from torch.distributed import ProcessGroup

from largefr.distributed.agreement import any_rank

log = logging.getLogger("largefr.train")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): stopped on request with a checkpoint; run it again to continue
PREEMPT_SIGNALS = (signal.SIGTERM,)


class Preempted(Exception):
    """Training stopped on a signal after writing the checkpoint of ``step``."""

    def __init__(self, step: int, checkpoint: str) -> None:
        super().__init__(f"stopped on SIGTERM at step {step}; checkpoint {checkpoint} (rerun to resume)")
        self.step, self.checkpoint = step, checkpoint


class PreemptionWatch:
    """Records preemption signals while installed (a context manager); :meth:`agreed_stop` is collective."""

    def __init__(self, group: ProcessGroup, device: torch.device, check_every: int = 1) -> None:
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.group, self.device, self.check_every = group, device, check_every
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "PreemptionWatch":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in PREEMPT_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        else:
            log.warning("not in the main thread: SIGTERM will not write a checkpoint")
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested:
            log.warning("received %s: stopping with a checkpoint at the next step boundary",
                        signal.Signals(signum).name)
        self.requested = True

    def agreed_stop(self, step: int) -> bool:
        """Collective every ``check_every`` steps: True on every rank when any rank was signalled."""
        if step % self.check_every != 0:
            return False
        return any_rank(self.requested, self.group, self.device)
