"""Training images/s with the real loader against the same steps on batches already in memory.

One process (world size 1, the device largefr.distributed picks), the recipe's backbone, head, precision
and loader. Measurements alternate, ``--repeats`` times: ``--steps`` optimizer steps fed by the loader,
then ``--steps`` steps cycling through batches taken from that loader once and kept on the device
(the step's input is the loaders' uint8 batch and mirror flags in both; mirroring and normalisation on
the device are part of the step). Each measurement starts with ``--warmup`` untimed steps, which also
drain whatever the loader prefetched meanwhile (keep it above the loader's prefetch depth).
``loader_over_memory`` is the median over the pairs of (images/s with the loader / images/s from memory
right after it), with its quartiles (largefr.bench.paired: adjacent pairs cancel the machine's drift);
1 - that is the share of training throughput the loader costs.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from largefr.bench.paired import paired_ratio
from largefr.data.loader import LoadedBatch

Batches = Iterator[LoadedBatch]


@dataclass(frozen=True)
class TrainBenchResult:
    config: str
    device: str
    loader: str
    workers: int
    precision: str
    batch_size: int
    steps: int
    repeats: int
    loader_images_per_s: float  # medians over the repeats
    memory_images_per_s: float
    loader_over_memory: float  # median of the pair ratios
    ratio_q1: float
    ratio_q3: float


def endless(loader: Any) -> Batches:
    """The loader's batches over consecutive epochs."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def timed_steps(parts: Any, batches: Batches, steps: int, warmup: int, accum: int) -> float:
    """Images/s over ``steps`` optimizer steps after ``warmup`` untimed ones (device synced at both ends)."""
    from largefr.train.step import train_step

    for _ in range(warmup):
        train_step(parts, [next(batches) for _ in range(accum)])
    result = train_step(parts, [next(batches) for _ in range(accum)])
    float(result.loss)  # host sync: the warm-up's work is done
    start = time.perf_counter()
    for _ in range(steps):
        result = train_step(parts, [next(batches) for _ in range(accum)])
    float(result.loss)
    seconds = time.perf_counter() - start
    return steps * accum * parts.cfg.train.batch_size / seconds


def run_bench(config: Path, overrides: list[str], steps: int, warmup: int, repeats: int,
              in_memory: int) -> TrainBenchResult:
    from largefr.config import load_config
    from largefr.distributed import free_port, init_distributed, shutdown
    from largefr.train.build import build_parts, build_train_loader, resolve_dataset, steps_per_epoch

    cfg, manifest = resolve_dataset(load_config(config, overrides))
    ctx = init_distributed(0, 1, f"tcp://127.0.0.1:{free_port()}")
    try:
        loader = build_train_loader(cfg, ctx, manifest)
        parts = build_parts(cfg, ctx, steps_per_epoch(loader, cfg.train.grad_accum))
        parts.ddp.train()
        parts.head.train()
        accum = cfg.train.grad_accum
        source = endless(loader)
        kept = [LoadedBatch(*(t.clone() for t in batch)) for batch in itertools.islice(source, in_memory * accum)]
        real, memory = [], []
        for _ in range(repeats):
            real.append(timed_steps(parts, source, steps, warmup, accum))
            memory.append(timed_steps(parts, itertools.cycle(kept), steps, warmup, accum))
        source.close()
    finally:
        shutdown()
    ratio = paired_ratio(real, memory)
    return TrainBenchResult(str(config), str(ctx.device), cfg.data.loader, cfg.data.num_workers, cfg.train.precision,
                            cfg.train.batch_size, steps, repeats, round(statistics.median(real), 1),
                            round(statistics.median(memory), 1), round(ratio.median, 3), round(ratio.q1, 3),
                            round(ratio.q3, 3))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, nargs="?", default=Path("configs/synthetic_cpu.yaml"),
                        help="training recipe (default: the CPU demo's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE",
                        help="override a config field, e.g. --set data.path=/data/synth (repeatable)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per measurement")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps before each measurement")
    parser.add_argument("--repeats", type=int, default=12,
                        help="alternating (loader, memory) pairs; the median pair ratio is reported")
    parser.add_argument("--in-memory", type=int, default=16, help="distinct batches kept for the in-memory steps")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")


def run(args: argparse.Namespace) -> int:
    for name in ("steps", "repeats", "in_memory"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    result = run_bench(args.config, args.overrides, args.steps, args.warmup, args.repeats, args.in_memory)
    print(json.dumps(asdict(result)) if args.json else _format(asdict(result)), flush=True)
    return 0


def _format(r: dict[str, Any]) -> str:
    return (f"{r['config']} on {r['device']} ({r['precision']}, batch {r['batch_size']}, {r['loader']} loader, "
            f"{r['workers']} workers): {r['loader_images_per_s']:.1f} images/s with the loader, "
            f"{r['memory_images_per_s']:.1f} from memory (medians), ratio {r['loader_over_memory']:.3f} per pair "
            f"(quartiles {r['ratio_q1']:.3f}-{r['ratio_q3']:.3f} over {r['repeats']} pairs; "
            f"loader cost {100 * (1 - r['loader_over_memory']):.1f}%)")
