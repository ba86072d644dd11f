"""Shard writer, DALI index files, manifest, epoch plan."""
from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from largefr.data.build import parse_size, plan_by_bytes, shard_bytes_for
from largefr.data.manifest import Manifest, ShardFileError, ShardInfo, read_manifest, write_manifest
from largefr.data.epoch_order import EpochPlan
from largefr.data.shards import ShardIndex, ShardWriter, iter_tar_samples, jpeg_size


def _write_shard(tmp_path, samples):
    writer = ShardWriter(tmp_path / "s.tar", tmp_path / "s.idx")
    for key, data, label in samples:
        writer.add(key, data, label)
    return writer.close()


def test_shard_is_a_plain_tar_and_index_points_at_member_data(tmp_path):
    samples = [(f"{i:04d}", bytes([i]) * (100 + 37 * i), i * 3) for i in range(5)]
    result = _write_shard(tmp_path, samples)
    assert result.num_samples == 5 and result.bytes == (tmp_path / "s.tar").stat().st_size
    with tarfile.open(tmp_path / "s.tar") as tar:
        assert tar.getnames() == [f"{k}.{e}" for k, _, _ in samples for e in ("jpg", "cls")]
    assert iter_tar_samples(tmp_path / "s.tar") == samples
    index = ShardIndex(tmp_path / "s.idx", tar_size=result.bytes)
    raw = (tmp_path / "s.tar").read_bytes()
    for row, (key, data, label) in enumerate(samples):
        off, size = int(index.image_offset[row]), int(index.image_size[row])
        assert raw[off : off + size] == data
        off, size = int(index.label_offset[row]), int(index.label_size[row])
        assert raw[off : off + size] == str(label).encode()
    assert (tmp_path / "s.idx").read_text().splitlines()[0] == "v1.2 5"
    assert not list(tmp_path.glob("*.tmp"))


def test_writer_rejects_bad_keys_and_labels_and_cleans_up_on_error(tmp_path):
    writer = ShardWriter(tmp_path / "s.tar", tmp_path / "s.idx")
    with pytest.raises(ValueError, match="key"):
        writer.add("a.b", b"x", 1)
    with pytest.raises(ValueError, match="label"):
        writer.add("a", b"x", -1)
    writer.abort()
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "t.tar", tmp_path / "t.idx") as w:
            w.add("a", b"x", 1)
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_index_pointing_past_the_tar_end_is_a_truncation_error(tmp_path):
    result = _write_shard(tmp_path, [("a", b"x" * 600, 1), ("b", b"y" * 600, 2)])
    with pytest.raises(ShardFileError, match="truncated"):
        ShardIndex(tmp_path / "s.idx", tar_size=result.bytes - 2048)


def _manifest(tmp_path, counts=(3, 2)):
    shards = []
    for n, count in enumerate(counts):
        w = ShardWriter(tmp_path / f"shard-{n}.tar", tmp_path / f"shard-{n}.idx")
        for i in range(count):
            w.add(f"{n}_{i}", b"jpeg", i)
        r = w.close()
        shards.append(ShardInfo(f"shard-{n}.tar", f"shard-{n}.idx", r.num_samples, r.bytes))
    manifest = Manifest(10, sum(counts), (112, 112), tuple(shards), "test", {"k": 1}, tmp_path)
    write_manifest(tmp_path, manifest)
    return manifest


def test_manifest_round_trip_and_file_checks(tmp_path):
    written = _manifest(tmp_path)
    read = read_manifest(tmp_path)
    assert read == written
    assert read.shard_counts == [3, 2] and read.image_size == (112, 112)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert {"num_classes", "num_samples", "image_size", "shards"} <= set(raw)
    read.check_files()
    tar = tmp_path / "shard-1.tar"
    tar.write_bytes(tar.read_bytes()[:-1024])
    with pytest.raises(ShardFileError, match="shard-1.tar.*truncated"):
        read.check_files()
    tar.unlink()
    with pytest.raises(ShardFileError, match="shard-1.tar.*missing"):
        read.check_files()


def test_manifest_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_manifest(tmp_path)
    _manifest(tmp_path)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    raw["num_samples"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="num_samples=99"):
        read_manifest(tmp_path)
    raw["format"] = "other"
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="format='other'"):
        read_manifest(tmp_path)


def test_jpeg_size_reads_the_frame_header():
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.new("RGB", (96, 112)).save(buf, "JPEG")
    assert jpeg_size(buf.getvalue()) == (112, 96)
    assert jpeg_size(b"not a jpeg") is None
    assert jpeg_size(buf.getvalue()[:20]) is None


def _all_positions(plan: EpochPlan) -> list[tuple[int, int]]:
    out = []
    for seg in plan.segments(0, plan.steps * plan.batch_size):
        out += [(seg.shard, int(r)) for r in seg.rows]
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_plan_gives_ranks_disjoint_equal_blocks(world):
    counts = (37, 50, 13, 21)
    plans = [EpochPlan(counts, seed=5, epoch=2, rank=r, world_size=world, batch_size=8) for r in range(world)]
    assert len({p.steps for p in plans}) == 1
    assert plans[0].steps == (sum(counts) // world) // 8
    taken = [s for p in plans for s in _all_positions(p)]
    assert len(taken) == len(set(taken)) == world * plans[0].steps * 8
    assert all(0 <= row < counts[shard] for shard, row in taken)


def test_plan_is_deterministic_and_changes_with_epoch_and_wraps():
    counts = (37, 50, 13)
    a = _all_positions(EpochPlan(counts, 1, 0, 0, 1, 10))
    assert a == _all_positions(EpochPlan(counts, 1, 0, 0, 1, 10))
    assert a != _all_positions(EpochPlan(counts, 1, 1, 0, 1, 10))
    assert a != _all_positions(EpochPlan(counts, 2, 0, 0, 1, 10))
    plan = EpochPlan(counts, 1, 0, 1, 2, 10)
    m = plan.block_size
    first = [(s.shard, r) for s in plan.segments(0, 5) for r in s.rows.tolist()]
    wrapped = [(s.shard, r) for s in plan.segments(m, m + 5) for r in s.rows.tolist()]
    assert first == wrapped
    flips = plan.flips(np.arange(2000))
    assert 0.4 < flips.mean() < 0.6 and (flips == plan.flips(np.arange(2000))).all()


def test_plan_rejects_datasets_without_a_full_batch():
    with pytest.raises(ValueError, match="no full batch"):
        EpochPlan((5, 5), 0, 0, 0, 2, 8)
    with pytest.raises(ValueError, match="rank 2"):
        EpochPlan((50,), 0, 0, 2, 2, 8)


def test_sizes_and_byte_plans():
    assert parse_size("1G") == 1 << 30 and parse_size("64k") == 65536 and parse_size("1e6") == 10**6
    with pytest.raises(ValueError, match="size"):
        parse_size("lots")
    groups = plan_by_bytes([1000] * 10, 2048 * 2 + 3 * 512 * 2)
    assert [len(g) for g in groups] == [2, 2, 2, 2, 2]
    assert [i for g in groups for i in g] == list(range(10))
    assert shard_bytes_for([1000] * 10, 1 << 30, workers=2) == 5 * 2560  # small data: one shard per worker
    assert shard_bytes_for([1000] * 10, 4096, workers=2) == 4096
