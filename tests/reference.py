"""Single-process float64 reference for the margin-softmax family, written from the papers' formulas.

It shares no code with largefr.heads: logits over the full (or restricted) W with the margin put on the
target column, then F.cross_entropy. Used by the head tests as ground truth.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from largefr.heads import margins as M


def _psi(theta: torch.Tensor, m: int) -> torch.Tensor:
    k = torch.floor(theta * m / math.pi).clamp(max=m - 1)
    return torch.where(torch.remainder(k, 2) == 0, 1.0, -1.0).double() * torch.cos(m * theta) - 2 * k


def reference_logits(margin: M.Margin, x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, step: int = 0) -> torch.Tensor:
    """Full logits [N, C] in float64 for raw embeddings x [N, D], raw W [C, D], labels [N] (columns of w)."""
    rows = torch.arange(x.shape[0])
    x_norm = x.norm(dim=1)
    w_norm = w.norm(dim=1)
    cos = (x @ w.T) / (x_norm[:, None] * w_norm[None, :])
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
        target = x_norm * w_norm[labels] * _psi(theta, margin.margin)
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
    margin: M.Margin, x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, step: int = 0
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(mean CE loss, d loss/d x [N, D], d loss/d w [C, D]) in float64."""
    x = x.detach().double().requires_grad_(True)
    w = w.detach().double().requires_grad_(True)
    loss = F.cross_entropy(reference_logits(margin, x, w, labels, step), labels)
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
]
