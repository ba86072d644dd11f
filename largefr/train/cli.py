"""``largefr train CONFIG [--set a.b=c ...]``: one process, or one per rank under torchrun.

The resolved config (num_classes and num_images read from the dataset manifest) is printed by rank 0
and saved as ``<output_dir>/config.yaml`` and in every checkpoint. By default a run resumes from the
newest complete checkpoint in its checkpoint directory.

Exit codes: 0 done (or stopped at --max-steps), 2 a config or input error, 3 the output directory is
locked by another live job (``<output_dir>/run.lock``), 75 stopped by SIGTERM after writing a checkpoint
(rerun the same command to continue). Process-group set-up and every collective fail after
``train.collective_timeout_s`` seconds, so a lost peer ends the job instead of hanging it.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from typing import TYPE_CHECKING

from largefr.config import Config, ConfigError, load_config
from largefr.config_schema import help_text

if TYPE_CHECKING:
    from largefr.distributed import DistContext


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, nargs="?", default=None, help="recipe YAML (configs/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE",
                        help="override a config field, e.g. --set train.batch_size=64 (repeatable)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop (with a checkpoint) after this many optimizer steps in all; the LR schedule "
                             "still spans the whole run, so a later run resumes where this one stopped")
    parser.add_argument("--resume", default="auto",
                        help="'auto' (newest checkpoint in the checkpoint dir, if any), 'none', or a checkpoint dir")
    parser.add_argument("--export-init", type=Path, default=None, metavar="DIR",
                        help="write the initial backbone (the seeded init of this config) as backbone.pt + "
                             "meta.json to DIR and exit; `largefr eval --checkpoint DIR` evaluates it")
    parser.add_argument("--print-config", action="store_true",
                        help="print the config as loaded (each field's help as a comment) and exit")
    parser.add_argument("--help-config", action="store_true",
                        help="list every config field with its type, default and help, and exit")


def run(args: argparse.Namespace) -> int:
    if args.max_steps is not None and args.max_steps < 0:
        print(f"largefr train: --max-steps must be >= 0, got {args.max_steps}", file=sys.stderr)
        return 2
    if args.help_config:
        print(help_text(Config), end="")
        return 0
    if args.config is None:
        print("largefr train: a recipe YAML is needed (e.g. configs/synthetic_cpu.yaml); "
              "--help-config lists the fields", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(cfg.to_commented_yaml(), end="")
            return 0
        if args.export_init is not None:
            print(f"initial backbone written to {export_init(cfg, args.export_init)}")
            return 0
        _check_inputs(cfg)
    except ConfigError as exc:
        if os.environ.get("RANK", "0") == "0":  # every rank fails alike; one message is enough
            print(f"largefr train: {exc}", file=sys.stderr)
        return 2
    return _run_distributed(cfg, args)


def _check_inputs(cfg: Config) -> None:
    """Dataset and verification files, checked before any process group exists."""
    from largefr.train.build import resolve_dataset, resolve_eval_bins

    resolve_dataset(cfg)
    resolve_eval_bins(cfg)


def export_init(cfg: Config, out_dir: Path) -> Path:
    from largefr.backbone_file import save_backbone_checkpoint
    from largefr.train.build import exported_backbone_meta, seeded_backbone

    return save_backbone_checkpoint(out_dir, seeded_backbone(cfg), exported_backbone_meta(cfg))


EXIT_LOCKED = 3


def init_process_group(cfg: Config) -> "DistContext":
    """The job's process group (torchrun's variables, or one local rank); its set-up and every collective
    time out after ``train.collective_timeout_s``."""
    from largefr.distributed import init_from_env

    return init_from_env(timeout_s=cfg.train.collective_timeout_s)


def _run_distributed(cfg: Config, args: argparse.Namespace) -> int:
    from largefr.distributed import shutdown
    from largefr.train.preemption import EXIT_PREEMPTED, Preempted
    from largefr.train.run_lock import RunDirectoryLocked

    ctx = init_process_group(cfg)
    logging.basicConfig(level=logging.INFO if ctx.is_main else logging.WARNING,
                        format=f"%(asctime)s rank{ctx.rank} %(name)s %(levelname)s: %(message)s")
    try:
        from largefr.train.run import train

        train(cfg, ctx, max_steps=args.max_steps, resume=args.resume)
    except ConfigError as exc:  # same on every rank: the dataset or a value checked after loading
        if ctx.is_main:
            print(f"largefr train: {exc}", file=sys.stderr)
        return 2
    except RunDirectoryLocked as exc:
        if ctx.is_main:
            print(f"largefr train: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    except Preempted as exc:
        if ctx.is_main:
            print(f"largefr train: {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    finally:
        shutdown()
    return 0
