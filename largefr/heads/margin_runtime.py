"""The head's per-step glue between a margin's declarations and the sharded softmax.

The margin's state (EMAs) lives in the head as buffers ``margin_<name>`` (so ``head.state_dict()``,
``.to(device)`` and checkpoints carry it); every rank computes it from the same gathered or all-reduced
values, so it stays identical on every rank and at every world size.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from largefr.heads.margin_base import Margin, MarginBatch, MarginState, NontargetPrepare, RowParams
from largefr.heads.softmax_state import TargetFn

STATE_PREFIX = "margin_"


@dataclass(frozen=True)
class MarginStep:
    """What the sharded softmax needs from the margin for one step."""

    target_fn: TargetFn
    row_params: dict[str, torch.Tensor]
    nontarget: NontargetPrepare | None
    needs_target_cosine: bool


def _target_logit(
    margin: Margin, step: int, x_norm: torch.Tensor, w_norm: torch.Tensor, dot: torch.Tensor, params: RowParams
) -> torch.Tensor:
    return margin.target_from_stats(x_norm, w_norm, dot, step, params)


def margin_step(margin: Margin, x_all: torch.Tensor, step: int, seed: int, training: bool,
                state: MarginState) -> MarginStep:
    """Row constants (updating the state when training) and hooks for the gathered batch ``x_all``."""
    with torch.no_grad():
        batch = MarginBatch(torch.linalg.vector_norm(x_all.detach(), dim=1), step, seed, training)
        params = margin.row_params(batch, state)
    nontarget = margin.nontarget(state, training)
    target_fn = functools.partial(_target_logit, margin, step)
    return MarginStep(target_fn, params, nontarget, nontarget is not None and margin.needs_target_cosine)


def sample_regularizer_loss(
    margin: Margin, local_x: torch.Tensor, x_all: torch.Tensor
) -> torch.Tensor | None:
    """(1/N) sum over the global batch of the margin's per-sample term, each sample counted once.

    The value is computed from the gathered batch (the same on every rank); the gradient only from this
    rank's own rows, so the all-gather's summing backward does not count a sample once per rank.
    """
    local = margin.sample_regularizer(torch.linalg.vector_norm(local_x.float(), dim=1))
    if local is None:
        return None
    with torch.no_grad():
        total = margin.sample_regularizer(torch.linalg.vector_norm(x_all.detach(), dim=1)).sum()  # type: ignore[union-attr]
    local_sum = local.sum()
    return (total + (local_sum - local_sum.detach())) / x_all.shape[0]


def state_buffers(margin: Margin) -> dict[str, torch.Tensor]:
    """The buffers a head registers for ``margin``'s state, by buffer name."""
    return {STATE_PREFIX + k: torch.tensor(float(v), dtype=torch.float32) for k, v in margin.initial_state().items()}


def expand_sub_center_rows(class_ids: torch.Tensor, sub_centers: int) -> torch.Tensor:
    """W row ids of the classes ``class_ids`` (S consecutive rows per class)."""
    if sub_centers == 1:
        return class_ids
    offsets = torch.arange(sub_centers, device=class_ids.device)
    return (class_ids.unsqueeze(1) * sub_centers + offsets).reshape(-1)
