"""``largefr eval``: 10-fold verification of a checkpoint on insightface .bin sets, with flip test.

The protocol (``--protocol``, default insightface's; see :mod:`largefr.eval.verification`) is named in
the printed table and in each set's entry of ``results.json``, with the threshold's unit.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from largefr.eval.verification import DEFAULT_FARS, PROTOCOLS


@dataclass(frozen=True)
class SetResult:
    name: str
    metrics: dict[str, Any]
    images_per_s: float
    roc_png: Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="directory with backbone.pt and meta.json")
    parser.add_argument("--bins", required=True, nargs="+", type=Path, help="verification .bin files (lfw.bin ...)")
    parser.add_argument(
        "--out-dir", type=Path, default=Path("eval_out"), help="where roc_<set>.png and results.json go"
    )
    parser.add_argument("--batch-size", type=int, default=128, help="images per forward (doubled by the flip test)")
    parser.add_argument("--workers", type=int, default=4, help="JPEG decoding threads")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when available, else CPU) or a torch device")
    parser.add_argument("--folds", type=int, default=10, help="cross-validation folds")
    parser.add_argument("--no-flip", action="store_true", help="embed images only, without their mirror")
    parser.add_argument(
        "--protocol", choices=PROTOCOLS, default="insightface",
        help="threshold search: 'insightface' (squared L2 distance, grid 0:4:0.01, first best threshold; the "
        "published numbers' protocol, with VAL@FAR) or 'exact' (cosine, exact max-margin search)",
    )


def _device(name: str) -> torch.device:
    if name == "auto":
        from largefr.distributed.env import choose_backend_and_device

        return choose_backend_and_device(0)[1]
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device; expected 'auto', 'cpu', 'cuda:0', ...") from None


def evaluate_bin(
    model: torch.nn.Module, bin_path: Path, image_size: int, args: argparse.Namespace, device: torch.device
) -> SetResult:
    from largefr.eval.bin_io import load_bin
    from largefr.eval.embed import embed_images
    from largefr.eval.plots import plot_roc
    from largefr.eval.verification import verify_interleaved

    vb = load_bin(bin_path)
    start = time.perf_counter()
    emb = embed_images(
        model, vb.images, image_size, args.batch_size, args.workers, device, flip=not args.no_flip
    )
    rate = len(vb.images) / (time.perf_counter() - start)
    metrics = verify_interleaved(emb, vb.issame, folds=args.folds, protocol=args.protocol)
    png = plot_roc({vb.name: (metrics["fpr"], metrics["tpr"])}, args.out_dir / f"roc_{vb.name}.png", f"ROC {vb.name}")
    return SetResult(vb.name, metrics, rate, png)


_UNIT_SHORT = {"squared_l2": "d2", "cosine": "cos"}


def _val_cell(m: dict[str, Any], far: float) -> str:
    val = m.get("val_at_far", {}).get(far)
    return "-" if val is None else f"{val['val']:.4f} ± {val['val_std']:.4f}"


def format_table(results: list[SetResult]) -> str:
    header = (["set", "pairs", "protocol", "accuracy (%)", "threshold"] + [f"TAR@FAR={f:g}" for f in DEFAULT_FARS]
              + [f"VAL@FAR={f:g}" for f in DEFAULT_FARS] + ["AUC", "img/s"])
    rows = [header]
    for r in results:
        m = r.metrics
        rows.append(
            [r.name, str(m["num_pairs"]), m["protocol"],
             f"{100 * m['accuracy_mean']:.2f} ± {100 * m['accuracy_std']:.2f}",
             f"{m['threshold']:.4f} {_UNIT_SHORT[m['threshold_unit']]}"]
            + [f"{m['tar_at_far'][f]:.4f}" for f in DEFAULT_FARS]
            + [_val_cell(m, f) for f in DEFAULT_FARS]
            + [f"{m['auc']:.4f}", f"{r.images_per_s:.0f}"]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _summary(r: SetResult) -> dict[str, Any]:
    m = r.metrics
    summary = {
        "protocol": m["protocol"],
        "folds": int(len(m["fold_accuracies"])),
        "accuracy_mean": m["accuracy_mean"],
        "accuracy_std": m["accuracy_std"],
        "threshold": m["threshold"],
        "threshold_unit": m["threshold_unit"],
        "tar_at_far": {f"{k:g}": v for k, v in m["tar_at_far"].items()},
        "auc": m["auc"],
        "num_pairs": m["num_pairs"],
        "images_per_s": r.images_per_s,
        "roc_png": str(r.roc_png),
    }
    if "val_at_far" in m:
        summary["val_at_far"] = {f"{k:g}": v for k, v in m["val_at_far"].items()}
    return summary


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as exc:  # bad input: the message names the value
        print(f"largefr eval: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from largefr.backbone_file import load_backbone_from_checkpoint, read_checkpoint_meta

    missing = [str(p) for p in args.bins if not p.is_file()]
    if missing:
        raise FileNotFoundError(f".bin files not found: {missing}")
    device = _device(args.device)
    meta = read_checkpoint_meta(args.checkpoint)
    model = load_backbone_from_checkpoint(args.checkpoint, device)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = [evaluate_bin(model, Path(b), meta.image_size, args, device) for b in args.bins]
    print(f"checkpoint {args.checkpoint} ({meta.backbone}, {meta.embedding_size}-d), device {device}, "
          f"flip test {'off' if args.no_flip else 'on'}, {args.folds} folds, protocol {args.protocol}")
    print(format_table(results))
    summary = {r.name: _summary(r) for r in results}
    (args.out_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"ROC curves and results.json written to {args.out_dir}")
    return 0
