"""The margin-softmax family as data: what to normalise, the scale, and the target-logit transform.

Every margin produces logits of the form

    non-target j:  a_i * b_j * cos(theta_ij)          (= x_i . W_j with the declared normalisations)
    target y_i:    target_logit(x_i, W_y)              (the margin's own function, differentiable)

where a_i = s (a fixed scale) when features are normalised, ||x_i|| otherwise, and b_j = 1 when W rows
are normalised, ||W_j|| otherwise. The sharded head (partial_fc.py) only reads these declarations and
calls ``target_logit``; it knows no margin by name. All functions here are pure tensor math.
"""
from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass
from typing import ClassVar

import torch

# Clamp for sqrt(1 - cos^2) and acos: keeps d/dcos finite when cos -> +-1 (theta -> 0 or pi).
_COS_EPS = 1e-6


def _theta(cos: torch.Tensor) -> torch.Tensor:
    return torch.acos(cos.clamp(-1.0 + _COS_EPS, 1.0 - _COS_EPS))


def multiplicative_angular_psi(theta: torch.Tensor, m: int) -> torch.Tensor:
    """psi(theta) = (-1)^k cos(m theta) - 2k for theta in [k pi/m, (k+1) pi/m] (L-Softmax, A-Softmax).

    Monotonically decreasing on [0, pi] and equal to cos(m theta) on the first interval.
    """
    k = torch.floor(theta * (m / math.pi)).clamp(0, m - 1).detach()
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    return sign * torch.cos(m * theta) - 2.0 * k


def _check_number(owner: object, name: str, value: object, *, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{type(owner).__name__}: {name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{type(owner).__name__}: {name} must be > 0, got {value!r}")


def _check_flag(owner: object, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{type(owner).__name__}: {name} must be True or False, got {value!r}")


@dataclass(frozen=True)
class Margin:
    """Base declaration. The normalisations are fixed per class (not constructor arguments);
    subclasses declare their own parameters, which are the positional ones."""

    normalize_features: ClassVar[bool] = False
    normalize_weight: ClassVar[bool] = False

    @property
    def feature_scale(self) -> float:
        """a_i when features are normalised (the fixed scale s); unused otherwise."""
        return 1.0

    def target_logit(self, x: torch.Tensor, w: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Target logit of each row of raw embeddings x [n, D] against its raw class row w [n, D]."""
        x_norm, w_norm = torch.linalg.vector_norm(x, dim=1), torch.linalg.vector_norm(w, dim=1)
        return self.target_from_stats(x_norm, w_norm, (x * w).sum(dim=1), step)

    def target_from_stats(
        self, x_norm: torch.Tensor, w_norm: torch.Tensor, dot: torch.Tensor, step: int = 0
    ) -> torch.Tensor:
        """The same target logit from ||x||, ||w|| and x . w ([n] each).

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


@dataclass(frozen=True)
class Softmax(Margin):
    """Plain softmax: logits x . W_j (no normalisation, no margin)."""


@dataclass(frozen=True)
class NormalizedMargin(Margin):
    """Base of the margins on normalised features and W rows: logits s * cos, ``scale`` s first."""

    normalize_features: ClassVar[bool] = True
    normalize_weight: ClassVar[bool] = True
    scale: float = 64.0

    @property
    def feature_scale(self) -> float:
        return float(self.scale)

    def __post_init__(self) -> None:
        _check_number(self, "scale", self.scale, positive=True)


@dataclass(frozen=True)
class NormFace(NormalizedMargin):
    """NormFace: s * cos(theta_j) with x and W normalised, no margin. Positional: (scale)."""


@dataclass(frozen=True)
class CosFace(NormalizedMargin):
    """CosFace / AM-Softmax: target s * (cos(theta_y) - m). Positional: (scale, margin)."""

    margin: float = 0.35

    def target_cosine(self, cos: torch.Tensor, step: int) -> torch.Tensor:
        return cos - self.margin

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number(self, "margin", self.margin)


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
    phi = torch.cos(m1 * _theta(cos) + m2) - m3
    theta_max = (math.pi - m2) / m1
    if not monotonic or theta_max >= math.pi:
        return phi
    cos_max = math.cos(theta_max)
    return torch.where(cos > cos_max, phi, (cos - cos_max) - 1.0 - m3)


@dataclass(frozen=True)
class CombinedMargin(NormalizedMargin):
    """Combined margin: target s * (cos(m1 * theta_y + m2) - m3). Positional: (scale, m1, m2, m3);
    ``monotonic`` is keyword-only. See combined_margin_cosine."""

    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    _: KW_ONLY
    monotonic: bool = False

    def target_cosine(self, cos: torch.Tensor, step: int) -> torch.Tensor:
        return combined_margin_cosine(cos, self.m1, self.m2, self.m3, self.monotonic)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number(self, "m1", self.m1, positive=True)
        _check_number(self, "m2", self.m2)
        _check_number(self, "m3", self.m3)
        _check_flag(self, "monotonic", self.monotonic)


@dataclass(frozen=True)
class ArcFace(NormalizedMargin):
    """ArcFace: target s * cos(theta_y + m), additive angular margin. Positional: (scale, margin);
    ``monotonic`` is keyword-only. See combined_margin_cosine."""

    margin: float = 0.5
    _: KW_ONLY
    monotonic: bool = False

    def target_cosine(self, cos: torch.Tensor, step: int) -> torch.Tensor:
        return combined_margin_cosine(cos, 1.0, self.margin, 0.0, self.monotonic)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number(self, "margin", self.margin)
        _check_flag(self, "monotonic", self.monotonic)


@dataclass(frozen=True)
class LSoftmax(Margin):
    """L-Softmax: target ||W_y|| ||x|| psi(theta_y), others x . W_j (no normalisation). Positional: (margin)."""

    margin: int = 2

    def target_cosine(self, cos: torch.Tensor, step: int) -> torch.Tensor:
        return multiplicative_angular_psi(_theta(cos), self.margin)

    def __post_init__(self) -> None:
        if isinstance(self.margin, bool) or not (isinstance(self.margin, int) and self.margin >= 1):
            raise ValueError(f"{type(self).__name__}: margin must be an integer >= 1, got {self.margin!r}")


@dataclass(frozen=True)
class SphereFace(LSoftmax):
    """A-Softmax: W normalised, scale ||x||, target ||x|| psi(theta_y).
    Positional: (margin, lambda_base, lambda_min, gamma, power).

    Optional annealing blends in the plain cosine: f = (lambda cos + psi) / (1 + lambda), with
    lambda = max(lambda_min, lambda_base * (1 + gamma * step) ** -power). Off by default (lambda_base = 0).
    """

    normalize_weight: ClassVar[bool] = True
    margin: int = 4
    lambda_base: float = 0.0
    lambda_min: float = 0.0
    gamma: float = 0.12
    power: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("lambda_base", "lambda_min", "gamma", "power"):
            _check_number(self, name, getattr(self, name))

    def annealing_lambda(self, step: int) -> float:
        if self.lambda_base <= 0:
            return 0.0
        return max(self.lambda_min, self.lambda_base * (1.0 + self.gamma * step) ** (-self.power))

    def target_cosine(self, cos: torch.Tensor, step: int) -> torch.Tensor:
        psi = super().target_cosine(cos, step)
        lam = self.annealing_lambda(step)
        return psi if lam == 0.0 else (lam * cos + psi) / (1.0 + lam)


MARGINS: dict[str, type[Margin]] = {
    "softmax": Softmax,
    "normface": NormFace,
    "lsoftmax": LSoftmax,
    "sphereface": SphereFace,
    "cosface": CosFace,
    "arcface": ArcFace,
    "combined": CombinedMargin,
}


def build_margin(name: str, **params: float) -> Margin:
    """Margin by registry name (``arcface``, ``cosface``, ...) with its parameters."""
    key = name.lower()
    if key not in MARGINS:
        raise ValueError(f"unknown margin {name!r}; expected one of {sorted(MARGINS)}")
    try:
        return MARGINS[key](**params)
    except TypeError as exc:
        raise ValueError(f"bad parameters {params} for margin {name!r}: {exc}") from exc
