"""The training loop: epochs of micro-batches -> optimizer steps, logging, verification, checkpoints.

An epoch is ``len(loader) // grad_accum`` optimizer steps; its trailing ``len(loader) % grad_accum``
batches are not used. Training ends at the schedule's total steps (``schedule.total_steps`` or
``train.epochs`` epochs), or earlier at ``max_steps`` (a later run resumes from there). A checkpoint is
written every ``checkpoint.every_steps`` steps and when the loop ends.

Host syncs happen only at log steps (loss, grad norm), under fp16 loss scaling, at verification and
checkpoint steps, and at the preemption checks (one int all-reduced every ``train.preempt_check_every``
steps). SIGTERM stops the loop after the next agreed check with a checkpoint (:class:`Preempted`). A
non-finite loss is :class:`TrainingDiverged`; the checkpoints it may have poisoned are moved aside
(:mod:`largefr.train.health`). At each epoch end the corrupt samples skipped by all ranks are logged
(``skipped_samples`` in the metrics).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from largefr.data.loader import FaceLoader, LoadedBatch
from largefr.distributed import all_reduce_
from largefr.train.build import TrainParts
from largefr.train.checkpoint import step_dir_name
from largefr.train.evaluate import PeriodicVerifier
from largefr.train.health import TrainingDiverged, is_finite_number, quarantine_from
from largefr.train.loggers import Logger
from largefr.train.preemption import Preempted, PreemptionWatch
from largefr.train.state import Progress, save
from largefr.train.step import StepResult, train_step

__all__ = ["Preempted", "Trainer", "TrainingDiverged"]

log = logging.getLogger("largefr.train")


@dataclass
class RateMeter:
    """Images per second and ETA between log steps (wall clock; each log step syncs the device)."""

    images_per_step: int
    last_time: float = 0.0
    last_step: int = 0
    excluded: float = 0.0

    def start(self, step: int) -> None:
        self.last_time, self.last_step, self.excluded = time.perf_counter(), step, 0.0

    def exclude(self, seconds: float) -> None:
        """Time spent outside training steps (verification, checkpoints) since the last rate."""
        self.excluded += seconds

    def rate(self, step: int) -> float:
        now = time.perf_counter()
        steps, elapsed = step - self.last_step, max(now - self.last_time - self.excluded, 1e-9)
        self.start(step)
        self.last_time = now
        return steps * self.images_per_step / elapsed


class Trainer:
    def __init__(
        self, parts: TrainParts, loader: FaceLoader, logger: Logger, verifier: PeriodicVerifier,
        progress: Progress, total_steps: int, saved_step: int = -1, watch: PreemptionWatch | None = None,
    ) -> None:
        """``saved_step``: the step of an existing checkpoint of this state (a resume), not saved again.
        ``watch``: the installed SIGTERM watch (None: signals are not handled)."""
        self.parts, self.loader, self.logger, self.verifier = parts, loader, logger, verifier
        self.progress, self.total_steps = progress, total_steps
        cfg = parts.cfg
        self.accum = cfg.train.grad_accum
        self.meter = RateMeter(cfg.train.batch_size * self.accum * parts.ctx.world_size)
        self.last_saved = saved_step
        self.end = total_steps
        self._loss_sum = torch.zeros((), device=parts.ctx.device)
        self._loss_count = 0
        self.watch = watch
        self.preempted = False
        self.loss_verified_step = progress.step  # the losses of every step up to this one were finite
        self._epoch_skipped_from = loader.skipped

    def fit(self, max_steps: int | None = None) -> Progress:
        """Train until the schedule's end (or ``max_steps``); always ends with a checkpoint."""
        end = self.total_steps if max_steps is None else min(self.total_steps, max_steps)
        self.end = end
        bar = self._progress_bar(end)
        self.parts.ddp.train()
        self.parts.objective.train()
        first_step = self.progress.step
        self.meter.start(first_step)
        try:
            while self.progress.step < end and not self.preempted:
                self._run_epoch(end, bar)
        except TrainingDiverged:
            if self.parts.ctx.is_main:
                quarantine_from(self.parts.cfg.checkpoint_dir, self.loss_verified_step)
            raise
        finally:
            if bar is not None:
                bar.close()
        if self.preempted:
            step = self.progress.step
            path = self._save() if self.last_saved != step else Path(self.parts.cfg.checkpoint_dir) / step_dir_name(step)
            raise Preempted(step, str(path))
        trained = self.progress.step > first_step
        if trained and self.verifier and self.progress.step % self.parts.cfg.train.eval_every != 0:
            self._verify()  # the final network, unless just verified
        if self.last_saved != self.progress.step:
            self._save()
        return self.progress

    def _run_epoch(self, end: int, bar: tqdm | None) -> None:
        loader, progress = self.loader, self.progress
        loader.set_epoch(progress.epoch)
        steps_left = loader.batches_left() // self.accum
        batches = iter(loader)
        try:
            for _ in range(steps_left):
                if progress.step >= end:
                    return
                result = train_step(self.parts, self._micro_batches(batches))
                progress.step += 1
                if bar is not None:
                    bar.update(1)
                self._after_step(result)
                if self.watch is not None and self.watch.agreed_stop(progress.step):
                    self.preempted = True
                    return
        finally:
            batches.close()  # type: ignore[attr-defined]  (a generator: stops loader workers now)
        self._log_skipped(progress.epoch)
        progress.epoch += 1

    def _log_skipped(self, epoch: int) -> None:
        """Corrupt samples skipped by all ranks in ``epoch`` (one all-reduce per epoch), logged by rank 0."""
        counts = torch.tensor([self.loader.skipped - self._epoch_skipped_from, self.loader.skipped],
                              dtype=torch.int64, device=self.parts.ctx.device)
        all_reduce_(counts, torch.distributed.ReduceOp.SUM, self.parts.ctx.group)
        self._epoch_skipped_from = self.loader.skipped
        in_epoch, total = (int(v) for v in counts.tolist())
        if self.parts.ctx.is_main:
            log.info("epoch %d: skipped %d corrupt samples (%d in total)", epoch, in_epoch, total)
        self.logger.log(self.progress.step, {"skipped_samples": total, "skipped_samples_epoch": in_epoch})

    def _micro_batches(self, batches: Iterator[LoadedBatch]) -> list[LoadedBatch]:
        # The torch DataLoader draws its workers' base seed from the global torch RNG when an epoch
        # starts; keep that draw out of the training stream so resumed runs see the same dropout masks.
        with torch.random.fork_rng(devices=[]):
            return [next(batches) for _ in range(self.accum)]

    def _after_step(self, result: StepResult) -> None:
        cfg, step = self.parts.cfg, self.progress.step
        self._loss_sum += result.loss
        self._loss_count += 1
        if step % cfg.train.log_every == 0 or step == self.end:
            self._log(result)
        if self.verifier and step % cfg.train.eval_every == 0:
            self._verify()
        if step % cfg.checkpoint.every_steps == 0:
            self._save()

    def _verify(self) -> None:
        started = time.perf_counter()
        metrics = self.verifier(self.parts.model)
        if metrics:
            self.logger.log(self.progress.step, metrics)
        self.meter.exclude(time.perf_counter() - started)

    def _log(self, result: StepResult) -> None:
        step = self.progress.step
        loss = self._verify_losses()
        rate = self.meter.rate(step)
        eta = (self.total_steps - step) * self.meter.images_per_step / max(rate, 1e-9)
        self._log_loss_reset()
        metrics = {
            "loss": loss,
            "lr": self.parts.backbone_opt.param_groups[0]["lr"],
            "images_per_s": rate,
            "eta_min": eta / 60.0,
            "epoch": self.progress.epoch,
        }
        if self.parts.head_opt is not None:
            metrics["lr_head"] = self.parts.head_opt.param_groups[0]["lr"]
        metrics.update({name: float(value) for name, value in self.parts.objective.stats().items()})
        if self.parts.cfg.train.clip_grad_norm is not None:
            metrics["grad_norm"] = float(result.grad_norm)
        if self.parts.precision.scaler.enabled:
            metrics["loss_scale"] = self.parts.precision.scaler.get_scale()
        self.logger.log(step, metrics)

    def _verify_losses(self) -> float:
        """Mean loss since the last log line (kept for it); TrainingDiverged if any of them was not finite."""
        step, count = self.progress.step, max(self._loss_count, 1)
        loss = float(self._loss_sum) / count
        if not is_finite_number(loss):
            raise TrainingDiverged(f"loss is {loss} in steps ({self.loss_verified_step}, {step}]; lower optim.*.lr "
                                   "or use train.precision=fp32 (checkpoints from step "
                                   f"{self.loss_verified_step} on are moved aside)")
        self.loss_verified_step = step
        return loss

    def _log_loss_reset(self) -> None:
        self._loss_sum.zero_()
        self._loss_count = 0

    def _save(self) -> Path:
        """A checkpoint of this step, once its losses are known finite (``save`` checks the weights)."""
        started = time.perf_counter()
        self._verify_losses()
        path = save(self.parts, self.loader, self.progress)
        self.last_saved = self.progress.step
        self.meter.exclude(time.perf_counter() - started)
        return path

    def _progress_bar(self, end: int) -> tqdm | None:
        if not self.parts.ctx.is_main or not self.parts.cfg.logging.console:
            return None
        return tqdm(total=end, initial=self.progress.step, desc="train", unit="step", dynamic_ncols=True,
                    mininterval=1.0)
