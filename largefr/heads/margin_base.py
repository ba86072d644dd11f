"""The margin contract: what a margin declares, and the capabilities the sharded head offers it.

Every margin produces logits of the form

    non-target j:  f_i(a_i * b_j * cos(theta_ij))      (f_i = identity unless the margin transforms them)
    target y_i:    target_logit(x_i, W_y)              (the margin's own function, differentiable)

where a_i = s (a fixed scale) when features are normalised, ||x_i|| otherwise, and b_j = 1 when W rows
are normalised, ||W_j|| otherwise. The sharded head (partial_fc.py) only reads these declarations; it
knows no margin by name. Capabilities beyond the target function (all optional, off by default):

- per-row constants (``row_params``) from the global batch: feature-norm statistics, per-sample draws
  fixed by (seed, step, global sample index); they may update the margin's state (EMAs, scalar tensors
  the head keeps, checkpoints and makes identical on every rank because they are computed from the
  gathered batch or from all-reduced values);
- a transform f_i of the non-target logits (``nontarget``) which may depend on every row's target cosine,
  all-reduced by the head before the softmax (``needs_target_cosine``); it costs passes over the logits;
- S sub-centres per class (``num_sub_centers``): W has S rows per class, the class logit is their max;
- a per-sample regulariser added to the loss (``sample_regularizer``), averaged over the global batch with
  each sample counted once.
All functions here are pure tensor math: no collectives.
"""
from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass
from typing import Callable, ClassVar, Mapping

import torch

# Clamp for sqrt(1 - cos^2) and acos: keeps d/dcos finite when cos -> +-1 (theta -> 0 or pi).
COS_EPS = 1e-6

RowParams = Mapping[str, torch.Tensor]  # per-row margin constants, each [N], no gradient
MarginState = dict[str, torch.Tensor]  # scalar tensors (EMAs), identical on every rank
# in place on rows [a, b): logits [n, K] -> f_i(logits), slope [n, K] <- f_i'(logits)
NontargetTransform = Callable[[torch.Tensor, torch.Tensor, int, int], None]
# given every row's target cosine (all-reduced, [N]; None when not asked for), the transform of this step
NontargetPrepare = Callable[[torch.Tensor | None], NontargetTransform]


def theta_of(cos: torch.Tensor) -> torch.Tensor:
    return torch.acos(cos.clamp(-1.0 + COS_EPS, 1.0 - COS_EPS))


def check_number(owner: object, name: str, value: object, *, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{type(owner).__name__}: {name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{type(owner).__name__}: {name} must be > 0, got {value!r}")


def check_flag(owner: object, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{type(owner).__name__}: {name} must be True or False, got {value!r}")


@dataclass(frozen=True)
class MarginBatch:
    """What a margin may read about the step's global batch (the same tensors on every rank)."""

    x_norm: torch.Tensor  # [N] ||x_i|| of the gathered raw embeddings, detached
    step: int  # the head's training forwards so far
    seed: int  # the head's seed
    training: bool  # False in eval mode: state is read, not updated


@dataclass(frozen=True)
class Margin:
    """Base declaration. The normalisations are fixed per class (not constructor arguments);
    subclasses declare their own parameters, which are the positional ones."""

    normalize_features: ClassVar[bool] = False
    normalize_weight: ClassVar[bool] = False
    needs_target_cosine: ClassVar[bool] = False

    @property
    def feature_scale(self) -> float:
        """a_i when features are normalised (the fixed scale s); unused otherwise."""
        return 1.0

    @property
    def num_sub_centers(self) -> int:
        return 1

    def extra_cost(self) -> str:
        """What this margin costs beyond the plain head ('' when nothing): shown by ``largefr bench head``."""
        return ""

    def initial_state(self) -> dict[str, float]:
        """Names and initial values of the margin's state (EMAs); empty when it has none."""
        return {}

    def row_params(self, batch: MarginBatch, state: MarginState) -> dict[str, torch.Tensor]:
        """Per-row constants [N] for the target function (no gradient); may update ``state`` when training."""
        return {}

    def nontarget(self, state: MarginState, training: bool) -> NontargetPrepare | None:
        """Builder of the step's non-target transform from the target cosines, or None (identity)."""
        return None

    def sample_regularizer(self, x_norm: torch.Tensor) -> torch.Tensor | None:
        """Per-sample term [n] added to the loss (averaged over the global batch), or None."""
        return None

    def target_logit(self, x: torch.Tensor, w: torch.Tensor, step: int = 0, params: RowParams | None = None) -> torch.Tensor:
        """Target logit of each row of raw embeddings x [n, D] against its raw class row w [n, D]."""
        x_norm, w_norm = torch.linalg.vector_norm(x, dim=1), torch.linalg.vector_norm(w, dim=1)
        return self.target_from_stats(x_norm, w_norm, (x * w).sum(dim=1), step, params)

    def target_from_stats(
        self, x_norm: torch.Tensor, w_norm: torch.Tensor, dot: torch.Tensor, step: int = 0,
        params: RowParams | None = None,
    ) -> torch.Tensor:
        """The same target logit from ||x||, ||w|| and x . w ([n] each) and the row constants.

        Every margin depends on x and w only through these three numbers, so its gradient with respect
        to w is a x + b w: the sharded head uses that to fold the target's weight gradient into its GEMMs.
        """
        cos = dot / (x_norm * w_norm).clamp_min(1e-12)
        return self.row_scale(x_norm, w_norm) * self.target_cosine(cos, step)

    def row_scale(self, x_norm: torch.Tensor, w_norm: torch.Tensor) -> torch.Tensor:
        """a_i * b_y: the magnitude multiplying the target's (transformed) cosine."""
        a = torch.full_like(x_norm, self.feature_scale) if self.normalize_features else x_norm
        return a if self.normalize_weight else a * w_norm

    def target_cosine(self, cos: torch.Tensor, step: int) -> torch.Tensor:
        return cos


def interclass_filter_(logits: torch.Tensor, slope: torch.Tensor, threshold_logit: float) -> None:
    """Zero the logits above ``threshold_logit`` and their slope (insightface's inter-class filtering)."""
    slope.copy_(logits <= threshold_logit)
    logits.mul_(slope)


@dataclass(frozen=True)
class NormalizedMargin(Margin):
    """Base of the margins on normalised features and W rows: logits s * cos, ``scale`` s first.

    ``interclass_filter`` (keyword-only; None = off): non-target logits whose cosine exceeds it are set to
    0 with zero gradient, as insightface arcface_torch's ``interclass_filtering_threshold`` for noisy
    web-scale data. It costs three passes over the logits in the forward and one in the backward.
    """

    normalize_features: ClassVar[bool] = True
    normalize_weight: ClassVar[bool] = True
    scale: float = 64.0
    _: KW_ONLY
    interclass_filter: float | None = None

    @property
    def feature_scale(self) -> float:
        return float(self.scale)

    def __post_init__(self) -> None:
        check_number(self, "scale", self.scale, positive=True)
        if self.interclass_filter is not None:
            check_number(self, "interclass_filter", self.interclass_filter)
            if not -1.0 <= self.interclass_filter <= 1.0:
                raise ValueError(f"{type(self).__name__}: interclass_filter must be a cosine in [-1, 1], "
                                 f"got {self.interclass_filter!r}")

    def extra_cost(self) -> str:
        if self.interclass_filter is None:
            return ""
        return "inter-class filter: 3 extra passes over the logits forward, 1 backward, one [N, K] slope buffer"

    def filter_threshold_logit(self) -> float | None:
        return None if self.interclass_filter is None else self.feature_scale * self.interclass_filter

    def nontarget(self, state: MarginState, training: bool) -> NontargetPrepare | None:
        threshold = self.filter_threshold_logit()
        if threshold is None:
            return None

        def transform(logits: torch.Tensor, slope: torch.Tensor, a: int, b: int) -> None:
            interclass_filter_(logits, slope, threshold)

        return lambda target_cos: transform


def combined_margin_cosine(
    cos: torch.Tensor, m1: float, m2: float, m3: float, monotonic: bool = False
) -> torch.Tensor:
    """cos(m1 * theta + m2) - m3 with theta = acos(cos), optionally continued monotonically.

    The gradient is the true derivative through theta (clamped at |cos| = 1 - 1e-6). When
    m1 * theta + m2 > pi the function stops being monotonic: d/dtheta = -m1 sin(m1 theta + m2) turns
    positive, so such (rare, badly misclassified) samples are pushed further from their class. With
    ``monotonic`` the curve is continued past theta_max = (pi - m2) / m1 by the straight line
    (cos - cos(theta_max)) - 1 - m3, which meets it at -1 - m3 and keeps decreasing in theta.
    """
    phi = torch.cos(m1 * theta_of(cos) + m2) - m3
    theta_max = (math.pi - m2) / m1
    if not monotonic or theta_max >= math.pi:
        return phi
    cos_max = math.cos(theta_max)
    return torch.where(cos > cos_max, phi, (cos - cos_max) - 1.0 - m3)
