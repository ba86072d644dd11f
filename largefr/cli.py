"""The ``largefr`` command. Each sub-command lives in its own module, imported only when it runs.

A command module defines ``add_arguments(parser: argparse.ArgumentParser) -> None`` and
``run(args: argparse.Namespace) -> int``. Register it in :data:`COMMANDS`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("largefr.bench.cli", "benchmarks: head, data (ratios measured in one run)"),
    "synth": ("largefr.data.cli_synth", "synthetic face identities: train shards + held-out verification pairs"),
    "convert": ("largefr.data.cli_convert", "convert insightface .rec/.idx or a folder per identity into shards"),
    "eval": ("largefr.eval.cli", "verification .bin sets: 10-fold accuracy, TAR@FAR, ROC plots"),
    "export": ("largefr.eval.export", "export a checkpoint's backbone (onnx)"),
    "train": ("largefr.train.cli", "train a backbone with a Partial FC head (single process or torchrun)"),
    "plan": ("largefr.plan_cli", "memory per rank of a configuration (head slice, optimizer, workspace, backbone)"),
}


def _top_level_help() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: largefr COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {desc}" for name, (_, desc) in sorted(COMMANDS.items())]
    lines += ["", "`largefr COMMAND --help` describes a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_level_help())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"largefr: unknown command {name!r}; expected one of {sorted(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, desc = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"largefr {name}", description=desc)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
