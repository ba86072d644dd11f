"""Pair verification metrics: the field's 10-fold accuracy protocol, VAL/TAR@FAR and AUC.

Folds are contiguous blocks of pairs, in order (scikit-learn ``KFold`` without shuffling). Each fold's
threshold is chosen on the other folds and its accuracy measured on the fold; the result is the mean and
(population) standard deviation of the fold accuracies. Two threshold searches:

``protocol="insightface"`` (default; what published LFW / CFP-FP / AgeDB-30 numbers use): the score is the
squared L2 distance d = ||a/|a| - b/|b|||^2 (in float64), "same" is predicted when ``d < t``, t runs over
the grid 0, 0.01, ..., 3.99 and the FIRST grid value of best training accuracy is taken. ``val_at_far``
is insightface's VAL@FAR: per fold, the training FAR(t) on the grid 0, 0.001, ..., 3.999 is inverted by
linear interpolation at the target (between the last grid value with FAR <= target and the next one; the
exact degree-1 spline scipy's ``interp1d(kind="slinear")`` gave before it refused repeated x), t = 0 when
no grid value reaches the target, and VAL and FAR are measured on the test fold. Where insightface would
divide by zero (a fold without genuine or without impostor pairs) the rate is 0.

``protocol="exact"``: the score is the cosine similarity, "same" is ``cos >= t``, and the threshold is
searched exactly, not on a grid: with the distinct training similarities v_0 > v_1 > ... > v_{m-1},
accepting the top i+1 of them has a fixed accuracy for any threshold in (v_{i+1}, v_i], and the midpoint
of that gap is used (max margin; v_m = v_{m-1} - 1 and "accept nothing" uses v_0 + 0.5). Among equally
accurate choices the highest threshold wins.

Both report ``threshold`` = mean of the per-fold thresholds, in the protocol's units (``threshold_unit``),
and, over all pairs by cosine similarity, ``tar_at_far`` (no interpolation), ``auc`` and the ROC.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_FARS: tuple[float, ...] = (1e-3, 1e-4)
PROTOCOLS: tuple[str, ...] = ("insightface", "exact")
THRESHOLD_UNITS: dict[str, str] = {"insightface": "squared_l2", "exact": "cosine"}
ACCURACY_GRID: np.ndarray = np.arange(0, 4, 0.01)  # insightface's accuracy thresholds (squared L2)
VAL_GRID: np.ndarray = np.arange(0, 4, 0.001)  # insightface's VAL@FAR thresholds (squared L2)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, eps)


def _check_pairs(emb_a: np.ndarray, emb_b: np.ndarray, issame: np.ndarray) -> None:
    if emb_a.ndim != 2 or emb_a.shape != emb_b.shape:
        raise ValueError(f"expected emb_a and emb_b of the same shape [N, D], got {emb_a.shape} and {emb_b.shape}")
    if issame.shape != (emb_a.shape[0],):
        raise ValueError(f"expected issame of shape ({emb_a.shape[0]},), got {issame.shape}")
    if not (np.isfinite(emb_a).all() and np.isfinite(emb_b).all()):
        raise ValueError("embeddings contain NaN or inf")


def _check_labels(issame: np.ndarray) -> np.ndarray:
    labels = np.asarray(issame)
    if labels.dtype != np.bool_:
        if not np.isin(labels, (0, 1)).all():
            raise ValueError(f"expected issame to be bool or 0/1, got values {np.unique(labels)[:5]}")
        labels = labels.astype(np.bool_)
    if labels.all() or not labels.any():
        raise ValueError("expected both genuine (True) and impostor (False) pairs in issame")
    return labels


def _check_fars(fars: Sequence[float]) -> None:
    for far in fars:
        if not 0.0 < far <= 1.0:
            raise ValueError(f"FAR targets must be in (0, 1], got {far}")


def pair_similarity(emb_a: np.ndarray, emb_b: np.ndarray) -> np.ndarray:
    """Cosine similarity of row pairs after L2 normalisation."""
    a = l2_normalize(np.asarray(emb_a, dtype=np.float64))
    b = l2_normalize(np.asarray(emb_b, dtype=np.float64))
    return np.einsum("nd,nd->n", a, b)


def pair_squared_distance(emb_a: np.ndarray, emb_b: np.ndarray) -> np.ndarray:
    """Squared L2 distance of row pairs after L2 normalisation (in [0, 4])."""
    a = l2_normalize(np.asarray(emb_a, dtype=np.float64))
    b = l2_normalize(np.asarray(emb_b, dtype=np.float64))
    return np.sum(np.square(a - b), axis=1)


def fold_test_masks(n: int, folds: int) -> list[np.ndarray]:
    """Boolean test masks of ``folds`` contiguous folds, as scikit-learn ``KFold(folds, shuffle=False)``."""
    if not 2 <= folds <= n:
        raise ValueError(f"folds must be in [2, number of pairs={n}], got {folds}")
    sizes = np.full(folds, n // folds)
    sizes[: n % folds] += 1  # the first n % folds folds hold one pair more
    bounds = np.r_[0, np.cumsum(sizes)]
    masks = []
    for k in range(folds):
        test = np.zeros(n, dtype=bool)
        test[bounds[k] : bounds[k + 1]] = True
        masks.append(test)
    return masks


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy) maximising accuracy of ``scores >= threshold``; ties -> highest threshold."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tp = np.cumsum(y)[last_of_value]
    fp = (last_of_value + 1) - tp
    negatives = s.size - y.sum()
    correct = np.r_[negatives, tp + (negatives - fp)]  # first entry: nothing accepted
    values = s[last_of_value]
    upper = np.r_[values[0] + 1.0, values]  # gap i lies between upper[i] and lower[i]
    lower = np.r_[values, values[-1] - 1.0]
    thresholds = (upper + lower) / 2
    i = int(np.argmax(correct))
    return float(thresholds[i]), float(correct[i] / s.size)


def kfold_accuracy(scores: np.ndarray, labels: np.ndarray, folds: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Exact protocol: per-fold test accuracy and best training threshold of ``scores >= t``."""
    masks = fold_test_masks(scores.shape[0], folds)
    accs, thrs = np.empty(folds), np.empty(folds)
    for k, test in enumerate(masks):
        thrs[k], _ = best_threshold(scores[~test], labels[~test])
        accs[k] = np.mean((scores[test] >= thrs[k]) == labels[test])
    return accs, thrs


def _accepted_below(dist: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold t, how many of ``dist`` satisfy ``dist < t``."""
    return np.searchsorted(np.sort(dist), thresholds, side="left")


def grid_kfold_accuracy(
    dist: np.ndarray, labels: np.ndarray, folds: int = 10, grid: np.ndarray = ACCURACY_GRID
) -> tuple[np.ndarray, np.ndarray]:
    """insightface protocol: per-fold test accuracy of ``dist < t`` at the first best training grid t."""
    masks = fold_test_masks(dist.shape[0], folds)
    accs, thrs = np.empty(folds), np.empty(folds)
    for k, test in enumerate(masks):
        d, y = dist[~test], labels[~test]
        true_accepts = _accepted_below(d[y], grid)
        true_rejects = (~y).sum() - _accepted_below(d[~y], grid)
        thrs[k] = grid[int(np.argmax(true_accepts + true_rejects))]  # argmax: the first of equal counts
        accs[k] = np.mean((dist[test] < thrs[k]) == labels[test])
    return accs, thrs


def _rate(count: int, total: int) -> float:
    return float(count) / float(total) if total else 0.0


def _val_far(dist: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, float]:
    """(VAL, FAR) of ``dist < threshold``: accepted share of genuine and of impostor pairs."""
    accepted = dist < threshold
    return (_rate(int(np.sum(accepted & labels)), int(labels.sum())),
            _rate(int(np.sum(accepted & ~labels)), int((~labels).sum())))


def _threshold_at_far(dist: np.ndarray, labels: np.ndarray, far_target: float, grid: np.ndarray) -> float:
    """Grid threshold with training FAR = target by linear interpolation of FAR(t) (see module docstring)."""
    impostors = int((~labels).sum())
    far = _accepted_below(dist[~labels], grid) / impostors if impostors else np.zeros(grid.size)
    if far.max() < far_target:
        return 0.0
    # FAR(t) is non-decreasing in t: the segment starts at the last grid point with FAR <= target,
    # at most the second to last one (degree-1 B-spline with knots far[0], far[0], ..., far[-1], far[-1]).
    i = min(int(np.searchsorted(far, far_target, side="right")) - 1, grid.size - 2)
    if far[i + 1] == far[i]:
        return 0.0  # a zero-length last segment: both basis functions vanish
    w = 1.0 / (far[i + 1] - far[i])
    return float(grid[i] * (w * (far[i + 1] - far_target)) + grid[i + 1] * (w * (far_target - far[i])))


def grid_kfold_val_at_far(
    dist: np.ndarray, labels: np.ndarray, far_target: float, folds: int = 10, grid: np.ndarray = VAL_GRID
) -> dict[str, float]:
    """insightface's VAL@FAR: {"val": mean, "val_std": std, "far": mean} over the test folds."""
    vals, fars = [], []
    for test in fold_test_masks(dist.shape[0], folds):
        threshold = _threshold_at_far(dist[~test], labels[~test], far_target, grid)
        val, far = _val_far(dist[test], labels[test], threshold)
        vals.append(val)
        fars.append(far)
    return {"val": float(np.mean(vals)), "val_std": float(np.std(vals)), "far": float(np.mean(fars))}


def tar_at_far(
    scores: np.ndarray, labels: np.ndarray, fars: Sequence[float] = DEFAULT_FARS
) -> dict[float, float]:
    """TAR at the lowest threshold whose FAR does not exceed each target (no interpolation)."""
    from sklearn.metrics import roc_curve

    labels = _check_labels(labels)
    _check_fars(fars)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    out: dict[float, float] = {}
    for far in fars:
        i = int(np.searchsorted(fpr, far, side="right")) - 1  # fpr is non-decreasing and starts at 0
        out[float(far)] = float(tpr[i])
    return out


def _protocol_folds(
    emb_a: np.ndarray, emb_b: np.ndarray, labels: np.ndarray, folds: int, fars: Sequence[float], protocol: str
) -> dict[str, Any]:
    if protocol == "exact":
        accs, thrs = kfold_accuracy(pair_similarity(emb_a, emb_b), labels, folds)
        return {"fold_accuracies": accs, "fold_thresholds": thrs}
    dist = pair_squared_distance(emb_a, emb_b)
    accs, thrs = grid_kfold_accuracy(dist, labels, folds)
    val = {float(far): grid_kfold_val_at_far(dist, labels, far, folds) for far in fars}
    return {"fold_accuracies": accs, "fold_thresholds": thrs, "val_at_far": val}


def verify(
    emb_a: np.ndarray,
    emb_b: np.ndarray,
    issame: np.ndarray | Sequence[bool],
    folds: int = 10,
    fars: Sequence[float] = DEFAULT_FARS,
    protocol: str = "insightface",
) -> dict[str, Any]:
    """10-fold verification accuracy, mean best threshold, TAR@FAR and AUC of embedding pairs.

    Returns ``protocol``, ``accuracy_mean``, ``accuracy_std``, ``threshold`` (in ``threshold_unit``),
    ``tar_at_far`` ({far: tar}), ``auc``, ``fold_accuracies``, ``fold_thresholds``, the ROC (``fpr``,
    ``tpr``) over all pairs and ``num_pairs``; with ``protocol="insightface"`` also ``val_at_far``
    ({far: {"val", "val_std", "far"}}). See the module docstring for the two protocols.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    emb_a, emb_b = np.asarray(emb_a), np.asarray(emb_b)
    labels = _check_labels(np.asarray(issame).reshape(-1))
    _check_pairs(emb_a, emb_b, labels)
    _check_fars(fars)
    out = _protocol_folds(emb_a, emb_b, labels, folds, fars, protocol)
    accs, thrs = out["fold_accuracies"], out["fold_thresholds"]
    scores = pair_similarity(emb_a, emb_b)
    fpr, tpr, _ = roc_curve(labels, scores)
    out.update(
        protocol=protocol,
        threshold_unit=THRESHOLD_UNITS[protocol],
        accuracy_mean=float(accs.mean()),
        accuracy_std=float(accs.std()),
        threshold=float(thrs.mean()),
        tar_at_far=tar_at_far(scores, labels, fars),
        auc=float(roc_auc_score(labels, scores)),
        fpr=fpr,
        tpr=tpr,
        num_pairs=int(labels.shape[0]),
    )
    return out


def verify_interleaved(embeddings: np.ndarray, issame: np.ndarray | Sequence[bool], **kwargs: Any) -> dict[str, Any]:
    """:func:`verify` for embeddings ordered as in a .bin: pair i is rows 2i and 2i+1."""
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] % 2:
        raise ValueError(f"expected embeddings [2N, D] with an even row count, got {emb.shape}")
    return verify(emb[0::2], emb[1::2], issame, **kwargs)
