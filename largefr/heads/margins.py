"""The margin-softmax family as data: the classic margins, the modern ones, and the registry.

The contract every margin follows (normalisations, scale, target transform and the optional
capabilities) is in largefr.heads.margin_base; the modern margins (CurricularFace, AdaFace, MagFace,
sub-centre ArcFace, ElasticFace) are in largefr.heads.modern_margins and re-exported here. All
functions here are pure tensor math.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import KW_ONLY, dataclass
from typing import ClassVar

import torch

from largefr.heads.margin_base import (
    Margin,
    MarginBatch,
    NormalizedMargin,
    check_flag,
    check_number,
    combined_margin_cosine,
    theta_of,
)
from largefr.heads.modern_margins import (
    AdaFace,
    CurricularFace,
    ElasticArcFace,
    ElasticCosFace,
    MagFace,
    SubCenterArcFace,
)

__all__ = [
    "AdaFace", "ArcFace", "CombinedMargin", "CosFace", "CurricularFace", "ElasticArcFace", "ElasticCosFace",
    "LSoftmax", "MagFace", "Margin", "MarginBatch", "MARGINS", "NormFace", "NormalizedMargin", "Softmax",
    "SphereFace", "SubCenterArcFace", "build_margin", "combined_margin_cosine", "multiplicative_angular_psi",
    "parse_margin_param", "transforms_nontargets",
]


def multiplicative_angular_psi(theta: torch.Tensor, m: int) -> torch.Tensor:
    """psi(theta) = (-1)^k cos(m theta) - 2k for theta in [k pi/m, (k+1) pi/m] (L-Softmax, A-Softmax).

    Monotonically decreasing on [0, pi] and equal to cos(m theta) on the first interval.
    """
    k = torch.floor(theta * (m / math.pi)).clamp(0, m - 1).detach()
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    return sign * torch.cos(m * theta) - 2.0 * k


@dataclass(frozen=True)
class Softmax(Margin):
    """Plain softmax: logits x . W_j (no normalisation, no margin)."""


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
        check_number(self, "margin", self.margin)


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
        check_number(self, "m1", self.m1, positive=True)
        check_number(self, "m2", self.m2)
        check_number(self, "m3", self.m3)
        check_flag(self, "monotonic", self.monotonic)


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
        check_number(self, "margin", self.margin)
        check_flag(self, "monotonic", self.monotonic)


@dataclass(frozen=True)
class LSoftmax(Margin):
    """L-Softmax (Liu et al., ICML 2016): target ||W_y|| ||x|| psi(theta_y), others x . W_j (no
    normalisation). Positional: (margin, lambda_base, lambda_min, gamma, power).

    The paper trains it by annealing: the target's psi is blended with the plain cosine,
    f = (lambda cos + psi) / (1 + lambda), with lambda = max(lambda_min, lambda_base * (1 + gamma * step) ** -power)
    over the head's training forwards. Off by default (lambda_base = 0).
    """

    margin: int = 2
    lambda_base: float = 0.0
    lambda_min: float = 0.0
    gamma: float = 0.12
    power: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.margin, bool) or not (isinstance(self.margin, int) and self.margin >= 1):
            raise ValueError(f"{type(self).__name__}: margin must be an integer >= 1, got {self.margin!r}")
        for name in ("lambda_base", "lambda_min", "gamma", "power"):
            check_number(self, name, getattr(self, name))

    def annealing_lambda(self, step: int) -> float:
        if self.lambda_base <= 0:
            return 0.0
        return max(self.lambda_min, self.lambda_base * (1.0 + self.gamma * step) ** (-self.power))

    def target_cosine(self, cos: torch.Tensor, step: int) -> torch.Tensor:
        psi = multiplicative_angular_psi(theta_of(cos), self.margin)
        lam = self.annealing_lambda(step)
        return psi if lam == 0.0 else (lam * cos + psi) / (1.0 + lam)


@dataclass(frozen=True)
class SphereFace(LSoftmax):
    """A-Softmax (Liu et al., CVPR 2017): as L-Softmax with W normalised: scale ||x||, target
    ||x|| psi(theta_y), the same optional annealing. Positional: (margin, lambda_base, lambda_min, gamma, power)."""

    normalize_weight: ClassVar[bool] = True
    margin: int = 4


MARGINS: dict[str, type[Margin]] = {
    "softmax": Softmax,
    "normface": NormFace,
    "lsoftmax": LSoftmax,
    "sphereface": SphereFace,
    "cosface": CosFace,
    "arcface": ArcFace,
    "combined": CombinedMargin,
    "curricularface": CurricularFace,
    "adaface": AdaFace,
    "magface": MagFace,
    "subcenter_arcface": SubCenterArcFace,
    "elastic_arcface": ElasticArcFace,
    "elastic_cosface": ElasticCosFace,
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


def parse_margin_param(text: str) -> tuple[str, float]:
    """``K=V`` of a command line's ``--margin-param`` (``sub_centers`` stays an int)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected K=V (e.g. scale=64), got {text!r}")
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"margin parameter {key} must be a number, got {value!r}") from None
    return key, int(number) if number.is_integer() and key == "sub_centers" else number


def transforms_nontargets(margin: Margin) -> bool:
    """Whether training transforms the non-target logits (the head then keeps an [n, K] slope buffer)."""
    state = {name: torch.tensor(value) for name, value in margin.initial_state().items()}
    return margin.nontarget(state, True) is not None
