"""MXNet RecordIO reader/writer without mxnet, and the rec / folder converters."""
from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from largefr.cli import main as cli_main
from largefr.data.convert import convert_folder, convert_rec
from largefr.data.manifest import read_manifest
from largefr.data.recordio import (MAGIC, RecordIOError, RecordIOReader, RecordIOWriter, face_rec_layout,
                                   iter_face_rec, pack_record, scan_offsets, unpack_record, write_face_rec)
from largefr.data.shards import iter_tar_samples


def _jpeg(value: int, size: tuple[int, int] = (112, 112), fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size[1], size[0]), (value, 255 - value, 40)).save(buf, fmt)
    return buf.getvalue()


def test_irheader_layout_matches_struct_IfQQ():
    rec = pack_record(7.0, b"img", id=3, id2=9)
    assert rec == struct.pack("<IfQQ", 0, 7.0, 3, 9) + b"img"
    header, payload = unpack_record(rec)
    assert (header.flag, header.label, header.id, header.id2, payload) == (0, 7.0, 3, 9, b"img")
    rec = pack_record((5.0, 2.0), b"xy")
    assert rec[:24] == struct.pack("<IfQQ", 2, 0.0, 0, 0) and rec[24:32] == struct.pack("<2f", 5.0, 2.0)
    header, payload = unpack_record(rec)
    assert header.flag == 2 and header.label == (5.0, 2.0) and header.class_id == 5.0 and payload == b"xy"
    with pytest.raises(RecordIOError, match="flag=3"):
        unpack_record(struct.pack("<IfQQ", 3, 0.0, 0, 0) + b"\0" * 4)


def test_record_framing_bytes(tmp_path):
    with RecordIOWriter(tmp_path / "a.rec", tmp_path / "a.idx") as w:
        w.write(0, b"hello")
        w.write(1, b"")
    raw = (tmp_path / "a.rec").read_bytes()
    assert raw[:8] == struct.pack("<II", MAGIC, 5) and raw[8:16] == b"hello\0\0\0"
    assert raw[16:24] == struct.pack("<II", MAGIC, 0) and len(raw) == 24
    assert (tmp_path / "a.idx").read_text() == "0\t0\n1\t16\n"


def test_payload_containing_the_magic_is_split_and_rejoined(tmp_path):
    magic = struct.pack("<I", MAGIC)
    payloads = [magic + b"abcd" + magic + b"xy", b"12" + magic + b"34", b"abcd" + magic, b"z" * 9]
    with RecordIOWriter(tmp_path / "a.rec", tmp_path / "a.idx") as w:
        for key, p in enumerate(payloads):
            w.write(key, p)
    raw = (tmp_path / "a.rec").read_bytes()
    assert struct.unpack_from("<I", raw, 4)[0] >> 29 == 1  # first part of a split record
    reader = RecordIOReader(tmp_path / "a.rec")
    assert [reader.read(k) for k in range(len(payloads))] == payloads
    assert scan_offsets(tmp_path / "a.rec") == reader.offsets
    reader.close()


def test_truncated_or_corrupt_rec_is_an_error_naming_the_file(tmp_path):
    with RecordIOWriter(tmp_path / "a.rec", tmp_path / "a.idx") as w:
        w.write(0, b"x" * 100)
    raw = (tmp_path / "a.rec").read_bytes()
    (tmp_path / "a.rec").write_bytes(raw[:50])
    with pytest.raises(RecordIOError, match="a.rec.*truncated"):
        RecordIOReader(tmp_path / "a.rec").read(0)
    (tmp_path / "a.rec").write_bytes(b"\1\2\3\4" + raw[4:])
    with pytest.raises(RecordIOError, match="bad magic"):
        RecordIOReader(tmp_path / "a.rec").read(0)


def _face_rec(tmp_path, corrupt_key: int | None = None, array_labels: bool = False):
    samples = [(c, _jpeg(10 * c + i)) for c in (0, 1, 2, 5) for i in range(3)]
    if corrupt_key is not None:
        samples[corrupt_key - 1] = (samples[corrupt_key - 1][0], b"\xff\xd8 broken")
    write_face_rec(tmp_path / "train.rec", samples, array_labels=array_labels)
    return samples


@pytest.mark.parametrize("array_labels", [False, True])
def test_insightface_header_record_layout(tmp_path, array_labels):
    samples = _face_rec(tmp_path, array_labels=array_labels)
    reader = RecordIOReader(tmp_path / "train.rec")
    header, _ = unpack_record(reader.read(0))
    assert header.flag == 2 and header.label == (13.0, 17.0)
    layout = face_rec_layout(reader)
    assert layout.image_keys == list(range(1, 13)) and layout.declared_classes == 4
    ident, _ = unpack_record(reader.read(16))
    assert ident.label == (10.0, 13.0)  # identity 5 owns image records 10..12
    assert [(label, img) for _, label, img in iter_face_rec(tmp_path / "train.rec")] == samples


def test_convert_rec_round_trip_resume_and_corrupt_image(tmp_path, caplog):
    samples = _face_rec(tmp_path, corrupt_key=4)
    out = tmp_path / "out"
    manifest = convert_rec(tmp_path / "train.rec", out, shard_bytes=4 * 1024, workers=1, progress=False)
    assert len(manifest.shards) > 2
    assert manifest.num_classes == 6 and manifest.num_samples == 11 and manifest.extra["skipped"] == 1
    assert "000000004" in caplog.text
    got = {key: (img, label) for shard in manifest.shards for key, img, label in iter_tar_samples(out / shard.tar)}
    expected = {f"{k:09d}": (img, label) for k, (label, img) in enumerate(samples, 1) if k != 4}
    assert got == expected
    first = out / manifest.shards[0].tar
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    first.unlink()
    again = convert_rec(tmp_path / "train.rec", out, shard_bytes=4 * 1024, workers=2, progress=False)
    assert again == manifest
    rewritten = [p.name for p in out.glob("*.tar") if p.stat().st_mtime_ns != mtimes[p.name]]
    assert rewritten == [first.name]
    with pytest.raises(ValueError, match="other parameters"):
        convert_rec(tmp_path / "train.rec", out, shard_bytes=8 * 1024, workers=1, progress=False)


def test_convert_cli_from_rec(tmp_path, capsys):
    _face_rec(tmp_path)
    code = cli_main(["convert", "--from", "rec", str(tmp_path / "train.rec"), "--out", str(tmp_path / "o"),
                     "--workers", "1", "--no-progress", "--no-shuffle"])
    assert code == 0 and "wrote 12 images of 6 classes" in capsys.readouterr().out
    keys = [k for s in read_manifest(tmp_path / "o").shards for k, _, _ in iter_tar_samples(tmp_path / "o" / s.tar)]
    assert keys == [f"{k:09d}" for k in range(1, 13)]


def test_convert_folder_reencodes_resizes_and_skips_broken(tmp_path):
    src = tmp_path / "faces"
    for name, files in {"bob": {"a.jpg": _jpeg(1), "b.png": _jpeg(2, fmt="PNG")},
                        "alice": {"x.jpg": _jpeg(3, (120, 100)), "bad.jpg": b"nope", "notes.txt": b"-"}}.items():
        (src / name).mkdir(parents=True)
        for f, data in files.items():
            (src / name / f).write_bytes(data)
    manifest = convert_folder(src, tmp_path / "out", workers=1, progress=False, shuffle=False)
    assert (tmp_path / "out" / "classes.txt").read_text().split() == ["alice", "bob"]
    assert manifest.num_classes == 2 and manifest.num_samples == 3 and manifest.extra["skipped"] == 1
    samples = [s for shard in manifest.shards for s in iter_tar_samples(tmp_path / "out" / shard.tar)]
    assert [label for _, _, label in samples] == [0, 1, 1]
    for _, data, _ in samples:
        img = Image.open(io.BytesIO(data))
        assert img.format == "JPEG" and img.size == (112, 112)
    pixel = np.asarray(Image.open(io.BytesIO(samples[2][1])))[50, 50]
    assert abs(int(pixel[0]) - 2) < 6  # bob/b.png, converted from PNG
    with pytest.raises(ValueError, match="no identity sub-folders"):
        convert_folder(tmp_path / "out", tmp_path / "o2", workers=1, progress=False)


@pytest.mark.parametrize("label", [float("nan"), float("inf"), -2.0, 1.5])
def test_convert_rec_rejects_a_label_that_is_not_a_class_id_naming_record_and_file(tmp_path, label):
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        w.write(0, pack_record((3.0, 4.0), b""))  # images 1..2, one identity record
        w.write(1, pack_record(1.0, _jpeg(1), id=1))
        w.write(2, pack_record(label, _jpeg(2), id=2))
        w.write(3, pack_record((1.0, 3.0), b""))
    with pytest.raises(RecordIOError, match=rf"train\.rec record 2: label {label} is not a class id"):
        convert_rec(tmp_path / "train.rec", tmp_path / "out", workers=1, progress=False)
    with pytest.raises(RecordIOError, match="record 2"):
        list(iter_face_rec(tmp_path / "train.rec"))
