"""Build a training run's parts from a resolved :class:`Config` and a :class:`DistContext`.

Backbone: seeded by ``derive_seed(train.seed, "backbone_init")`` (identical on every rank and in
``largefr train --export-init``), moved to the context's device and wrapped in DDP with a SUM
all-reduce (see largefr.distributed.ddp),
or with ``train.engine: deepspeed`` in a DeepSpeed ZeRO engine (largefr.train.deepspeed_engine).
Head: PartialFC over ``ctx.group``, never in DDP, with its own row-sparse optimizer, when the loss has a
margin_softmax term (a pure contrastive / triplet run has no head and no head optimizer). The loss terms
form the run's :class:`~largefr.train.objective.Objective`. The optimizers follow one LR schedule by
optimizer step.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from largefr.backbone_file import CheckpointMeta
from largefr.config import Config, ConfigError, OptimizerConfig, resolve_dataset_sizes
from largefr.data.loader import FaceLoader
from largefr.data.loader_factory import build_loader
from largefr.data.manifest import Manifest, read_manifest
from largefr.distributed import DistContext, wrap_ddp_sum
from largefr.heads import PartialFC
from largefr.heads.margins import build_margin
from largefr.models import build_backbone
from largefr.models.input import InputBuffer
from largefr.seeding import derive_seed
from largefr.train.amp import Precision
from largefr.train.deepspeed_engine import wrap_deepspeed
from largefr.train.objective import Objective, build_objective
from largefr.train.schedule import ScheduledLR, schedule_from_config


@dataclass
class TrainParts:
    """Everything one rank steps: the plain backbone, its data-parallel wrapper (DDP, or the DeepSpeed
    engine, then also ``engine``), head, optimizers, schedule."""

    cfg: Config
    ctx: DistContext
    model: nn.Module
    ddp: DistributedDataParallel | nn.Module
    head: PartialFC | None
    backbone_opt: torch.optim.Optimizer
    head_opt: torch.optim.Optimizer | None
    scheduler: ScheduledLR
    precision: Precision
    inputs: InputBuffer  # uint8 batches -> the backbone's float32 input, on ctx.device
    objective: Objective
    engine: Any = None  # the deepspeed.DeepSpeedEngine (== ddp) with train.engine=deepspeed


def resolve_dataset(cfg: Config) -> tuple[Config, Manifest]:
    """Read the dataset manifest; fill ``head.num_classes`` / ``data.num_images`` from it (or check them)."""
    if not cfg.data.path:
        raise ConfigError("data.path", "is empty; expected a dataset directory written by largefr synth/convert")
    try:
        manifest = read_manifest(cfg.data.path)
    except FileNotFoundError as exc:
        raise ConfigError("data.path", str(exc)) from None
    if tuple(manifest.image_size) != (cfg.data.image_size, cfg.data.image_size):
        raise ConfigError(
            "data.image_size",
            f"got {cfg.data.image_size}, but the images of {cfg.data.path} are {list(manifest.image_size)}",
        )
    return resolve_dataset_sizes(cfg, manifest.num_classes, manifest.num_samples), manifest


def backbone_kwargs(cfg: Config) -> dict[str, Any]:
    """Arguments for build_backbone besides the embedding size (architecture ones first)."""
    kwargs = dict(cfg.model.kwargs)
    if cfg.model.dropout > 0:
        kwargs["dropout"] = cfg.model.dropout
    if cfg.model.grad_checkpoint:
        kwargs["grad_checkpoint"] = True
    return kwargs


def seeded_backbone(cfg: Config) -> nn.Module:
    """The initial backbone of a run: a function of the config only (same on every rank)."""
    torch.manual_seed(derive_seed(cfg.train.seed, "backbone_init"))
    try:
        model = build_backbone(cfg.model.name, cfg.head.embedding_size, **backbone_kwargs(cfg))
    except (ValueError, TypeError) as exc:
        raise ConfigError("model", str(exc)) from None
    size = getattr(model, "image_size", cfg.data.image_size)
    if size != cfg.data.image_size:
        raise ConfigError("data.image_size", f"got {cfg.data.image_size}, but {cfg.model.name} takes {size}x{size}")
    return model


def exported_backbone_meta(cfg: Config) -> CheckpointMeta:
    """What ``meta.json`` records to rebuild this run's backbone (checkpoints and ``--export-init``)."""
    return CheckpointMeta(cfg.model.name, cfg.head.embedding_size, cfg.data.image_size, dict(cfg.model.kwargs))


BACKBONE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}


def build_backbone_optimizer(model: nn.Module, ocfg: OptimizerConfig) -> torch.optim.Optimizer:
    if ocfg.state_dtype is not None:
        raise ConfigError("optim.backbone.state_dtype", f"got {ocfg.state_dtype!r}; 16-bit state is for the head's optimizer only (expected null)")
    return BACKBONE_OPTIMIZERS[ocfg.name](model.parameters(), **ocfg.arguments())


def build_head_optimizer(head: PartialFC, ocfg: OptimizerConfig) -> torch.optim.Optimizer:
    return head.optimizer(ocfg.name, state_dtype=ocfg.state_dtype, **ocfg.arguments())


def build_head(cfg: Config, ctx: DistContext) -> PartialFC:
    if cfg.head.num_classes is None:
        raise ConfigError("head.num_classes", "is null; resolve it from the dataset manifest first")
    try:
        margin = build_margin(cfg.head.margin, **cfg.head.margin_params)
    except (ValueError, TypeError) as exc:
        raise ConfigError("head.margin_params", str(exc)) from None
    # validate=False: labels come from the loader (checked there); no host sync in the step
    try:
        head = PartialFC(
            margin, cfg.head.embedding_size, cfg.head.num_classes, cfg.head.sample_rate,
            process_group=ctx.group, seed=cfg.train.seed, chunk_rows=cfg.head.chunk_rows, validate=False,
            weight_dtype=cfg.head.weight_dtype, storage_device=cfg.head.storage_device,
        )
    except ValueError as exc:
        if "storage_device" not in str(exc):
            raise
        raise ConfigError("head.storage_device", str(exc)) from None
    return head.to(ctx.device)


def seed_rank_streams(seed: int, rank: int) -> None:
    """Per-rank torch/numpy/python RNG streams for training (dropout etc.), after the shared init."""
    value = derive_seed(seed, "rank_streams", rank)
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


def build_parts(cfg: Config, ctx: DistContext, steps_per_epoch: int) -> TrainParts:
    """Model, DDP, head, optimizers and schedule of a run with ``steps_per_epoch`` optimizer steps per epoch."""
    model = seeded_backbone(cfg).to(ctx.device)
    head = build_head(cfg, ctx) if cfg.loss_term("margin_softmax") is not None else None
    objective = build_objective(cfg, ctx, head)
    seed_rank_streams(cfg.train.seed, ctx.rank)
    backbone_opt = build_backbone_optimizer(model, cfg.optim.backbone)
    engine = wrap_deepspeed(model, backbone_opt, cfg, ctx) if cfg.train.engine == "deepspeed" else None
    ddp = wrap_ddp_sum(model, ctx) if engine is None else engine
    head_opt = build_head_optimizer(head, cfg.optim.head) if head is not None else None
    try:
        schedule = schedule_from_config(cfg.schedule, cfg.train.epochs, steps_per_epoch)
    except ValueError as exc:
        raise ConfigError("schedule", str(exc)) from None
    scheduler = ScheduledLR([opt for opt in (backbone_opt, head_opt) if opt is not None], schedule)
    precision = Precision(cfg.train.precision, ctx.device)
    return TrainParts(cfg, ctx, model, ddp, head, backbone_opt, head_opt, scheduler, precision,
                      InputBuffer(ctx.device), objective, engine)


def build_train_loader(cfg: Config, ctx: DistContext, manifest: Manifest) -> FaceLoader:
    return build_loader(
        manifest, batch_size=cfg.train.batch_size, rank=ctx.rank, world_size=ctx.world_size,
        seed=cfg.train.seed, device=ctx.device, kind=cfg.data.loader, num_threads=cfg.data.num_workers,
        prefetch=cfg.data.prefetch, shuffle_buffer=cfg.data.shuffle_buffer, flip=cfg.data.random_flip,
        sampler=cfg.data.sampler, images_per_identity=cfg.data.images_per_identity,
    )


def steps_per_epoch(loader: FaceLoader, grad_accum: int) -> int:
    """Optimizer steps per epoch: the loader's batches per epoch in whole groups of ``grad_accum``."""
    steps = len(loader) // grad_accum
    if steps < 1:
        raise ConfigError(
            "train.grad_accum",
            f"got {grad_accum}, but an epoch has only {len(loader)} batches per rank "
            f"(train.batch_size={loader.config.batch_size}, {loader.config.world_size} ranks)",
        )
    return steps


def resolve_eval_bins(cfg: Config) -> list[Path]:
    """``train.eval_bins``: a path as given if it exists, else a name inside ``data.path``."""
    out = []
    for i, name in enumerate(cfg.train.eval_bins):
        given = Path(name)
        path = given if given.is_file() else Path(cfg.data.path) / name
        if not path.is_file():
            raise ConfigError(f"train.eval_bins[{i}]", f"got {name!r}: neither {given} nor {path} is a file")
        out.append(path)
    return out

