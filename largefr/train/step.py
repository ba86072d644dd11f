"""One optimizer step over ``grad_accum`` micro-batches (no host sync unless fp16 loss scaling is on).

Gradient scale. The head returns the mean loss over the GLOBAL batch; each rank's backbone gradient is a
partial of it and DDP sums them (largefr.distributed.ddp), the head's W slice gradient is exact on its
owner. Hence N ranks on B images each make the same update as 1 rank on the N*B images. Over A
micro-batches each micro-batch loss is divided by A: the backbone's .grad and the head's row gradient
(merged over backward passes) both accumulate the gradient of the mean of the A micro-batch losses.
DDP all-reduces only in the last micro-batch's backward (``no_sync`` before).

Input. Micro-batches hold the loaders' uint8 images and mirror flags; each is mirrored and normalised on
the compute device (:func:`largefr.models.input.normalize_images`, into ``parts.inputs``' reused buffer)
right before its forward. The head's rows are chosen from the labels before the backbone's forward (Objective.prefetch).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch

from largefr.data.loader import LoadedBatch
from largefr.train.build import TrainParts
from largefr.train.deepspeed_engine import MicroBatch, engine_step


@dataclass
class StepResult:
    """Device tensors (read them only at log steps): mean loss of the step, backbone grad norm before
    clipping (0 without clipping), and 1.0 if the step was skipped for a non-finite gradient."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    skipped: torch.Tensor


def forward_backward(parts: TrainParts, micro_batches: Sequence[MicroBatch]) -> torch.Tensor:
    """Accumulate the gradients of the mean micro-batch loss; returns that mean (detached). A micro-batch is
    a loader's :class:`LoadedBatch` or an (images, labels) pair (nothing mirrored)."""
    count = len(micro_batches)
    if count < 1:
        raise ValueError("a step needs at least one micro-batch")
    total = torch.zeros((), device=parts.ctx.device)
    for i, batch in enumerate(micro_batches):
        images, labels, mirror = LoadedBatch(*batch)
        sync = contextlib.nullcontext() if i == count - 1 else parts.ddp.no_sync()
        with sync:
            inputs = parts.inputs(images, mirror)
            with parts.precision.autocast():  # the head's rows dtype follows autocast: prefetch inside it
                parts.objective.prefetch(labels)
                embeddings = parts.ddp(inputs)
                loss = parts.objective(embeddings, labels)
            parts.precision.scaler.scale(loss / count).backward()
        total += loss.detach().float() / count
    return total


def apply_gradients(parts: TrainParts) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscale and check (fp16), clip the backbone, step both optimizers; (grad norm, skipped)."""
    scaler = parts.precision.scaler
    params = [p for p in parts.model.parameters() if p.grad is not None]
    found_inf = torch.zeros((), device=parts.ctx.device)
    if scaler.enabled:  # row_grad() finalises the head's gradient early: only when it must be unscaled
        row_grad = parts.head.row_grad() if parts.head is not None else None
        grads = [p.grad for p in params] + ([row_grad.grad] if row_grad is not None else [])
        found_inf = scaler.unscale_(grads, parts.ctx.group)
    clip = parts.cfg.train.clip_grad_norm
    if clip is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    else:
        grad_norm = torch.zeros((), device=parts.ctx.device)
    if not scaler.enabled or not bool(found_inf):  # host sync under fp16 only
        parts.backbone_opt.step()
        if parts.head_opt is not None:
            parts.head_opt.step()
    scaler.update(found_inf)
    parts.backbone_opt.zero_grad(set_to_none=True)
    if parts.head_opt is not None:
        parts.head_opt.zero_grad()
    parts.scheduler.step()
    return grad_norm, found_inf


def train_step(parts: TrainParts, micro_batches: Sequence[MicroBatch]) -> StepResult:
    if parts.engine is not None:  # train.engine=deepspeed: the engine reduces, clips and steps the backbone
        clipping = parts.cfg.train.clip_grad_norm is not None
        return StepResult(*engine_step(parts.engine, parts.objective, parts.head_opt, parts.scheduler, parts.precision,
                                       micro_batches, parts.ctx, clipping, parts.inputs))
    loss = forward_backward(parts, micro_batches)
    grad_norm, skipped = apply_gradients(parts)
    return StepResult(loss, grad_norm, skipped)
