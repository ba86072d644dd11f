"""Loaders (torch and DALI): rank sharding, equal batches, resume, corrupt samples, missing shards.

Every image is a flat colour that encodes its sample number, and its label is a function of that
number, so a test can tell exactly which sample each row is and that its label travelled with it.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from largefr.data.loader_factory import build_loader, dali_available
from largefr.data.manifest import Manifest, ShardFileError, ShardInfo, write_manifest
from largefr.data.shards import ShardWriter, shard_names
from multirank import run_ranks

NUM_CLASSES = 7
COUNTS = (37, 50, 13)
KINDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="nvidia.dali missing"))]


def sample_colour(k: int) -> tuple[int, int, int]:
    return (k // 16) * 16 + 8, (k % 16) * 16 + 8, 128


def label_of(k: int) -> int:
    return (k * 3) % NUM_CLASSES


def make_dataset(out: Path, counts=COUNTS, corrupt: dict[int, tuple[bytes | None, bytes | None]] | None = None) -> Manifest:
    """Shards of flat-colour 112x112 JPEGs; ``corrupt[k] = (image, label)`` replaces sample k's payloads."""
    out.mkdir(parents=True, exist_ok=True)
    corrupt = corrupt or {}
    shards, k = [], 0
    for n, count in enumerate(counts):
        tar, idx = shard_names(n)
        writer = ShardWriter(out / tar, out / idx)
        for _ in range(count):
            buf = io.BytesIO()
            Image.new("RGB", (112, 112), sample_colour(k)).save(buf, "JPEG", quality=95)
            image, label = corrupt.get(k, (None, None))
            writer.add(f"{k:06d}", image if image is not None else buf.getvalue(), label_of(k))
            if label is not None:  # rewrite the label member in place (same length keeps offsets valid)
                _patch_last_label(writer, label)
            k += 1
        result = writer.close()
        shards.append(ShardInfo(tar, idx, result.num_samples, result.bytes))
    manifest = Manifest(NUM_CLASSES, k, (112, 112), tuple(shards), "test", {}, out)
    write_manifest(out, manifest)
    return manifest


def _patch_last_label(writer: ShardWriter, label: bytes) -> None:
    fields = writer._lines[-1].split()
    offset, size = int(fields[5]), int(fields[6])
    assert len(label) == size, "a replacement label must keep the label's length"
    writer._tar.flush()
    with open(writer._tmp_tar, "r+b") as f:
        f.seek(offset)
        f.write(label)


def decode_samples(images: torch.Tensor) -> list[int]:
    """Sample numbers from flat-colour uint8 images."""
    rgb = images[:, :, 56, 56].to(torch.int64)
    return [int(r // 16) * 16 + int(g // 16) for r, g in zip(rgb[:, 0].tolist(), rgb[:, 1].tolist())]


def collect(loader) -> list[tuple[list[int], list[int]]]:
    batches = []
    for images, labels, mirror in loader:
        # the decoders' HWC memory as a [B, 3, H, W] view; one mirror flag per image
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64 and images.permute(0, 2, 3, 1).is_contiguous()
        assert images.shape == (loader.config.batch_size, 3, 112, 112) and labels.shape == (loader.config.batch_size,)
        assert mirror.dtype == torch.bool and mirror.shape == labels.shape
        samples = decode_samples(images)
        assert labels.tolist() == [label_of(k) for k in samples], "label shifted away from its image"
        batches.append((samples, labels.tolist()))
    return batches


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loader") / "clean"
    make_dataset(root)
    return root


def _rank_epochs(ctx, root: str, kinds: list[str], batch_size: int) -> dict:
    out = {}
    for kind in kinds:
        # rank processes are daemons here, which may not start DataLoader workers: decode in-process
        loader = build_loader(root, batch_size=batch_size, rank=ctx.rank, world_size=ctx.world_size, seed=3,
                              device=ctx.device, kind=kind, num_threads=0 if kind == "torch" else 1)
        counts = torch.tensor([len(loader)])
        gathered = [torch.zeros_like(counts) for _ in range(ctx.world_size)]
        torch.distributed.all_gather(gathered, counts, group=ctx.group)
        assert len({int(c) for c in gathered}) == 1
        out[kind] = {"len": len(loader), "batches": collect(loader), "state": loader.state_dict()}
    return out


def test_ranks_get_disjoint_equal_batches(dataset):
    kinds = ["torch", "dali"] if dali_available() else ["torch"]
    results = run_ranks(_rank_epochs, 2, str(dataset), kinds, 8)
    steps = (sum(COUNTS) // 2) // 8
    for kind in kinds:
        seen = []
        for r in results:
            assert r[kind]["len"] == steps and len(r[kind]["batches"]) == steps
            assert r[kind]["state"]["epoch"] == 1 and r[kind]["state"]["step"] == 0
            seen += [k for samples, _ in r[kind]["batches"] for k in samples]
        assert len(seen) == len(set(seen)) == 2 * steps * 8, kind
        assert set(seen) <= set(range(sum(COUNTS)))
    if len(kinds) == 2:
        assert results[0]["torch"]["batches"] == results[0]["dali"]["batches"]


@pytest.mark.parametrize("kind", KINDS)
def test_epochs_reshuffle_and_resume_mid_epoch_continues_exactly(dataset, kind):
    def make():
        return build_loader(dataset, batch_size=8, rank=1, world_size=3, seed=0, kind=kind, num_threads=2)

    full = make()
    full.set_epoch(4)
    epoch4 = collect(full)
    assert full.epoch == 5 and collect(full) != epoch4
    partial = make()
    partial.set_epoch(4)
    head = []
    for images, _, _ in partial:
        head.append(decode_samples(images))
        if len(head) == 2:
            break
    state = partial.state_dict()
    assert (state["epoch"], state["step"], state["position"]) == (4, 2, 16)
    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(4)
    assert head + [s for s, _ in collect(resumed)] == [s for s, _ in epoch4]


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_samples_are_skipped_counted_and_batches_stay_full(tmp_path, kind, caplog):
    corrupt = {k: (b"garbage", None) for k in (3, 40, 41, 77)}
    corrupt[5] = (b"\xff\xd8\xff\xe0" + b"\0" * 50, None)  # a JPEG header, then nothing
    corrupt[60] = (None, b"x")  # label_of(60) = 5: one character
    small = io.BytesIO()
    Image.new("RGB", (96, 96), sample_colour(90)).save(small, "JPEG")
    corrupt[90] = (small.getvalue(), None)  # decodable, but not the manifest's image size
    make_dataset(tmp_path, corrupt=corrupt)
    loader = build_loader(tmp_path, batch_size=13, seed=1, kind=kind, num_threads=2)
    with caplog.at_level(logging.WARNING, logger="largefr.data"):
        batches = collect(loader)
    seen = [k for samples, _ in batches for k in samples]
    assert len(batches) == len(loader) == 7 and len(seen) == len(set(seen)) == 91
    assert not set(seen) & set(corrupt)
    assert loader.skipped == len(corrupt)
    assert "000040.jpg" in caplog.text and "skipped 7 corrupt samples" in caplog.text
    # 93 good samples cannot fill 12 batches of 8: past the reserve the rank wraps around to its first samples
    loader = build_loader(tmp_path, batch_size=8, seed=1, kind=kind, num_threads=1)
    seen = [k for samples, _ in collect(loader) for k in samples]
    assert len(seen) == 96 and set(seen) == set(range(100)) - set(corrupt)


@pytest.mark.parametrize("kind", KINDS)
def test_missing_or_truncated_shard_is_a_clear_error(tmp_path, kind):
    make_dataset(tmp_path)
    tar = tmp_path / shard_names(1)[0]
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardFileError, match="shard-000001.tar.*truncated"):
        build_loader(tmp_path, batch_size=8, kind=kind)
    tar.unlink()
    with pytest.raises(ShardFileError, match="shard-000001.tar.*missing"):
        build_loader(tmp_path, batch_size=8, kind=kind)


def test_bad_arguments_name_the_value(dataset):
    with pytest.raises(ValueError, match="kind 'mxnet'"):
        build_loader(dataset, batch_size=8, kind="mxnet")
    with pytest.raises(ValueError, match="rank 2 is outside"):
        build_loader(dataset, batch_size=8, rank=2, world_size=2, kind="torch")
    with pytest.raises(ValueError, match="no full batch"):
        build_loader(dataset, batch_size=64, world_size=2, kind="torch")
    with pytest.raises(TypeError, match="torch.device"):
        build_loader(dataset, batch_size=8, device="cpu", kind="torch")
    loader = build_loader(dataset, batch_size=8, kind="torch")
    with pytest.raises(ValueError, match="step=99"):
        loader.load_state_dict({"epoch": 0, "step": 99, "position": 0})


@pytest.mark.parametrize("kind", KINDS)
def test_held_batches_are_never_overwritten(dataset, kind):
    # torch: a ring slot is reused only once every view of its batch is gone (largefr.data.shm_ring);
    # DALI: zero-copy outputs of the dynamic executor are never recycled while Python holds them
    loader = build_loader(dataset, batch_size=8, kind=kind, num_threads=0 if kind == "torch" else 1)
    kept = []
    for images, _, _ in loader:
        if not kept:
            kept = [images, decode_samples(images)]
    assert len(loader) == 12 and decode_samples(kept[0]) == kept[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_torch_loader_reuses_ring_slots_but_never_under_a_live_view(dataset, workers, monkeypatch):
    from largefr.data import shm_ring

    views = []
    original = shm_ring.SlotRing.view
    monkeypatch.setattr(shm_ring.SlotRing, "view", lambda self, slot, n: views.append(slot) or original(self, slot, n))
    loader = build_loader(dataset, batch_size=8, kind="torch", num_threads=workers, prefetch=1)
    expected = [samples for samples, _ in collect(loader)]  # each batch dropped before the next: slots recycle
    slots = loader._idle_ring.num_slots
    assert len(views) == len(expected) > slots and len(set(views)) == slots, (views, slots)
    # now hold every batch (more batches than slots), and one only through a slice of it
    views.clear()
    held, part = [], None
    loader.set_epoch(0)
    for i, (images, _, _) in enumerate(loader):
        if i == 1:
            part = images[2:5]
        else:
            held.append(images)
    assert len(views) < len(expected)  # past the ring's size, workers sent fresh arrays instead of waiting
    assert [decode_samples(x) for x in held] == expected[:1] + expected[2:]
    assert decode_samples(part) == expected[1][2:5]


@pytest.mark.skipif(not dali_available(), reason="nvidia.dali missing")
def test_dali_images_are_the_decoded_pixels_and_the_step_mirrors_the_flagged_ones(tmp_path):
    # the loader hands exactly the pixels of DALI's own decode (held batches intact), the flags say which to
    # mirror, and the step's normalize_images mirrors exactly those
    import numpy as np

    from largefr.models.input import normalize_images
    from nvidia.dali import fn, pipeline_def, types

    n, gen = 24, np.random.default_rng(0)
    shard, idx = shard_names(0)
    writer, encoded = ShardWriter(tmp_path / shard, tmp_path / idx), []
    for k in range(n):
        buf = io.BytesIO()
        Image.fromarray(gen.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        encoded.append(buf.getvalue())
        writer.add(f"{k:06d}", encoded[-1], k)
    result = writer.close()
    write_manifest(tmp_path, Manifest(n, n, (112, 112), (ShardInfo(shard, idx, result.num_samples, result.bytes),),
                                      "test", {}, tmp_path))

    @pipeline_def(batch_size=n, num_threads=1, device_id=None)
    def decode():
        enc = fn.external_source(source=lambda: [np.frombuffer(e, dtype=np.uint8) for e in encoded], batch=True)
        return fn.decoders.image(enc, device="cpu", output_type=types.RGB)

    pipe = decode()
    pipe.build()
    (out,) = pipe.run()
    ref = torch.from_numpy(np.stack([np.asarray(out[i]) for i in range(n)])).permute(0, 3, 1, 2)
    for flip in (False, True):
        loader = build_loader(tmp_path, batch_size=8, kind="dali", num_threads=1, flip=flip)
        batches = list(loader)  # all held at once: zero-copy buffers must not be recycled meanwhile
        mirrored = []
        for images, labels, mirror in batches:
            assert images.dtype == torch.uint8 and images.shape == (8, 3, 112, 112)
            assert torch.equal(images, ref[labels])
            expected = (ref[labels].double() - 127.5) / 127.5
            expected[mirror] = expected[mirror].flip(-1)
            assert (normalize_images(images, mirror).double() - expected).abs().max() <= 2e-7
            mirrored += mirror.tolist()
        assert len(mirrored) == n and any(mirrored) == flip and (all(mirrored) is False)


def test_slot_ring_frees_a_slot_with_its_last_view_and_reclaims_stopped_claims():
    from largefr.data.shm_ring import SlotRing

    with pytest.raises(ValueError, match="slots=3 must be a positive multiple of workers=2"):
        SlotRing(3, (4,), workers=2)
    ring = SlotRing(2, (4,), workers=1)
    slot, array = ring.claim(0)
    array[:] = 7
    assert ring.claim(2) is None  # chunk 2 maps to the same slot, still claimed
    tail = ring.view(slot, 3)[1:]
    assert ring.claim(2) is None and tail.tolist() == [7, 7]
    ring.reclaim()  # a view holds the slot: reclaiming must not free it
    assert ring.claim(2) is None
    del tail
    assert ring.claim(2) is not None  # freed with its last view
    ring.reclaim()  # that claim's worker "stopped": the slot is free again
    assert ring.claim(0) is not None
    with pytest.raises(ValueError, match="slot 5"):
        ring.view(5, 1)


def test_torch_loader_without_room_for_a_ring_copies_chunks_as_before(dataset, monkeypatch, caplog):
    from largefr.data import shm_ring, torch_loader

    monkeypatch.setattr(torch_loader, "shared_memory_free_bytes", lambda: 1 << 20)  # a tiny /dev/shm
    monkeypatch.setattr(shm_ring.SlotRing, "__init__", lambda *a: pytest.fail("no ring may be allocated"))
    loader = build_loader(dataset, batch_size=8, kind="torch", num_threads=2)
    with caplog.at_level(logging.INFO, logger="largefr.data"):
        batches = collect(loader)
    assert len(batches) == 12 and "no shared-memory ring" in caplog.text
    monkeypatch.undo()
    assert collect(build_loader(dataset, batch_size=8, kind="torch", num_threads=2)) == batches  # with a ring
