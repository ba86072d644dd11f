"""``train.engine: deepspeed``: the backbone in a DeepSpeed ZeRO engine; the Partial FC head stays outside.

What the engine takes over from largefr's one config (the DeepSpeed JSON is generated, see
:func:`deepspeed_config`; ``deepspeed.config`` may name a JSON file whose keys override it):
- the backbone's torch optimizer (``optim.backbone``, built by largefr and passed in, so DeepSpeed
  compiles no optimizer op); ZeRO stage 1 partitions its state over the ranks, stage 2 also the gradients;
- gradient clipping (``train.clip_grad_norm`` -> ``gradient_clipping``: DeepSpeed's global norm over the
  partitions is the norm torch's ``clip_grad_norm_`` computes over the full gradients);
- gradient accumulation (``train.grad_accum`` -> ``gradient_accumulation_steps``; ``engine.backward``
  divides each micro-batch loss by it, which also scales the head's gradient, as in the DDP path);
- the LR schedule: largefr's :class:`ScheduledLR` sets ``lr`` in the torch optimizer's param groups,
  which ZeRO keeps (it swaps only their ``params`` for its flat fp32 partition).
Precision: fp32, or bf16 by torch autocast with fp32 weights and an fp32 ZeRO master (the numerics of the
DDP path). DeepSpeed's own bf16 mode casts every weight to bf16, while the backbone's embedding layer
multiplies fp32 inputs by its weight with autocast off (largefr.models.backbone_parts), so it is not
used. fp16 is refused: DeepSpeed's loss scaler would scale the head's row gradient too and its overflow
check does not see that gradient (and DeepSpeed's CPU accelerator has no fp16 on this machine's CPUs).

Gradient semantics. The head returns the mean loss over the GLOBAL batch, so each rank's backbone
gradient is a partial derivative of one loss and the full gradient is their SUM (largefr.distributed.ddp).
DeepSpeed averages by default; ``gradient_allreduce_op: "sum"`` makes ZeRO-1/2 sum. DeepSpeed 0.19.8
refuses ``sum`` with ZeRO-3 ("not supported with ZeRO stage 3"), hence stages 1 and 2 only (ZeRO-3 itself
ran with the BatchNorm backbone on gloo in a probe, averaging).

The head. ``deepspeed.initialize`` broadcasts every parameter of the module it wraps from rank 0, and the
engine keeps one optimizer: the class-sharded W is never given to it. It keeps its own row-sparse optimizer
and is stepped before the engine, both at the LR of the step.

Checkpoints. The engine writes its state (module, ZeRO partitions of the optimizer state, step counters)
into ``<step dir>/deepspeed/`` beside the DCP files of the head's row shards and the rest, before the
step directory is published (renamed), so a checkpoint stays atomic. The ZeRO partitions are saved
elastically (``zero_optimization.elastic_checkpoint``), so they load at another world size too.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from largefr.config import Config, ConfigError
from largefr.data.loader import LoadedBatch
from largefr.distributed import DistContext, broadcast_buffers
from largefr.train.amp import Precision
from largefr.train.objective import Objective
from largefr.train.schedule import ScheduledLR

log = logging.getLogger("largefr.train")

ENGINE_TAG = "deepspeed"  # the engine's sub-directory of a checkpoint step directory
# keys of the generated JSON an override file may not change: they carry largefr's contracts
_FIXED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
               "gradient_allreduce_op")
_REFUSED_SECTIONS = {
    "optimizer": "the backbone's optimizer comes from optim.backbone",
    "scheduler": "the LR schedule comes from the schedule section",
    "fp16": "fp16 is not supported with train.engine=deepspeed (see largefr.train.deepspeed_engine)",
    "bf16": "bf16 is torch autocast (train.precision=bf16) with fp32 weights",
}


MicroBatch = LoadedBatch | tuple[torch.Tensor, torch.Tensor]  # a pair: (images, labels), nothing mirrored

def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON of a run: generated from ``cfg``, then ``deepspeed.config``'s keys over it."""
    if cfg.train.precision == "fp16":
        raise ConfigError("train.precision", "got 'fp16', which train.engine=deepspeed does not support; "
                          "expected 'fp32' or 'bf16' (see largefr.train.deepspeed_engine)")
    train = cfg.train
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * world_size,
        "gradient_allreduce_op": "sum",
        "gradient_clipping": 0.0 if train.clip_grad_norm is None else train.clip_grad_norm,
        "zero_optimization": {"stage": cfg.deepspeed.stage, "elastic_checkpoint": True},
        "zero_allow_untested_optimizer": True,  # a torch SGD/AdamW, built from optim.backbone
        "steps_per_print": 2**31 - 1,  # largefr logs
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed.config is None:
        return generated
    merged = _merge(generated, _read_override(cfg.deepspeed.config))
    _check_override(merged, generated, cfg.deepspeed.config)
    return merged


def _read_override(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError("deepspeed.config", f"got {path!r}, which is not a file (expected a DeepSpeed JSON file)")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError("deepspeed.config", f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError("deepspeed.config", f"{path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _check_override(merged: dict[str, Any], generated: dict[str, Any], path: str) -> None:
    for key, why in _REFUSED_SECTIONS.items():
        section = merged.get(key)
        enabled = not isinstance(section, dict) or bool(section.get("enabled", False))
        if section is not None and (key in ("optimizer", "scheduler") or enabled):
            raise ConfigError("deepspeed.config", f"{path} sets {key!r}: {why}")
    for key in _FIXED_KEYS:
        if merged.get(key) != generated[key]:
            raise ConfigError("deepspeed.config", f"{path} sets {key}={merged.get(key)!r}, expected "
                              f"{generated[key]!r} (derived from train.batch_size, train.grad_accum, the "
                              "world size; gradients must be summed, see largefr.distributed.ddp)")
    stage = (merged.get("zero_optimization") or {}).get("stage")
    if stage not in (1, 2):
        raise ConfigError("deepspeed.config", f"{path} sets zero_optimization.stage={stage!r}, expected 1 or 2")


def wrap_deepspeed(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, ctx: DistContext) -> nn.Module:
    """``model`` (on ``ctx.device``) and its ``optimizer`` in a DeepSpeed engine over the default group."""
    if ctx.group is not torch.distributed.group.WORLD:
        raise ValueError("train.engine=deepspeed runs data-parallel over the default (WORLD) process group; "
                         "got another group")
    ds_config = deepspeed_config(cfg, ctx.world_size)
    # DeepSpeed picks its accelerator at import from DS_ACCELERATOR and asserts LOCAL_RANK is set
    os.environ.setdefault("DS_ACCELERATOR", ctx.device.type)
    os.environ.setdefault("LOCAL_RANK", str(ctx.local_rank))
    try:
        import deepspeed
    except ImportError as exc:
        raise ConfigError("train.engine", f"got 'deepspeed', but it cannot be imported ({exc}); "
                          "install it with pip install 'largefr[deepspeed]'") from None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines repeat the whole config
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           dist_init_required=False)
    return engine


def engine_step(
    engine: Any, objective: Objective,
    head_opt: torch.optim.Optimizer | None, scheduler: ScheduledLR, precision: Precision,
    micro_batches: Sequence[MicroBatch], ctx: DistContext, clipping: bool,
    inputs: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step over the engine's ``gradient_accumulation_steps`` micro-batches (loader images
    and mirror flags, turned into the backbone's input by ``inputs``):
    (mean loss, backbone grad norm before clipping or 0 without clipping, 1.0 if the engine skipped)."""
    count = len(micro_batches)
    if count != engine.gradient_accumulation_steps():
        raise ValueError(f"got {count} micro-batches, the engine accumulates {engine.gradient_accumulation_steps()}")
    # as DDP's buffer sync: rank 0's BatchNorm running statistics on every rank before the forward
    broadcast_buffers(engine.module, ctx.group)
    total = torch.zeros((), device=ctx.device)
    for i, batch in enumerate(micro_batches):
        images, labels, mirror = LoadedBatch(*batch)
        with precision.autocast():
            objective.prefetch(labels)
            embeddings = engine(inputs(images, mirror))
            loss = objective(embeddings, labels)
        engine.backward(loss)  # loss / count, for the head's gradient too
        total += loss.detach().float() / count
        if i < count - 1:
            engine.step()  # not a boundary: counts the micro-step only
    if head_opt is not None:
        head_opt.step()  # at this step's LR, before the engine's step (the scheduler moves after both)
    engine.step()
    if head_opt is not None:
        head_opt.zero_grad()
    scheduler.step()
    norm = engine.get_global_grad_norm() if clipping else None
    grad_norm = torch.zeros((), device=ctx.device) if norm is None else torch.as_tensor(norm, device=ctx.device).float()
    skipped = torch.tensor(0.0 if engine.was_step_applied() else 1.0, device=ctx.device)
    return total, grad_norm, skipped


def save_engine_state(engine: Any, step_dir: Path) -> None:
    """Every rank: the engine's state into ``step_dir / ENGINE_TAG`` (collective)."""
    # An elastic ZeRO checkpoint records (and on load requires) a "step" in the optimizer's param groups,
    # where DeepSpeed's own Adam keeps it; torch's optimizers keep theirs per parameter and ignore this key.
    for group in engine.optimizer.optimizer.param_groups:
        group["step"] = engine.global_steps
    engine.save_checkpoint(str(step_dir), tag=ENGINE_TAG, save_latest=False)


def load_engine_state(engine: Any, step_dir: Path, saved_world_size: int, world_size: int) -> None:
    """Every rank: the engine's state from a checkpoint written by :func:`save_engine_state` (collective).

    Call it after the backbone's weights were loaded into ``engine.module`` (the DCP item). At the world
    size of the save DeepSpeed loads everything; at another one (DeepSpeed refuses that) see
    :func:`_load_resharded`.
    """
    if not (step_dir / ENGINE_TAG).is_dir():
        raise FileNotFoundError(f"checkpoint {step_dir} has no {ENGINE_TAG}/ directory (engine state); "
                                "was it written with train.engine=ddp?")
    if saved_world_size != world_size:
        _load_resharded(engine, step_dir / ENGINE_TAG, saved_world_size)
        return
    loaded, _ = engine.load_checkpoint(str(step_dir), tag=ENGINE_TAG, load_lr_scheduler_states=False)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the engine state of {step_dir / ENGINE_TAG}")
    # the elastic load pads every tensor state to 1-d, torch's per-parameter "step" (AdamW) included
    for state in engine.optimizer.optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor) and step.numel() == 1 and step.dim() > 0:
            state["step"] = step.reshape(())


def _load_resharded(engine: Any, engine_dir: Path, saved_world_size: int) -> None:
    """ZeRO-1/2 state saved on ``saved_world_size`` ranks, onto this world size.

    Each saved rank's file holds, per param group, the optimizer state of its partition of the group's
    flat fp32 vector with the padding removed (``elastic_checkpoint``), so their concatenation is the state
    of the whole flat vector; this rank takes its partition of it and pads as DeepSpeed does. The fp32
    master partition is refreshed from the module (loaded from the DCP item).
    """
    zero = engine.optimizer
    saved = [torch.load(engine_dir / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", map_location="cpu",
                        weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]
             for r in range(saved_world_size)]
    zero.refresh_fp32_params()
    rank = torch.distributed.get_rank(group=zero.dp_process_group)
    for i, group in enumerate(zero.optimizer.param_groups):
        partition = group["params"][0]
        size = partition.numel()
        state = zero.optimizer.state[partition]
        for key, first in saved[0][i].items():
            if isinstance(first, torch.Tensor) and first.dim() > 0:
                whole = torch.cat([per_rank[i][key] for per_rank in saved])
                mine = torch.zeros(size, dtype=first.dtype)
                part = whole[rank * size: (rank + 1) * size]
                mine[: part.numel()] = part
                state[key] = mine.to(partition.device)
            else:  # replicated (torch AdamW's per-parameter step)
                state[key] = first.reshape(()).clone() if isinstance(first, torch.Tensor) else first
    model_states = torch.load(engine_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    engine.global_steps = int(model_states["global_steps"])
    engine.skipped_steps = int(model_states["skipped_steps"])
    engine.global_samples = engine.global_steps * engine.train_batch_size()
    log.warning("engine state of %s (ZeRO partitions of %d ranks) resharded onto %d ranks",
                engine_dir, saved_world_size, torch.distributed.get_world_size(group=zero.dp_process_group))
