"""Pair verification metrics: the field's 10-fold accuracy protocol, TAR@FAR and AUC.

Embeddings are L2-normalised and compared by cosine similarity (equivalently squared distance
``2 - 2 cos``); a pair is predicted "same" when its similarity is >= the threshold. Folds are
contiguous blocks of pairs, in order (scikit-learn ``KFold`` without shuffling, as insightface).
On the training folds the threshold is searched exactly, not on a grid: with the distinct training
similarities v_0 > v_1 > ... > v_{m-1}, accepting the top i+1 of them has a fixed accuracy for any
threshold in (v_{i+1}, v_i], and the midpoint of that gap is used (max margin; v_m = v_{m-1} - 1 and
"accept nothing" uses v_0 + 0.5). Among equally accurate choices the highest threshold wins.
The reported ``threshold`` is the mean of the per-fold best thresholds (cosine units).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_FARS: tuple[float, ...] = (1e-3, 1e-4)


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


def pair_similarity(emb_a: np.ndarray, emb_b: np.ndarray) -> np.ndarray:
    """Cosine similarity of row pairs after L2 normalisation."""
    a = l2_normalize(np.asarray(emb_a, dtype=np.float64))
    b = l2_normalize(np.asarray(emb_b, dtype=np.float64))
    return np.einsum("nd,nd->n", a, b)


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
    """Per-fold test accuracy and best training threshold, folds contiguous and in order."""
    n = scores.shape[0]
    if not 2 <= folds <= n:
        raise ValueError(f"folds must be in [2, number of pairs={n}], got {folds}")
    sizes = np.full(folds, n // folds)
    sizes[: n % folds] += 1  # same split as sklearn KFold(shuffle=False)
    bounds = np.r_[0, np.cumsum(sizes)]
    accs, thrs = np.empty(folds), np.empty(folds)
    for k in range(folds):
        test = np.zeros(n, dtype=bool)
        test[bounds[k] : bounds[k + 1]] = True
        thrs[k], _ = best_threshold(scores[~test], labels[~test])
        accs[k] = np.mean((scores[test] >= thrs[k]) == labels[test])
    return accs, thrs


def tar_at_far(
    scores: np.ndarray, labels: np.ndarray, fars: Sequence[float] = DEFAULT_FARS
) -> dict[float, float]:
    """TAR at the lowest threshold whose FAR does not exceed each target (no interpolation)."""
    from sklearn.metrics import roc_curve

    labels = _check_labels(labels)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    out: dict[float, float] = {}
    for far in fars:
        if not 0.0 < far <= 1.0:
            raise ValueError(f"FAR targets must be in (0, 1], got {far}")
        i = int(np.searchsorted(fpr, far, side="right")) - 1  # fpr is non-decreasing and starts at 0
        out[float(far)] = float(tpr[i])
    return out


def verify(
    emb_a: np.ndarray,
    emb_b: np.ndarray,
    issame: np.ndarray | Sequence[bool],
    folds: int = 10,
    fars: Sequence[float] = DEFAULT_FARS,
) -> dict[str, Any]:
    """10-fold verification accuracy, mean best threshold, TAR@FAR and AUC of embedding pairs.

    Returns ``accuracy_mean``, ``accuracy_std``, ``threshold`` (cosine), ``tar_at_far`` ({far: tar}),
    ``auc``, plus ``fold_accuracies``, ``fold_thresholds`` and the ROC (``fpr``, ``tpr``) over all pairs.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    emb_a, emb_b = np.asarray(emb_a), np.asarray(emb_b)
    labels = _check_labels(np.asarray(issame).reshape(-1))
    _check_pairs(emb_a, emb_b, labels)
    scores = pair_similarity(emb_a, emb_b)
    accs, thrs = kfold_accuracy(scores, labels, folds)
    fpr, tpr, _ = roc_curve(labels, scores)
    return {
        "accuracy_mean": float(accs.mean()),
        "accuracy_std": float(accs.std()),
        "threshold": float(thrs.mean()),
        "tar_at_far": tar_at_far(scores, labels, fars),
        "auc": float(roc_auc_score(labels, scores)),
        "fold_accuracies": accs,
        "fold_thresholds": thrs,
        "fpr": fpr,
        "tpr": tpr,
        "num_pairs": int(labels.shape[0]),
    }


def verify_interleaved(embeddings: np.ndarray, issame: np.ndarray | Sequence[bool], **kwargs: Any) -> dict[str, Any]:
    """:func:`verify` for embeddings ordered as in a .bin: pair i is rows 2i and 2i+1."""
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] % 2:
        raise ValueError(f"expected embeddings [2N, D] with an even row count, got {emb.shape}")
    return verify(emb[0::2], emb[1::2], issame, **kwargs)
