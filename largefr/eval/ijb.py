"""IJB-B/C style evaluation: template features, 1:1 verification (TAR@FAR) and 1:N identification.

Lists follow the insightface IJB text format:

* template/media list (``ijbc_face_tid_mid.txt``): ``image_name template_id media_id`` per image;
* pair list (``ijbc_template_pair_label.txt``): ``template_1 template_2 label`` per pair (label 0/1);
* 1:N gallery/probe lists: ``template_id subject_id`` per line, or the IJB CSV files with a header
  containing ``TEMPLATE_ID`` and ``SUBJECT_ID`` (one row per image; templates are deduplicated).

A template's feature is built as in insightface: image features are L2-normalised, averaged within
each media (a video's frames, or a single still), the media means are summed over the template and
the sum is L2-normalised.
"""
from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from largefr.eval.verification import l2_normalize, tar_at_far

IJB_FARS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
DEFAULT_FPIRS: tuple[float, ...] = (0.01, 0.1)
_PAIR_CHUNK = 65536


@dataclass(frozen=True)
class TemplateMedia:
    image_names: list[str]
    templates: np.ndarray  # int64 [num_images]
    medias: np.ndarray  # int64 [num_images]


@dataclass(frozen=True)
class TemplatePairs:
    t1: np.ndarray  # int64 [num_pairs]
    t2: np.ndarray
    labels: np.ndarray  # bool [num_pairs]


@dataclass(frozen=True)
class TemplateSubjects:
    templates: np.ndarray  # int64 [num_templates], unique
    subjects: np.ndarray  # int64 [num_templates]


def _int_fields(fields: Sequence[str], path: Path, lineno: int) -> list[int]:
    try:
        return [int(f) for f in fields]
    except ValueError:
        raise ValueError(f"{path}:{lineno}: expected integer ids, got {' '.join(fields)!r}") from None


def read_template_media(path: str | os.PathLike[str]) -> TemplateMedia:
    """Read ``image_name template_id media_id`` lines."""
    p = Path(path)
    names, tids, mids = [], [], []
    for lineno, line in enumerate(p.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3:
            raise ValueError(f"{p}:{lineno}: expected 'image_name template_id media_id', got {line!r}")
        tid, mid = _int_fields(fields[1:], p, lineno)
        names.append(fields[0])
        tids.append(tid)
        mids.append(mid)
    if not names:
        raise ValueError(f"{p}: template/media list is empty")
    return TemplateMedia(names, np.asarray(tids, dtype=np.int64), np.asarray(mids, dtype=np.int64))


def read_template_pairs(path: str | os.PathLike[str]) -> TemplatePairs:
    """Read ``template_1 template_2 label`` lines (label 0 or 1)."""
    p = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": reported below
            rows = np.loadtxt(p, dtype=np.int64, ndmin=2)
    except ValueError as exc:
        raise ValueError(f"{p}: expected 'template_1 template_2 label' integer lines ({exc})") from None
    if rows.shape[0] == 0:
        raise ValueError(f"{p}: pair list is empty")
    if rows.shape[1] != 3:
        raise ValueError(f"{p}: expected 3 columns 'template_1 template_2 label', got {rows.shape[1]}")
    if not np.isin(rows[:, 2], (0, 1)).all():
        raise ValueError(f"{p}: labels must be 0 or 1, got {sorted(set(rows[:, 2].tolist()) - {0, 1})[:5]}")
    return TemplatePairs(rows[:, 0].copy(), rows[:, 1].copy(), rows[:, 2].astype(bool))


def read_template_subjects(path: str | os.PathLike[str]) -> TemplateSubjects:
    """Read a 1:N gallery or probe list: IJB CSV (TEMPLATE_ID, SUBJECT_ID columns) or ``tid sid`` lines."""
    p = Path(path)
    text = p.read_text()
    first = text.lstrip().split("\n", 1)[0]
    if "TEMPLATE_ID" in first.upper():
        reader = csv.DictReader(text.splitlines())
        cols = {c.strip().upper(): c for c in reader.fieldnames or []}
        if "SUBJECT_ID" not in cols:
            raise ValueError(f"{p}: CSV header must contain TEMPLATE_ID and SUBJECT_ID, got {reader.fieldnames}")
        pairs = [
            _int_fields([row[cols["TEMPLATE_ID"]], row[cols["SUBJECT_ID"]]], p, n + 2) for n, row in enumerate(reader)
        ]
    else:
        pairs = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                fields = line.split()
                if len(fields) != 2:
                    raise ValueError(f"{p}:{lineno}: expected 'template_id subject_id', got {line!r}")
                pairs.append(_int_fields(fields, p, lineno))
    if not pairs:
        raise ValueError(f"{p}: template/subject list is empty")
    arr = np.unique(np.asarray(pairs, dtype=np.int64), axis=0)
    tids, counts = np.unique(arr[:, 0], return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{p}: template {int(tids[counts > 1][0])} is listed with more than one subject")
    return TemplateSubjects(arr[:, 0].copy(), arr[:, 1].copy())


def _group_sum(x: np.ndarray, group: np.ndarray, num_groups: int) -> np.ndarray:
    """Row sums per group id in [0, num_groups); every group is non-empty."""
    order = np.argsort(group, kind="stable")
    starts = np.searchsorted(group[order], np.arange(num_groups))
    return np.add.reduceat(x[order], starts, axis=0)


def template_features(
    image_features: np.ndarray, templates: np.ndarray, medias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique template ids, L2-normalised template features) by media then template pooling."""
    feats = np.asarray(image_features, dtype=np.float32)
    templates, medias = np.asarray(templates).reshape(-1), np.asarray(medias).reshape(-1)
    if feats.ndim != 2 or not feats.shape[0] == templates.shape[0] == medias.shape[0]:
        raise ValueError(
            f"expected image_features [N, D] with N = len(templates) = len(medias), got {feats.shape}, "
            f"{templates.shape[0]} templates, {medias.shape[0]} medias"
        )
    if not np.isfinite(feats).all():
        raise ValueError("image_features contain NaN or inf")
    feats = l2_normalize(feats)
    tm, tm_group = np.unique(np.stack([templates, medias], 1), axis=0, return_inverse=True)
    tm_group = tm_group.reshape(-1)
    media_mean = _group_sum(feats, tm_group, tm.shape[0]) / np.bincount(tm_group)[:, None]
    tids, t_group = np.unique(tm[:, 0], return_inverse=True)
    return tids, l2_normalize(_group_sum(media_mean, t_group.reshape(-1), tids.shape[0]))


def _rows_of(template_ids: np.ndarray, wanted: np.ndarray, what: str) -> np.ndarray:
    idx = np.clip(np.searchsorted(template_ids, wanted), 0, template_ids.shape[0] - 1)
    missing = template_ids[idx] != wanted
    if missing.any():
        raise ValueError(f"{what} template {int(wanted[missing][0])} has no images in the template/media list")
    return idx


def template_pair_scores(
    template_ids: np.ndarray, template_feats: np.ndarray, t1: np.ndarray, t2: np.ndarray
) -> np.ndarray:
    """Cosine similarity of each template pair (features already normalised), in chunks."""
    i1 = _rows_of(template_ids, np.asarray(t1), "pair")
    i2 = _rows_of(template_ids, np.asarray(t2), "pair")
    scores = np.empty(i1.shape[0], dtype=np.float64)
    for s in range(0, i1.shape[0], _PAIR_CHUNK):
        a, b = template_feats[i1[s : s + _PAIR_CHUNK]], template_feats[i2[s : s + _PAIR_CHUNK]]
        scores[s : s + _PAIR_CHUNK] = np.einsum("nd,nd->n", a, b)
    return scores


def ijb_verification(
    image_features: np.ndarray,
    media: TemplateMedia,
    pairs: TemplatePairs,
    fars: Sequence[float] = IJB_FARS,
) -> dict[str, Any]:
    """IJB 1:1: template pooling, pair scores, TAR at each FAR (ROC over all pairs) and AUC."""
    from sklearn.metrics import roc_auc_score, roc_curve

    tids, tfeats = template_features(image_features, media.templates, media.medias)
    scores = template_pair_scores(tids, tfeats, pairs.t1, pairs.t2)
    fpr, tpr, _ = roc_curve(pairs.labels, scores)
    return {
        "tar_at_far": tar_at_far(scores, pairs.labels, fars),
        "auc": float(roc_auc_score(pairs.labels, scores)),
        "fpr": fpr,
        "tpr": tpr,
        "scores": scores,
        "num_pairs": int(scores.shape[0]),
    }


def _subject_scores(sims: np.ndarray, gallery_subjects: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Max similarity over each subject's gallery templates: (subject ids, [P, num_subjects])."""
    order = np.argsort(gallery_subjects, kind="stable")
    subjects, starts = np.unique(gallery_subjects[order], return_index=True)
    return subjects, np.maximum.reduceat(sims[:, order], starts, axis=1)


def _max_count_within(rate: float, total: int) -> int:
    """Largest k with k / total <= rate, without the rounding of floor(rate * total) (0.29 * 100 = 28.99...)."""
    k = int(np.floor(rate * total))
    while (k + 1) / total <= rate:
        k += 1
    while k > 0 and k / total > rate:
        k -= 1
    return k


def identification(
    gallery_feats: np.ndarray,
    gallery_subjects: np.ndarray,
    probe_feats: np.ndarray,
    probe_subjects: np.ndarray,
    ranks: Sequence[int] = (1, 5, 10),
    fpirs: Sequence[float] = DEFAULT_FPIRS,
) -> dict[str, Any]:
    """1:N search of probe templates against a gallery (features are L2-normalised here).

    Closed set (mated probes, whose subject is in the gallery): CMC at ``ranks``; a mate's rank is
    1 + the number of gallery subjects scoring strictly higher. Open set: for each FPIR the threshold
    admits at most floor(FPIR * non-mated probes) non-mated top scores; TPIR is the fraction of mated
    probes whose mate is ranked first with a score above that threshold. Needs non-mated probes
    unless ``fpirs`` is empty.
    """
    g_sub, p_sub = np.asarray(gallery_subjects).reshape(-1), np.asarray(probe_subjects).reshape(-1)
    g, p = np.asarray(gallery_feats, np.float32), np.asarray(probe_feats, np.float32)
    shapes_ok = g.ndim == 2 and p.ndim == 2 and g.shape[1] == p.shape[1]
    if not shapes_ok or g.shape[0] != g_sub.shape[0] or p.shape[0] != p_sub.shape[0]:
        raise ValueError(
            f"expected gallery [G, D] with G subjects and probes [P, D] with P subjects, got gallery {g.shape} "
            f"with {g_sub.shape[0]} subjects and probes {p.shape} with {p_sub.shape[0]} subjects"
        )
    subjects, scores = _subject_scores(l2_normalize(p) @ l2_normalize(g).T, g_sub)
    mated = np.isin(p_sub, subjects)
    if not mated.any():
        raise ValueError("no probe subject appears in the gallery: rank and TPIR are undefined")
    if fpirs and mated.all():
        raise ValueError("open-set TPIR@FPIR needs non-mated probes (subjects absent from the gallery); pass fpirs=()")
    mate_col = np.searchsorted(subjects, p_sub[mated])
    mate_score = scores[mated, mate_col]
    rank = 1 + (scores[mated] > mate_score[:, None]).sum(axis=1)
    nonmated_top = np.sort(scores[~mated].max(axis=1))[::-1]
    out: dict[str, Any] = {
        "rank1": float(np.mean(rank == 1)),
        "cmc": {int(k): float(np.mean(rank <= k)) for k in ranks},
        "tpir_at_fpir": {},
        "num_mated": int(mated.sum()),
        "num_nonmated": int((~mated).sum()),
    }
    for fpir in fpirs:
        if not 0.0 < fpir <= 1.0:
            raise ValueError(f"FPIR targets must be in (0, 1], got {fpir}")
        allowed = _max_count_within(fpir, nonmated_top.shape[0])
        threshold = nonmated_top[allowed] if allowed < nonmated_top.shape[0] else -np.inf
        out["tpir_at_fpir"][float(fpir)] = float(np.mean((rank == 1) & (mate_score > threshold)))
    return out


def ijb_identification(
    template_ids: np.ndarray,
    template_feats: np.ndarray,
    gallery: TemplateSubjects,
    probes: TemplateSubjects,
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`identification` on pooled template features selected by the gallery and probe lists."""
    g_rows = _rows_of(template_ids, gallery.templates, "gallery")
    p_rows = _rows_of(template_ids, probes.templates, "probe")
    return identification(template_feats[g_rows], gallery.subjects, template_feats[p_rows], probes.subjects, **kwargs)
