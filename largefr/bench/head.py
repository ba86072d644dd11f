"""Partial FC step time against its matrix-multiply floor, and peak memory against the slice's bytes.

Spawns N local ranks. Each rank runs the head step (forward + backward + row-sparse SGD step) on random
embeddings and uniform labels; after each timed step, the same process times the three GEMMs of that
step for the same shapes (logits [N,D]x[D,K], embedding grads [N,K]x[K,D], weight grads [K,N]x[N,D]).
On the CPU, ratios are the result: the median of step / floor over the alternating pairs, and peak RSS
(taken before the floor's buffers exist) / (W slice + optimizer state). On a GPU (the device
largefr.distributed picks; world size 1 per GPU) each timing is bracketed by device synchronisations, so
the absolute times mean something, and the peak memory is the allocator's ``max_memory_allocated``
beside the memory planner's prediction for the same head (largefr.memory_plan). A configuration the
planner says does not fit in the device's free memory is skipped, one that runs out of memory anyway is
reported as such, and the other configurations still run (all in one process per rank).

Beside the GEMM floor, the same alternation times the row traffic a row-sparse step cannot avoid: each
sampled row of W and of every optimizer state read once and written once (r < 1: the gather and
scatter of those rows that the head and its optimizers use, largefr.heads.weight_store; r = 1: one
in-place pass over the slice and its state). On a machine whose memory bandwidth is low against its GEMM
rate, step / (GEMM + traffic) shows how much of the step is neither.

``--margin NAME`` (a largefr.heads.margins registry name, default arcface; ``--margin-param k=v`` for its
parameters) times that margin's head. The floor stays the plain head's three GEMMs over the sampled class
columns, so step/floor shows what a margin costs beyond them; the output also prints the margin's own
statement of its extra cost (extra passes over the logits, extra collectives, wider GEMMs) or "none".
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
from dataclasses import asdict, dataclass
from typing import Any

import torch

from largefr.bench.baselines import GemmFloor, RowTraffic, sync, timed
from largefr.bench.paired import paired_ratio
from largefr.distributed import DistContext
from largefr.distributed.spawn import run_local_ranks
from largefr.heads.margins import parse_margin_param

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    weight_dtype: str = "fp32"  # storage of W and of its optimizer state (16 bits: stochastic rounding)


@dataclass(frozen=True)
class RankResult:
    step_s: float
    floor_s: float
    ratio: float  # median over iterations of step / floor
    traffic_s: float
    ratio_with_traffic: float  # median over iterations of step / (floor + row traffic)
    ratio_with_traffic_q1: float  # its quartiles over the iterations (how far one pair can be trusted)
    ratio_with_traffic_q3: float
    peak_rss_bytes: int
    weight_bytes: int
    state_bytes: int
    sampled_rows: int
    device: str = "cpu"
    peak_device_bytes: int | None = None  # max_memory_allocated on an accelerator, None on the CPU


def planned_bytes(cfg: HeadBenchConfig) -> int:
    """The memory planner's per-rank bytes for this head (W slice, optimizer state, step buffers)."""
    from largefr.memory_plan import PlanInput, plan_memory

    from largefr.distributed.env import compute_device_type

    return plan_memory(PlanInput(cfg.num_classes, cfg.embedding_size, cfg.world_size, cfg.batch_size,
                                 cfg.sample_rate, cfg.optimizer, cfg.dtype, cfg.chunk_rows, margin=cfg.margin,
                                 margin_params=cfg.margin_params, compute_device=compute_device_type(),
                                 weight_dtype=cfg.weight_dtype)).total  # type: ignore[arg-type]


def _bench_extra_bytes(cfg: HeadBenchConfig) -> int:
    """What the floor's buffers and the row-traffic buffer add beside the head (largest rank)."""
    from largefr.memory_plan import OPTIMIZER_STATES, PlanInput, sampled_rows

    k = sampled_rows(PlanInput(cfg.num_classes, cfg.embedding_size, cfg.world_size, cfg.batch_size, cfg.sample_rate))
    n, d = cfg.batch_size * cfg.world_size, cfg.embedding_size
    size = 4 if DTYPES[cfg.dtype] is None else 2
    stored = 4 if cfg.weight_dtype == "fp32" else 2
    moved = (1 + OPTIMIZER_STATES[cfg.optimizer]) * k * d * stored if cfg.sample_rate < 1.0 else 0
    return (2 * n * k + 2 * k * d + 2 * n * d) * size + moved


def _does_not_fit(cfg: HeadBenchConfig, device: torch.device, held: int = 0) -> str:
    """'' if the planner's head bytes plus the bench's own buffers fit in the device's free memory
    (plus ``held``: the bytes of this config's W slice and state, already allocated)."""
    if device.type == "cpu" or not hasattr(torch.accelerator, "get_memory_info"):
        return ""
    free, _total = torch.accelerator.get_memory_info(device)
    free += held
    head, extra = planned_bytes(cfg), _bench_extra_bytes(cfg)
    if head + extra <= 0.97 * free:
        return ""
    return (f"does not fit: the planner predicts {head / 2**30:.1f} GiB for the head plus {extra / 2**30:.1f} GiB "
            f"of floor/traffic buffers, {free / 2**30:.1f} GiB free on {device}")


class _Heads:
    """One head (and optimizer) per class count and shape, reused by the configs that differ only in
    sample rate and autocast dtype: W's initial values do not change a step's cost, and building a
    multi-GB slice on the CPU costs far more than the steps timed on a GPU."""

    def __init__(self, ctx: DistContext) -> None:
        self.ctx, self.key, self.head, self.opt = ctx, None, None, None

    @staticmethod
    def _key(cfg: HeadBenchConfig) -> tuple[Any, ...]:
        return (cfg.num_classes, cfg.embedding_size, cfg.chunk_rows, cfg.optimizer, cfg.margin, cfg.margin_params,
                cfg.weight_dtype)

    def held_bytes(self, cfg: HeadBenchConfig) -> int:
        if self.head is None or self._key(cfg) != self.key:
            return 0
        state = self.opt.state[self.head.weight]
        return sum(t.numel() * t.element_size() for t in [self.head.weight, *state.values()])

    def release_unless(self, cfg: HeadBenchConfig) -> None:
        if self.head is not None and self._key(cfg) != self.key:
            self.key = self.head = self.opt = None
        gc.collect()
        if self.ctx.device.type != "cpu":
            torch.accelerator.empty_cache()
            torch.accelerator.reset_peak_memory_stats(self.ctx.device)

    def get(self, cfg: HeadBenchConfig) -> tuple[Any, torch.optim.Optimizer]:
        from largefr import PartialFC
        from largefr.heads.margins import build_margin

        if self.head is None:
            self.head = PartialFC(
                build_margin(cfg.margin, **dict(cfg.margin_params)), cfg.embedding_size, cfg.num_classes,
                cfg.sample_rate, self.ctx.group,
                seed=0, chunk_rows=cfg.chunk_rows, validate=False, weight_dtype=cfg.weight_dtype,
            ).to(self.ctx.device)
            hyper = {"momentum": 0.9} if cfg.optimizer == "sgd" else {}
            self.opt = self.head.optimizer(cfg.optimizer, lr=0.1, weight_decay=5e-4, **hyper)
            self.key = self._key(cfg)
        self.head.sample_rate = float(cfg.sample_rate)
        return self.head, self.opt


def _bench_rank(ctx: DistContext, cfg: HeadBenchConfig, head: Any, opt: torch.optim.Optimizer) -> RankResult:
    from largefr.heads.margin_runtime import expand_sub_center_rows

    gen = torch.Generator().manual_seed(ctx.rank)
    emb = torch.randn(cfg.batch_size, cfg.embedding_size, generator=gen).to(ctx.device).requires_grad_(True)
    # all steps' labels drawn up front: no host-to-device copy inside a timed step
    labels = iter(torch.randint(0, cfg.num_classes, (cfg.warmup + cfg.steps, cfg.batch_size), generator=gen).to(ctx.device))
    dtype = DTYPES[cfg.dtype]

    def step() -> None:
        with torch.autocast(ctx.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = head(emb, next(labels))
        loss.backward()
        opt.step()
        opt.zero_grad()
        emb.grad = None

    for _ in range(cfg.warmup):
        step()
    sync(ctx.device)
    sampled = head.sampled_class_ids.numel()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the floor's own buffers
    peak_device = None if ctx.device.type == "cpu" else torch.accelerator.max_memory_allocated(ctx.device)
    floor = GemmFloor(cfg.batch_size * ctx.world_size, sampled, cfg.embedding_size, dtype, ctx.device)
    floor()
    state = opt.state[head.weight]
    ids = None
    if cfg.sample_rate < 1.0:
        ids = expand_sub_center_rows(head.sampled_class_ids - head.class_range[0], head.sub_centers)
    traffic = RowTraffic([head.weight.detach(), *(t for t in state.values() if t.dim() == 2)], ids,
                          host_kernel=opt.steps_sampled_rows_on_host_kernel())
    # steps and floors alternate, so both see the same machine (other load, clock, cache state)
    steps, floors, moves = zip(*[
        (timed(step, ctx.group, ctx.device), timed(floor, ctx.group, ctx.device),
         timed(traffic, ctx.group, ctx.device)) for _ in range(cfg.steps)
    ])
    with_traffic = paired_ratio(steps, [b + c for b, c in zip(floors, moves)])
    return RankResult(
        step_s=statistics.median(steps),
        floor_s=statistics.median(floors),
        ratio=statistics.median(a / b for a, b in zip(steps, floors)),
        traffic_s=statistics.median(moves),
        ratio_with_traffic=with_traffic.median,
        ratio_with_traffic_q1=with_traffic.q1,
        ratio_with_traffic_q3=with_traffic.q3,
        peak_rss_bytes=peak_rss,
        weight_bytes=head.weight.numel() * head.weight.element_size(),
        state_bytes=sum(t.numel() * t.element_size() for t in state.values() if t.dim() > 0),
        sampled_rows=sampled,
        device=str(ctx.device),
        peak_device_bytes=peak_device,
    )


def _bench_rank_all(ctx: DistContext, cfgs: list[HeadBenchConfig]) -> list[RankResult | str]:
    """Every config in this process, one after the other; a reason string for one skipped or out of memory."""
    results: list[RankResult | str] = []
    heads = _Heads(ctx)
    for cfg in cfgs:
        heads.release_unless(cfg)
        reason = _does_not_fit(cfg, ctx.device, heads.held_bytes(cfg))
        if not reason:
            try:
                results.append(_bench_rank(ctx, cfg, *heads.get(cfg)))
            except torch.OutOfMemoryError as exc:  # one rank per device here: no peer left inside a collective
                reason = f"out of memory on {ctx.device}: {str(exc).splitlines()[0]}"
                heads.head = heads.opt = heads.key = None
        if reason:
            results.append(reason)
    return results


def _summary(cfg: HeadBenchConfig, ranks: list[RankResult | str]) -> dict[str, Any]:
    from largefr.heads.margins import build_margin

    margin = {"margin_params": dict(cfg.margin_params),
              "margin_extra_cost": build_margin(cfg.margin, **dict(cfg.margin_params)).extra_cost() or "none"}
    reasons = [r for r in ranks if isinstance(r, str)]
    if reasons:
        return {**asdict(cfg), **margin, "skipped": reasons[0], "planned_mb": planned_bytes(cfg) / 2**20}
    done = [r for r in ranks if isinstance(r, RankResult)]
    worst_mem = max(done, key=lambda r: r.peak_rss_bytes)
    worst_traffic = max(done, key=lambda r: r.ratio_with_traffic)  # the rank whose median ratio is reported
    slice_state = worst_mem.weight_bytes + worst_mem.state_bytes
    out = {
        **asdict(cfg),
        **margin,
        "device": done[0].device,
        "sampled_rows_per_rank": done[0].sampled_rows,
        "step_ms": 1000 * max(r.step_s for r in done),
        "floor_ms": 1000 * max(r.floor_s for r in done),
        "step_over_floor": max(r.ratio for r in done),
        "row_traffic_ms": 1000 * max(r.traffic_s for r in done),
        "step_over_floor_plus_traffic": worst_traffic.ratio_with_traffic,
        "step_over_floor_plus_traffic_quartiles": [worst_traffic.ratio_with_traffic_q1, worst_traffic.ratio_with_traffic_q3],
        "peak_rss_mb": worst_mem.peak_rss_bytes / 2**20,
        "slice_plus_state_mb": slice_state / 2**20,
        "rss_over_slice_plus_state": worst_mem.peak_rss_bytes / slice_state,
        "rss_minus_1.15x_slice_state_mb": (worst_mem.peak_rss_bytes - 1.15 * slice_state) / 2**20,
        "planned_mb": planned_bytes(cfg) / 2**20,
    }
    if done[0].peak_device_bytes is not None:
        peak = max(r.peak_device_bytes or 0 for r in done)
        out.update(max_memory_allocated_mb=peak / 2**20, allocated_over_planned=peak / planned_bytes(cfg))
    return out


def run_head_benches(cfgs: list[HeadBenchConfig]) -> list[dict[str, Any]]:
    """All configs (same world size) in one set of rank processes; one summary dict per config."""
    if len({c.world_size for c in cfgs}) != 1:
        raise ValueError(f"configs of one run share a world size, got {sorted({c.world_size for c in cfgs})}")
    world = cfgs[0].world_size
    ranks = run_local_ranks(_bench_rank_all, world, cfgs, threads_per_rank=max(1, torch.get_num_threads() // world))
    return [_summary(cfg, [r[i] for r in ranks]) for i, cfg in enumerate(cfgs)]


def run_head_bench(cfg: HeadBenchConfig) -> dict[str, Any]:
    return run_head_benches([cfg])[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-classes", type=int, nargs="+", default=[200_000])
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=128, help="per rank")
    parser.add_argument("--sample-rate", type=float, nargs="+", default=[1.0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", default=["fp32"],
                        help="autocast dtype(s) of the step (fp32: none)")
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    parser.add_argument("--weight-dtype", choices=sorted(DTYPES), nargs="+", default=["fp32"],
                        help="storage of W and its optimizer state (16 bits: stochastically rounded updates)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--chunk-rows", type=int, default=None)
    parser.add_argument("--margin", default="arcface", help="margin registry name (largefr.heads.margins.MARGINS)")
    parser.add_argument("--margin-param", action="append", default=[], metavar="K=V", type=parse_margin_param,
                        help="a margin parameter, e.g. --margin-param scale=64 (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per config")


def run(args: argparse.Namespace) -> int:
    cfgs = [
        HeadBenchConfig(num_classes, args.embedding_size, args.batch_size, rate, args.world_size, dtype,
                        args.optimizer, args.warmup, args.steps, args.chunk_rows, args.margin, tuple(args.margin_param),
                        weight_dtype)
        for num_classes in args.num_classes for weight_dtype in args.weight_dtype  # one head per (C, W dtype)
        for rate in args.sample_rate for dtype in args.dtype
    ]
    for result in run_head_benches(cfgs):
        print(json.dumps(result) if args.json else _format(result), flush=True)
    return 0


def _format(r: dict[str, Any]) -> str:
    name = (f"{r['margin']} C={r['num_classes']:,} r={r['sample_rate']} N={r['world_size']} B={r['batch_size']} "
            f"D={r['embedding_size']} {r['dtype']} {r['optimizer']} W {r['weight_dtype']}")
    if "skipped" in r:
        return f"{name}: skipped, {r['skipped']}"
    if "max_memory_allocated_mb" in r:
        memory = (f"max_memory_allocated {r['max_memory_allocated_mb']:.0f} MB = "
                  f"{r['allocated_over_planned']:.2f} x planned ({r['planned_mb']:.0f} MB)")
    else:
        memory = (f"peak RSS {r['peak_rss_mb']:.0f} MB = {r['rss_over_slice_plus_state']:.2f} x slice+state "
                  f"({r['slice_plus_state_mb']:.0f} MB)")
    q1, q3 = r["step_over_floor_plus_traffic_quartiles"]
    return (
        f"{name} on {r['device']}: K={r['sampled_rows_per_rank']:,} rows/rank  "
        f"step {r['step_ms']:.2f} ms  floor {r['floor_ms']:.2f} ms  step/floor {r['step_over_floor']:.2f}  "
        f"row traffic {r['row_traffic_ms']:.2f} ms  step/(floor+traffic) {r['step_over_floor_plus_traffic']:.2f} "
        f"(quartiles {q1:.2f}-{q3:.2f})  "
        f"{memory}  margin extra cost: {r['margin_extra_cost']}"
    )
