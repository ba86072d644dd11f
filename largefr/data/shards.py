"""Tar shards and their DALI index files.

A shard is a plain POSIX (ustar) tar of samples ``<key>.jpg`` + ``<key>.cls``. :class:`ShardWriter`
writes the tar and, at the same time, the index file ``fn.readers.webdataset`` reads (DALI's
format v1.2: a header ``v1.2 <num_samples>`` then one line per sample listing, per component,
``<ext> <data offset> <size> <member name>``). Both go to temporary names and are renamed when the
shard is complete, so a shard that exists under its final name is finished.
"""
from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from largefr.data.manifest import ShardFileError

INDEX_VERSION = "v1.2"
IMAGE_EXT = "jpg"
LABEL_EXT = "cls"
_BLOCK = 512


@dataclass(frozen=True)
class ShardResult:
    num_samples: int
    bytes: int


def shard_names(index: int) -> tuple[str, str]:
    """File names (tar, index) of shard number ``index``."""
    return f"shard-{index:06d}.tar", f"shard-{index:06d}.idx"


def _check_key(key: str) -> None:
    if not key or "." in key or "/" in key or key.startswith("_"):
        raise ValueError(f"sample key {key!r} must be non-empty, contain no '.' or '/' and not start with '_'")


class ShardWriter:
    """Write one shard: ``add(key, jpeg_bytes, label)`` per sample, then ``close()``.

    Used as a context manager, an exception removes the partial files instead of renaming them.
    """

    def __init__(self, tar_path: str | os.PathLike[str], index_path: str | os.PathLike[str]) -> None:
        self.tar_path, self.index_path = Path(tar_path), Path(index_path)
        self._tmp_tar = self.tar_path.with_name(self.tar_path.name + ".tmp")
        self._tmp_idx = self.index_path.with_name(self.index_path.name + ".tmp")
        self._tar: BinaryIO = open(self._tmp_tar, "wb", buffering=1 << 20)
        self._lines: list[str] = []
        self._pos = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __len__(self) -> int:
        return len(self._lines)

    @property
    def bytes_written(self) -> int:
        return self._pos

    def add(self, key: str, image: bytes, label: int) -> None:
        _check_key(key)
        if not isinstance(label, (int, np.integer)) or label < 0:
            raise ValueError(f"sample {key!r}: label must be an integer >= 0, got {label!r}")
        parts = []
        for ext, data in ((IMAGE_EXT, image), (LABEL_EXT, str(int(label)).encode("ascii"))):
            name = f"{key}.{ext}"
            offset = self._member(name, data)
            parts.append(f"{ext} {offset} {len(data)} {name}")
        self._lines.append(" ".join(parts))

    def _member(self, name: str, data: bytes) -> int:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self._tar.write(info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict"))
        offset = self._pos + _BLOCK
        self._tar.write(data)
        pad = -len(data) % _BLOCK
        self._tar.write(b"\0" * pad)
        self._pos = offset + len(data) + pad
        return offset

    def close(self) -> ShardResult:
        if not self._lines:
            self.abort()
            raise ValueError(f"shard {self.tar_path} has no samples")
        self._tar.write(b"\0" * (2 * _BLOCK))
        self._tar.close()
        self._pos += 2 * _BLOCK
        with open(self._tmp_idx, "w") as f:
            f.write(f"{INDEX_VERSION} {len(self._lines)}\n")
            f.write("\n".join(self._lines))
            f.write("\n")
        os.replace(self._tmp_idx, self.index_path)
        os.replace(self._tmp_tar, self.tar_path)
        return ShardResult(len(self._lines), self._pos)

    def abort(self) -> None:
        if not self._tar.closed:
            self._tar.close()
        for p in (self._tmp_tar, self._tmp_idx):
            p.unlink(missing_ok=True)


class ShardIndex:
    """A parsed index file: per sample the offset and size of its image and label members."""

    def __init__(self, path: str | os.PathLike[str], tar_size: int | None = None) -> None:
        self.path = Path(path)
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise ShardFileError(f"cannot read index file {self.path}: {exc}") from exc
        header, _, body = text.partition("\n")
        fields = header.split()
        if len(fields) != 2 or fields[0] != INDEX_VERSION or not fields[1].isdigit():
            raise ShardFileError(f"index file {self.path}: header {header!r}, expected '{INDEX_VERSION} <num_samples>'")
        self.lines: list[str] = body.splitlines()
        n = int(fields[1])
        if len(self.lines) != n:
            raise ShardFileError(f"index file {self.path}: header says {n} samples but it has {len(self.lines)} lines")
        self.image_offset, self.image_size, self.label_offset, self.label_size = self._parse()
        if tar_size is not None and n:
            end = max(int((self.image_offset + self.image_size).max()), int((self.label_offset + self.label_size).max()))
            if end > tar_size:
                raise ShardFileError(
                    f"index file {self.path} points to byte {end} but its tar has {tar_size} bytes: truncated shard"
                )

    def __len__(self) -> int:
        return len(self.lines)

    def _parse(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        tokens = " ".join(self.lines).split()
        n = len(self.lines)
        if len(tokens) == 8 * n and tokens[0:1] == [IMAGE_EXT] and tokens[4:5] == [LABEL_EXT]:
            if tokens[0::8].count(IMAGE_EXT) == n and tokens[4::8].count(LABEL_EXT) == n:
                cols = [np.array(tokens[c::8], dtype=np.int64) for c in (1, 2, 5, 6)]
                return cols[0], cols[1], cols[2], cols[3]
        return self._parse_generic()

    def _parse_generic(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        out = np.zeros((len(self.lines), 4), dtype=np.int64)
        for i, line in enumerate(self.lines):
            tok = line.split()
            comps = {tok[j]: (int(tok[j + 1]), int(tok[j + 2])) for j in range(0, len(tok) - 3, 4)}
            if IMAGE_EXT not in comps or LABEL_EXT not in comps:
                raise ShardFileError(
                    f"index file {self.path} line {i + 2}: sample lacks a .{IMAGE_EXT} or .{LABEL_EXT} component"
                )
            out[i] = (*comps[IMAGE_EXT], *comps[LABEL_EXT])
        return out[:, 0], out[:, 1], out[:, 2], out[:, 3]

    def write_subset(self, path: str | os.PathLike[str], rows: np.ndarray) -> None:
        """Write an index listing only ``rows`` (in that order) of this shard, for a DALI reader."""
        with open(path, "w") as f:
            f.write(f"{INDEX_VERSION} {len(rows)}\n")
            f.write("\n".join(self.lines[r] for r in rows.tolist()))
            f.write("\n")


def read_exact(f: BinaryIO, path: Path, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` of an open shard; a short read is an error naming the shard."""
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise ShardFileError(f"shard {path} is truncated: wanted {size} bytes at offset {offset}, got {len(data)}")
    return data


def iter_tar_samples(tar_path: str | os.PathLike[str]) -> list[tuple[str, bytes, int]]:
    """All (key, image bytes, label) of a shard read with :mod:`tarfile` (for tests and tools)."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            fobj = tar.extractfile(member)
            if fobj is not None:
                samples.setdefault(key, {})[ext] = fobj.read()
    return [(k, v[IMAGE_EXT], int(v[LABEL_EXT])) for k, v in samples.items()]


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's SOF marker without decoding, or None if it is not a readable JPEG."""
    if data[:2] != b"\xff\xd8":
        return None
    buf = io.BytesIO(data)
    buf.seek(2)
    while True:
        marker = buf.read(2)
        if len(marker) < 2 or marker[0] != 0xFF:
            return None
        kind = marker[1]
        if kind in (0xD8, 0x01) or 0xD0 <= kind <= 0xD7:
            continue
        length_raw = buf.read(2)
        if len(length_raw) < 2:
            return None
        length = int.from_bytes(length_raw, "big")
        if kind in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            sof = buf.read(5)
            if len(sof) < 5:
                return None
            return int.from_bytes(sof[1:3], "big"), int.from_bytes(sof[3:5], "big")
        buf.seek(length - 2, io.SEEK_CUR)
