"""``largefr bench NAME ...``: each benchmark module defines add_arguments(parser) and run(args)."""
from __future__ import annotations

import argparse
import importlib

# benchmark name -> module
BENCHMARKS: dict[str, str] = {
    "head": "largefr.bench.head",
    "data": "largefr.bench.data",
    "train": "largefr.bench.train",
    "scale": "largefr.bench.scale",
    "losses": "largefr.bench.losses",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0]))


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(BENCHMARKS[args.benchmark]).run(args) or 0)
