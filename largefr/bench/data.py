"""Data loader throughput: train-ready images/s against the decode-only images/s of the same shards.

In one run, on the same shards and thread count, alternately times (a) reading + decoding only
(DALI: reader + decoder pipeline, outputs dropped; torch: DataLoader workers reading + PIL-decoding)
and (b) the full loader up to train-ready: what the training step takes, the uint8 [B, 3, H, W] batch
(the decoders' HWC memory) with its mirror flags and parsed labels, all on the device. The ratio
train-ready / decode-only is the loader's overhead (paired, see below).
Mirroring, the transpose to NCHW and the float conversion are the step's own, on the compute device
(largefr.models.input); their time per batch on the bench's device is reported beside the ratio
(``step_input_ms``), so that on a CPU, where the step and the loader share cores, nothing is hidden.
The ratio is the median over the ``--repeats`` pairs of (train-ready / the decode-only measured just
before it), with its quartiles (largefr.bench.paired); the rates are medians.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from largefr.bench.paired import paired_ratio
from largefr.data.loader import FaceLoader, LoadedBatch
from largefr.data.loader_factory import build_loader
from largefr.data.manifest import Manifest, read_manifest
from largefr.data.epoch_order import EpochPlan


@dataclass(frozen=True)
class DataBenchResult:
    loader: str
    threads: int
    batch_size: int
    batches: int
    device: str
    num_samples: int
    images_per_s: float
    decode_only_images_per_s: float
    ratio: float  # median of the pair ratios
    ratio_q1: float
    ratio_q3: float
    step_input_ms: float  # the step's mirror + transpose + normalise of one batch on the device (median)


def _plan(manifest: Manifest, batch_size: int) -> EpochPlan:
    return EpochPlan(tuple(manifest.shard_counts), 0, 0, 0, 1, batch_size)


def decode_only_dali(manifest: Manifest, batch_size: int, threads: int, device: torch.device,
                     batches: int, warmup: int) -> float:
    from largefr.data.dali_loader import build_pipeline, dali_device_id, write_listing
    from largefr.data.samples import ShardReader

    plan = _plan(manifest, batch_size)
    tmp = Path(tempfile.mkdtemp(prefix="largefr-bench-"))
    reader = ShardReader(manifest)
    try:
        listing = write_listing(plan, reader, 0, plan.block_size, set(), tmp)
        pipe = build_pipeline(listing, batch_size=batch_size, num_threads=threads, device_id=dali_device_id(device),
                              prefetch=2, seed=1, decode_only=True)
        for _ in range(warmup):
            pipe.run()
        start = time.perf_counter()
        for _ in range(batches):
            (images,) = pipe.run()
        if device.type != "cpu":
            images.as_cpu()  # waits for the last batch's decoding
        seconds = time.perf_counter() - start
        del pipe
    finally:
        reader.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return batches * batch_size / seconds


def decode_only_torch(manifest: Manifest, batch_size: int, threads: int, batches: int, warmup: int) -> float:
    from largefr.data.torch_loader import ChunkStream, make_dataloader

    plan = _plan(manifest, batch_size)
    stream = ChunkStream(manifest, plan, 0, (warmup + batches) * batch_size, batch_size, flip=False, decode_only=True)
    count, start = 0, 0.0
    for i, chunk in enumerate(make_dataloader(stream, threads, 2, pin=False)):
        if i == warmup:
            start = time.perf_counter()
        if i >= warmup:
            count += chunk.decoded
    return count / (time.perf_counter() - start)


def train_ready(loader: FaceLoader, batches: int, warmup: int) -> tuple[float, LoadedBatch]:
    """Train-ready images/s, and the last batch."""
    count, start, seen = 0, 0.0, 0
    epoch = 0
    while seen < warmup + batches:
        loader.set_epoch(epoch)
        for batch in loader:
            images = batch.images
            if seen == warmup:
                start = time.perf_counter()
            if seen >= warmup:
                count += images.shape[0]
            seen += 1
            if seen >= warmup + batches:
                break
        epoch += 1
    if images.device.type != "cpu":
        images.sum().item()  # waits for the device
    return count / (time.perf_counter() - start), batch


def step_input_ms(batch: LoadedBatch, repeats: int = 9) -> float:
    """Median ms of the training step's input conversion (mirror, NCHW, float32) of ``batch``."""
    from largefr.models.input import InputBuffer

    inputs = InputBuffer(batch.images.device)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        inputs(batch.images, batch.mirror).sum().item()  # .item(): waits for the device; the sum is ~1 pass
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[1:])


def run_bench(source: str, loader_kind: str, threads: int, batch_size: int, batches: int, warmup: int,
              repeats: int, device: torch.device) -> DataBenchResult:
    manifest = read_manifest(source)
    loader = build_loader(manifest, batch_size=batch_size, kind=loader_kind, num_threads=threads, device=device)
    decode, ready = [], []
    for _ in range(repeats):
        if loader_kind == "dali":
            decode.append(decode_only_dali(manifest, batch_size, threads, device, batches, warmup))
        else:
            decode.append(decode_only_torch(manifest, batch_size, threads, batches, warmup))
        rate, last = train_ready(loader, batches, warmup)
        ready.append(rate)
    ratio = paired_ratio(ready, decode)
    return DataBenchResult(loader_kind, threads, batch_size, batches, str(device), manifest.num_samples,
                           round(statistics.median(ready), 1), round(statistics.median(decode), 1),
                           round(ratio.median, 3), round(ratio.q1, 3), round(ratio.q3, 3), round(step_input_ms(last), 2))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, help="dataset directory (manifest.json + shards)")
    parser.add_argument("--loader", choices=("dali", "torch"), default="dali")
    parser.add_argument("--threads", type=int, default=2, help="DALI threads / torch DataLoader workers")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=30, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches before each measurement")
    parser.add_argument("--repeats", type=int, default=5,
                        help="alternating (decode-only, train-ready) pairs; the median pair ratio is reported")
    parser.add_argument("--device", default=None, help="torch device (default: the one largefr.distributed picks)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")


def _device(name: str | None) -> torch.device:
    if name is not None:
        return torch.device(name)
    from largefr.distributed import choose_backend_and_device

    return choose_backend_and_device(0)[1]


def run(args: argparse.Namespace) -> int:
    for name in ("threads", "batch_size", "batches", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    result = run_bench(args.source, args.loader, args.threads, args.batch_size, args.batches, args.warmup,
                       args.repeats, _device(args.device))
    if args.json:
        print(json.dumps(asdict(result)), flush=True)
    else:
        print(_format(asdict(result)), flush=True)
    return 0


def _format(r: dict[str, Any]) -> str:
    return (f"{r['loader']} loader, {r['threads']} threads, batch {r['batch_size']} on {r['device']}: "
            f"{r['images_per_s']:.0f} train-ready images/s, {r['decode_only_images_per_s']:.0f} decode-only images/s, "
            f"ratio {r['ratio']:.2f} per pair (quartiles {r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}); the step's mirror + normalise of one batch: {r['step_input_ms']:.1f} ms")
