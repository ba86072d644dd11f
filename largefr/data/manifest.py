"""The dataset manifest: sizes known without scanning any shard.

A dataset directory holds ``manifest.json`` plus, for every shard, a tar file and its DALI index
(see docs/data_format.md). :func:`read_manifest` returns a typed :class:`Manifest`;
:meth:`Manifest.check_files` turns a missing or truncated shard into an error that names it.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "largefr-webdataset"
FORMAT_VERSION = 1


class ShardFileError(RuntimeError):
    """A shard or index file named in the manifest is missing, truncated or malformed."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard: ``tar`` and ``index`` are file names relative to the dataset directory."""

    tar: str
    index: str
    num_samples: int
    bytes: int

    def __post_init__(self) -> None:
        if self.num_samples <= 0:
            raise ValueError(f"shard {self.tar!r}: num_samples must be > 0, got {self.num_samples}")
        if self.bytes <= 0:
            raise ValueError(f"shard {self.tar!r}: bytes must be > 0, got {self.bytes}")


@dataclass(frozen=True)
class Manifest:
    """What loaders and the trainer need to know about a dataset.

    ``root`` is the directory the manifest was read from (not stored in the file).
    ``image_size`` is (height, width) of every image. ``extra`` holds producer details
    (source, skipped samples, synth parameters) and is never interpreted by loaders.
    """

    num_classes: int
    num_samples: int
    image_size: tuple[int, int]
    shards: tuple[ShardInfo, ...]
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    root: Path = Path(".")

    def __post_init__(self) -> None:
        if self.num_classes <= 0:
            raise ValueError(f"manifest: num_classes must be > 0, got {self.num_classes}")
        if len(self.image_size) != 2 or min(self.image_size) <= 0:
            raise ValueError(f"manifest: image_size must be [height, width] > 0, got {list(self.image_size)}")
        if not self.shards:
            raise ValueError("manifest: the list of shards is empty")
        total = sum(s.num_samples for s in self.shards)
        if total != self.num_samples:
            raise ValueError(f"manifest: num_samples={self.num_samples} but the shards hold {total} samples")

    @property
    def shard_counts(self) -> list[int]:
        return [s.num_samples for s in self.shards]

    def tar_path(self, shard: int) -> Path:
        return self.root / self.shards[shard].tar

    def index_path(self, shard: int) -> Path:
        return self.root / self.shards[shard].index

    def check_files(self) -> None:
        """Raise :class:`ShardFileError` naming the first missing or truncated shard or index."""
        for i, shard in enumerate(self.shards):
            tar, idx = self.tar_path(i), self.index_path(i)
            if not tar.is_file():
                raise ShardFileError(f"shard {tar} listed in {self.root / MANIFEST_NAME} is missing")
            size = tar.stat().st_size
            if size != shard.bytes:
                raise ShardFileError(
                    f"shard {tar} is {size} bytes but the manifest records {shard.bytes} bytes "
                    "(truncated or rewritten shard)"
                )
            if not idx.is_file():
                raise ShardFileError(f"index file {idx} of shard {tar} is missing")

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "num_classes": self.num_classes,
            "num_samples": self.num_samples,
            "image_size": list(self.image_size),
            "source": self.source,
            "shards": [asdict(s) for s in self.shards],
            "extra": self.extra,
        }


def read_manifest(directory: str | os.PathLike[str]) -> Manifest:
    """Read and validate ``<directory>/manifest.json``; raise naming the file and the bad field."""
    root = Path(directory)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a dataset directory written by largefr synth/convert")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if raw.get("format") != FORMAT_NAME or raw.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format={raw.get('format')!r} version={raw.get('version')!r}, "
            f"expected format={FORMAT_NAME!r} version={FORMAT_VERSION}"
        )
    try:
        shards = tuple(
            ShardInfo(str(s["tar"]), str(s["index"]), int(s["num_samples"]), int(s["bytes"])) for s in raw["shards"]
        )
        return Manifest(
            num_classes=int(raw["num_classes"]),
            num_samples=int(raw["num_samples"]),
            image_size=(int(raw["image_size"][0]), int(raw["image_size"][1])),
            shards=shards,
            source=str(raw.get("source", "")),
            extra=dict(raw.get("extra", {})),
            root=root,
        )
    except (KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"{path}: missing or malformed field ({exc!r})") from exc


def write_manifest(directory: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically (temp file, then rename)."""
    path = Path(directory) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=1) + "\n")
    os.replace(tmp, path)
    return path
