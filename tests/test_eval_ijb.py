"""IJB-style template pooling, 1:1 TAR@FAR and 1:N identification on synthetic lists with known answers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from largefr.eval.ijb import (
    IJB_FARS,
    identification,
    ijb_identification,
    ijb_verification,
    read_template_media,
    read_template_pairs,
    read_template_subjects,
    template_features,
)


def _write_lists(
    tmp: Path, templates: list[int], medias: list[int], pairs: list[tuple[int, int, int]]
) -> tuple[Path, Path]:
    tid_mid, pair_file = tmp / "tid_mid.txt", tmp / "pairs.txt"
    tid_mid.write_text("".join(f"{i}.jpg {t} {m}\n" for i, (t, m) in enumerate(zip(templates, medias))))
    pair_file.write_text("".join(f"{a} {b} {y}\n" for a, b, y in pairs))
    return tid_mid, pair_file


def test_media_is_averaged_before_template() -> None:
    e1, e2 = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    feats = np.stack([3 * e1, e1, 2 * e1, e2, e2])  # template 7: media 1 has three stills of e1, media 2 one of e2
    tids, tf = template_features(feats, np.array([7, 7, 7, 7, 9]), np.array([1, 1, 1, 2, 5]))
    assert tids.tolist() == [7, 9]
    np.testing.assert_allclose(tf[0], [2**-0.5, 2**-0.5], atol=1e-6)  # not (3, 1)/sqrt(10): media count, not images
    np.testing.assert_allclose(tf[1], e2, atol=1e-6)


def test_template_features_match_insightface_loop() -> None:
    rng = np.random.default_rng(0)
    n = 300
    feats, tmpl, med = rng.normal(size=(n, 8)), rng.integers(0, 20, n), rng.integers(0, 6, n)
    tids, tf = template_features(feats, tmpl, med)
    normed = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    for row, t in enumerate(tids):
        in_t = tmpl == t
        total = sum(normed[in_t & (med == m)].mean(axis=0) for m in np.unique(med[in_t]))
        np.testing.assert_allclose(tf[row], total / np.linalg.norm(total), atol=1e-5)


def _angle_feature(cos: float) -> np.ndarray:
    return np.array([cos, np.sqrt(1 - cos**2)])


def test_one_to_one_known_tar(tmp_path: Path) -> None:
    # 10 genuine and 1000 impostor pairs, each pair is templates (2i, 2i+1); template 2i is at angle 0
    genuine = [0.99] * 7 + [0.5994, -0.5, -0.6]  # 7 above every impostor, one just below the top impostor
    impostor = list(np.linspace(-0.4, 0.6, 1000))
    cosines = genuine + impostor
    templates, medias, feats, pairs = [], [], [], []
    for i, c in enumerate(cosines):
        for side, vec in ((0, _angle_feature(1.0)), (1, _angle_feature(c))):
            templates += [2 * i + side] * 2  # two frames of one video per template
            medias += [100 + 2 * i + side] * 2
            feats += [vec * 2.0, vec * 0.5]
        pairs.append((2 * i, 2 * i + 1, int(i < len(genuine))))
    tid_mid, pair_file = _write_lists(tmp_path, templates, medias, pairs)
    media, tp = read_template_media(tid_mid), read_template_pairs(pair_file)
    assert media.image_names[:2] == ["0.jpg", "1.jpg"] and tp.labels.sum() == 10
    res = ijb_verification(np.array(feats), media, tp)
    tar = res["tar_at_far"]
    assert set(tar) == set(IJB_FARS)
    assert [tar[f] for f in (1e-6, 1e-5, 1e-4)] == pytest.approx([0.7, 0.7, 0.7])
    assert [tar[f] for f in (1e-3, 1e-2, 1e-1)] == pytest.approx([0.8, 0.8, 0.8])
    np.testing.assert_allclose(res["scores"], cosines, atol=1e-5)


def test_separable_clusters_reach_tar_one() -> None:
    rng = np.random.default_rng(1)
    centers = np.linalg.qr(rng.normal(size=(32, 32)))[0][:10]
    subject = np.repeat(np.arange(10), 6)  # 10 subjects x 3 templates x 2 images
    feats = centers[subject] + 0.05 * rng.normal(size=(60, 32))
    templates = np.arange(60) // 2
    from largefr.eval.ijb import TemplateMedia, TemplatePairs

    media = TemplateMedia([f"{i}.jpg" for i in range(60)], templates, np.arange(60))
    t_subj = np.arange(30) // 3
    t1, t2 = np.triu_indices(30, k=1)
    res = ijb_verification(feats, media, TemplatePairs(t1, t2, t_subj[t1] == t_subj[t2]))
    assert all(v == 1.0 for v in res["tar_at_far"].values()) and res["auc"] == 1.0


def _basis(i: int, dim: int = 12) -> np.ndarray:
    e = np.zeros(dim)
    e[i] = 1.0
    return e


def test_one_to_n_known_rank_and_tpir(tmp_path: Path) -> None:
    # gallery: subjects 0..4 on axes 0..4; subject 4 has a second template on axis 5. Axis 11 is "elsewhere".
    gallery_axes, gallery_subjects = [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 4]
    mated = [(0, 0.9), (1, 0.85), (2, 0.8), (3, 0.75), (5, 0.7), (0, 0.3)]  # (axis of mate, score)
    probes = [c * _basis(a) + np.sqrt(1 - c**2) * _basis(11) for a, c in mated]
    probe_subjects = [0, 1, 2, 3, 4, 0]
    probes += [0.6 * _basis(1) + 0.8 * _basis(2), 0.6 * _basis(3) + 0.8 * _basis(0)]  # mates ranked 2nd
    probe_subjects += [1, 3]
    nonmated_top = [0.95, 0.6, 0.5, 0.4, 0.35, 0.2, 0.1, 0.1, 0.05, 0.0]
    probes += [c * _basis(i % 5) + np.sqrt(1 - c**2) * _basis(10) for i, c in enumerate(nonmated_top)]
    probe_subjects += list(range(100, 110))
    gallery_ids, probe_ids = np.arange(200, 206), np.arange(300, 300 + len(probes))
    template_ids = np.r_[gallery_ids, probe_ids]
    feats = np.stack([_basis(a) for a in gallery_axes] + probes)
    gal_csv = tmp_path / "gallery.csv"
    gal_csv.write_text(
        "TEMPLATE_ID,SUBJECT_ID,FILENAME\n"
        + "".join(f"{t},{s},img/{t}_{k}.jpg\n" for t, s in zip(gallery_ids, gallery_subjects) for k in range(2))
    )
    probe_txt = tmp_path / "probes.txt"
    probe_txt.write_text("".join(f"{t} {s}\n" for t, s in zip(probe_ids, probe_subjects)))
    res = ijb_identification(
        template_ids, feats, read_template_subjects(gal_csv), read_template_subjects(probe_txt),
        ranks=(1, 2), fpirs=(0.01, 0.1, 0.3, 0.5),
    )
    assert (res["num_mated"], res["num_nonmated"]) == (8, 10)
    assert res["rank1"] == pytest.approx(6 / 8) and res["cmc"] == {1: pytest.approx(6 / 8), 2: 1.0}
    # FPIR 0.3 admits 3 false alarms (0.95, 0.6, 0.5): threshold 0.4, the 0.3 mate stays out
    expected = {0.01: 0.0, 0.1: 5 / 8, 0.3: 5 / 8, 0.5: 6 / 8}
    assert res["tpir_at_fpir"] == pytest.approx(expected)


def test_fpir_count_is_exact_despite_float_rounding() -> None:
    from largefr.eval.ijb import _max_count_within

    assert 0.29 * 100 < 29 and _max_count_within(0.29, 100) == 29
    assert [_max_count_within(r, 10) for r in (0.0999, 0.1, 0.7, 1.0)] == [0, 1, 7, 10]


def test_bad_lists_are_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("a.jpg 1\n")
    with pytest.raises(ValueError, match=r"bad\.txt:1: expected 'image_name template_id media_id'"):
        read_template_media(bad)
    bad.write_text("a.jpg 1 x\n")
    with pytest.raises(ValueError, match=r"bad\.txt:1: expected integer ids, got '1 x'"):
        read_template_media(bad)
    bad.write_text("1 2 1\n3 4 2\n")
    with pytest.raises(ValueError, match=r"labels must be 0 or 1, got \[2\]"):
        read_template_pairs(bad)
    bad.write_text("1 2\n")
    with pytest.raises(ValueError, match=r"expected 3 columns"):
        read_template_pairs(bad)
    bad.write_text("1 5\n1 6\n")
    with pytest.raises(ValueError, match=r"template 1 is listed with more than one subject"):
        read_template_subjects(bad)
    from largefr.eval.ijb import template_pair_scores

    with pytest.raises(ValueError, match=r"pair template 4 has no images"):
        template_pair_scores(np.array([1, 2]), np.eye(2), np.array([1]), np.array([4]))
    g = np.eye(3)
    with pytest.raises(ValueError, match=r"needs non-mated probes"):
        identification(g, np.arange(3), g, np.arange(3))
    assert identification(g, np.arange(3), g, np.arange(3), fpirs=())["rank1"] == 1.0
