"""Loaders (torch and DALI) on bad data and bad states: bunched corrupt samples, images of the wrong
size, the label grammar, plan-driven flips after a resume, and loader-state validation.

Datasets are one shard of tiny 16x16 JPEGs whose label is the sample number, so a label names its sample.
Corrupt samples are chosen by *position* in the epoch plan (``bad_at``), to bunch them where wanted.
"""
from __future__ import annotations

import io
import itertools
import re
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from largefr.data.labels import LabelOutOfRange, pad_label_rows, parse_label, parse_label_rows
from largefr.data.loader_factory import build_loader, dali_available
from largefr.data.manifest import Manifest, ShardInfo, write_manifest
from largefr.data.epoch_order import EpochPlan
from largefr.models.input import normalize_images
from largefr.data.shards import ShardWriter, shard_names

SIZE = 16
KINDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="nvidia.dali missing"))]
needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia.dali missing")


def gradient_jpeg(size: int = SIZE) -> bytes:
    """A left-to-right dark-to-bright ramp: its mirror image is bright on the left."""
    ramp = np.linspace(0, 255, size).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.tile(ramp[None, :, None], (size, 1, 3))).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_dataset(out: Path, n: int, special: dict[int, tuple[bytes, bytes]] | None = None) -> Path:
    """One shard of ``n`` samples; sample k has label k, or the raw (image, label) payloads ``special[k]``."""
    out.mkdir(parents=True, exist_ok=True)
    tar, idx = shard_names(0)
    writer, image = ShardWriter(out / tar, out / idx), gradient_jpeg()
    for k in range(n):
        key = f"{k:06d}"
        if k in (special or {}):
            img, lab = special[k]
            members = [f"jpg {writer._member(key + '.jpg', img)} {len(img)} {key}.jpg",
                       f"cls {writer._member(key + '.cls', lab)} {len(lab)} {key}.cls"]
            writer._lines.append(" ".join(members))
        else:
            writer.add(key, image, k)
    result = writer.close()
    write_manifest(out, Manifest(n, n, (SIZE, SIZE), (ShardInfo(tar, idx, result.num_samples, result.bytes),),
                                 "test", {}, out))
    return out


def bad_at(n: int, batch_size: int, positions: list[int], payload: tuple[bytes, bytes] | None = None) -> dict:
    """``special`` making the samples at plan ``positions`` (seed 0, epoch 0, one rank) corrupt."""
    rows = EpochPlan((n,), 0, 0, 0, 1, batch_size).shard_rows(0)
    return {int(rows[p % n]): payload or (b"junk", str(int(rows[p % n])).encode()) for p in positions}


def run(root: Path, kind: str, batch_size: int, **kw) -> tuple[list[list[int]], list[list[bool]], int]:
    """(labels, mirrored) of every batch of one epoch, and the loader's skipped count."""
    loader = build_loader(root, batch_size=batch_size, kind=kind, num_threads=0 if kind == "torch" else 1, **kw)
    labels, mirrored = [], []
    for images, lab, mirror in loader:
        assert images.shape == (batch_size, 3, SIZE, SIZE) and images.dtype == torch.uint8
        labels.append(lab.tolist())
        mirrored.append(mirrored_after_the_step(images, mirror))
    return labels, mirrored, loader.skipped


def looks_mirrored(images: torch.Tensor) -> list[bool]:
    """The dataset's images are brighter on the right: a brighter left column means mirrored."""
    return (images[:, :, :, 0].float().mean((1, 2)) > images[:, :, :, -1].float().mean((1, 2))).tolist()


def mirrored_after_the_step(images: torch.Tensor, mirror: torch.Tensor) -> list[bool]:
    """The flags, checked: the loader hands the images unmirrored and the step's normalisation mirrors
    exactly the flagged ones."""
    assert not any(looks_mirrored(images))
    assert looks_mirrored(normalize_images(images, mirror)) == mirror.tolist()
    return mirror.tolist()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_bunched_corrupt_samples_recover_by_reading_further(tmp_path, kind):
    # 24 samples, batches of 4: positions 4..11 are bad, and again 28..35 once the rank wraps around.
    # A listing rebuilt at 28 holds only bad positions: the DALI loader must read past them (it looped).
    root = write_dataset(tmp_path, 24, bad_at(24, 4, list(range(4, 12))))
    labels, _, skipped = run(root, kind, 4, flip=False)
    reference, _, _ = run(root, "torch", 4, flip=False)
    good = set(range(24)) - set(bad_at(24, 4, list(range(4, 12))))
    assert len(labels) == 6 and skipped == 16 and {k for b in labels for k in b} == good
    assert labels == reference


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [list(range(10)), list(range(12))], ids=["two-good", "all-bad"])
def test_too_many_corrupt_samples_is_a_clear_error_with_the_total(tmp_path, kind, bad):
    root = write_dataset(tmp_path, 12, bad_at(12, 4, bad))
    corrupt = 24 if len(bad) == 12 else 20  # bad positions among the 3*4 + 12 the rank may read
    with pytest.raises(RuntimeError, match=f"ran out of valid samples after {corrupt} corrupt ones"):
        run(root, kind, 4, flip=False)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_size", [5, 1])
def test_images_of_another_size_are_skipped_and_counted(tmp_path, kind, batch_size):
    # positions 5..9 fill a whole batch of 5 with 20x20 images (the manifest says 16x16), 17 is alone
    wrong = [5, 6, 7, 8, 9, 17]
    root = write_dataset(tmp_path, 30, {k: (gradient_jpeg(20), v) for k, (_, v) in bad_at(30, 5, wrong).items()})
    labels, _, skipped = run(root, kind, batch_size, flip=False)
    seen = {k for b in labels for k in b}
    assert len(labels) == 30 // batch_size and seen == set(range(30)) - set(bad_at(30, 5, wrong))
    assert skipped >= 6 and (labels, skipped) == run(root, "torch", batch_size, flip=False)[::2]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_images_all_of_another_size_run_out_clearly(tmp_path, kind):
    root = write_dataset(tmp_path, 10, {k: (gradient_jpeg(20), str(k).encode()) for k in range(10)})
    with pytest.raises(RuntimeError, match="ran out of valid samples after 20 corrupt ones"):
        run(root, kind, 5, flip=False)


LABEL_CASES = [  # payload, class id or None (corrupt)
    (b"5", 5), (b" 5\n", 5), (b"5\x0c", 5), (b"\t\x0b5\r", 5), (b"0012", 12),
    (b"5\x00", None), (b"\x005", None), (b"5 5", None), (b"+5", None), (b"", None), (b" ", None),
    (b"-1", None), (b"5\xa0", None), (b"1" * 19, None),
]


def test_one_label_grammar_for_single_payloads_and_padded_batches():
    raw = np.full((len(LABEL_CASES), 20), -1, dtype=np.int16)
    for i, (payload, _) in enumerate(LABEL_CASES):
        raw[i, : len(payload)] = np.frombuffer(payload, dtype=np.uint8)
    padded = pad_label_rows([np.frombuffer(payload, dtype=np.uint8) for payload, _ in LABEL_CASES])  # DALI's path
    width = max(len(payload) for payload, _ in LABEL_CASES)
    assert padded.dtype == np.int16 and np.array_equal(padded, raw[:, :width])
    assert pad_label_rows([np.zeros(0, np.uint8)] * 3).shape == (3, 0)
    with pytest.raises(ValueError, match="payload 1 must be uint8 bytes, got dtype int8"):
        pad_label_rows([np.zeros(2, np.uint8), np.full(2, -1, np.int8)])
    values, ok = parse_label_rows(raw, 20)
    for i, (payload, expected) in enumerate(LABEL_CASES):
        assert parse_label(payload, 20) == expected, payload
        assert (int(values[i]) if ok[i] else None) == expected, payload


def test_a_well_formed_label_past_num_classes_is_a_dataset_error_not_a_skip():
    values, ok = parse_label_rows(np.frombuffer(b"20", dtype=np.uint8).astype(np.int16)[None], 20)
    assert not ok[0]  # the padded-batch path marks it; the probe then raises
    with pytest.raises(LabelOutOfRange, match=r"label 20, outside \[0, num_classes=20\)"):
        parse_label(b" 20\n", 20)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_loaders_fail_on_a_label_outside_the_manifest_naming_shard_sample_and_value(tmp_path, kind):
    # 20 classes in the manifest; sample 11 says 57 (a valid number, a wrong dataset); sample 4 is corrupt
    root = write_dataset(tmp_path, 20, {11: (gradient_jpeg(), b"57"), 4: (b"junk", b"4")})
    with pytest.raises(Exception, match=r"000011\.jpg has label 57, outside \[0, num_classes=20\)") as info:
        run(root, kind, 5, flip=False)
    assert ".tar:000011.jpg" in str(info.value)  # the shard file and the member


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_both_loaders_parse_label_payloads_alike(tmp_path, kind, caplog):
    # sample 3 says b"3\x0c" (whitespace: label 3), sample 7 says b"7\x00" (NUL: corrupt)
    root = write_dataset(tmp_path, 20, {3: (gradient_jpeg(), b"3\x0c"), 7: (gradient_jpeg(), b"7\x00")})
    with caplog.at_level(logging.WARNING, logger="largefr.data"):
        labels, _, skipped = run(root, kind, 5, flip=False)
    seen = [k for b in labels for k in b]
    assert skipped == 1 and len(seen) == 20 and 3 in seen and 7 not in seen
    assert "000007" in caplog.text and "is not a class id" in caplog.text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_flips_follow_the_plan_after_resume_and_across_loaders(tmp_path, kind):
    # corrupt samples force DALI rebuilds; the flips must still be those of each sample's plan position
    root = write_dataset(tmp_path, 40, bad_at(40, 4, [5, 13, 14]))

    def loader():
        l = build_loader(root, batch_size=4, seed=0, kind=kind, num_threads=0 if kind == "torch" else 1)
        l.set_epoch(0)
        return l

    full = [(lab.tolist(), mirrored_after_the_step(im, m)) for im, lab, m in loader()]
    first = loader()
    it = iter(first)
    head = [(lab.tolist(), mirrored_after_the_step(im, m)) for im, lab, m in itertools.islice(it, 3)]
    it.close()
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    resumed.set_epoch(0)
    assert head + [(lab.tolist(), mirrored_after_the_step(im, m)) for im, lab, m in resumed] == full
    flips = [f for _, m in full for f in m]
    assert 0 < sum(flips) < len(flips)
    torch_run = run(root, "torch", 4)
    assert (torch_run[0], torch_run[1]) == ([b for b, _ in full], [m for _, m in full])


@needs_dali
def test_dali_shuffle_buffer_keeps_a_random_flip(tmp_path):
    root = write_dataset(tmp_path, 40)
    _, mirrored, _ = run(root, "dali", 4, shuffle_buffer=8)
    flips = [f for m in mirrored for f in m]
    assert 0 < sum(flips) < len(flips)


def test_load_state_dict_rejects_states_it_cannot_resume(tmp_path):
    root = write_dataset(tmp_path, 40)
    loader = build_loader(root, batch_size=4, seed=7, kind="torch", num_threads=0)
    ok = {"epoch": 1, "step": 3, "position": 13, "skipped": 1, "pool": "", "step_offset": 0, "world_size": 1,
          "batch_size": 4, "seed": 7}
    loader.load_state_dict(ok)
    assert loader.state_dict() == ok
    bad = [({"seed": 3}, "seed=3, this loader uses seed=7"),
           ({"world_size": None}, "world_size=None"),
           ({"epoch": -1}, "epoch=-1"),
           ({"position": 11}, "position=11 is below (step - step_offset) x batch_size = (3 - 0) x 4"),
           ({"step_offset": 4}, "step_offset=4 is outside [0, step=3]"),
           ({"pool": "5-x"}, "pool='5-x': expected ranges"),
           ({"step": 2.5}, "step=2.5")]
    for change, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            loader.load_state_dict({**ok, **change})
    partial = {k: v for k, v in ok.items() if k != "world_size"}
    with pytest.raises(ValueError, match="batch_size=4 but no world_size"):
        loader.load_state_dict(partial)
    rescaled = {**ok, "world_size": 2, "batch_size": 2, "position": 7}  # 3 batches of 2x2 = 12 samples
    loader.load_state_dict(rescaled)
    assert (loader.state_dict()["step"], loader.state_dict()["position"]) == (3, 12)


def _encoded(mode: str, size: tuple[int, int], fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(len(mode) + size[0])
    channels = {"RGB": 3, "L": 1, "CMYK": 4}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels.squeeze(2) if channels == 1 else pixels, mode).save(buf, fmt, quality=90)
    return buf.getvalue()


def test_jpeg_fast_path_decodes_into_the_buffer_and_agrees_with_pil(monkeypatch):
    pytest.importorskip("simplejpeg")
    from largefr.data import samples

    jpeg = _encoded("RGB", (24, 16))
    cases = {
        "rgb jpeg": jpeg, "grey jpeg": _encoded("L", (24, 16)), "cmyk jpeg": _encoded("CMYK", (24, 16)),
        "png": _encoded("RGB", (24, 16), "PNG"), "other size": _encoded("RGB", (20, 16)),
        "garbage": b"\xff\xd8garbage", "truncated": jpeg[: len(jpeg) // 2], "not an image": b"GIF89a?",
    }
    fast, buffers = {}, {}
    for name, data in cases.items():
        buffers[name] = np.zeros((16, 24, 3), dtype=np.uint8)
        fast[name] = samples.decode_image(data, (16, 24), out=buffers[name])
    assert fast["rgb jpeg"][0] is buffers["rgb jpeg"] and buffers["rgb jpeg"].any()
    assert fast["other size"] == (None, "image is 16x20, expected 16x24")
    monkeypatch.setattr(samples, "simplejpeg", None)
    for name, data in cases.items():
        array, reason = samples.decode_image(data, (16, 24))
        fast_array, fast_reason = fast[name]
        assert (array is None) == (fast_array is None) and reason == fast_reason, name
        if array is not None:
            assert np.array_equal(array, fast_array), name  # libjpeg-turbo both ways: the same pixels
    assert fast["truncated"][0] is None and fast["not an image"][0] is None
