"""What a training checkpoint holds, and saving / resuming it with largefr.train.checkpoint (DCP).

Items: the backbone and its optimizer (replicated); the head's W slice and its row-sparse optimizer
state as row shards of the global [num_classes, D] tensors (their global class range is the shard
offset, so a checkpoint reshards to another world size); the LR schedule; the loss scaler; the data
position (replicated: epoch, optimizer step) and each rank's loader state and head sampling RNG
(per rank); RNG states (added by the checkpoint module). ``config.yaml`` (the resolved config) and
``meta.json`` (what ``largefr eval`` needs to rebuild the backbone) are written next to them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from largefr.data.loader import FaceLoader
from largefr.distributed import broadcast_buffers
from largefr.heads import PartialFC
from largefr.train.build import TrainParts
from largefr.train.checkpoint import (
    OptimizerState,
    PerRank,
    RowShardedState,
    backbone_meta,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)


class HeadWeight:
    """The head's W slice as a state_dict of one row-sharded tensor (its extra state travels per rank)."""

    def __init__(self, head: PartialFC) -> None:
        self.head = head

    def state_dict(self) -> dict[str, Any]:
        return {"weight": self.head.weight.detach()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.head.weight.copy_(state["weight"])


@dataclass
class Progress:
    """Where training stands: optimizer steps done (global), and the epoch they are in."""

    step: int = 0
    epoch: int = 0


def checkpoint_state(parts: TrainParts, loader: FaceLoader, progress: Progress) -> dict[str, Any]:
    head, num_classes = parts.head, parts.head.num_classes
    extra = head.get_extra_state()
    return {
        "backbone": parts.model,
        "backbone_optim": OptimizerState(parts.model, parts.backbone_opt),
        "head": RowShardedState(HeadWeight(head), head.class_range, num_classes),
        "head_optim": RowShardedState(parts.head_opt, head.class_range, num_classes),
        "scheduler": parts.scheduler,
        "scaler": parts.precision.scaler,
        "progress": {"step": progress.step, "epoch": progress.epoch, "head_step": head.step},
        "loader": PerRank(loader.state_dict()),
        # bytes, not a tensor: a head that has not run yet has no generator, and DCP needs one kind per key
        "head_rng": PerRank({"rng": None if extra["rng"] is None else extra["rng"].cpu().numpy().tobytes()}),
    }


def save(parts: TrainParts, loader: FaceLoader, progress: Progress) -> Path:
    cfg = parts.cfg
    broadcast_buffers(parts.model, parts.ctx.group)  # replicated state must be equal on every rank
    meta = backbone_meta(cfg.model.name, cfg.head.embedding_size, cfg.data.image_size, **cfg.model.kwargs)
    meta.update(num_classes=cfg.head.num_classes, precision=cfg.train.precision)
    return save_checkpoint(
        cfg.checkpoint_dir, progress.step, checkpoint_state(parts, loader, progress), parts.ctx,
        keep_last=cfg.checkpoint.keep_last, extra_files={"config.yaml": cfg.to_yaml().encode()}, meta=meta,
    )


def resume(parts: TrainParts, loader: FaceLoader, path: str | Path) -> Progress:
    """Load ``path`` into the parts and the loader; returns the progress to continue from.

    At the world size of the save everything continues exactly. At another world size the W slices
    are resharded, the loader position is rescaled by global samples consumed, and the head's sampling
    RNG starts afresh.
    """
    state = checkpoint_state(parts, loader, Progress())
    same_world = int(read_meta(path)["world_size"]) == parts.ctx.world_size
    loaded = load_checkpoint(path, state, parts.ctx)
    progress_state = loaded["progress"]
    progress = Progress(int(progress_state["step"]), int(progress_state["epoch"]))
    parts.head.step = int(progress_state["head_step"])
    rng = loaded["head_rng"]
    if same_world and rng is not None and rng["rng"] is not None:
        generator_state = torch.frombuffer(bytearray(rng["rng"]), dtype=torch.uint8)
        parts.head.set_extra_state({**parts.head.get_extra_state(), "rng": generator_state})
    if same_world:
        loader_state = loaded["loader"]
        if loader_state is None:
            raise RuntimeError(f"checkpoint {path} holds no loader state of rank {parts.ctx.rank}")
    else:  # rank 0's saved position; the loader rescales it to this world size
        loader_state = _broadcast_rank0_loader_state(parts, loaded["loader"])
    loader.load_state_dict(loader_state)
    return progress


def _broadcast_rank0_loader_state(parts: TrainParts, own: dict[str, Any] | None) -> dict[str, Any]:
    box = [own if parts.ctx.is_main else None]
    dist.broadcast_object_list(box, group=parts.ctx.group, group_src=0)
    if box[0] is None:
        raise RuntimeError("the checkpoint holds no loader state of rank 0")
    return dict(box[0])
