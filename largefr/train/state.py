"""What a training checkpoint holds, and saving / resuming it with largefr.train.checkpoint (DCP).

Items: the backbone and its optimizer (replicated); the head's W slice and its row-sparse optimizer
state as row shards of the global [num_classes, D] tensors (their global class range is the shard
offset, so a checkpoint reshards to another world size); the LR schedule; the loss scaler; the data
position (replicated: epoch, optimizer step) and each rank's loader state and head sampling RNG
(per rank); RNG states (added by the checkpoint module). A run without a margin_softmax term has no head
items; a centre loss adds its centres as row shards of the global [num_classes, D] tensor (same ranges
as W, so they reshard the same way). ``config.yaml`` (the resolved config) and
``meta.json`` (what ``largefr eval`` needs to rebuild the backbone) are written next to them.

Resumed with another world size, batch size or ``train.grad_accum``, a step of the checkpoint holds
another number of samples: the optimizer step and the LR schedule are then re-derived from the data
consumed (whole epochs plus the loader's rescaled position), so the run still ends after the
configured epochs and the LR follows the fraction of the data seen.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from largefr.backbone_file import read_meta_json
from largefr.config import ConfigError
from largefr.data.loader import FaceLoader
from largefr.distributed import broadcast_buffers
from largefr.distributed.agreement import any_rank
from largefr.heads import PartialFC
from largefr.train.build import TrainParts, exported_backbone_meta, steps_per_epoch
from largefr.train.deepspeed_engine import ENGINE_TAG, load_engine_state, save_engine_state
from largefr.train.objective import center_of
from largefr.train.checkpoint import (
    OptimizerState,
    PerRank,
    RowShardedState,
    load_checkpoint,
    load_every_rank,
    save_checkpoint,
)
from largefr.train.health import TrainingDiverged, nonfinite_tensors

log = logging.getLogger("largefr.train")


class HeadWeight:
    """The head's W slice as a row-sharded tensor, with the margin's state (EMAs, replicated scalars)."""

    def __init__(self, head: PartialFC) -> None:
        self.head = head

    def state_dict(self) -> dict[str, Any]:
        return {"weight": self.head.weight.detach(), "margin_state": dict(self.head.margin_state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.head.weight.copy_(state["weight"])
        self.head.load_margin_state(state.get("margin_state", {}))


@dataclass
class Progress:
    """Where training stands: optimizer steps done (global), and the epoch they are in."""

    step: int = 0
    epoch: int = 0


@dataclass(frozen=True)
class StepSize:
    """The samples of one optimizer step: ranks x batch per rank x accumulated micro-batches."""

    world_size: int
    batch_size: int
    grad_accum: int

    def __str__(self) -> str:
        return f"{self.world_size} ranks x batch {self.batch_size} x grad_accum {self.grad_accum}"


def checkpoint_state(parts: TrainParts, loader: FaceLoader, progress: Progress) -> dict[str, Any]:
    # with train.engine=deepspeed the backbone's optimizer state is the engine's (its ZeRO partitions)
    state: dict[str, Any] = {"backbone": parts.model}
    if parts.engine is None:
        state["backbone_optim"] = OptimizerState(parts.model, parts.backbone_opt)
    state.update({
        "scheduler": parts.scheduler,
        "scaler": parts.precision.scaler,
        "progress": {"step": progress.step, "epoch": progress.epoch},
        "loader": PerRank(loader.state_dict()),
    })
    head, center = parts.head, center_of(parts.objective)
    if head is not None:
        extra = head.get_extra_state()
        assert parts.head_opt is not None
        rows, num_rows = head.row_range, head.num_classes * head.sub_centers  # S sub-centre rows per class
        state["head"] = RowShardedState(HeadWeight(head), rows, num_rows)
        state["head_optim"] = RowShardedState(parts.head_opt, rows, num_rows)
        state["progress"]["head_training_forwards"] = head.training_forwards
        # bytes, not a tensor: a head that has not run yet has no generator, and DCP needs one kind per key
        state["head_rng"] = PerRank({"rng": None if extra["rng"] is None else extra["rng"].cpu().numpy().tobytes()})
    if center is not None:
        state["center"] = RowShardedState(center, center.class_range, center.num_classes)
    return state


def check_finite(parts: TrainParts, step: int) -> None:
    """TrainingDiverged on every rank when any rank's parameters or buffers hold a NaN or an infinity."""
    named = [*parts.model.named_parameters(), *parts.model.named_buffers()]
    if parts.head is not None:
        named.append(("head.weight", parts.head.weight))
    bad = nonfinite_tensors(named)
    if any_rank(bool(bad), parts.ctx.group, parts.ctx.device):
        where = f"rank {parts.ctx.rank}: {', '.join(bad[:4])}" if bad else "on another rank"
        raise TrainingDiverged(f"parameters are not finite at step {step} ({where}); the checkpoint is not "
                               "written. Lower optim.*.lr or use train.precision=fp32")


def save(parts: TrainParts, loader: FaceLoader, progress: Progress) -> Path:
    """Publish a checkpoint of this state; refused (TrainingDiverged) when any weight is not finite."""
    cfg = parts.cfg
    broadcast_buffers(parts.model, parts.ctx.group)  # replicated state must be equal on every rank
    check_finite(parts, progress.step)
    return save_checkpoint(
        cfg.checkpoint_dir, progress.step, checkpoint_state(parts, loader, progress), parts.ctx,
        keep_last=cfg.checkpoint.keep_last, extra_files={"config.yaml": cfg.to_yaml().encode()},
        # samples_consumed orders checkpoints of runs with different step sizes (e.g. resumed 1 -> 3 ranks)
        meta={"num_classes": cfg.head.num_classes, "precision": cfg.train.precision,
              "samples_consumed": loader.samples_consumed(), "engine": cfg.train.engine},
        backbone_meta=exported_backbone_meta(cfg),
        write_more=None if parts.engine is None else (lambda step_dir: save_engine_state(parts.engine, step_dir)),
    )


def resume(parts: TrainParts, loader: FaceLoader, path: str | Path) -> Progress:
    """Load ``path`` into the parts and the loader; returns the progress to continue from.

    At the world size of the save everything continues exactly. At another world size the W slices
    are resharded, the rest of the epoch is the samples no saved rank has read (dealt to the new ranks),
    and the head's sampling RNG starts afresh. At another world size, batch size or grad_accum the step
    and the LR schedule are re-derived from the data consumed (see the module doc).
    """
    state = checkpoint_state(parts, loader, Progress())
    _check_engine(Path(path), parts.cfg.train.engine)
    del state["loader"]  # read below with the keys the checkpoint has (older ones lack pool, step_offset)
    every_rank = load_every_rank(path, "loader", parts.ctx)
    same_world = int(read_meta_json(path)["world_size"]) == parts.ctx.world_size
    loaded = load_checkpoint(path, state, parts.ctx)
    if parts.engine is not None:  # after the DCP load of the backbone: the engine's module and ZeRO state
        load_engine_state(parts.engine, Path(path), int(read_meta_json(path)["world_size"]), parts.ctx.world_size)
    progress_state = loaded["progress"]
    progress = Progress(int(progress_state["step"]), int(progress_state["epoch"]))
    if parts.head is not None:
        _restore_head_counters(parts.head, progress_state, loaded["head_rng"] if same_world else None)
    loader_state = every_rank[parts.ctx.rank] if same_world else every_rank[0]
    loader.load_rank_states(every_rank)  # exact at the same sizes; else the unread samples, dealt anew
    now = StepSize(parts.ctx.world_size, parts.cfg.train.batch_size, parts.cfg.train.grad_accum)
    saved = _saved_step_size(Path(path), loader_state, now)
    if saved != now:
        progress = _rederive_progress(parts, loader, progress)
        log.info("checkpoint %s was trained with %s, this run uses %s: step %d of it continues as step %d "
                 "(epoch %d; the LR schedule too)", path, saved, now, int(progress_state["step"]), progress.step,
                 progress.epoch)
    return progress


def _check_engine(path: Path, engine: str) -> None:
    saved = read_meta_json(path).get("engine", "ddp")
    if saved != engine:
        where = f"{ENGINE_TAG}/ (engine state)" if saved == "deepspeed" else "the backbone's torch optimizer state"
        raise ConfigError("train.engine", f"got {engine!r}, but checkpoint {path} was written with "
                          f"train.engine={saved!r} (it holds {where}); resume with train.engine={saved}")


def _restore_head_counters(head: PartialFC, progress_state: dict[str, Any], rng: dict[str, Any] | None) -> None:
    """The head's forward count and (at the same world size) its sampling RNG."""
    head.training_forwards = int(progress_state.get("head_training_forwards", progress_state.get("head_step", 0)))
    if rng is not None and rng["rng"] is not None:
        generator_state = torch.frombuffer(bytearray(rng["rng"]), dtype=torch.uint8)
        head.set_extra_state({**head.get_extra_state(), "rng": generator_state})


def _saved_step_size(path: Path, loader_state: dict[str, Any], now: StepSize) -> StepSize:
    """The step size of the run that wrote ``path``; ``loader_state``: the position saved by its rank 0
    (or by this rank, at the same world size). What is not recorded is taken to be as ``now``."""
    batch_size = int(loader_state.get("batch_size", now.batch_size))  # as FaceLoader.load_state_dict
    return StepSize(int(read_meta_json(path)["world_size"]), batch_size, _saved_grad_accum(path, now.grad_accum))


def _saved_grad_accum(path: Path, current: int) -> int:
    """``train.grad_accum`` of the run that wrote ``path`` (from the config.yaml saved with it)."""
    config = path / "config.yaml"
    if not config.is_file():
        log.warning("checkpoint %s has no config.yaml; assuming it was trained with train.grad_accum=%d",
                    path, current)
        return current
    raw = yaml.safe_load(config.read_text()) or {}
    return int((raw.get("train") or {}).get("grad_accum", 1))


def _rederive_progress(parts: TrainParts, loader: FaceLoader, saved: Progress) -> Progress:
    """The optimizer step of this setup that has consumed the data of ``saved``: its whole epochs and
    the loader's (rescaled) position in its epoch, rounded down to whole optimizer steps (the loader is
    moved back to that step, so at most ``grad_accum - 1`` batches are seen again). The LR scheduler is
    set to that step."""
    accum = parts.cfg.train.grad_accum
    position = loader.state_dict()
    in_epoch = 0
    if int(position["epoch"]) == saved.epoch:  # else the loader's epoch ended; set_epoch starts the next
        batches = int(position["step"])
        in_epoch = batches // accum
        back = batches - in_epoch * accum
        offset = int(position.get("step_offset", 0))
        if back and batches - back >= offset:  # the pool of a resumed epoch starts at its offset: not before
            step = batches - back
            loader.load_state_dict({**position, "step": step, "position": (step - offset) * loader.config.batch_size})
    progress = Progress(saved.epoch * steps_per_epoch(loader, accum) + in_epoch, saved.epoch)
    parts.scheduler.load_state_dict({"last_step": progress.step})
    return progress
