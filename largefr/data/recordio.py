"""MXNet RecordIO (.rec + .idx) as insightface writes face datasets, read and written without mxnet.

Record framing (dmlc-core): ``uint32 magic 0xced7230a``, ``uint32 lrec`` whose top 3 bits are the
continuation flag and low 29 bits the part length, the part, zero padding to 4 bytes. A payload that
contains the magic word at a 4-byte aligned position is split there into parts (flag 1 first, 2 middle,
3 last; 0 = whole record) and the reader re-inserts the magic between parts.

Payload: an IRHeader ``struct '<IfQQ'`` (flag, label, id, id2); when ``flag > 0`` it is followed by
``flag`` float32 labels (and the header's own label field is 0), then the encoded image.

The ``.idx`` file holds one ``<key>\\t<byte offset>`` line per record. insightface's record 0 is a dataset
header with ``flag > 0`` and labels ``(first identity record, end of identity records)``: image records
are keys ``1 .. label[0]-1`` (label = class id) and keys ``label[0] .. label[1]-1`` describe identities.
"""
from __future__ import annotations

import math
import os
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_BITS = 29
_LEN_MASK = (1 << _LEN_BITS) - 1
IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(IR_FORMAT)


class RecordIOError(ValueError):
    """A .rec/.idx file does not follow the RecordIO format."""


@dataclass(frozen=True)
class IRHeader:
    flag: int
    label: float | tuple[float, ...]
    id: int
    id2: int

    @property
    def class_id(self) -> float:
        """The scalar label, or the first of several (insightface stores the class id there)."""
        return self.label if isinstance(self.label, float) else self.label[0]


def record_class_id(header: IRHeader, rec_path: str | os.PathLike[str], key: int) -> int:
    """The class id of image record ``key``; RecordIOError naming the record when the stored float32
    label is not a finite integer >= 0 (NaN, inf, negative or fractional)."""
    value = header.class_id
    if not math.isfinite(value) or value < 0 or value != int(value):
        raise RecordIOError(f"{rec_path} record {key}: label {value} is not a class id (a finite integer >= 0)")
    return int(value)


def pack_record(label: float | Sequence[float], payload: bytes, id: int = 0, id2: int = 0) -> bytes:
    """An IRHeader (+ float32 label array when ``label`` is a sequence) followed by ``payload``."""
    if isinstance(label, (int, float, np.integer, np.floating)):
        return struct.pack(IR_FORMAT, 0, float(label), id, id2) + payload
    labels = np.asarray(label, dtype=np.float32)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"label must be a number or a non-empty 1-d sequence, got shape {labels.shape}")
    return struct.pack(IR_FORMAT, labels.size, 0.0, id, id2) + labels.tobytes() + payload


def unpack_record(record: bytes) -> tuple[IRHeader, bytes]:
    """Split a record payload into its IRHeader and the remaining bytes (the encoded image)."""
    if len(record) < IR_SIZE:
        raise RecordIOError(f"record of {len(record)} bytes is shorter than an IRHeader ({IR_SIZE} bytes)")
    flag, label, id_, id2 = struct.unpack_from(IR_FORMAT, record)
    rest = record[IR_SIZE:]
    if flag > 0:
        if len(rest) < 4 * flag:
            raise RecordIOError(f"IRHeader flag={flag} announces {flag} float32 labels but only {len(rest)} bytes follow")
        labels = tuple(float(x) for x in np.frombuffer(rest, dtype=np.float32, count=flag))
        return IRHeader(flag, labels, id_, id2), rest[4 * flag :]
    return IRHeader(flag, float(label), id_, id2), rest


class RecordIOWriter:
    """Writes records (dmlc framing) and the matching .idx; for tests and small tools."""

    def __init__(self, rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str]) -> None:
        self._rec: BinaryIO = open(rec_path, "wb")
        self._idx = open(idx_path, "w")

    def write(self, key: int, record: bytes) -> None:
        self._idx.write(f"{key}\t{self._rec.tell()}\n")
        parts = _split_at_magic(record)
        for i, part in enumerate(parts):
            flag = 0 if len(parts) == 1 else 1 if i == 0 else 3 if i == len(parts) - 1 else 2
            if len(part) > _LEN_MASK:
                raise ValueError(f"record part of {len(part)} bytes exceeds the RecordIO limit of 2^29-1")
            self._rec.write(struct.pack("<II", MAGIC, (flag << _LEN_BITS) | len(part)))
            self._rec.write(part)
            self._rec.write(b"\0" * (-len(part) % 4))

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _split_at_magic(record: bytes) -> list[bytes]:
    """Cut ``record`` at every 4-byte aligned occurrence of the magic word (which is dropped)."""
    parts, start, i = [], 0, record.find(_MAGIC_BYTES)
    while i >= 0:
        if i % 4 == 0:
            parts.append(record[start:i])
            start = i + 4
            i = record.find(_MAGIC_BYTES, start)
        else:
            i = record.find(_MAGIC_BYTES, i + 1)
    parts.append(record[start:])
    return parts


class RecordIOReader:
    """Random access to the records of a .rec through its .idx (or a scan when there is no .idx)."""

    def __init__(self, rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str] | None = None) -> None:
        self.rec_path = Path(rec_path)
        if not self.rec_path.is_file():
            raise FileNotFoundError(f"RecordIO file {self.rec_path} not found")
        self.file_size = self.rec_path.stat().st_size
        idx = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        self.offsets = read_idx(idx) if idx.is_file() else scan_offsets(self.rec_path)
        self._f: BinaryIO = open(self.rec_path, "rb")

    def keys(self) -> list[int]:
        return list(self.offsets)

    def record_size(self, key: int) -> int:
        """Bytes the record occupies in the file (its offset to the next record's), for planning."""
        return self._sizes()[key]

    def _sizes(self) -> dict[int, int]:
        if not hasattr(self, "_size_cache"):
            keys = sorted(self.offsets, key=self.offsets.__getitem__)
            starts = [self.offsets[k] for k in keys] + [self.file_size]
            self._size_cache = {k: starts[i + 1] - starts[i] for i, k in enumerate(keys)}
        return self._size_cache

    def read(self, key: int) -> bytes:
        if key not in self.offsets:
            raise KeyError(f"record key {key} is not in the index of {self.rec_path}")
        return self.read_at(self.offsets[key])

    def read_at(self, offset: int) -> bytes:
        return read_record(self._f, self.rec_path, offset)

    def close(self) -> None:
        self._f.close()


def _read_header(f: BinaryIO, path: str | os.PathLike[str], at: int) -> tuple[int, int]:
    """(continuation flag, payload length) of the framing header at the file's current position ``at``."""
    head = f.read(8)
    if len(head) < 8:
        raise RecordIOError(f"{path}: truncated record header at byte {at}")
    magic, lrec = struct.unpack("<II", head)
    if magic != MAGIC:
        raise RecordIOError(f"{path}: bad magic 0x{magic:08x} at byte {at}, expected 0x{MAGIC:08x}")
    return lrec >> _LEN_BITS, lrec & _LEN_MASK


def read_record(f: BinaryIO, path: str | os.PathLike[str], offset: int) -> bytes:
    """The payload of the record starting at ``offset`` of the open .rec ``f`` (parts re-joined)."""
    f.seek(offset)
    chunks: list[bytes] = []
    while True:
        at = f.tell()
        flag, length = _read_header(f, path, at)
        data = f.read(length + (-length % 4))
        if len(data) < length:
            raise RecordIOError(f"{path}: truncated record at byte {at} (wanted {length} bytes, got {len(data)})")
        if (flag in (0, 1)) != (not chunks) or flag > 3:
            raise RecordIOError(f"{path}: continuation flag {flag} out of sequence at byte {at}")
        chunks.append(data[:length])
        if flag in (0, 3):
            return _MAGIC_BYTES.join(chunks)


def read_idx(path: str | os.PathLike[str]) -> dict[int, int]:
    """``key -> byte offset`` from an MXNet .idx file (``<key>\\t<offset>`` per line)."""
    offsets: dict[int, int] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or not fields[0].isdigit() or not fields[1].isdigit():
                raise RecordIOError(f"{path} line {n}: {line.strip()!r}, expected '<key>\\t<offset>'")
            offsets[int(fields[0])] = int(fields[1])
    return offsets


def scan_offsets(rec_path: str | os.PathLike[str]) -> dict[int, int]:
    """Offsets of all records, keyed 0, 1, 2, ... in file order, by walking the framing headers."""
    offsets: dict[int, int] = {}
    size = os.path.getsize(rec_path)
    with open(rec_path, "rb") as f:
        pos = 0
        while pos < size:
            f.seek(pos)
            flag, length = _read_header(f, rec_path, pos)
            if flag in (0, 1):
                offsets[len(offsets)] = pos
            pos += 8 + length + (-length % 4)
    return offsets


@dataclass(frozen=True)
class FaceRecLayout:
    """Which keys of an insightface .rec are images; ``declared_classes`` from the header (or None)."""

    image_keys: list[int]
    declared_classes: int | None


def face_rec_layout(reader: RecordIOReader) -> FaceRecLayout:
    """Interpret record 0 the way insightface does (see the module docstring)."""
    if 0 in reader.offsets:
        header, _ = unpack_record(reader.read(0))
        if header.flag > 0 and isinstance(header.label, tuple) and len(header.label) >= 2:
            first_id, end_id = int(header.label[0]), int(header.label[1])
            if first_id < 1 or end_id < first_id:
                raise RecordIOError(f"{reader.rec_path}: record 0 labels {header.label[:2]} are not (first identity, end)")
            keys = [k for k in range(1, first_id) if k in reader.offsets]
            return FaceRecLayout(keys, end_id - first_id if end_id > first_id else None)
    return FaceRecLayout(sorted(reader.offsets), None)


def write_face_rec(rec_path: str | os.PathLike[str], samples: Sequence[tuple[int, bytes]],
                   array_labels: bool = False) -> None:
    """Write (class id, encoded image) samples as insightface does: header record 0, images 1..N,
    then one record per identity with labels (first image key, end image key). Samples of one class
    must be contiguous. ``array_labels`` stores each image label as a float32 array (flag > 0)."""
    classes = [label for label, _ in samples]
    ids = list(dict.fromkeys(classes))
    first_id = len(samples) + 1
    with RecordIOWriter(rec_path, Path(rec_path).with_suffix(".idx")) as w:
        w.write(0, pack_record((first_id, first_id + len(ids)), b""))
        for key, (label, image) in enumerate(samples, 1):
            w.write(key, pack_record((float(label), 0.0) if array_labels else float(label), image, id=key))
        counts = Counter(classes)
        start = 1
        for n, cls in enumerate(ids):
            end = start + counts[cls]
            w.write(first_id + n, pack_record((start, end), b""))
            start = end


def iter_face_rec(rec_path: str | os.PathLike[str]) -> Iterator[tuple[int, int, bytes]]:
    """(key, class id, encoded image) of every image record, in key order."""
    reader = RecordIOReader(rec_path)
    try:
        for key in face_rec_layout(reader).image_keys:
            header, image = unpack_record(reader.read(key))
            yield key, record_class_id(header, rec_path, key), image
    finally:
        reader.close()
