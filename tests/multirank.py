"""The one helper that runs a test function on N gloo ranks (CPU) for the multi-rank tests.

``run_ranks(fn, world_size, *args)`` spawns the ranks through largefr.distributed.spawn (the group is
initialised exactly as in torchrun jobs), calls ``fn(ctx, *args)`` in each, and returns the per-rank
results in rank order; a failing rank fails the test with that rank's traceback. ``fn`` must be a
module-level function of a test module.
"""
from __future__ import annotations

from typing import Any, Callable

from largefr.distributed.spawn import run_local_ranks

DEFAULT_TIMEOUT_S = 240.0


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Any]:
    if not 1 <= world_size <= 4:
        raise ValueError(f"tests run on 1-4 ranks, got world_size={world_size}")
    return run_local_ranks(fn, world_size, *args, timeout_s=timeout_s, threads_per_rank=1)
