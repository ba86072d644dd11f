"""The exact protocol, TAR@FAR and AUC against independent scikit-learn computations (the default,
insightface protocol is pinned in test_eval_insightface_protocol.py)."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import KFold

from largefr.eval.verification import best_threshold, tar_at_far, verify, verify_interleaved


def _pairs(n: int, dim: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    issame = rng.random(n) < 0.5
    a = rng.normal(size=(n, dim))
    b = np.where(issame[:, None], a + noise * rng.normal(size=(n, dim)), rng.normal(size=(n, dim)))
    return a * rng.uniform(0.5, 3.0, size=(n, 1)), b, issame  # scale must not matter


def _reference(a: np.ndarray, b: np.ndarray, issame: np.ndarray, folds: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent 10-fold: KFold splits, roc_curve on the train folds, accuracy from TP/FP counts."""
    sims = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    accs, thrs = [], []
    for train, test in KFold(n_splits=folds, shuffle=False).split(sims):
        y, s = issame[train], sims[train]
        fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
        pos, neg = y.sum(), (~y).sum()
        correct = np.rint(tpr * pos) + (neg - np.rint(fpr * neg))
        i = int(np.argmax(correct))  # thresholds descend: the first maximum is the highest threshold
        # roc_curve's thr[0] is +inf (accept nothing); accept scores >= thr[i], so use the gap below it
        upper = thr[1] + 1.0 if i == 0 else thr[i]
        lower = thr[i + 1] if i + 1 < thr.size else thr[i] - 1.0
        t = (upper + lower) / 2
        thrs.append(t)
        accs.append(np.mean((sims[test] >= t) == issame[test]))
    return np.array(accs), np.array(thrs)


@pytest.mark.parametrize("n,noise,seed", [(600, 1.2, 0), (347, 2.0, 1), (1000, 0.8, 2)])
def test_tenfold_matches_sklearn_kfold_reference(n: int, noise: float, seed: int) -> None:
    a, b, issame = _pairs(n, 16, noise, seed)
    res = verify(a, b, issame, folds=10, protocol="exact")
    ref_acc, ref_thr = _reference(a, b, issame, 10)
    np.testing.assert_allclose(res["fold_accuracies"], ref_acc, atol=1e-12)
    np.testing.assert_allclose(res["fold_thresholds"], ref_thr, atol=1e-9)
    assert res["accuracy_mean"] == pytest.approx(ref_acc.mean(), abs=1e-12)
    assert res["accuracy_std"] == pytest.approx(ref_acc.std(), abs=1e-12)
    assert res["threshold"] == pytest.approx(ref_thr.mean(), abs=1e-9)
    sims = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert res["auc"] == pytest.approx(roc_auc_score(issame, sims), abs=1e-12)
    assert 0.5 < res["accuracy_mean"] < 1.0  # a non-trivial case: the threshold search matters


@pytest.mark.parametrize("protocol", ["insightface", "exact"])
def test_perfectly_separable_pairs(protocol: str) -> None:
    a, b, issame = _pairs(400, 32, 0.05, 3)
    res = verify(a, b, issame, protocol=protocol)
    assert res["accuracy_mean"] == 1.0 and res["accuracy_std"] == 0.0
    assert res["auc"] == 1.0
    assert res["tar_at_far"] == {1e-3: 1.0, 1e-4: 1.0}


def test_best_threshold_ties_pick_highest_and_count_exactly() -> None:
    scores = np.array([0.9, 0.8, 0.8, 0.5, 0.1])
    labels = np.array([True, True, False, False, False])
    thr, acc = best_threshold(scores, labels)
    assert (thr, acc) == (pytest.approx(0.85), 0.8)  # accept {0.9} or {0.9, 0.8, 0.8, 0.5}: the higher wins
    thr, acc = best_threshold(np.array([0.3, 0.2]), np.array([False, False]))
    assert thr == pytest.approx(0.8) and acc == 1.0  # accept nothing: above the top score
    thr, acc = best_threshold(np.array([0.3, 0.2]), np.array([True, True]))
    assert thr == pytest.approx(-0.3) and acc == 1.0  # accept everything: below the lowest score


def test_tar_at_far_known_answer() -> None:
    # 1000 impostors at distinct scores; 10 genuine pairs, exactly k of them above every impostor.
    impostors = np.linspace(0.0, 0.5, 1000)
    genuine = np.array([0.9] * 7 + [0.4995, 0.2, 0.1])  # 0.4995 is beaten only by the top impostor
    scores = np.r_[genuine, impostors]
    labels = np.r_[np.ones(10, bool), np.zeros(1000, bool)]
    tars = tar_at_far(scores, labels, fars=(1e-4, 1e-3, 2e-3, 1.0))
    assert tars[1e-4] == pytest.approx(0.7)  # FAR 0: only the 7 clear genuine pairs
    assert tars[1e-3] == pytest.approx(0.8)  # one false accept allowed: 0.4995 becomes reachable
    assert tars[2e-3] == pytest.approx(0.8)
    assert tars[1.0] == pytest.approx(1.0)


def test_interleaved_order_matches_pairs() -> None:
    a, b, issame = _pairs(200, 8, 1.0, 4)
    inter = np.empty((400, 8))
    inter[0::2], inter[1::2] = a, b
    for protocol in ("insightface", "exact"):
        got, want = verify_interleaved(inter, issame, protocol=protocol), verify(a, b, issame, protocol=protocol)
        assert got["accuracy_mean"] == want["accuracy_mean"] and got["protocol"] == protocol


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(emb_b=np.ones((10, 3))), r"same shape"),
        (dict(issame=np.array([True, False] * 4)), r"shape \(10,\)"),
        (dict(issame=np.ones(10, bool)), r"both genuine"),
        (dict(issame=np.arange(10)), r"bool or 0/1"),
        (dict(folds=11), r"folds must be in \[2, number of pairs=10\], got 11"),
        (dict(emb_a=np.full((10, 4), np.nan)), r"NaN"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs: dict, match: str) -> None:
    args = dict(emb_a=np.ones((10, 4)), emb_b=np.ones((10, 4)), issame=np.array([True, False] * 5), folds=10)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        verify(**args)
    with pytest.raises(ValueError, match=r"FAR targets must be in \(0, 1\], got 0"):
        tar_at_far(np.arange(4.0), np.array([1, 0, 1, 0], bool), fars=(0.0,))
