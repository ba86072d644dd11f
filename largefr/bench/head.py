"""Partial FC step time against its matrix-multiply floor, and peak memory against the slice's bytes.

Spawns N local ranks. Each rank runs the head step (forward + backward + row-sparse SGD step) on random
embeddings and uniform labels; after each timed step, the same process times the three GEMMs of that
step for the same shapes (logits [N,D]x[D,K], embedding grads [N,K]x[K,D], weight grads [K,N]x[N,D]).
Ratios, not absolute times, are the result: the median of step / floor over the alternating pairs, and
peak RSS (taken before the floor's buffers exist) / (W slice + optimizer state).

Beside the GEMM floor, the same alternation times the row traffic a row-sparse step cannot avoid: each
sampled row of W and of every optimizer state read once and written once (r < 1: torch's gather and
scatter of those rows, the ops the optimizer uses; r = 1: one in-place pass over the slice and its
state). On a machine whose memory bandwidth is low against its GEMM rate, step / (GEMM + traffic) shows
how much of the step is neither.

``--margin NAME`` (a largefr.heads.margins registry name, default arcface; ``--margin-param k=v`` for its
parameters) times that margin's head. The floor stays the plain head's three GEMMs over the sampled class
columns, so step/floor shows what a margin costs beyond them; the output also prints the margin's own
statement of its extra cost (extra passes over the logits, extra collectives, wider GEMMs) or "none".
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from largefr.distributed import DistContext, barrier
from largefr.distributed.spawn import run_local_ranks

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class HeadBenchConfig:
    num_classes: int
    embedding_size: int
    batch_size: int
    sample_rate: float
    world_size: int
    dtype: str = "fp32"
    optimizer: str = "sgd"
    warmup: int = 3
    steps: int = 10
    chunk_rows: int | None = None
    margin: str = "arcface"
    margin_params: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class RankResult:
    step_s: float
    floor_s: float
    ratio: float  # median over iterations of step / floor
    traffic_s: float
    ratio_with_traffic: float  # median over iterations of step / (floor + row traffic)
    peak_rss_bytes: int
    weight_bytes: int
    state_bytes: int
    sampled_rows: int


class _GemmFloor:
    """The step's three GEMMs for the same shapes and dtype, with preallocated outputs."""

    def __init__(self, rows: int, cols: int, dim: int, dtype: torch.dtype | None) -> None:
        dt = dtype or torch.float32
        self.x, self.w = torch.randn(rows, dim, dtype=dt), torch.randn(cols, dim, dtype=dt)
        self.g = torch.randn(rows, cols, dtype=dt)
        self.logits = torch.empty(rows, cols, dtype=dt)
        self.grad_x, self.grad_w = torch.empty(rows, dim, dtype=dt), torch.empty(cols, dim, dtype=dt)

    def __call__(self) -> None:
        torch.mm(self.x, self.w.t(), out=self.logits)
        torch.mm(self.g, self.w, out=self.grad_x)
        torch.mm(self.g.t(), self.x, out=self.grad_w)


class _RowTraffic:
    """Reads and writes back, unchanged, the sampled rows of W and of each optimizer state."""

    def __init__(self, tensors: list[torch.Tensor], ids: torch.Tensor | None) -> None:
        self.tensors, self.ids = tensors, ids
        self.rows = [] if ids is None else [torch.empty(ids.numel(), t.shape[1], dtype=t.dtype, device=t.device) for t in tensors]

    @torch.no_grad()
    def __call__(self) -> None:
        if self.ids is None:
            for t in self.tensors:
                t.mul_(1.0)
            return
        for t, rows in zip(self.tensors, self.rows):
            torch.index_select(t, 0, self.ids, out=rows)
        for t, rows in zip(self.tensors, self.rows):
            t.index_copy_(0, self.ids, rows)


def _timed(fn: Any, group: Any) -> float:
    barrier(group)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _bench_rank(ctx: DistContext, cfg: HeadBenchConfig) -> RankResult:
    from largefr import PartialFC
    from largefr.heads.margin_runtime import expand_sub_center_rows
    from largefr.heads.margins import build_margin

    head = PartialFC(
        build_margin(cfg.margin, **dict(cfg.margin_params)), cfg.embedding_size, cfg.num_classes, cfg.sample_rate, ctx.group,
        seed=0, chunk_rows=cfg.chunk_rows, validate=False,
    ).to(ctx.device)
    opt = head.optimizer(cfg.optimizer, lr=0.1, weight_decay=5e-4, **({"momentum": 0.9} if cfg.optimizer == "sgd" else {}))
    gen = torch.Generator().manual_seed(ctx.rank)
    emb = torch.randn(cfg.batch_size, cfg.embedding_size, generator=gen).to(ctx.device).requires_grad_(True)
    dtype = DTYPES[cfg.dtype]

    def step() -> None:
        labels = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=gen).to(ctx.device)
        with torch.autocast(ctx.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = head(emb, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        emb.grad = None

    for _ in range(cfg.warmup):
        step()
    sampled = head.sampled_class_ids.numel()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the floor's own buffers
    floor = _GemmFloor(cfg.batch_size * ctx.world_size, sampled, cfg.embedding_size, dtype)
    floor()
    state = opt.state[head.weight]
    ids = None
    if cfg.sample_rate < 1.0:
        ids = expand_sub_center_rows(head.sampled_class_ids - head.class_range[0], head.sub_centers)
    traffic = _RowTraffic([head.weight.detach(), *(t for t in state.values() if t.dim() == 2)], ids)
    # steps and floors alternate, so both see the same machine (other load, clock, cache state)
    steps, floors, moves = zip(*[
        (_timed(step, ctx.group), _timed(floor, ctx.group), _timed(traffic, ctx.group)) for _ in range(cfg.steps)
    ])
    return RankResult(
        step_s=statistics.median(steps),
        floor_s=statistics.median(floors),
        ratio=statistics.median(a / b for a, b in zip(steps, floors)),
        traffic_s=statistics.median(moves),
        ratio_with_traffic=statistics.median(a / (b + c) for a, b, c in zip(steps, floors, moves)),
        peak_rss_bytes=peak_rss,
        weight_bytes=head.weight.numel() * head.weight.element_size(),
        state_bytes=sum(t.numel() * t.element_size() for t in state.values() if t.dim() > 0),
        sampled_rows=sampled,
    )


def run_head_bench(cfg: HeadBenchConfig) -> dict[str, Any]:
    from largefr.heads.margins import build_margin

    extra_cost = build_margin(cfg.margin, **dict(cfg.margin_params)).extra_cost() or "none"
    ranks = run_local_ranks(_bench_rank, cfg.world_size, cfg, threads_per_rank=max(1, torch.get_num_threads() // cfg.world_size))
    step_s = max(r.step_s for r in ranks)
    floor_s = max(r.floor_s for r in ranks)
    ratio = max(r.ratio for r in ranks)
    worst_mem = max(ranks, key=lambda r: r.peak_rss_bytes)
    slice_state = worst_mem.weight_bytes + worst_mem.state_bytes
    return {
        **asdict(cfg),
        "margin_params": dict(cfg.margin_params),
        "margin_extra_cost": extra_cost,
        "sampled_rows_per_rank": ranks[0].sampled_rows,
        "step_ms": 1000 * step_s,
        "floor_ms": 1000 * floor_s,
        "step_over_floor": ratio,
        "row_traffic_ms": 1000 * max(r.traffic_s for r in ranks),
        "step_over_floor_plus_traffic": max(r.ratio_with_traffic for r in ranks),
        "peak_rss_mb": worst_mem.peak_rss_bytes / 2**20,
        "slice_plus_state_mb": slice_state / 2**20,
        "rss_over_slice_plus_state": worst_mem.peak_rss_bytes / slice_state,
        "rss_minus_1.15x_slice_state_mb": (worst_mem.peak_rss_bytes - 1.15 * slice_state) / 2**20,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-classes", type=int, nargs="+", default=[200_000])
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=128, help="per rank")
    parser.add_argument("--sample-rate", type=float, nargs="+", default=[1.0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--chunk-rows", type=int, default=None)
    parser.add_argument("--margin", default="arcface", help="margin registry name (largefr.heads.margins.MARGINS)")
    parser.add_argument("--margin-param", action="append", default=[], metavar="K=V", type=_margin_param,
                        help="a margin parameter, e.g. --margin-param scale=64 (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per config")


def _margin_param(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected K=V (e.g. scale=64), got {text!r}")
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"margin parameter {key} must be a number, got {value!r}") from None
    return key, int(number) if number.is_integer() and key == "sub_centers" else number


def run(args: argparse.Namespace) -> int:
    for num_classes in args.num_classes:
        for rate in args.sample_rate:
            cfg = HeadBenchConfig(
                num_classes, args.embedding_size, args.batch_size, rate, args.world_size, args.dtype,
                args.optimizer, args.warmup, args.steps, args.chunk_rows, args.margin, tuple(args.margin_param),
            )
            result = run_head_bench(cfg)
            print(json.dumps(result) if args.json else _format(result), flush=True)
    return 0


def _format(r: dict[str, Any]) -> str:
    return (
        f"{r['margin']} C={r['num_classes']:,} r={r['sample_rate']} N={r['world_size']} B={r['batch_size']} "
        f"D={r['embedding_size']} {r['dtype']} {r['optimizer']}: K={r['sampled_rows_per_rank']:,} rows/rank  "
        f"step {r['step_ms']:.1f} ms  floor {r['floor_ms']:.1f} ms  step/floor {r['step_over_floor']:.2f}  "
        f"row traffic {r['row_traffic_ms']:.1f} ms  step/(floor+traffic) {r['step_over_floor_plus_traffic']:.2f}  "
        f"peak RSS {r['peak_rss_mb']:.0f} MB = {r['rss_over_slice_plus_state']:.2f} x slice+state "
        f"({r['slice_plus_state_mb']:.0f} MB)  margin extra cost: {r['margin_extra_cost']}"
    )
