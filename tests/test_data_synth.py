"""Synthetic identities: determinism, dataset layout, the verification .bin, the raw-pixel floor."""
from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from largefr.cli import main as cli_main
from largefr.data.manifest import read_manifest
from largefr.data.shards import iter_tar_samples
from largefr.data.synth import FaceGenerator, SynthSpec, render_jpegs
from largefr.data.synth_dataset import (pixel_verification_accuracy, write_synthetic_dataset, train_order,
                                        verification_pairs)
from largefr.eval.verification import verify_interleaved


def test_an_image_depends_only_on_seed_identity_and_instance():
    gen, spec = FaceGenerator(), SynthSpec(10, 4, seed=3)
    ids, inst = np.array([1, 2, 3, 4, 5]), np.array([0, 1, 2, 3, 0])
    whole = render_jpegs(gen, spec, ids, inst)
    alone = render_jpegs(gen, spec, ids[2:3], inst[2:3])
    assert whole[2] == alone[0]
    assert render_jpegs(gen, SynthSpec(10, 4, seed=4), ids[2:3], inst[2:3])[0] != alone[0]
    img = np.asarray(Image.open(io.BytesIO(whole[0])))
    assert img.shape == (112, 112, 3) and img.std() > 10


def test_same_identity_images_differ_by_nuisance():
    gen, spec = FaceGenerator(), SynthSpec(10, 4, seed=0)
    a, b = (np.asarray(Image.open(io.BytesIO(j)), dtype=float)
            for j in render_jpegs(gen, spec, np.array([7, 7]), np.array([0, 1])))
    assert np.abs(a - b).mean() > 10


def _read_all(out):
    manifest = read_manifest(out)
    return manifest, [s for shard in manifest.shards for s in iter_tar_samples(out / shard.tar)]


def test_synth_dataset_is_deterministic_across_worker_counts(tmp_path):
    spec = SynthSpec(identities=12, per_identity=3, seed=1, holdout=5, pairs=10)
    one = write_synthetic_dataset(tmp_path / "one", spec, workers=1, shard_bytes=40_000, progress=False)
    two = write_synthetic_dataset(tmp_path / "two", spec, workers=2, shard_bytes=40_000, progress=False)
    assert len(one.shards) > 1 and one.num_samples == 36 and one.num_classes == 12
    (_, a), (_, b) = _read_all(tmp_path / "one"), _read_all(tmp_path / "two")
    assert a == b
    labels = [label for _, _, label in a]
    assert sorted(labels) == sorted(list(range(12)) * 3)
    assert labels != sorted(labels)  # written in a shuffled order
    assert one.extra["verification"] == "verification.bin"
    assert (tmp_path / "one" / "verification.bin").read_bytes() == (tmp_path / "two" / "verification.bin").read_bytes()
    assert sorted(train_order(spec)) == list(range(36))


def test_verification_bin_is_insightface_format_over_held_out_identities(tmp_path):
    spec = SynthSpec(identities=6, per_identity=2, seed=0, holdout=4, pairs=12)
    write_synthetic_dataset(tmp_path, spec, workers=1, progress=False)
    with open(tmp_path / "verification.bin", "rb") as f:
        bins, issame = pickle.load(f, encoding="bytes")
    assert isinstance(bins, list) and isinstance(issame, list) and len(bins) == 2 * len(issame) == 24
    assert sum(issame) == 6 and all(isinstance(x, bool) for x in issame)
    assert all(Image.open(io.BytesIO(b)).size == (112, 112) for b in bins)
    ids, _, same = verification_pairs(spec)
    assert ids.min() >= spec.identities and ids.max() < spec.identities + spec.holdout
    assert (ids[0::2] == ids[1::2]).tolist() == same.tolist() == issame


def test_raw_pixels_do_not_solve_verification():
    spec = SynthSpec(identities=100, per_identity=1, seed=0, holdout=60, pairs=300)
    ids, inst, issame = verification_pairs(spec)
    bins = render_jpegs(FaceGenerator(), spec, ids, inst)
    accuracy = pixel_verification_accuracy(bins, issame.tolist())
    assert 0.45 < accuracy < 0.75


def test_pixel_baseline_is_the_eval_protocol_on_pixels():
    spec = SynthSpec(identities=10, per_identity=1, seed=1, holdout=8, pairs=40)
    ids, inst, issame = verification_pairs(spec)
    bins = render_jpegs(FaceGenerator(), spec, ids, inst)
    x = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.float32).reshape(-1) for b in bins])
    x -= x.mean(axis=1, keepdims=True)
    want = verify_interleaved(x, issame)  # what ``largefr eval`` computes for these "embeddings"
    assert want["protocol"] == "insightface"
    assert pixel_verification_accuracy(bins, issame.tolist()) == pytest.approx(want["accuracy_mean"], abs=1e-6)


def test_synth_cli_and_bad_arguments(tmp_path, capsys):
    code = cli_main(["synth", "--out", str(tmp_path / "d"), "--identities", "4", "--per-identity", "2",
                     "--holdout", "3", "--pairs", "4", "--workers", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "wrote 8 images of 4 identities" in out and "raw-pixel verification accuracy" in out
    with pytest.raises(ValueError, match="per_identity must be an integer >= 1, got 0"):
        SynthSpec(4, 0)
    with pytest.raises(ValueError, match="holdout >= 2"):
        SynthSpec(4, 2, holdout=1, pairs=5)
