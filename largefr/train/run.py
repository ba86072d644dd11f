"""Wiring of a training run: config -> lock, dataset, parts, loggers, verifier, resume -> :class:`Trainer`."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from largefr.config import Config, ConfigError
from largefr.distributed import DistContext
from largefr.distributed.agreement import rank0_decides
from largefr.train.build import (
    TrainParts,
    build_parts,
    build_train_loader,
    resolve_dataset,
    resolve_eval_bins,
    steps_per_epoch,
)
from largefr.train.checkpoint import checkpoint_problem, latest_checkpoint
from largefr.train.evaluate import PeriodicVerifier
from largefr.train.loggers import build_loggers
from largefr.train.preemption import PreemptionWatch
from largefr.train.resume_config import apply_optimizer_config, refuse_unhonourable, saved_config
from largefr.train.run_lock import RunDirectoryLocked, RunLock
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
    problem = checkpoint_problem(path)
    if problem:
        raise ConfigError("", f"--resume {resume!r} is not a complete checkpoint directory ({problem})")
    return path


def lock_run_directory(cfg: Config, ctx: DistContext) -> RunLock:
    """Rank 0 takes ``<output_dir>/run.lock``; every rank raises RunDirectoryLocked if it is held."""
    lock = RunLock(cfg.output_dir)

    def take() -> str | None:
        try:
            lock.acquire()
        except RunDirectoryLocked as exc:
            return str(exc)
        return None

    message = rank0_decides(take, ctx.group)
    if message is not None:
        raise RunDirectoryLocked(message)
    return lock


def train(cfg: Config, ctx: DistContext, max_steps: int | None = None, resume: str = "auto") -> Progress:
    """Train (or continue training) the run described by ``cfg`` on this rank; returns where it stopped.

    Raises RunDirectoryLocked when another job holds the output directory, Preempted after SIGTERM (with
    a checkpoint written), TrainingDiverged on a non-finite loss or weight."""
    lock = lock_run_directory(cfg, ctx)
    try:
        with PreemptionWatch(ctx.group, ctx.device, cfg.train.preempt_check_every) as watch:
            return _train(cfg, ctx, max_steps, resume, watch)
    finally:
        lock.release()


def _train(cfg: Config, ctx: DistContext, max_steps: int | None, resume: str, watch: PreemptionWatch) -> Progress:
    started = time.perf_counter()
    cfg, manifest = resolve_dataset(cfg)
    bins = resolve_eval_bins(cfg)
    loader = build_train_loader(cfg, ctx, manifest)
    spe = steps_per_epoch(loader, cfg.train.grad_accum)
    parts = build_parts(cfg, ctx, spe)
    out = Path(cfg.output_dir)
    path = resume_path(cfg, resume)
    saved = saved_config(path) if path is not None else None
    if saved is not None:
        refuse_unhonourable(saved, cfg, path)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
        print(f"resolved config ({ctx.world_size} ranks, backend {ctx.backend}, device {ctx.device}):")
        print(cfg.to_commented_yaml(), end="", flush=True)
    progress = Progress()
    if path is not None:
        progress = resume_from(parts, loader, path)
        _apply_config_to_restored_optimizers(parts)
        log.info("resumed from %s at step %d (epoch %d)", path, progress.step, progress.epoch)
    total = parts.scheduler.schedule.total_steps
    log.info("%d optimizer steps per epoch, %d in all; global batch %d x %d accumulation",
             spe, total, cfg.train.batch_size * ctx.world_size, cfg.train.grad_accum)
    verifier = PeriodicVerifier(bins, ctx, cfg.data.image_size)
    with build_loggers(cfg.logging, out, ctx.rank, run_config=cfg.to_dict()) as logger:
        trainer = Trainer(parts, loader, logger, verifier, progress, total, -1 if path is None else progress.step,
                          watch)
        progress = trainer.fit(max_steps)
    log.info("stopped at step %d of %d after %.1f s; checkpoints in %s",
             progress.step, total, time.perf_counter() - started, cfg.checkpoint_dir)
    return progress


def _apply_config_to_restored_optimizers(parts: TrainParts) -> None:
    """The restored param groups carry the checkpoint's hyperparameters; the config's win (see
    largefr.train.resume_config), and the schedule is re-applied at the restored step."""
    changes = apply_optimizer_config(parts.backbone_opt, parts.cfg.optim.backbone, "backbone")
    changes += apply_optimizer_config(parts.head_opt, parts.cfg.optim.head, "head")
    parts.scheduler.load_state_dict(parts.scheduler.state_dict())
    if changes:
        log.warning("resuming with the config's optimizer settings instead of the checkpoint's: %s; the "
                    "schedule continues from the new base lr", "; ".join(changes))
