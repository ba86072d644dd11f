"""Random access to the samples of a dataset through its index files, and PIL decoding."""
from __future__ import annotations

import io
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from largefr.data.manifest import Manifest
from largefr.data.shards import ShardIndex, read_exact

log = logging.getLogger("largefr.data")


@dataclass(frozen=True)
class RawSample:
    shard: int
    row: int
    image: bytes
    label: bytes


class ShardReader:
    """Reads (image bytes, label bytes) of sample ``row`` of shard ``shard``; keeps a few shards open."""

    def __init__(self, manifest: Manifest, max_open: int = 8) -> None:
        self.manifest = manifest
        self.max_open = max_open
        self._open: OrderedDict[int, tuple[ShardIndex, BinaryIO]] = OrderedDict()

    def index(self, shard: int) -> ShardIndex:
        return self._get(shard)[0]

    def _get(self, shard: int) -> tuple[ShardIndex, BinaryIO]:
        entry = self._open.get(shard)
        if entry is not None:
            self._open.move_to_end(shard)
            return entry
        path = self.manifest.tar_path(shard)
        index = ShardIndex(self.manifest.index_path(shard), tar_size=self.manifest.shards[shard].bytes)
        if len(index) != self.manifest.shards[shard].num_samples:
            raise ValueError(
                f"index {index.path} lists {len(index)} samples, the manifest says {self.manifest.shards[shard].num_samples}"
            )
        entry = (index, open(path, "rb"))
        self._open[shard] = entry
        if len(self._open) > self.max_open:
            _, (_, f) = self._open.popitem(last=False)
            f.close()
        return entry

    def read(self, shard: int, row: int) -> RawSample:
        index, f = self._get(shard)
        path = self.manifest.tar_path(shard)
        img_off, img_len = int(index.image_offset[row]), int(index.image_size[row])
        lab_off, lab_len = int(index.label_offset[row]), int(index.label_size[row])
        if img_off < lab_off and lab_off - (img_off + img_len) < 2048:
            span = read_exact(f, path, img_off, lab_off + lab_len - img_off)
            return RawSample(shard, row, span[:img_len], span[lab_off - img_off :])
        return RawSample(shard, row, read_exact(f, path, img_off, img_len), read_exact(f, path, lab_off, lab_len))

    def describe(self, shard: int, row: int) -> str:
        """``<tar path>:<member name>`` of a sample, for log messages."""
        line = self.index(shard).lines[row].split()
        name = line[3] if len(line) > 3 else f"row {row}"
        return f"{self.manifest.tar_path(shard)}:{name}"

    def close(self) -> None:
        for _, f in self._open.values():
            f.close()
        self._open.clear()


def decode_image(data: bytes, image_size: tuple[int, int]) -> tuple[np.ndarray | None, str]:
    """uint8 [H, W, 3] RGB, or (None, reason) when the image is undecodable or of the wrong size."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            # convert() copies even an RGB image: ~15% of a 112x112 JPEG's decode here
            array = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    except UnidentifiedImageError:
        return None, "undecodable image (not a recognised image format)"
    except Exception as exc:  # PIL raises many types for broken data; each one means "skip this sample"
        return None, f"undecodable image ({type(exc).__name__}: {exc})"
    if array.shape[:2] != tuple(image_size):
        return None, f"image is {array.shape[0]}x{array.shape[1]}, expected {image_size[0]}x{image_size[1]}"
    return array, ""
