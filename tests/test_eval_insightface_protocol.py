"""The default verification protocol against an independent loop implementation of insightface's.

The reference below follows insightface's recipe step by step (sklearn KFold without shuffling, one
threshold at a time, tp/tn counted with logical ands, np.argmax, FAR inverted by scipy's degree-1 spline
evaluated as scipy's B-spline code does) and shares no code with largefr.eval.verification.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy.interpolate import interp1d
from sklearn.model_selection import KFold

from largefr.eval.verification import ACCURACY_GRID, VAL_GRID, verify


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(np.square(a - b), 1)


def _rate(count: int, total: int) -> float:
    return count / total if total else 0.0  # insightface divides by zero here


def _slinear(x: np.ndarray, y: np.ndarray, v: float) -> float:
    """interp1d(x, y, kind="slinear")(v) as scipy's BSpline evaluates it, repeated x allowed."""
    order = np.argsort(x, kind="mergesort")
    x, y = x[order], y[order]
    t = np.r_[x[0], x, x[-1]]  # knots of the degree-1 interpolating spline
    n = x.size
    interval = 2
    while interval != n and v >= t[interval]:
        interval += 1
    interval -= 1  # t[interval] <= v < t[interval + 1]
    lo, hi = t[interval], t[interval + 1]
    if hi == lo:
        return 0.0
    w = 1.0 / (hi - lo)
    return float(y[interval - 1] * (w * (hi - v)) + y[interval] * (w * (v - lo)))


def _reference(
    dist: np.ndarray, issame: np.ndarray, folds: int, fars: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray, dict[float, tuple[float, float, float]]]:
    accs, thrs, vals = [], [], {far: ([], []) for far in fars}
    for train, test in KFold(n_splits=folds, shuffle=False).split(np.arange(dist.size)):
        acc_train = np.zeros(ACCURACY_GRID.size)
        for j in range(ACCURACY_GRID.size):
            pred = np.less(dist[train], 0.01 * j)
            tp = np.sum(np.logical_and(pred, issame[train]))
            tn = np.sum(np.logical_and(np.logical_not(pred), np.logical_not(issame[train])))
            acc_train[j] = float(tp + tn) / train.size
        best = 0.01 * int(np.argmax(acc_train))
        pred = np.less(dist[test], best)
        accs.append(float(np.sum(pred == issame[test])) / test.size)
        thrs.append(best)
        far_train = np.zeros(VAL_GRID.size)
        for j in range(VAL_GRID.size):
            fa = np.sum(np.logical_and(np.less(dist[train], 0.001 * j), np.logical_not(issame[train])))
            far_train[j] = _rate(int(fa), int(np.sum(np.logical_not(issame[train]))))
        for far in fars:
            threshold = _slinear(far_train, 0.001 * np.arange(VAL_GRID.size), far) if far_train.max() >= far else 0.0
            pred = np.less(dist[test], threshold)
            vals[far][0].append(_rate(int(np.sum(pred & issame[test])), int(np.sum(issame[test]))))
            vals[far][1].append(_rate(int(np.sum(pred & ~issame[test])), int(np.sum(~issame[test]))))
    val_at_far = {far: (np.mean(v), np.std(v), np.mean(f)) for far, (v, f) in vals.items()}
    return np.array(accs), np.array(thrs), val_at_far


def _random_pairs(n: int, dim: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    issame = rng.random(n) < 0.5
    a = rng.normal(size=(n, dim))
    b = np.where(issame[:, None], a + noise * rng.normal(size=(n, dim)), rng.normal(size=(n, dim)))
    return a * rng.uniform(0.5, 3.0, size=(n, 1)), b, issame


def _tied_pairs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entries in {-1, 0, 1}, D=3: few distinct distances, many exactly on the grid (0, 2, 4, ...)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(-1, 2, size=(n, 3)).astype(float)
    a[~a.any(axis=1), 0] = 1.0
    issame = rng.random(n) < 0.5
    b = np.where(issame[:, None] & (rng.random((n, 1)) < 0.7), a, rng.integers(-1, 2, size=(n, 3)))
    b[~b.any(axis=1), 1] = 1.0
    return a, b.astype(float), issame


def _sorted_labels(n: int, genuine: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Genuine pairs first: most test folds hold one class only, some training sets no impostor."""
    a, b, _ = _random_pairs(n, 8, 0.0, seed)
    issame = np.arange(n) < genuine
    b[issame] = a[issame] + 0.6 * np.random.default_rng(seed + 1).normal(size=(genuine, 8))
    return a, b, issame


CASES = {
    "random-600": (_random_pairs(600, 16, 1.2, 0), 10),
    "random-347": (_random_pairs(347, 16, 2.0, 1), 10),
    "random-1000": (_random_pairs(1000, 16, 0.8, 2), 10),
    "ties": (_tied_pairs(300, 3), 10),
    "ties-5-folds": (_tied_pairs(123, 4), 5),
    "sorted-labels": (_sorted_labels(203, 100, 5), 10),
    "one-impostor": (_sorted_labels(20, 19, 6), 10),
    "leave-one-out": (_sorted_labels(30, 11, 7), 30),
}


@pytest.mark.parametrize("name", list(CASES))
def test_default_is_insightface_protocol(name: str) -> None:
    (a, b, issame), folds = CASES[name]
    fars = (1e-3, 1e-2, 0.1, 1.0)  # 1.0: FAR(t) reaches the target only on the last, zero-length segment
    res = verify(a, b, issame, folds=folds, fars=fars)
    ref_acc, ref_thr, ref_val = _reference(_squared_distances(a, b), issame, folds, fars)
    assert res["protocol"] == "insightface" and res["threshold_unit"] == "squared_l2"
    np.testing.assert_allclose(res["fold_accuracies"], ref_acc, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res["fold_thresholds"], ref_thr, rtol=0, atol=1e-12)
    assert res["accuracy_mean"] == pytest.approx(ref_acc.mean(), abs=1e-12)
    assert res["accuracy_std"] == pytest.approx(ref_acc.std(), abs=1e-12)
    assert res["threshold"] == pytest.approx(ref_thr.mean(), abs=1e-12)
    for far in fars:
        got = res["val_at_far"][far]
        assert (got["val"], got["val_std"], got["far"]) == pytest.approx(ref_val[far], abs=1e-12)


def test_reference_spline_is_scipys_where_scipy_accepts_the_data() -> None:
    rng = np.random.default_rng(8)
    x = np.sort(rng.random(50))
    y = np.cumsum(rng.random(50))
    for v in np.r_[x[0], x[-1], x[10], rng.uniform(x[0], x[-1], 20)]:
        assert _slinear(x, y, v) == pytest.approx(float(interp1d(x, y, kind="slinear")(v)), abs=1e-12)


def _unit_pairs(dists: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Unit 2-d pairs with the given squared distances (d = 2 - 2 cos)."""
    theta = np.arccos(1.0 - np.asarray(dists) / 2.0)
    a = np.tile([1.0, 0.0], (len(dists), 1))
    return a, np.stack([np.cos(theta), np.sin(theta)], axis=1)


def test_exact_and_insightface_differ_and_each_is_what_it_claims() -> None:
    # genuine at d = 0.501, impostors at d = 0.505, both inside the grid cell (0.50, 0.51]: the grid
    # threshold accepts all or nothing, the exact search separates them.
    rng = np.random.default_rng(9)
    issame = rng.permutation(np.arange(200) < 100)
    a, b = _unit_pairs(np.where(issame, 0.501, 0.505).tolist())
    grid = verify(a, b, issame)
    exact = verify(a, b, issame, protocol="exact")
    assert exact["protocol"] == "exact" and exact["threshold_unit"] == "cosine" and "val_at_far" not in exact
    assert exact["accuracy_mean"] == 1.0
    assert np.all((1 - 0.505 / 2 < exact["fold_thresholds"]) & (exact["fold_thresholds"] <= 1 - 0.501 / 2))
    assert grid["accuracy_mean"] < 0.6  # every fold threshold is a grid value: 0.51 accepts all, 0.50 none
    assert set(np.round(grid["fold_thresholds"] / 0.01).astype(int)) <= {0, 51}
    assert np.all(np.isin(grid["fold_thresholds"], ACCURACY_GRID))
    assert grid["tar_at_far"] == exact["tar_at_far"] and grid["auc"] == exact["auc"] == 1.0


def test_first_best_threshold_and_strict_less_than() -> None:
    # genuine pairs at d = 1.995, impostors orthogonal (d = 2.0 exactly, a grid value): the first
    # threshold accepting every genuine pair is 2.0, and it rejects the impostors only because
    # "same" is d < t.
    issame = np.arange(40) % 2 == 0
    a, b = _unit_pairs([1.995] * 40)
    b[~issame] = [0.0, 1.0]
    res = verify(a, b, issame)
    np.testing.assert_array_equal(res["fold_thresholds"], np.full(10, 2.0))
    assert res["accuracy_mean"] == 1.0


def test_unknown_protocol_is_a_clear_error() -> None:
    a, b, issame = _random_pairs(20, 4, 1.0, 10)
    with pytest.raises(ValueError, match=r"protocol must be one of \('insightface', 'exact'\), got 'lfw'"):
        verify(a, b, issame, protocol="lfw")
