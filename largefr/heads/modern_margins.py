"""Modern margins: CurricularFace, AdaFace, MagFace, sub-centre ArcFace, ElasticFace (Arc and Cos).

Each uses one or more capabilities of the margin contract (largefr.heads.margin_base); the sharded
head knows none of them by name. Formulas (theta_y = acos cos(theta_y), s the scale):

- CurricularFace (Huang et al., CVPR 2020): target s cos(theta_y + m); a non-target cos_j is hard when
  cos_j > cos(theta_y + m) and becomes cos_j (t + cos_j); t <- alpha mean_i cos(theta_yi) + (1 - alpha) t
  over the global batch (alpha = 0.01, t_0 = 0), updated before use, no gradient through t or the mask.
- AdaFace (Kim et al., CVPR 2022): z_i = clip(h (||x_i|| - mu) / (sigma + 1e-3), -1, 1) with mu, sigma
  EMAs (momentum 0.01, initial 20 and 100) of the batch mean and std of the (detached, clipped to
  [0.001, 100]) norms; target s (cos(clip(theta_y - m z_i, eps, pi - eps)) - (m z_i + m)), cos clipped to
  +-(1 - eps), eps = 1e-3 (the authors' code).
- MagFace (Meng et al., CVPR 2021): a_i = clip(||x_i||, l_a, u_a), m(a) = (u_m - l_m)/(u_a - l_a)(a - l_a) + l_m,
  target s cos(theta_y + m(a_i)) (gradient through a_i), loss += lambda_g mean_i g(a_i), g(a) = a/u_a^2 + 1/a.
- Sub-centre ArcFace (Deng et al., ECCV 2020): S sub-centres per class, cos(theta_ij) = max_k cos(theta_ijk),
  then ArcFace on the target.
- ElasticFace (Boutros et al., CVPRW 2022): per-sample m_i ~ N(m, sigma); Arc: s cos(theta_y + m_i),
  Cos: s (cos(theta_y) - m_i). The draw of step t is the stream of (seed, t); global sample i takes its
  i-th value, so it does not depend on the world size.
"""
from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass

import torch

from largefr.heads.margin_base import (
    MarginBatch,
    MarginState,
    NontargetPrepare,
    NontargetTransform,
    NormalizedMargin,
    RowParams,
    check_flag,
    check_number,
    combined_margin_cosine,
    interclass_filter_,
    theta_of,
)
from largefr.seeding import derive_seed


def ema_(state: torch.Tensor, value: torch.Tensor, momentum: float) -> None:
    """state <- momentum * value + (1 - momentum) * state, in place."""
    state.mul_(1.0 - momentum).add_(value.to(state.dtype), alpha=momentum)


def step_normal(seed: int, step: int, count: int, device: torch.device) -> torch.Tensor:
    """``count`` standard normal draws fixed by (seed, step): value i belongs to global sample i."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "elastic_margin", step))
    return torch.randn(count, generator=gen).to(device)


def curricular_(logits: torch.Tensor, slope: torch.Tensor, hard_above: torch.Tensor, t: torch.Tensor,
                scale: float, slope_set: bool) -> None:
    """Hard negatives l > hard_above_i become l (t + l/s) = s cos (t + cos), slope t + 2 l/s (in place).

    Six passes over [n, K]: the mask, u = t + l/s, u := 1 off the mask, l *= u, and the slope 2u - t
    (1 off the mask), multiplied into an existing slope when the inter-class filter set one.
    """
    easy = logits <= hard_above.unsqueeze(1)
    u = torch.add(t, logits, alpha=1.0 / scale)
    u.masked_fill_(easy, 1.0)
    logits.mul_(u)
    if slope_set:
        slope.mul_(torch.add(-t, u, alpha=2.0).masked_fill_(easy, 1.0))
    else:
        torch.add(-t, u, alpha=2.0, out=slope).masked_fill_(easy, 1.0)


@dataclass(frozen=True)
class _ArcTarget(NormalizedMargin):
    """s cos(theta_y + m) on the target. Positional: (scale, margin)."""

    margin: float = 0.5

    def target_cosine(self, cos: torch.Tensor, step: int) -> torch.Tensor:
        return combined_margin_cosine(cos, 1.0, self.margin, 0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "margin", self.margin)


@dataclass(frozen=True)
class CurricularFace(_ArcTarget):
    """CurricularFace: target s cos(theta_y + m); hard negatives cos_j (t + cos_j), t an EMA of the global
    mean target cosine. Positional: (scale, margin, momentum); ``monotonic`` keyword-only (off = the paper)."""

    needs_target_cosine = True
    momentum: float = 0.01
    _: KW_ONLY
    monotonic: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "momentum", self.momentum)
        if not 0.0 < self.momentum <= 1.0:
            raise ValueError(f"CurricularFace: momentum must be in (0, 1], got {self.momentum!r}")
        check_flag(self, "monotonic", self.monotonic)

    def target_cosine(self, cos: torch.Tensor, step: int) -> torch.Tensor:
        return combined_margin_cosine(cos, 1.0, self.margin, 0.0, self.monotonic)

    def initial_state(self) -> dict[str, float]:
        return {"t": 0.0}

    def extra_cost(self) -> str:
        cost = ("one all-reduce of the N target cosines; hard-negative transform: 6 extra passes over the logits "
                "forward (again in the backward when chunked), 1 backward, one [N, K] slope buffer")
        return cost + (" (plus the inter-class filter)" if self.interclass_filter is not None else "")

    def nontarget(self, state: MarginState, training: bool) -> NontargetPrepare:
        filter_at = self.filter_threshold_logit()

        def prepare(target_cos: torch.Tensor | None) -> NontargetTransform:
            assert target_cos is not None, "CurricularFace needs the all-reduced target cosines"
            with torch.no_grad():
                if training:
                    ema_(state["t"], target_cos.mean(), self.momentum)
                t = state["t"].clone()
                hard_above = self.feature_scale * self.target_cosine(target_cos, 0)

            def transform(logits: torch.Tensor, slope: torch.Tensor, a: int, b: int) -> None:
                if filter_at is not None:
                    interclass_filter_(logits, slope, filter_at)
                curricular_(logits, slope, hard_above[a:b], t, self.feature_scale, filter_at is not None)

            return transform

        return prepare


@dataclass(frozen=True)
class AdaFace(NormalizedMargin):
    """AdaFace: norm-adaptive angular and additive margins. Positional: (scale, margin, h, momentum)."""

    margin: float = 0.4
    h: float = 0.333
    momentum: float = 0.01
    eps: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("margin", "h", "momentum", "eps"):
            check_number(self, name, getattr(self, name))

    def initial_state(self) -> dict[str, float]:
        return {"batch_mean": 20.0, "batch_std": 100.0}

    def row_params(self, batch: MarginBatch, state: MarginState) -> dict[str, torch.Tensor]:
        norms = batch.x_norm.detach().clamp(0.001, 100.0)
        if batch.training:
            std = norms.std() if norms.numel() > 1 else torch.zeros((), device=norms.device)
            ema_(state["batch_mean"], norms.mean(), self.momentum)
            ema_(state["batch_std"], std, self.momentum)
        z = ((norms - state["batch_mean"]) / (state["batch_std"] + self.eps) * self.h).clamp(-1.0, 1.0)
        return {"g_angle": -self.margin * z, "g_add": self.margin * z + self.margin}

    def target_from_stats(self, x_norm: torch.Tensor, w_norm: torch.Tensor, dot: torch.Tensor, step: int = 0,
                          params: RowParams | None = None) -> torch.Tensor:
        assert params is not None, "AdaFace needs its per-row margins (row_params)"
        cos = (dot / (x_norm * w_norm).clamp_min(1e-12)).clamp(-1.0 + self.eps, 1.0 - self.eps)
        theta = (torch.acos(cos) + params["g_angle"]).clamp(self.eps, math.pi - self.eps)
        return self.feature_scale * (torch.cos(theta) - params["g_add"])


@dataclass(frozen=True)
class MagFace(NormalizedMargin):
    """MagFace: magnitude-aware margin m(a) and regulariser lambda_g g(a).
    Positional: (scale, l_a, u_a, l_m, u_m, lambda_g)."""

    l_a: float = 10.0
    u_a: float = 110.0
    l_m: float = 0.45
    u_m: float = 0.8
    lambda_g: float = 35.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("l_a", "u_a", "l_m", "u_m", "lambda_g"):
            check_number(self, name, getattr(self, name))
        if not 0 < self.l_a < self.u_a:
            raise ValueError(f"MagFace: need 0 < l_a < u_a, got l_a={self.l_a!r}, u_a={self.u_a!r}")

    def magnitude(self, x_norm: torch.Tensor) -> torch.Tensor:
        return x_norm.clamp(self.l_a, self.u_a)

    def adaptive_margin(self, a: torch.Tensor) -> torch.Tensor:
        return (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m

    def target_from_stats(self, x_norm: torch.Tensor, w_norm: torch.Tensor, dot: torch.Tensor, step: int = 0,
                          params: RowParams | None = None) -> torch.Tensor:
        cos = dot / (x_norm * w_norm).clamp_min(1e-12)
        m = self.adaptive_margin(self.magnitude(x_norm))
        return self.feature_scale * torch.cos(theta_of(cos) + m)

    def sample_regularizer(self, x_norm: torch.Tensor) -> torch.Tensor:
        a = self.magnitude(x_norm)
        return self.lambda_g * (a / self.u_a**2 + 1.0 / a)

    def extra_cost(self) -> str:
        return "regulariser over the N feature norms (no pass over the logits)"


@dataclass(frozen=True)
class SubCenterArcFace(_ArcTarget):
    """Sub-centre ArcFace: S sub-centres per class, class cosine = their max, ArcFace on the target.
    Positional: (scale, margin, sub_centers)."""

    sub_centers: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.sub_centers, bool) or not (isinstance(self.sub_centers, int) and self.sub_centers >= 1):
            raise ValueError(f"SubCenterArcFace: sub_centers must be an integer >= 1, got {self.sub_centers!r}")

    @property
    def num_sub_centers(self) -> int:
        return self.sub_centers

    def extra_cost(self) -> str:
        return (f"{self.sub_centers}x wider logits GEMMs and W (the floor grows {self.sub_centers}-fold); one max over "
                "sub-centres forward, one scatter to the best sub-centre backward, an int64 [N, K] argmax buffer")


@dataclass(frozen=True)
class _Elastic(NormalizedMargin):
    margin: float = 0.5
    sigma: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "margin", self.margin)
        check_number(self, "sigma", self.sigma)
        if self.sigma < 0:
            raise ValueError(f"{type(self).__name__}: sigma must be >= 0, got {self.sigma!r}")

    def row_params(self, batch: MarginBatch, state: MarginState) -> dict[str, torch.Tensor]:
        draws = step_normal(batch.seed, batch.step, batch.x_norm.numel(), batch.x_norm.device)
        return {"margin": self.margin + self.sigma * draws}


@dataclass(frozen=True)
class ElasticArcFace(_Elastic):
    """ElasticFace-Arc: target s cos(theta_y + m_i), m_i ~ N(m, sigma). Positional: (scale, margin, sigma)."""

    def target_from_stats(self, x_norm: torch.Tensor, w_norm: torch.Tensor, dot: torch.Tensor, step: int = 0,
                          params: RowParams | None = None) -> torch.Tensor:
        assert params is not None, "ElasticFace needs its per-row margins (row_params)"
        cos = dot / (x_norm * w_norm).clamp_min(1e-12)
        return self.feature_scale * torch.cos(theta_of(cos) + params["margin"])


@dataclass(frozen=True)
class ElasticCosFace(_Elastic):
    """ElasticFace-Cos: target s (cos(theta_y) - m_i), m_i ~ N(m, sigma). Positional: (scale, margin, sigma)."""

    margin: float = 0.35

    def target_from_stats(self, x_norm: torch.Tensor, w_norm: torch.Tensor, dot: torch.Tensor, step: int = 0,
                          params: RowParams | None = None) -> torch.Tensor:
        assert params is not None, "ElasticFace needs its per-row margins (row_params)"
        cos = dot / (x_norm * w_norm).clamp_min(1e-12)
        return self.feature_scale * (cos - params["margin"])
