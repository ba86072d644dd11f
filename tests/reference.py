"""Single-process float64 reference for the margin-softmax family, written from the papers' formulas.

It shares no code with largefr.heads: logits over the full (or restricted) W with the margin put on the
target column, then F.cross_entropy. Used by the head tests as ground truth.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from largefr.heads import margins as M
from largefr.seeding import derive_seed


def _psi(theta: torch.Tensor, m: int) -> torch.Tensor:
    k = torch.floor(theta * m / math.pi).clamp(max=m - 1)
    return torch.where(torch.remainder(k, 2) == 0, 1.0, -1.0).double() * torch.cos(m * theta) - 2 * k


def _arc(c: torch.Tensor, m: torch.Tensor | float) -> torch.Tensor:
    return torch.cos(torch.acos(c.clamp(-1 + 1e-12, 1 - 1e-12)) + m)


def elastic_draws(seed: int, step: int, n: int) -> torch.Tensor:
    """ElasticFace's per-sample normals as the head documents them: the stream derive_seed(seed, "elastic_margin", step)."""
    return torch.randn(n, generator=torch.Generator().manual_seed(derive_seed(seed, "elastic_margin", step))).double()


def initial_reference_state(margin: M.Margin) -> dict[str, float]:
    """The papers' initial EMA values (CurricularFace t = 0; AdaFace mean 20, std 100 as the authors' code)."""
    if isinstance(margin, M.CurricularFace):
        return {"t": 0.0}
    if isinstance(margin, M.AdaFace):
        return {"batch_mean": 20.0, "batch_std": 100.0}
    return {}


def _modern_logits(margin: M.Margin, x: torch.Tensor, cos: torch.Tensor, labels: torch.Tensor, step: int,
                   state: dict[str, float], seed: int, training: bool) -> torch.Tensor | None:
    """Logits [N, C] (scaled) for the modern margins from the class cosines cos [N, C]; None for others."""
    rows = torch.arange(x.shape[0])
    s, c = getattr(margin, "scale", 1.0), cos[rows, labels]
    if isinstance(margin, M.CurricularFace):
        if training:
            state["t"] = 0.01 * c.detach().mean().item() + 0.99 * state["t"]
        target = _arc(c, margin.margin)
        hard = cos > target.detach()[:, None]
        logits = torch.where(hard, cos * (state["t"] + cos), cos)
        logits[rows, labels] = target
        return s * logits
    if isinstance(margin, M.AdaFace):
        norms = x.detach().norm(dim=1).clamp(0.001, 100)
        if training:
            state["batch_mean"] = 0.01 * norms.mean().item() + 0.99 * state["batch_mean"]
            state["batch_std"] = 0.01 * norms.std().item() + 0.99 * state["batch_std"]
        z = ((norms - state["batch_mean"]) / (state["batch_std"] + 1e-3) * margin.h).clamp(-1, 1)
        theta = (torch.acos(c.clamp(-1 + 1e-3, 1 - 1e-3)) - margin.margin * z).clamp(1e-3, math.pi - 1e-3)
        target = torch.cos(theta) - (margin.margin * z + margin.margin)
    elif isinstance(margin, M.MagFace):
        a = x.norm(dim=1).clamp(margin.l_a, margin.u_a)
        m = (margin.u_m - margin.l_m) / (margin.u_a - margin.l_a) * (a - margin.l_a) + margin.l_m
        target = _arc(c, m)
    elif isinstance(margin, M.ElasticArcFace):
        target = _arc(c, margin.margin + margin.sigma * elastic_draws(seed, step, x.shape[0]))
    elif isinstance(margin, M.ElasticCosFace):
        target = c - (margin.margin + margin.sigma * elastic_draws(seed, step, x.shape[0]))
    elif isinstance(margin, M.SubCenterArcFace):
        target = _arc(c, margin.margin)
    else:
        return None
    logits = cos.clone()
    logits[rows, labels] = target
    return s * logits


def reference_logits(margin: M.Margin, x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, step: int = 0,
                     state: dict[str, float] | None = None, seed: int = 0, training: bool = True) -> torch.Tensor:
    """Full logits [N, C] in float64 for raw embeddings x [N, D], raw W [S*C, D], labels [N] (classes of w).

    ``state`` holds the EMAs (updated in place when training), ``seed`` fixes ElasticFace's draws.
    """
    rows = torch.arange(x.shape[0])
    x_norm = x.norm(dim=1)
    w_norm = w.norm(dim=1)
    cos = (x @ w.T) / (x_norm[:, None] * w_norm[None, :])
    if isinstance(margin, M.SubCenterArcFace):  # class cosine = max over its sub-centres (rows c*S .. c*S+S-1)
        cos = cos.view(x.shape[0], -1, margin.sub_centers).amax(dim=2)
    if isinstance(margin, M.NormalizedMargin) and margin.interclass_filter is not None:
        others = torch.ones_like(cos, dtype=torch.bool)
        others[rows, labels] = False
        cos = torch.where(others & (cos > margin.interclass_filter), torch.zeros_like(cos), cos)
    modern = _modern_logits(margin, x, cos, labels, step, state if state is not None else {}, seed, training)
    if modern is not None:
        return modern
    c = cos[rows, labels]
    theta = torch.acos(c.clamp(-1 + 1e-12, 1 - 1e-12))
    if isinstance(margin, M.Softmax):
        return x @ w.T
    if isinstance(margin, M.SphereFace):
        logits = x_norm[:, None] * cos
        psi = _psi(theta, margin.margin)
        lam = margin.annealing_lambda(step)
        target = x_norm * (lam * c + psi) / (1 + lam)
    elif isinstance(margin, M.LSoftmax):
        logits = x @ w.T
        lam = margin.annealing_lambda(step)
        target = x_norm * w_norm[labels] * (lam * c + _psi(theta, margin.margin)) / (1 + lam)
    else:
        s = margin.feature_scale
        logits = s * cos
        if isinstance(margin, M.NormFace):
            target = s * c
        elif isinstance(margin, M.CosFace):
            target = s * (c - margin.margin)
        elif isinstance(margin, M.ArcFace):
            target = s * torch.cos(theta + margin.margin)
        elif isinstance(margin, M.CombinedMargin):
            target = s * (torch.cos(margin.m1 * theta + margin.m2) - margin.m3)
        else:
            raise TypeError(f"no reference for {margin!r}")
    logits = logits.clone()
    logits[rows, labels] = target
    return logits


def reference_loss_and_grads(
    margin: M.Margin, x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, step: int = 0,
    state: dict[str, float] | None = None, seed: int = 0,
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(mean CE loss [+ MagFace's lambda_g mean g(a)], d loss/d x [N, D], d loss/d w [S*C, D]) in float64."""
    x = x.detach().double().requires_grad_(True)
    w = w.detach().double().requires_grad_(True)
    loss = F.cross_entropy(reference_logits(margin, x, w, labels, step, state, seed), labels)
    if isinstance(margin, M.MagFace):
        a = x.norm(dim=1).clamp(margin.l_a, margin.u_a)
        loss = loss + margin.lambda_g * (a / margin.u_a**2 + 1 / a).mean()
    loss.backward()
    return loss.item(), x.grad, w.grad


ALL_MARGINS: list[M.Margin] = [
    M.Softmax(),
    M.NormFace(scale=16.0),
    M.LSoftmax(margin=2),
    M.SphereFace(margin=4),
    M.SphereFace(margin=3, lambda_base=1000.0, lambda_min=5.0),
    M.CosFace(scale=16.0, margin=0.35),
    M.ArcFace(scale=16.0, margin=0.5),
    M.CombinedMargin(scale=16.0, m1=0.9, m2=0.4, m3=0.15),
    M.LSoftmax(margin=3, lambda_base=100.0, lambda_min=2.0),  # annealed (appended: tests index this list)
]

# the modern margins at small scales (s = 16 keeps float32 sums well inside the test tolerances)
MODERN_MARGINS: list[M.Margin] = [
    M.CurricularFace(16.0, 0.5),
    M.CurricularFace(16.0, 0.5, interclass_filter=0.3),
    M.AdaFace(16.0, 0.4, 0.333),
    M.MagFace(16.0, 1.0, 6.0, 0.45, 0.8, 5.0),  # l_a, u_a scaled to the test's norms (~4)
    M.SubCenterArcFace(16.0, 0.5, 3),
    M.ElasticArcFace(16.0, 0.5, 0.05),
    M.ElasticCosFace(16.0, 0.35, 0.05),
    M.ArcFace(16.0, 0.5, interclass_filter=0.2),
]
