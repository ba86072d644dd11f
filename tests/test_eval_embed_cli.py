"""Flip-test embedding, checkpoint loading and the `largefr eval` command end to end on tiny inputs."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from largefr.cli import main
from largefr.eval.bin_io import load_bin, write_bin
from largefr.backbone_file import CheckpointMeta, load_backbone_from_checkpoint, save_backbone_checkpoint
from largefr.eval.embed import decode_image, embed_images, encode_image
from largefr.models.input import normalize_images
from largefr.eval.verification import verify_interleaved
from backbones import calibrated_backbone, one_torch_thread  # noqa: F401  (fixture)

META = CheckpointMeta("iresnet18", 32, 112, {"base_width": 8})
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_backbone() -> torch.nn.Module:
    return calibrated_backbone(META.backbone, META.embedding_size, **META.backbone_kwargs)


def _image(seed: int) -> np.ndarray:
    blocks = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return np.kron(blocks, np.ones((14, 14, 1), dtype=np.uint8))  # 112 x 112, not mirror-symmetric


def _write_set(path: Path, pairs: int, seed: int) -> None:
    images, issame = [], []
    for i in range(pairs):
        a, same = _image(seed + i), i % 2 == 0
        b = a if same else _image(seed + 1000 + i)
        images += [encode_image(a, "PNG"), encode_image(b, "JPEG")]
        issame.append(same)
    write_bin(path, images, issame)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_backbone_checkpoint(tmp_path_factory.mktemp("ckpt"), _tiny_backbone(), META)


def test_flip_test_embedding_is_image_plus_mirror(checkpoint: Path) -> None:
    model = load_backbone_from_checkpoint(checkpoint, "cpu")
    arrays = [_image(s) for s in range(7)]
    encoded = [encode_image(a, "PNG") for a in arrays]
    x = normalize_images(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))
    assert x.shape == (7, 3, 112, 112) and x.min() >= -1.0 - 2e-7 and x.max() <= 1.0 + 2e-7  # one float32 ulp
    assert torch.allclose(x[0, :, 0, 0], torch.from_numpy(arrays[0][0, 0] / 127.5 - 1.0).float())
    with torch.inference_mode():
        expected = (model(x) + model(x.flip(3))).numpy()
        plain = model(x).numpy()
    got = embed_images(model, encoded, batch_size=3, workers=3)  # 3 batches, last one partial
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    no_flip = embed_images(model, encoded, batch_size=7, workers=1, flip=False)
    np.testing.assert_allclose(no_flip, plain, rtol=1e-4, atol=1e-4)
    mirrored = embed_images(model, [encode_image(np.ascontiguousarray(a[:, ::-1]), "PNG") for a in arrays], workers=2)
    np.testing.assert_allclose(mirrored, got, rtol=1e-4, atol=1e-4)  # flip test is mirror invariant
    assert not np.allclose(plain, expected - plain, atol=1e-3)  # ... and the mirror really differs


def test_decode_resizes_and_reports_bad_bytes() -> None:
    small = encode_image(np.zeros((56, 56, 3), np.uint8), "PNG")
    assert decode_image(small, 112).shape == (112, 112, 3)
    with pytest.raises(ValueError, match=r"image 1: cannot decode 5 bytes"):
        embed_images(torch.nn.Identity(), [small, b"junk!"], image_size=112, workers=2)


def test_checkpoint_loader_uses_registry_and_checks_fit(checkpoint: Path, tmp_path: Path) -> None:
    model = load_backbone_from_checkpoint(checkpoint, "cpu")
    x = torch.randn(2, 3, 112, 112)
    with torch.inference_mode():
        assert torch.allclose(model(x), _tiny_backbone()(x), atol=1e-6)
    assert not model.training
    wrong = tmp_path / "wrong"
    save_backbone_checkpoint(wrong, _tiny_backbone(), CheckpointMeta("iresnet18", 64, 112, {"base_width": 8}))
    (wrong / "backbone.pt").write_bytes((checkpoint / "backbone.pt").read_bytes())
    with pytest.raises(ValueError, match=r"does not fit backbone 'iresnet18'"):
        load_backbone_from_checkpoint(wrong, "cpu")
    (wrong / "meta.json").write_text(json.dumps({"backbone": "iresnet18", "embedding_size": 32}))
    with pytest.raises(ValueError, match=r"missing keys \['image_size'\]"):
        load_backbone_from_checkpoint(wrong, "cpu")
    (wrong / "meta.json").write_text(json.dumps({"backbone": "iresnet18", "embedding_size": "32", "image_size": 112}))
    with pytest.raises(ValueError, match=r"'embedding_size' must be a positive int, got '32'"):
        load_backbone_from_checkpoint(wrong, "cpu")


@pytest.mark.parametrize("protocol", [None, "exact"])
def test_eval_cli_end_to_end(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], protocol: str | None
) -> None:
    bins = [tmp_path / "lfw.bin", tmp_path / "agedb_30.bin"]
    _write_set(bins[0], 10, seed=0)
    _write_set(bins[1], 12, seed=50)
    out = tmp_path / "out"
    chosen = [] if protocol is None else ["--protocol", protocol]
    rc = main(["eval", "--checkpoint", str(checkpoint), "--bins", *map(str, bins), "--out-dir", str(out),
               "--batch-size", "8", "--workers", "2", "--device", "cpu", *chosen])
    text = capsys.readouterr().out
    assert rc == 0, text
    print(text)
    expected = protocol or "insightface"  # the default
    results = json.loads((out / "results.json").read_text())
    model = load_backbone_from_checkpoint(checkpoint, "cpu")
    for b in bins:
        vb = load_bin(b)
        ref = verify_interleaved(embed_images(model, vb.images, workers=1), vb.issame, protocol=expected)
        got = results[vb.name]
        assert got["protocol"] == expected and got["folds"] == 10
        assert got["threshold_unit"] == {"insightface": "squared_l2", "exact": "cosine"}[expected]
        assert got["accuracy_mean"] == pytest.approx(ref["accuracy_mean"]) and got["auc"] == pytest.approx(ref["auc"])
        assert got["threshold"] == pytest.approx(ref["threshold"])
        assert got["auc"] == 1.0  # genuine pairs are the same face re-encoded; impostors differ
        if expected == "exact":
            assert got["accuracy_mean"] == 1.0  # the max-margin threshold generalises to the held-out fold
        # insightface takes the FIRST best grid threshold, the tightest one: with 1-pair folds a held-out
        # genuine pair farther apart than every training one is rejected (lfw: 0.9 here, as its reference)
        assert set(got["tar_at_far"]) == {"0.001", "0.0001"}
        if expected == "insightface":
            assert set(got["val_at_far"]) == {"0.001", "0.0001"}
            assert got["val_at_far"]["0.001"]["val"] == pytest.approx(ref["val_at_far"][1e-3]["val"])
        else:
            assert "val_at_far" not in got
        from PIL import Image

        with Image.open(out / f"roc_{vb.name}.png") as png:
            assert png.format == "PNG" and png.size[0] > 100
        row = next(line for line in text.splitlines() if line.startswith(vb.name))
        accuracy = f"{100 * got['accuracy_mean']:.2f} ± {100 * got['accuracy_std']:.2f}"
        assert accuracy in row and f" {expected} " in row
        assert (" d2 " if expected == "insightface" else " cos ") in row
    assert f"protocol {expected}" in text


def test_eval_cli_bad_input_is_a_clear_error(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(([b"a", b"b"], [print]), protocol=4))
    args = ["eval", "--checkpoint", str(checkpoint), "--out-dir", str(tmp_path), "--device", "cpu", "--bins"]
    assert main(args + [str(evil)]) == 2
    assert "refusing global builtins.print" in capsys.readouterr().err
    assert main(args + [str(tmp_path / "missing.bin")]) == 2
    assert "missing.bin" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path), "--bins", str(evil)]) == 2
    assert "meta.json" in capsys.readouterr().err
