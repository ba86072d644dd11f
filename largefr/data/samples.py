"""Random access to the samples of a dataset through its index files, and image decoding.

JPEGs are decoded by simplejpeg (libjpeg-turbo, optional: the ``data`` extra) straight into the caller's
buffer when it is installed: ~80-95 us per 112x112 JPEG on this project's VM against PIL's ~180-340 us
(object set-up, the decoded copy and ``tobytes``), the same pixels (both are libjpeg-turbo with its default
DCT and upsampling; tested). Other formats, CMYK JPEGs, and anything simplejpeg refuses go to PIL, which
also names the reason a broken image is skipped.
"""
from __future__ import annotations

import io
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

try:
    import simplejpeg
except ImportError:  # optional: PIL decodes everything, more slowly
    simplejpeg = None

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


def decode_image(
    data: bytes, image_size: tuple[int, int], out: np.ndarray | None = None
) -> tuple[np.ndarray | None, str]:
    """uint8 [H, W, 3] RGB, or (None, reason) when the image is undecodable or of the wrong size.

    ``out``: a C-contiguous uint8 [H, W, 3] array that a JPEG is decoded into (then returned); other
    images come back in an array of their own."""
    if simplejpeg is not None and data[:2] == b"\xff\xd8":
        decoded = _decode_jpeg(data, image_size, out)
        if decoded is not None:
            return decoded
    return _decode_pil(data, image_size)


_SIMPLEJPEG_COLOURS = ("RGB", "YCbCr", "Gray")  # what libjpeg-turbo turns into RGB itself (not CMYK / YCCK)


def _decode_jpeg(data: bytes, image_size: tuple[int, int], out: np.ndarray | None) -> tuple[np.ndarray | None, str] | None:
    """simplejpeg's decode, or None to let PIL decide (a colour space it does not convert, broken data)."""
    try:
        height, width, colour, _ = simplejpeg.decode_jpeg_header(data)
        if colour not in _SIMPLEJPEG_COLOURS:
            return None
        if (height, width) != tuple(image_size):
            return None, _wrong_size(height, width, image_size)
        if out is None or out.shape != (height, width, 3) or out.dtype != np.uint8 or not out.flags.c_contiguous:
            return simplejpeg.decode_jpeg(data, colorspace="RGB"), ""
        simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)  # fills out's bytes in its [H, W, 3] order
        return out, ""
    except ValueError:
        return None


def _decode_pil(data: bytes, image_size: tuple[int, int]) -> tuple[np.ndarray | None, str]:
    try:
        with Image.open(io.BytesIO(data)) as img:
            # convert() copies even an RGB image: ~15% of a 112x112 JPEG's decode here
            array = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    except UnidentifiedImageError:
        return None, "undecodable image (not a recognised image format)"
    except Exception as exc:  # PIL raises many types for broken data; each one means "skip this sample"
        return None, f"undecodable image ({type(exc).__name__}: {exc})"
    if array.shape[:2] != tuple(image_size):
        return None, _wrong_size(array.shape[0], array.shape[1], image_size)
    return array, ""


def _wrong_size(height: int, width: int, image_size: tuple[int, int]) -> str:
    return f"image is {height}x{width}, expected {image_size[0]}x{image_size[1]}"
