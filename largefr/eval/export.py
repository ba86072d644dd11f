"""``largefr export onnx``: the backbone of a checkpoint as ONNX with a dynamic batch axis.

Uses torch's default (``torch.export``-based) ONNX exporter; input ``input`` [batch, 3, S, S] float32
in [-1, 1], output ``embedding`` [batch, D] (not normalised, no flip test inside the graph).
After export the file is checked against PyTorch with onnxruntime at a batch size different from the
one traced, and the max abs difference is printed.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

INPUT_NAME, OUTPUT_NAME = "input", "embedding"


def export_onnx(
    model: nn.Module, out: str | os.PathLike[str], image_size: int = 112, opset: int = 18, trace_batch: int = 2
) -> Path:
    """Export ``model`` (eval mode, CPU) to ``out`` with a dynamic batch dimension."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    example = (torch.randn(trace_batch, 3, image_size, image_size),)
    batch = torch.export.Dim("batch", min=1)
    logging.getLogger("torch.onnx").setLevel(logging.WARNING)
    torch.onnx.export(
        model,
        example,
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},),
        opset_version=opset,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    return path


def onnx_max_abs_diff(
    model: nn.Module, onnx_path: str | os.PathLike[str], image_size: int = 112, batch: int = 3, seed: int = 0
) -> float:
    """Max |onnxruntime - PyTorch| over the embeddings of ``batch`` random inputs."""
    import onnxruntime as ort

    x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        expected = model.eval().cpu()(x).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    if got.shape != expected.shape:
        raise ValueError(f"onnxruntime returned shape {got.shape}, PyTorch {expected.shape}")
    return float(np.abs(got - expected).max())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    onnx = sub.add_parser("onnx", help="backbone to ONNX with a dynamic batch axis")
    onnx.add_argument("--checkpoint", required=True, type=Path, help="directory with backbone.pt and meta.json")
    onnx.add_argument("--out", required=True, type=Path, help="output .onnx file")
    onnx.add_argument("--opset", type=int, default=18, help="ONNX opset version")
    onnx.add_argument("--no-check", action="store_true", help="skip the onnxruntime parity check")
    onnx.add_argument("--tolerance", type=float, default=1e-3, help="max abs difference the check accepts")


def run(args: argparse.Namespace) -> int:
    from largefr.backbone_file import load_backbone_from_checkpoint, read_checkpoint_meta

    try:
        meta = read_checkpoint_meta(args.checkpoint)
        model = load_backbone_from_checkpoint(args.checkpoint, "cpu")
    except (ValueError, FileNotFoundError) as exc:
        print(f"largefr export: {exc}", file=sys.stderr)
        return 2
    path = export_onnx(model, args.out, meta.image_size, args.opset)
    print(f"exported {meta.backbone} ({meta.embedding_size}-d) to {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    if args.no_check:
        return 0
    diff = onnx_max_abs_diff(model, path, meta.image_size, batch=3)
    print(f"onnxruntime vs PyTorch at batch 3: max abs diff {diff:.3e}")
    if not diff <= args.tolerance:
        print(f"largefr export: max abs diff {diff:.3e} exceeds --tolerance {args.tolerance:g}", file=sys.stderr)
        return 1
    return 0
