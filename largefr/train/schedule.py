"""Learning-rate schedule by optimizer step: linear warmup, then poly or cosine decay.

:class:`LRSchedule` is a factor function ``step -> multiplier of the base lr`` (usable directly as a
``torch.optim.lr_scheduler.LambdaLR`` lambda). :class:`ScheduledLR` applies it to any object exposing
``param_groups`` with an ``"lr"`` entry, so the backbone's torch optimizer and the head's row-sparse
optimizer follow the same curve from their own base lrs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from largefr.config import ScheduleConfig


class HasParamGroups(Protocol):
    param_groups: list[dict[str, Any]]


@dataclass(frozen=True)
class LRSchedule:
    """Factor for 0-based optimizer step ``s`` (the step about to be taken).

    warmup (s < W):  (s + 1) / (W + 1)             -- never 0, reaches 1 at s = W
    decay  (s >= W): p = (s - W) / (T - W) clamped to [0, 1]
                     poly:   (1 - p) ** power
                     cosine: (1 + cos(pi p)) / 2
    result = min_lr_ratio + (1 - min_lr_ratio) * decay, so the lr ends at min_lr_ratio * base at s = T.
    """

    total_steps: int
    warmup_steps: int = 0
    decay: str = "poly"
    power: float = 2.0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}")
        if self.decay not in ("poly", "cosine"):
            raise ValueError(f"decay must be 'poly' or 'cosine', got {self.decay!r}")
        if not self.power > 0:
            raise ValueError(f"power must be > 0, got {self.power}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = self.total_steps - self.warmup_steps
        progress = 1.0 if span == 0 else min(1.0, (step - self.warmup_steps) / span)
        if self.decay == "poly":
            decay = (1.0 - progress) ** self.power
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * decay


def schedule_from_config(cfg: ScheduleConfig, epochs: int, steps_per_epoch: int) -> LRSchedule:
    """Resolve epoch-based fields with the number of optimizer steps per epoch (after grad_accum)."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    total = cfg.total_steps if cfg.total_steps is not None else epochs * steps_per_epoch
    if cfg.warmup_steps is not None:
        warmup = cfg.warmup_steps
    else:
        warmup = round((cfg.warmup_epochs or 0.0) * steps_per_epoch)
    return LRSchedule(total, warmup, cfg.decay, cfg.power, cfg.min_lr_ratio)


class ScheduledLR:
    """Sets ``group["lr"] = group["initial_lr"] * schedule(step)`` on every group of every optimizer.

    Call :meth:`step` after each optimizer step, like a torch LR scheduler. On construction the base lr
    of each group is recorded as ``initial_lr`` (kept if already present, e.g. after a resume) and the
    factor of step 0 is applied.
    """

    def __init__(self, optimizers: Sequence[HasParamGroups], schedule: LRSchedule) -> None:
        if not optimizers:
            raise ValueError("ScheduledLR needs at least one optimizer")
        for opt in optimizers:
            if not hasattr(opt, "param_groups"):
                raise TypeError(f"{type(opt).__name__} has no param_groups; expected an optimizer-like object")
            for group in opt.param_groups:
                group.setdefault("initial_lr", group["lr"])
        self.optimizers = list(optimizers)
        self.schedule = schedule
        self.last_step = 0
        self._apply()

    def _apply(self) -> None:
        factor = self.schedule(self.last_step)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for opt in self.optimizers for group in opt.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state["last_step"])
        self._apply()
