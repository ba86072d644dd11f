"""Metric loggers behind one small interface: console (tqdm-friendly), JSONL file, Weights & Biases.

Only rank 0 logs: :func:`build_loggers` returns a :class:`NullLogger` on every other rank, so wandb is
neither imported nor initialised there. wandb is imported only when enabled, runs offline unless
``WANDB_MODE`` or the config says otherwise, and takes its API key only from the environment
(``WANDB_API_KEY``, read by wandb itself).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Mapping, Sequence, TextIO

import torch
from tqdm import tqdm

from largefr.config import LoggingConfig

Metrics = Mapping[str, float | int | torch.Tensor]


def to_scalars(step: int, metrics: Metrics) -> dict[str, float | int]:
    """Check the step and metrics; 0-d tensors become Python numbers (a host sync: call only when logging)."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    out: dict[str, float | int] = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"metric {key!r}={value!r}: expected a str name and an int, float or 1-element tensor")
        out[key] = value
    return out


class Logger(ABC):
    @abstractmethod
    def log(self, step: int, metrics: Metrics) -> None:
        """Record ``metrics`` at optimizer step ``step``."""

    def close(self) -> None:
        """Flush and release resources; further calls to log are errors."""

    def __enter__(self) -> Logger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NullLogger(Logger):
    """What non-zero ranks get: accepts and drops everything."""

    def log(self, step: int, metrics: Metrics) -> None:
        return None


class ConsoleLogger(Logger):
    """One line per call, ``step 120 | loss 10.234 | lr 0.0998``, written through tqdm (progress bars stay intact)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream

    def log(self, step: int, metrics: Metrics) -> None:
        values = to_scalars(step, metrics)
        parts = [f"step {step}"] + [f"{k} {_fmt(v)}" for k, v in values.items()]
        tqdm.write(" | ".join(parts), file=self.stream or sys.stdout)


class JsonlLogger(Logger):
    """Appends ``{"step": s, "time": unix_seconds, **metrics}`` per line; NaN/inf are written as strings."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO | None = self.path.open("a", encoding="utf-8")

    def log(self, step: int, metrics: Metrics) -> None:
        if self._file is None:
            raise RuntimeError(f"JsonlLogger({self.path}) is closed")
        values = {k: v if math.isfinite(v) else str(v) for k, v in to_scalars(step, metrics).items()}
        record = {"step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class WandbLogger(Logger):
    """A wandb run (offline by default). Construct on rank 0 only."""

    def __init__(
        self,
        project: str,
        directory: str | Path,
        mode: str = "offline",
        entity: str | None = None,
        run_name: str | None = None,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        import wandb  # imported only when enabled

        mode = os.environ.get("WANDB_MODE", mode)
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"wandb mode must be 'offline', 'online' or 'disabled', got {mode!r}")
        Path(directory).mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(project=project, entity=entity, name=run_name, mode=mode,
                               dir=str(directory), config=run_config or {})

    def log(self, step: int, metrics: Metrics) -> None:
        if self._run is None:
            raise RuntimeError("WandbLogger is closed")
        self._run.log(to_scalars(step, metrics), step=step)

    def close(self) -> None:
        if self._run is not None:
            import wandb

            self._run.finish()
            self._run = None
            # wandb's own atexit teardown is unreliable once processes were forked or spawned (its docs);
            # at exit it then fails on a service connection already gone
            wandb.teardown()


class MultiLogger(Logger):
    def __init__(self, loggers: Sequence[Logger]) -> None:
        self.loggers = list(loggers)

    def log(self, step: int, metrics: Metrics) -> None:
        for logger in self.loggers:
            logger.log(step, metrics)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def build_loggers(
    cfg: LoggingConfig, output_dir: str | Path, rank: int, run_config: dict[str, Any] | None = None
) -> Logger:
    """The loggers the config asks for on rank 0 (JSONL at ``<output_dir>/metrics.jsonl``); a NullLogger elsewhere."""
    if rank != 0:
        return NullLogger()
    loggers = MultiLogger([])
    try:
        if cfg.console:
            loggers.loggers.append(ConsoleLogger())
        if cfg.jsonl:
            loggers.loggers.append(JsonlLogger(Path(output_dir) / "metrics.jsonl"))
        if cfg.wandb.enabled:
            w = cfg.wandb
            loggers.loggers.append(WandbLogger(w.project, output_dir, w.mode, w.entity, w.run_name, run_config))
    except BaseException:
        loggers.close()  # release what was opened before the failure, then report it
        raise
    return loggers


def _fmt(value: float | int) -> str:
    return str(value) if isinstance(value, int) else f"{value:.5g}"
