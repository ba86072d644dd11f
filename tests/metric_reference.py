"""Float64 single-process references for the pair, triplet and centre losses, written from the formulas
with explicit loops over pairs and triplets (no code shared with largefr.heads)."""
from __future__ import annotations

import torch


def _dist2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).pow(2).sum()


def _all_dist2(e: torch.Tensor) -> torch.Tensor:
    """D[i, j] = ||e_i - e_j||^2 from explicit differences."""
    return (e[:, None, :] - e[None, :, :]).pow(2).sum(-1)


def contrastive(x: torch.Tensor, y: torch.Tensor, margin: float, negatives: str, k: int, normalize: bool) -> torch.Tensor:
    e = x / x.norm(dim=1, keepdim=True) if normalize else x
    d2 = _all_dist2(e)
    values = d2.detach().tolist()
    n = e.shape[0]
    positives, chosen_negatives = [], []
    for a in range(n):
        negs = [j for j in range(n) if y[j] != y[a]]
        positives += [(a, j) for j in range(n) if j != a and y[j] == y[a]]
        if negatives == "hardest":
            negs = sorted(negs, key=lambda j: values[a][j])[:k]
        chosen_negatives += [(a, j) for j in negs]
    pa, pj = zip(*positives)
    na, nj = zip(*chosen_negatives)
    pos_terms = d2[list(pa), list(pj)]
    neg_terms = torch.clamp(margin - torch.sqrt(d2[list(na), list(nj)]), min=0.0) ** 2
    return (pos_terms.sum() + neg_terms.sum()) / (len(positives) + len(chosen_negatives))


def triplet(x: torch.Tensor, y: torch.Tensor, alpha: float, mining: str) -> tuple[torch.Tensor, float]:
    """(loss, active fraction)."""
    e = x / x.norm(dim=1, keepdim=True)
    d2 = _all_dist2(e)
    d = d2.detach().tolist()
    n = e.shape[0]
    triplets, candidates = [], 0
    for a in range(n):
        pos = [p for p in range(n) if p != a and y[p] == y[a]]
        neg = [q for q in range(n) if y[q] != y[a]]
        if not pos or not neg:
            continue
        if mining == "batch_all":
            candidates += len(pos) * len(neg)
            triplets += [(a, p, q) for p in pos for q in neg if d[a][p] - d[a][q] + alpha > 0]
        elif mining == "batch_hard":
            candidates += 1
            triplets.append((a, max(pos, key=lambda j: d[a][j]), min(neg, key=lambda j: d[a][j])))
        else:  # semi_hard
            candidates += len(pos)
            for p in pos:
                band = [q for q in neg if d[a][p] < d[a][q] < d[a][p] + alpha]
                if band:
                    triplets.append((a, p, min(band, key=lambda j: d[a][j])))
    if not triplets:
        return x.sum() * 0.0, 0.0
    a, p, q = (list(v) for v in zip(*triplets))
    hinge = torch.clamp(d2[a, p] - d2[a, q] + alpha, min=0.0)
    active = int((hinge > 0).sum())
    return hinge.sum() / len(triplets), active / max(candidates, 1)


def center_loss(x: torch.Tensor, y: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """1/2 sum_i ||x_i - c_{y_i}||^2 / B."""
    return sum(0.5 * _dist2(x[i], centers[y[i]]) for i in range(x.shape[0])) / x.shape[0]


def center_update(x: torch.Tensor, y: torch.Tensor, centers: torch.Tensor, alpha: float) -> torch.Tensor:
    """Wen et al.: delta c_j = sum_{i: y_i = j}(c_j - x_i) / (1 + n_j); c_j <- c_j - alpha delta c_j."""
    out = centers.clone()
    for j in range(centers.shape[0]):
        members = [i for i in range(x.shape[0]) if int(y[i]) == j]
        if not members:
            continue
        delta = sum(centers[j] - x[i] for i in members) / (1 + len(members))
        out[j] = centers[j] - alpha * delta
    return out
