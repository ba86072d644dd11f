"""Wiring of a training run: config -> dataset, parts, loggers, verifier, resume -> :class:`Trainer`."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from largefr.config import Config, ConfigError
from largefr.distributed import DistContext
from largefr.train.build import (
    build_parts,
    build_train_loader,
    resolve_dataset,
    resolve_eval_bins,
    steps_per_epoch,
)
from largefr.train.checkpoint import latest_checkpoint
from largefr.train.evaluate import PeriodicVerifier
from largefr.train.loggers import build_loggers
from largefr.train.trainer import Trainer
from largefr.train.state import Progress, resume as resume_from

log = logging.getLogger("largefr.train")


def resume_path(cfg: Config, resume: str) -> Path | None:
    """``resume``: 'auto' (newest complete checkpoint of the run, if any), 'none', or a checkpoint dir."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(cfg.checkpoint_dir)
    path = Path(resume)
    if not (path / ".metadata").is_file():
        raise ConfigError("", f"--resume {resume!r} is not a complete checkpoint directory (no .metadata)")
    return path


def train(cfg: Config, ctx: DistContext, max_steps: int | None = None, resume: str = "auto") -> Progress:
    """Train (or continue training) the run described by ``cfg`` on this rank; returns where it stopped."""
    started = time.perf_counter()
    cfg, manifest = resolve_dataset(cfg)
    bins = resolve_eval_bins(cfg)
    loader = build_train_loader(cfg, ctx, manifest)
    spe = steps_per_epoch(loader, cfg.train.grad_accum)
    parts = build_parts(cfg, ctx, spe)
    out = Path(cfg.output_dir)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
        print(f"resolved config ({ctx.world_size} ranks, backend {ctx.backend}, device {ctx.device}):")
        print(cfg.to_commented_yaml(), end="", flush=True)
    progress = Progress()
    path = resume_path(cfg, resume)
    if path is not None:
        progress = resume_from(parts, loader, path)
        log.info("resumed from %s at step %d (epoch %d)", path, progress.step, progress.epoch)
    total = parts.scheduler.schedule.total_steps
    log.info("%d optimizer steps per epoch, %d in all; global batch %d x %d accumulation",
             spe, total, cfg.train.batch_size * ctx.world_size, cfg.train.grad_accum)
    verifier = PeriodicVerifier(bins, ctx, cfg.data.image_size)
    with build_loggers(cfg.logging, out, ctx.rank, run_config=cfg.to_dict()) as logger:
        trainer = Trainer(parts, loader, logger, verifier, progress, total, -1 if path is None else progress.step)
        progress = trainer.fit(max_steps)
    log.info("stopped at step %d of %d after %.1f s; checkpoints in %s",
             progress.step, total, time.perf_counter() - started, cfg.checkpoint_dir)
    return progress
