"""Memory-scaling sweep: peak memory per rank and step time against class count, beside the planner.

``largefr bench scale --num-classes 250000 1000000 --world-size 2 --sample-rate 0.1 --weight-dtype fp32 bf16``
runs every combination as its own point, each in freshly spawned rank processes (nothing carries over
between points; the processes exit before the next point starts). Each rank builds the head
(weight_dtype W and optimizer state, on the device or in a separate host store), runs warm-up and
timed steps (forward + backward + row-sparse SGD-momentum step on random embeddings, uniform labels),
and records:
- peak memory: peak RSS on CPU (ru_maxrss, taken before the floor's own buffers exist) minus the baseline,
  the peak RSS after the same warm-up steps of a tiny head (``WARMUP_CLASSES_PER_RANK`` classes per rank):
  what a process costs whatever the class count (interpreter, torch, process group, gloo's and the
  autograd engine's buffers, allocator arenas; ~95 MB per rank with 2 gloo ranks) is not the head's, just
  as ``max_memory_allocated``, used on an accelerator, excludes the CUDA context. RSS is a high-water mark,
  so a head smaller than the baseline reads 0. ``fixed_mb`` reports the warm-up's own increase;
- the planner's prediction for the same layout (largefr.memory_plan, head only), device + host terms;
- the step time and the fp32 GEMM floor of that step's shapes, timed alternately in the same run; the ratio
  is the median of step / floor over those pairs (largefr.bench.paired), with its quartiles, on the rank
  where it is largest.
Writes ``results.csv`` and ``results.json`` to ``--out`` and draws the PNG plots (largefr.bench.scale_plots).
"""
from __future__ import annotations

import argparse
import csv
import gc
import itertools
import json
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from largefr.bench.paired import PairedRatio, paired_ratio
from largefr.distributed import DistContext
from largefr.distributed.spawn import run_local_ranks

POINT_TIMEOUT_S = 3600.0


WARMUP_CLASSES_PER_RANK = 1000  # the tiny head whose warm-up steps set the CPU baseline

@dataclass(frozen=True)
class ScalePoint:
    num_classes: int
    world_size: int
    sample_rate: float
    weight_dtype: str  # W and momentum
    storage: str = "device"  # or "host": a separate store (host memory; a forced separate buffer on CPU)
    embedding_size: int = 512
    batch_size: int = 128
    warmup: int = 2
    steps: int = 8


@dataclass(frozen=True)
class RankMeasure:
    baseline_bytes: int
    fixed_bytes: int  # CPU: the tiny head's warm-up increase of peak RSS (not counted in peak_bytes)
    peak_bytes: int
    step_s: float
    floor_s: float
    step_over_floor: PairedRatio  # the median of step / floor over the alternating pairs, with quartiles
    sampled_rows: int


def _memory_now(device: torch.device) -> int:
    if device.type == "cpu":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return int(torch.cuda.max_memory_allocated(device))  # accelerator: bytes the allocator handed out


def _head_step(ctx: DistContext, point: ScalePoint, num_classes: int) -> tuple[Any, Callable[[], None]]:
    """The point's head at ``num_classes`` and one training step of it (random embeddings, uniform labels)."""
    from largefr import PartialFC, margins

    head = PartialFC(
        margins.ArcFace(), point.embedding_size, num_classes, point.sample_rate, ctx.group, seed=0,
        validate=False, weight_dtype=point.weight_dtype, storage_device="cpu" if point.storage == "host" else None,
    ).to(ctx.device)
    opt = head.optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(ctx.rank)
    emb = torch.randn(point.batch_size, point.embedding_size, generator=gen).to(ctx.device).requires_grad_(True)

    def step() -> None:
        labels = torch.randint(0, num_classes, (point.batch_size,), generator=gen).to(ctx.device)
        head(emb, labels).backward()
        opt.step()
        opt.zero_grad()
        emb.grad = None

    return head, step


def _fixed_costs_warmed_up(ctx: DistContext, point: ScalePoint) -> tuple[int, int]:
    """(RSS before, baseline): peak RSS before and after a tiny head's warm-up steps (CPU only)."""
    before = _memory_now(ctx.device)
    _, step = _head_step(ctx, point, WARMUP_CLASSES_PER_RANK * ctx.world_size)
    for _ in range(max(1, point.warmup)):
        step()
    del step
    gc.collect()
    return before, _memory_now(ctx.device)


def _measure_rank(ctx: DistContext, point: ScalePoint) -> RankMeasure:
    from largefr.bench.baselines import GemmFloor, timed

    before, baseline = _fixed_costs_warmed_up(ctx, point) if ctx.device.type == "cpu" else (0, 0)
    head, step = _head_step(ctx, point, point.num_classes)
    for _ in range(point.warmup):
        step()
    peak = _memory_now(ctx.device) - baseline
    sampled = head.sampled_class_ids.numel()
    floor = GemmFloor(point.batch_size * ctx.world_size, sampled, point.embedding_size, None, ctx.device)  # fp32 floor
    floor()
    steps, floors = zip(*[(timed(step, ctx.group, ctx.device), timed(floor, ctx.group, ctx.device)) for _ in range(point.steps)])
    return RankMeasure(baseline, baseline - before, peak, statistics.median(steps), statistics.median(floors),
                       paired_ratio(steps, floors), sampled)


def planned_bytes(point: ScalePoint) -> tuple[int, int]:
    """The planner's (device, host) bytes per rank for the point's head (no backbone)."""
    from largefr.distributed.env import compute_device_type
    from largefr.memory_plan import PlanInput, plan_memory

    plan = plan_memory(PlanInput(
        point.num_classes, point.embedding_size, point.world_size, point.batch_size, point.sample_rate,
        weight_dtype=point.weight_dtype, storage=point.storage, compute_device=compute_device_type(),  # type: ignore[arg-type]
    ))
    return plan.total, plan.host_total


def measure_point(point: ScalePoint) -> dict[str, Any]:
    """One sweep point in fresh rank processes (they exit before this returns)."""
    threads = max(1, torch.get_num_threads() // point.world_size)
    started = time.perf_counter()
    ranks = run_local_ranks(_measure_rank, point.world_size, point, timeout_s=POINT_TIMEOUT_S, threads_per_rank=threads)
    device_plan, host_plan = planned_bytes(point)
    worst = max(ranks, key=lambda r: r.peak_bytes)
    slowest = max(ranks, key=lambda r: r.step_over_floor.median)
    predicted = device_plan + host_plan  # on CPU, host and "device" memory are the same RSS
    return {
        **asdict(point),
        "sampled_rows_per_rank": ranks[0].sampled_rows,
        "rows_per_step": ranks[0].sampled_rows + point.batch_size * point.world_size,
        "peak_mb": worst.peak_bytes / 2**20,
        "baseline_mb": worst.baseline_bytes / 2**20,
        "fixed_mb": max(r.fixed_bytes for r in ranks) / 2**20,
        "planned_mb": predicted / 2**20,
        "planned_device_mb": device_plan / 2**20,
        "planned_host_mb": host_plan / 2**20,
        "measured_over_planned": worst.peak_bytes / predicted,
        "step_ms": 1000 * max(r.step_s for r in ranks),
        "fp32_floor_ms": 1000 * max(r.floor_s for r in ranks),
        "step_over_fp32_floor": slowest.step_over_floor.median,
        "step_over_fp32_floor_quartiles": [slowest.step_over_floor.q1, slowest.step_over_floor.q3],
        "wall_s": time.perf_counter() - started,
    }


def write_results(rows: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-classes", type=int, nargs="+", default=[250_000, 500_000])
    parser.add_argument("--world-size", type=int, nargs="+", default=[2])
    parser.add_argument("--sample-rate", type=float, nargs="+", default=[0.1])
    parser.add_argument("--weight-dtype", choices=["fp32", "bf16", "fp16"], nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--storage", choices=["device", "host"], nargs="+", default=["device"])
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=128, help="per rank")
    parser.add_argument("--steps", type=int, default=8, help="timed steps, each paired with a floor")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench-scale"), help="results.csv, results.json, *.png")
    parser.add_argument("--no-plots", action="store_true")


def run(args: argparse.Namespace) -> int:
    rows = []
    grid = itertools.product(args.weight_dtype, args.storage, args.world_size, args.sample_rate, sorted(args.num_classes))
    for dtype, storage, world, rate, classes in grid:
        point = ScalePoint(classes, world, rate, dtype, storage, args.embedding_size, args.batch_size, args.warmup, args.steps)
        row = measure_point(point)
        rows.append(row)
        q1, q3 = row["step_over_fp32_floor_quartiles"]
        write_results(rows, args.out)  # after every point: a long sweep keeps what it measured
        print(
            f"C={classes:,} N={world} r={rate} {dtype} {storage}: peak {row['peak_mb']:.0f} MB/rank, planner "
            f"{row['planned_mb']:.0f} MB ({row['measured_over_planned']:.3f}x); step {row['step_ms']:.1f} ms = "
            f"{row['step_over_fp32_floor']:.2f} x fp32 GEMM floor (quartiles {q1:.2f}-{q3:.2f}); "
            f"{row['sampled_rows_per_rank']:,} sampled rows/rank",
            flush=True,
        )
    if not args.no_plots:
        from largefr.bench.scale_plots import plot_results

        for path in plot_results(rows, args.out):
            print(f"wrote {path}")
    return 0
