"""``largefr plan``: the memory planner's command line (plan, --max-classes search, --dry-run)."""
from __future__ import annotations

import argparse
import dataclasses

from largefr.heads.margins import parse_margin_param
from largefr.memory_plan import (
    DTYPE_BYTES, OPTIMIZER_STATES, MemoryPlan, PlanInput, largest_slice, format_bytes, max_classes, parse_bytes,
    plan_memory, sampled_rows,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-classes", type=int, default=None, help="required unless --max-classes")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128, help="per rank")
    parser.add_argument("--sample-rate", type=float, default=1.0)
    parser.add_argument("--head-optimizer", choices=sorted(OPTIMIZER_STATES), default="sgd")
    parser.add_argument("--backbone-optimizer", choices=sorted(OPTIMIZER_STATES), default="sgd")
    parser.add_argument("--precision", choices=sorted(DTYPE_BYTES), default="fp32", help="autocast of the step")
    parser.add_argument("--weight-dtype", choices=sorted(DTYPE_BYTES), default="fp32", help="storage of W")
    parser.add_argument("--state-dtype", choices=sorted(DTYPE_BYTES), default=None, help="head optimizer state (default: W's)")
    parser.add_argument("--storage", choices=["device", "host"], default="device", help="where W and its state live")
    parser.add_argument("--chunk-rows", type=int, default=None)
    parser.add_argument("--margin", default="arcface",
                        help="margin registry name: sub-centres (subcenter_arcface) and a non-target transform "
                             "(curricularface, interclass_filter) add buffers")
    parser.add_argument("--margin-param", action="append", default=[], metavar="K=V", type=parse_margin_param,
                        help="a margin parameter, e.g. --margin-param sub_centers=3 (repeatable)")
    parser.add_argument("--compute-device", choices=["cuda", "cpu"], default="cuda",
                        help="where the step runs: sizes the head's row blocks (default cuda)")
    parser.add_argument("--center-loss", action="store_true", help="a centre-loss term beside the head (fp32 centres)")
    parser.add_argument("--backbone", default=None, help="e.g. iresnet100 (adds parameters and activations)")
    parser.add_argument("--max-classes", action="store_true", help="print the largest class count that fits --device-memory")
    parser.add_argument("--device-memory", type=parse_bytes, default=None, help="per rank, e.g. 32GiB (with --max-classes)")
    parser.add_argument("--host-memory", type=parse_bytes, default=None,
                        help="host memory per rank for host-resident W, e.g. 256GiB (with --max-classes)")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the real head, its optimizer and the backbone on meta tensors with a fake process "
                             "group and run one step; print per-rank shapes and bytes")


def input_from_args(args: argparse.Namespace, num_classes: int) -> PlanInput:
    return PlanInput(
        num_classes, args.embedding_size, args.world_size, args.batch_size, args.sample_rate,
        args.head_optimizer, args.precision, args.chunk_rows, args.backbone, args.backbone_optimizer,
        weight_dtype=args.weight_dtype, state_dtype=args.state_dtype, storage=args.storage,
        margin=args.margin, margin_params=tuple(args.margin_param), center_loss=args.center_loss,
        compute_device=args.compute_device,
    )


def run(args: argparse.Namespace) -> int:
    if args.max_classes:
        if args.device_memory is None:
            raise SystemExit("--max-classes needs --device-memory (e.g. 32GiB)")
        try:
            template = input_from_args(args, max(args.world_size, 1))
            best = max_classes(template, args.device_memory, args.host_memory)
        except ValueError as exc:
            raise SystemExit(f"largefr plan: {exc}") from None
        print(f"largest class count that fits {format_bytes(args.device_memory)} per rank on {args.world_size} ranks: {best:,}"
              f" ({binding_limit(template, best, args.device_memory, args.host_memory)})")
        args.num_classes = best
    if args.num_classes is None:
        raise SystemExit("give --num-classes, or --max-classes with --device-memory")
    try:
        inp = input_from_args(args, args.num_classes)
        if args.dry_run:
            from largefr.plan_dry_run import run_dry

            run_dry(inp)
        else:
            print_plan(inp, plan_memory(inp))
    except ValueError as exc:  # a layout that cannot exist (e.g. fewer classes than ranks)
        raise SystemExit(f"largefr plan: {exc}") from None
    return 0


def binding_limit(template: PlanInput, best: int, device_bytes: int, host_bytes: int | None) -> str:
    """Which memory one more class would overflow (device, host or both), with the plan's bytes there."""
    over = plan_memory(dataclasses.replace(template, num_classes=best + 1))
    limits = [f"device memory ({over.total - device_bytes:,} B over)"] if over.total > device_bytes else []
    if host_bytes is not None and over.host_total > host_bytes:
        limits.append(f"host memory ({over.host_total - host_bytes:,} B over)")
    return "bound by " + " and ".join(limits) + f" at {best + 1:,} classes"


def print_plan(inp: PlanInput, plan: MemoryPlan) -> None:
    width = max(len(k) for k in (*plan.terms, *plan.host_terms))
    print(f"per-rank memory, {inp.num_classes:,} classes on {inp.world_size} ranks "
          f"({largest_slice(inp):,} classes on the largest), {sampled_rows(inp):,} sampled classes per step"
          f"{f' x {inp.sub_centers} sub-centres' if inp.sub_centers > 1 else ''}; "
          f"W {inp.weight_dtype}, head state {inp.head_state_dtype}, storage {inp.storage}")
    for name, size in plan.terms.items():
        print(f"  {name.ljust(width)}  {size / 2**30:9.3f} GiB")
    print(f"  {'total (device)'.ljust(width)}  {plan.total / 2**30:9.3f} GiB")
    for name, size in plan.host_terms.items():
        print(f"  {('host: ' + name).ljust(width)}  {size / 2**30:9.3f} GiB")
    if plan.host_terms:
        print(f"  {'total (host, per rank)'.ljust(width)}  {plan.host_total / 2**30:9.3f} GiB "
              f"(x {inp.world_size} ranks = {plan.host_total * inp.world_size / 2**40:.3f} TiB)")
    for note in plan.notes:
        print(f"  note: {note}")
