"""Activation (gradient) checkpointing of backbone stages, and the fp32 embedding layer.

Recomputing a stage in backward runs its BatchNorm layers a second time in training mode, which would
update their running statistics twice per step. The recompute context snapshots those buffers and puts
them back, so a checkpointed model ends a step in exactly the state of a plain one.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def _keep_bn_buffers(module: nn.Module) -> Iterator[None]:
    saved = [
        (buf, buf.clone())
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for buf in m.buffers()
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def run_stage(stage: nn.Module, x: torch.Tensor, grad_checkpoint: bool) -> torch.Tensor:
    """``stage(x)``, checkpointed (non-reentrant) when asked and gradients are being recorded."""
    if not (grad_checkpoint and torch.is_grad_enabled()):
        return stage(x)
    return checkpoint(
        stage,
        x,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _keep_bn_buffers(stage)),
    )


def check_image_input(x: torch.Tensor, image_size: int, name: str) -> None:
    """Raise a clear error unless ``x`` is [N, 3, image_size, image_size]."""
    if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (image_size, image_size):
        raise ValueError(f"{name} expects input [N, 3, {image_size}, {image_size}], got {list(x.shape)}")


def init_conv_bn(model: nn.Module) -> None:
    """Kaiming-normal (fan_out) convolutions; BatchNorm scale 1, shift 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def embed_in_fp32(linear: nn.Module, features: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The embedding layer (linear, then BatchNorm1d) in fp32 even under autocast, as insightface does:
    the trunk runs in low precision, the embedding the margin head sees keeps fp32's 24-bit mantissa."""
    device_type = "cpu" if x.device.type == "meta" else x.device.type  # meta (planner dry run): no autocast of its own
    with torch.autocast(device_type, enabled=False):
        return features(linear(x.float()))
