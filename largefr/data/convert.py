"""Converters into the shard format: insightface RecordIO (.rec/.idx) and one folder per identity.

Images that already are JPEGs of the target size are copied byte for byte (``verify=True`` also decodes
them); anything else is decoded, converted to RGB, resized to the target size and re-encoded. Undecodable
images are skipped, counted in the manifest (``extra.skipped``) and logged. Samples are written in a
seeded random order (``shuffle=True``) so that every shard mixes many identities.
"""
from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from largefr.data.build import (DEFAULT_SHARD_BYTES, ShardTask, check_params, finish_manifest, plan_by_bytes,
                                run_tasks, shard_bytes_for)
from largefr.data.manifest import Manifest
from largefr.data.recordio import RecordIOReader, face_rec_layout, read_record, record_class_id, unpack_record
from largefr.data.shards import jpeg_size
from largefr.seeding import derive_seed

log = logging.getLogger("largefr.data")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_IMAGE_SIZE = (112, 112)


def to_jpeg(data: bytes, image_size: tuple[int, int], quality: int, verify: bool) -> tuple[bytes | None, str]:
    """JPEG bytes of ``image_size`` for an encoded image, or (None, reason)."""
    is_target = jpeg_size(data) == tuple(image_size)
    if is_target and not verify:
        return data, ""
    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB")
    except Exception as exc:  # PIL raises many types for broken data; each one means "skip this sample"
        return None, f"undecodable image ({type(exc).__name__})"
    if is_target:
        return data, ""
    if rgb.size != (image_size[1], image_size[0]):
        rgb = rgb.resize((image_size[1], image_size[0]), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=quality)
    return out.getvalue(), ""


@dataclass(frozen=True)
class RecSource:
    """Image records of a .rec; task items are (key, byte offset) pairs."""

    rec_path: str
    image_size: tuple[int, int]
    quality: int
    verify: bool

    def samples(self, items: list[tuple[int, int]]) -> Iterator[tuple[str, bytes | None, int, str]]:
        with open(self.rec_path, "rb") as f:
            for key, offset in items:
                header, image = unpack_record(read_record(f, self.rec_path, offset))
                label = record_class_id(header, self.rec_path, key)
                data, reason = to_jpeg(image, self.image_size, self.quality, self.verify)
                yield f"{key:09d}", data, label, reason


@dataclass(frozen=True)
class FolderSource:
    """Image files; task items are (sample number, path, class id)."""

    image_size: tuple[int, int]
    quality: int
    verify: bool

    def samples(self, items: list[tuple[int, str, int]]) -> Iterator[tuple[str, bytes | None, int, str]]:
        for number, path, label in items:
            with open(path, "rb") as f:
                data, reason = to_jpeg(f.read(), self.image_size, self.quality, self.verify)
            yield f"{number:09d}", data, label, f"{path}: {reason}" if data is None else ""


def _tasks(out: Path, params: dict, items: list, sizes: list[int], shard_bytes: int, workers: int) -> list[ShardTask]:
    """Record the parameters, then cut the (shuffled) items into shard tasks."""
    plan_bytes = check_params(out, params, shard_bytes_for(sizes, shard_bytes, workers))
    n = len(items)
    order = np.random.default_rng(derive_seed(params["seed"], "convert_shuffle")).permutation(n) if params["shuffle"] else np.arange(n)
    items = [items[i] for i in order.tolist()]
    sizes = [sizes[i] for i in order.tolist()]
    return [ShardTask(k, items[g.start : g.stop], len(g)) for k, g in enumerate(plan_by_bytes(sizes, plan_bytes))]


def convert_rec(rec_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                shard_bytes: int = DEFAULT_SHARD_BYTES, workers: int = 2, shuffle: bool = True, seed: int = 0,
                image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE, quality: int = 95, verify: bool = False,
                progress: bool = True) -> Manifest:
    """Convert an insightface ``train.rec`` (+ ``train.idx`` beside it) into shards under ``out_dir``.

    Class ids are kept as stored. Resumable: rerunning with the same arguments skips finished shards.
    """
    rec = RecordIOReader(rec_path)
    try:
        layout = face_rec_layout(rec)
        items = [(k, rec.offsets[k]) for k in layout.image_keys]
        sizes = [rec.record_size(k) for k in layout.image_keys]
    finally:
        rec.close()
    if not items:
        raise ValueError(f"{rec_path} holds no image records")
    out = Path(out_dir)
    params = {"source": str(Path(rec_path).resolve()), "shard_bytes": shard_bytes, "shuffle": shuffle, "seed": seed,
              "image_size": list(image_size), "quality": quality, "verify": verify}
    tasks = _tasks(out, params, items, sizes, shard_bytes, workers)
    stats = run_tasks(RecSource(str(rec_path), image_size, quality, verify), tasks, out, workers,
                      f"convert {Path(rec_path).name}", progress)
    max_label = max(s.max_label for s in stats)
    if layout.declared_classes is not None and layout.declared_classes != max_label + 1:
        log.warning("%s: record 0 declares %d identities but the largest class id is %d; using %d classes",
                    rec_path, layout.declared_classes, max_label, max_label + 1)
    return finish_manifest(out, stats, image_size, None, f"rec:{Path(rec_path).resolve()}",
                           {"declared_classes": layout.declared_classes, "shuffled": shuffle})


def list_folder(src_dir: Path) -> tuple[list[str], list[tuple[int, str, int]]]:
    """Identity names (sorted; class id = position) and (sample number, path, class id) items."""
    if not src_dir.is_dir():
        raise FileNotFoundError(f"{src_dir} is not a directory (expected one sub-folder per identity)")
    identities = sorted(p.name for p in src_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not identities:
        raise ValueError(f"{src_dir} has no identity sub-folders")
    items = []
    for label, name in enumerate(identities):
        for path in sorted((src_dir / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                items.append((len(items), str(path), label))
    if not items:
        raise ValueError(f"{src_dir} holds no images with suffix {IMAGE_SUFFIXES}")
    return identities, items


def convert_folder(src_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                   shard_bytes: int = DEFAULT_SHARD_BYTES, workers: int = 2, shuffle: bool = True, seed: int = 0,
                   image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE, quality: int = 95, verify: bool = False,
                   progress: bool = True) -> Manifest:
    """Convert ``src_dir/<identity>/<image>`` into shards; class ids follow the sorted identity names,
    which are written to ``out_dir/classes.txt`` (line i = identity of class i)."""
    src = Path(src_dir)
    identities, items = list_folder(src)
    out = Path(out_dir)
    params = {"source": str(src.resolve()), "shard_bytes": shard_bytes, "shuffle": shuffle, "seed": seed,
              "image_size": list(image_size), "quality": quality, "verify": verify, "num_items": len(items)}
    sizes = [os.path.getsize(p) for _, p, _ in items]
    tasks = _tasks(out, params, items, sizes, shard_bytes, workers)
    (out / "classes.txt").write_text("\n".join(identities) + "\n")
    stats = run_tasks(FolderSource(image_size, quality, verify), tasks, out, workers, f"convert {src.name}", progress)
    return finish_manifest(out, stats, image_size, len(identities), f"folder:{src.resolve()}",
                           {"classes_file": "classes.txt", "shuffled": shuffle})
