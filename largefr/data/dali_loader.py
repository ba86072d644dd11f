"""The DALI loader: ``fn.readers.webdataset`` over per-epoch index files, one code path for CPU and GPU.

Each rank's planned sample order (:mod:`largefr.data.epoch_order`) is written as index files listing, per run of
consecutive positions inside one shard, that shard's rows in planned order; the reader then reads exactly
the rank's samples in that order (no ``shard_id``/``num_shards``: DALI's split by sample count gives ranks
unequal batch counts). Decoding runs on the CPU (``device_id=None``) when ``device.type == "cpu"`` and as
nvJPEG ``mixed`` decoding on ``device`` otherwise.

DALI stops a pipeline at an undecodable image. Then the positions just ahead of the last delivered batch
are probed one by one (same decoder, plus the label check), the bad ones are excluded and the pipeline
is rebuilt at the last delivered position: the batch is filled from the next samples and labels stay
attached to their images. A batch whose images are not the manifest's ``image_size`` is treated the same way.

The pipeline only reads and decodes: its HWC batch is handed as it is (zero-copy on the CPU) as a
[B, 3, H, W] view, with one mirror flag per image; the compute device mirrors, transposes and normalises
(largefr.models.input), as DALI's GPU ``crop_mirror_normalize`` would. On this project's 2-core CPU any
host pass after decoding costs loader throughput one for one (DALI's CPU flip / transpose / crop_mirror_
normalize ~35-40 us per image each, a numpy mirror + transpose 17-29 us, decoding ~145 us). Mirror flags
follow the plan (``EpochPlan.flips`` of each sample's position), as in the torch loader, so a resumed or
rebuilt pipeline mirrors the same samples. With ``shuffle_buffer > 0`` the reader's order is DALI's own:
the flag is then a seeded coin flip per delivered sample.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from largefr.data.labels import LabelOutOfRange, pad_label_rows, parse_label, parse_label_rows
from largefr.data.loader import Batch, FaceLoader, LoaderConfig, out_of_samples_error, register_loader
from largefr.data.manifest import Manifest
from largefr.data.epoch_order import EpochPlan
from largefr.data.samples import ShardReader
from largefr.seeding import derive_seed

log = logging.getLogger("largefr.data")


class BadBatch(RuntimeError):
    """A batch came out with an unparseable label or a malformed image tensor."""


@dataclass(frozen=True)
class Listing:
    """Index files making the reader read rank positions ``positions`` in order."""

    positions: np.ndarray
    tar_paths: list[str]
    index_paths: list[str]
    directory: Path


def import_dali() -> Any:
    try:
        import nvidia.dali as dali
    except ImportError as exc:
        raise ImportError(
            "the DALI loader needs NVIDIA DALI: pip install 'largefr[dali]' (nvidia-dali-cuda120), "
            "or use kind='torch'"
        ) from exc
    return dali


def dali_device_id(device: torch.device) -> int | None:
    """None (CPU-only pipeline) for a CPU device, else the accelerator index DALI should use."""
    if device.type == "cpu":
        return None
    return device.index if device.index is not None else torch.accelerator.current_device_index()


def batch_flips(plan: EpochPlan, listing: Listing, flip: bool, shuffle_buffer: int,
                seed: int) -> Callable[[int, int], np.ndarray]:
    """``flags(k, size)``: the mirror flags of the batch of ``size`` starting at listing offset k. In listing order they are the
    plan's (``EpochPlan.flips`` of each position); with a shuffle buffer DALI's order is its own, so each
    batch draws fresh coin flips from a stream seeded like the pipeline."""
    if not flip:
        return lambda k, size: np.zeros(size, dtype=bool)
    if shuffle_buffer == 0:
        planned = plan.flips(listing.positions)
        return lambda k, size: planned[k : k + size]
    coins = np.random.default_rng(seed)
    return lambda k, size: coins.random(size) < 0.5


def build_pipeline(listing: Listing, *, batch_size: int, num_threads: int, device_id: int | None, prefetch: int,
                   seed: int, shuffle_buffer: int = 0, decode_only: bool = False) -> Any:
    """Reader + decoder: uint8 HWC images (and, unless ``decode_only``, each ``.cls`` payload's bytes as they
    are: padding them in Python, :func:`largefr.data.labels.pad_label_rows`, costs less than DALI's per-sample
    cast and pad operators on the CPU). Mirror and transpose are the compute device's (largefr.models.input)."""
    dali = import_dali()
    fn, types = dali.fn, dali.types
    pipe = dali.Pipeline(batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id,
                         seed=seed, prefetch_queue_depth=prefetch, exec_dynamic=True)
    with pipe:
        jpg, cls = fn.readers.webdataset(
            paths=listing.tar_paths, index_paths=listing.index_paths, ext=["jpg", "cls"],
            missing_component_behavior="error", random_shuffle=shuffle_buffer > 0,
            initial_fill=max(1, shuffle_buffer), seed=seed, name="reader",
        )
        images = fn.decoders.image(jpg, device="cpu" if device_id is None else "mixed", output_type=types.RGB)
        if decode_only:
            pipe.set_outputs(images)
        else:
            pipe.set_outputs(images, cls)
    pipe.build()
    return pipe


def write_listing(plan: EpochPlan, reader: ShardReader, q0: int, q1: int, excluded: set[int],
                  directory: Path) -> Listing:
    """Index files for rank positions [q0, q1) without the ``excluded`` ones."""
    directory.mkdir(parents=True, exist_ok=True)
    positions, tars, indexes = [], [], []
    dropped = np.fromiter(excluded, dtype=np.int64, count=len(excluded))
    for n, seg in enumerate(plan.segments(q0, q1)):
        pos = np.arange(seg.start, seg.start + len(seg.rows))
        keep = ~np.isin(pos, dropped) if len(dropped) else slice(None)
        rows, pos = seg.rows[keep], pos[keep]
        if len(rows) == 0:
            continue
        path = directory / f"part-{n:06d}.idx"
        reader.index(seg.shard).write_subset(path, rows)
        positions.append(pos)
        tars.append(str(reader.manifest.tar_path(seg.shard)))
        indexes.append(str(path))
    return Listing(np.concatenate(positions) if positions else np.zeros(0, np.int64), tars, indexes, directory)


def parse_label_batch(raw: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [B] from the ``LABEL_PAD``-padded ``.cls`` bytes [B, L]; BadBatch if any row is not a class id."""
    values, ok = parse_label_rows(raw, num_classes)
    if not ok.all():
        raise BadBatch(f"rows {np.flatnonzero(~ok).tolist()} of the batch have no valid class id")
    return values


class DecodeProbe:
    """Decodes one encoded image at a time with DALI's decoder, to find the samples a pipeline chokes on."""

    def __init__(self, device_id: int | None) -> None:
        self.device_id = device_id
        self._pipe: Any = None

    def _build(self) -> Any:
        dali = import_dali()
        pipe = dali.Pipeline(batch_size=1, num_threads=1, device_id=self.device_id, prefetch_queue_depth=1,
                             exec_async=False, exec_pipelined=False)
        with pipe:
            enc = dali.fn.external_source(name="encoded", dtype=dali.types.UINT8, ndim=1)
            device = "cpu" if self.device_id is None else "mixed"
            pipe.set_outputs(dali.fn.decoders.image(enc, device=device, output_type=dali.types.RGB))
        pipe.build()
        return pipe

    def check(self, data: bytes, image_size: tuple[int, int]) -> str:
        """'' when the image decodes to image_size, else the reason it is bad."""
        if not data:
            return "empty image"
        if self._pipe is None:
            self._pipe = self._build()
        try:
            self._pipe.feed_input("encoded", [np.frombuffer(data, dtype=np.uint8)])
            (out,) = self._pipe.run()
            shape = tuple(out.shape()[0])
        except RuntimeError as exc:
            self._pipe = None  # a pipeline that raised is not reusable
            lines = [ln for ln in str(exc).splitlines() if ln.strip()]
            return f"undecodable image ({lines[-2] if len(lines) > 1 else lines[0] if lines else 'DALI error'})"
        if shape[:2] != tuple(image_size):
            return f"image is {shape[0]}x{shape[1]}, expected {image_size[0]}x{image_size[1]}"
        return ""


@register_loader
class DaliLoader(FaceLoader):
    """See :class:`largefr.data.loader.FaceLoader`; ``config.num_threads`` DALI worker threads."""

    kind = "dali"

    def __init__(self, manifest: Manifest, config: LoaderConfig) -> None:
        import_dali()
        super().__init__(manifest, config)
        self.device_id = dali_device_id(config.device)
        self._probe = DecodeProbe(self.device_id)

    def _pipeline_seed(self, plan: EpochPlan, rebuilds: int) -> int:
        return derive_seed(self.config.seed, "dali_pipeline", plan.epoch, plan.rank, rebuilds)

    def _batches(self, plan: EpochPlan, position: int, step: int) -> Iterator[Batch]:
        c = self.config
        limit = position + (plan.steps - step) * c.batch_size + plan.block_size  # as the torch loader
        reader = ShardReader(self.manifest, max_open=4)
        tmp = Path(tempfile.mkdtemp(prefix="largefr-dali-"))
        excluded: set[int] = set()
        q, rebuilds = position, 0
        try:
            while step < plan.steps:
                listing = self._listing(plan, reader, q, step, limit, excluded, tmp / f"listing-{rebuilds}")
                if len(listing.positions) < c.batch_size:
                    corrupt = sum(1 for p in excluded if p < limit)
                    raise out_of_samples_error(c.rank, plan, corrupt, self.manifest.root)
                pipe, flips = self._pipeline(plan, listing, rebuilds)
                shutil.rmtree(listing.directory, ignore_errors=True)
                rebuilds += 1
                k = 0
                while step < plan.steps and k + c.batch_size <= len(listing.positions):
                    try:
                        images, labels = self._run(pipe)
                    except RuntimeError as exc:  # includes BadBatch
                        excluded |= self._find_bad(plan, reader, q, excluded, exc)
                        break
                    mirror = torch.from_numpy(flips(k, c.batch_size)).to(c.device, non_blocking=True)
                    end = int(listing.positions[k + c.batch_size - 1]) + 1
                    skipped = sum(1 for p in excluded if q <= p < end)
                    k, step, q = k + c.batch_size, step + 1, end
                    yield Batch(images, labels, mirror, end, skipped)
                del pipe
        finally:
            reader.close()
            shutil.rmtree(tmp, ignore_errors=True)

    def _listing(self, plan: EpochPlan, reader: ShardReader, q: int, step: int, limit: int, excluded: set[int],
                 directory: Path) -> Listing:
        """Positions from ``q`` on, enough for the remaining batches (+ one, + the shuffle buffer) after the
        exclusions, but not past ``limit``: shorter than a batch only when the rank ran out of samples."""
        c = self.config
        need = (plan.steps - step + 1) * c.batch_size + c.shuffle_buffer
        q1 = min(limit, q + need + sum(1 for p in excluded if p >= q))
        return write_listing(plan, reader, q, q1, excluded, directory)

    def _pipeline(self, plan: EpochPlan, listing: Listing, rebuilds: int) -> tuple[Any, Callable[[int, int], np.ndarray]]:
        """The pipeline over ``listing`` and its batches' mirror flags (``batch_flips``)."""
        c = self.config
        seed = self._pipeline_seed(plan, rebuilds)
        pipe = build_pipeline(listing, batch_size=c.batch_size, num_threads=c.num_threads, device_id=self.device_id,
                              prefetch=c.prefetch, seed=seed, shuffle_buffer=c.shuffle_buffer)
        return pipe, batch_flips(plan, listing, c.flip, c.shuffle_buffer, seed)

    def _run(self, pipe: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch: uint8 [B, 3, H, W] in HWC memory, int64 labels [B], both on the loader's device."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        c = self.config
        images_out, labels_out = pipe.run()
        try:
            dense = images_out.as_tensor()
        except RuntimeError as exc:
            raise BadBatch(f"images of different sizes in one batch ({exc})") from exc
        shape = tuple(dense.shape())
        if shape[1:3] != tuple(self.manifest.image_size):
            h, w = self.manifest.image_size
            raise BadBatch(f"the batch's images are {shape[1]}x{shape[2]}, the manifest says {h}x{w}")
        if self.device_id is None:
            # zero-copy: with exec_dynamic a buffer stays DALI-owned and untouched while Python holds it
            hwc = torch.from_dlpack(dense)
        else:
            hwc = torch.empty(shape, dtype=torch.uint8, device=c.device)
            feed_ndarray(dense, hwc, cuda_stream=torch.accelerator.current_stream(c.device))
        labels = parse_label_batch(pad_label_rows([np.asarray(t) for t in labels_out]), self.manifest.num_classes)
        return hwc.permute(0, 3, 1, 2), torch.from_numpy(labels).to(c.device)

    def _find_bad(self, plan: EpochPlan, reader: ShardReader, q: int, excluded: set[int],
                  error: RuntimeError) -> set[int]:
        """Probe the positions the failed pipeline may have been reading; raise if none is bad."""
        c = self.config
        window = (c.prefetch + 2) * c.batch_size + c.shuffle_buffer
        bad: set[int] = set()
        for seg in plan.segments(q, q + window + len(excluded)):
            for i, row in enumerate(seg.rows.tolist()):
                pos = seg.start + i
                if pos in excluded:
                    continue
                raw = reader.read(seg.shard, row)
                try:
                    label = parse_label(raw.label, self.manifest.num_classes)
                except LabelOutOfRange as exc:
                    raise exc.at(reader.describe(seg.shard, row)) from None
                reason = self._probe.check(raw.image, self.manifest.image_size)
                if not reason and label is None:
                    reason = f"label {raw.label[:24]!r} is not a class id in [0, {self.manifest.num_classes})"
                if reason:
                    log.warning("rank %d: skipping corrupt sample %s: %s", c.rank, reader.describe(seg.shard, row), reason)
                    bad.add(pos)
        if not bad:
            raise RuntimeError(
                f"rank {c.rank} epoch {plan.epoch}: the DALI pipeline over {self.manifest.root} failed and no "
                f"corrupt sample was found at positions [{q}, {q + window})"
            ) from error
        return bad
