"""Which loss trains best here: the CPU demo recipe trained with each member of the loss family.

Every member trains configs/synthetic_cpu.yaml (iresnet18 width 8, bf16, AdamW, 16 images per rank) -- the
pair losses and the centre loss through its variants configs/synthetic_cpu_{contrastive,triplet,center}.yaml,
the margins through ``head.margin`` overrides -- for
the same number of steps, hence the same number of images, on ``--world-size`` gloo ranks, from the same
seeded backbone; only the loss (and, for the pair losses, the P x K sampler) differs. The table gives
the 10-fold verification accuracy on the held-out synthetic identities (``verification.bin``) next to
the untrained network's, the training images/s (as logged, verification and checkpoints excluded) and
the final logged loss. Without ``--data`` the demo's dataset (800 identities x 12 images, 100 held-out
identities, 600 pairs) is written to ``<out>/synthetic`` first (kept for later runs).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEMO = "synthetic_cpu.yaml"


@dataclass(frozen=True)
class Member:
    """A recipe of configs/ (the demo or one of its loss variants) and overrides of its head margin."""

    recipe: str
    overrides: tuple[str, ...] = ()


def _margin(name: str, params: str) -> Member:
    return Member(DEMO, (f"head.margin={name}", f"head.margin_params={params}"))


MEMBERS: dict[str, Member] = {
    "softmax": _margin("softmax", "{}"),
    "normface": _margin("normface", "{scale: 32.0}"),
    "lsoftmax": _margin("lsoftmax", "{margin: 2, lambda_base: 1000.0, lambda_min: 5.0, gamma: 0.12, power: 1.0}"),
    "sphereface": _margin("sphereface", "{margin: 4, lambda_base: 1000.0, lambda_min: 5.0, gamma: 0.12, power: 1.0}"),
    "cosface": Member(DEMO),  # the demo's own margin: s = 32, m = 0.25
    "arcface": _margin("arcface", "{scale: 32.0, margin: 0.3}"),
    "combined": _margin("combined", "{scale: 32.0, m1: 1.0, m2: 0.2, m3: 0.1}"),
    "contrastive": Member("synthetic_cpu_contrastive.yaml"),
    "triplet": Member("synthetic_cpu_triplet.yaml"),
    "softmax+center": Member("synthetic_cpu_center.yaml"),
    # the modern margins at the papers' parameters, with the demo's scale 32 and margins sized like arcface's
    "curricularface": _margin("curricularface", "{scale: 32.0, margin: 0.3}"),
    "adaface": _margin("adaface", "{scale: 32.0, margin: 0.3, h: 0.333}"),
    "magface": _margin("magface", "{scale: 32.0}"),
    "subcenter_arcface": _margin("subcenter_arcface", "{scale: 32.0, margin: 0.3, sub_centers: 3}"),
    "elastic_arcface": _margin("elastic_arcface", "{scale: 32.0, margin: 0.3, sigma: 0.05}"),
    "elastic_cosface": _margin("elastic_cosface", "{scale: 32.0, margin: 0.25, sigma: 0.05}"),
}


@dataclass(frozen=True)
class LossBenchRow:
    member: str
    steps: int
    images: int
    accuracy: float
    gain: float  # accuracy - untrained accuracy
    images_per_s: float
    final_loss: float
    seconds: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=900, help="optimizer steps per member (the demo: 900)")
    parser.add_argument("--world-size", type=int, default=2, help="gloo ranks (the demo: 2)")
    parser.add_argument("--members", default=",".join(MEMBERS), help=f"comma-separated subset of {list(MEMBERS)}")
    parser.add_argument("--data", type=Path, default=None, help="dataset dir with verification.bin (default: write one)")
    parser.add_argument("--out", type=Path, default=Path("bench_out/losses"), help="runs and dataset go here")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every member, e.g. train.precision=fp32 on a CPU "
                             "without native bf16 (repeatable)")


def run(args: argparse.Namespace) -> int:
    members = [m.strip() for m in args.members.split(",") if m.strip()]
    unknown = [m for m in members if m not in MEMBERS]
    if unknown or not members:
        raise SystemExit(f"largefr bench losses: unknown members {unknown}; expected a subset of {list(MEMBERS)}")
    if args.steps < 1 or not 1 <= args.world_size <= 64:
        raise SystemExit(f"largefr bench losses: --steps must be >= 1 and --world-size in [1, 64], got "
                         f"{args.steps} and {args.world_size}")
    data = args.data if args.data is not None else ensure_demo_dataset(args.out / "synthetic")
    bin_path = data / "verification.bin"
    if not bin_path.is_file():
        raise SystemExit(f"largefr bench losses: {bin_path} not found (write it with largefr synth --holdout)")
    untrained = untrained_accuracy(data, bin_path)
    print(f"untrained network: verification accuracy {untrained:.3f}", flush=True)
    rows = []
    for member in members:
        rows.append(train_member(member, data, bin_path, args.out / member, args.steps, args.world_size, untrained,
                                 tuple(args.extra)))
        print(f"{member}: accuracy {rows[-1].accuracy:.3f} ({rows[-1].seconds:.0f} s)", flush=True)
    print(format_table(rows, untrained))
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


def ensure_demo_dataset(out: Path) -> Path:
    from largefr.data.synth import SynthSpec
    from largefr.data.synth_dataset import write_synthetic_dataset

    if not (out / "manifest.json").is_file() or not (out / "verification.bin").is_file():
        write_synthetic_dataset(out, SynthSpec(800, 12, 0, 100, 600), workers=2, progress=False)
    return out


def member_overrides(member: str, data: Path, out: Path, steps: int, extra: tuple[str, ...] = ()) -> list[str]:
    """The bench's settings over the member's recipe: data, output, length (warmup: the demo's 30 steps,
    at most a tenth of the run), no verification or checkpoints before the end; then the user's ``extra``."""
    return [f"data.path={data}", f"output_dir={out}", f"schedule.total_steps={steps}",
            f"schedule.warmup_steps={min(30, steps // 10)}", f"train.log_every={min(25, steps)}",
            "train.eval_bins=[]", f"checkpoint.every_steps={steps}", "logging.console=false",
            *MEMBERS[member].overrides, *extra]


def member_config(member: str, overrides: list[str]) -> Any:
    from largefr.config import load_config

    return load_config(CONFIGS / MEMBERS[member].recipe, overrides)


def accuracy_of(model: Any, bin_path: Path, image_size: int) -> float:
    from largefr.eval.bin_io import load_bin
    from largefr.eval.embed import embed_images
    from largefr.eval.verification import verify_interleaved

    vb = load_bin(bin_path)
    emb = embed_images(model, vb.images, image_size, batch_size=64, workers=2)
    return float(verify_interleaved(emb, vb.issame)["accuracy_mean"])


def untrained_accuracy(data: Path, bin_path: Path) -> float:
    from largefr.config import load_config
    from largefr.train.build import seeded_backbone

    cfg = load_config(CONFIGS / DEMO, [f"data.path={data}"])
    return accuracy_of(seeded_backbone(cfg), bin_path, cfg.data.image_size)


def torchrun_command(recipe: Path, overrides: list[str], world: int) -> list[str]:
    """The demo's launch: torchrun on one node, ``world`` CPU ranks (gloo), loader worker processes allowed."""
    sets = [arg for value in overrides for arg in ("--set", value)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node",
            str(world), "-m", "largefr", "train", str(recipe), "--resume", "none", *sets]


def train_member(member: str, data: Path, bin_path: Path, out: Path, steps: int, world: int,
                 untrained: float, extra: tuple[str, ...] = ()) -> LossBenchRow:
    from largefr.backbone_file import load_backbone_from_checkpoint
    from largefr.train.checkpoint import latest_checkpoint

    overrides = member_overrides(member, data, out, steps, extra)
    cfg = member_config(member, overrides)  # a bad member recipe fails here, before any rank starts
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    log_path = out.parent / f"{member}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        done = subprocess.run(torchrun_command(CONFIGS / MEMBERS[member].recipe, overrides, world), stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"member {member}: training failed (exit {done.returncode}), see {log_path}")
    seconds = time.perf_counter() - started
    checkpoint = latest_checkpoint(cfg.checkpoint_dir)
    if checkpoint is None:
        raise RuntimeError(f"member {member}: no checkpoint in {cfg.checkpoint_dir}")
    accuracy = accuracy_of(load_backbone_from_checkpoint(checkpoint), bin_path, cfg.data.image_size)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [m["images_per_s"] for m in logged if "images_per_s" in m]
    losses = [m["loss"] for m in logged if "loss" in m]
    images = steps * world * cfg.train.batch_size
    return LossBenchRow(member, steps, images, accuracy, accuracy - untrained,
                        sum(rates) / len(rates) if rates else float("nan"), losses[-1] if losses else float("nan"),
                        seconds)


def format_table(rows: list[LossBenchRow], untrained: float) -> str:
    lines = [f"untrained: {untrained:.3f}",
             f"{'loss':<16} {'steps':>6} {'images':>8} {'verif acc':>9} {'gain':>7} {'images/s':>9} {'final loss':>10}"]
    for r in rows:
        lines.append(f"{r.member:<16} {r.steps:>6} {r.images:>8} {r.accuracy:>9.3f} {r.gain:>+7.3f} "
                     f"{r.images_per_s:>9.1f} {r.final_loss:>10.4f}")
    return "\n".join(lines)
