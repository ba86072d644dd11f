"""Run a function on N local processes joined in one process group (tests, benchmarks, CPU demos).

``run_local_ranks(fn, world_size, *args)`` spawns ``world_size`` processes, initialises the group through
:func:`largefr.distributed.init_distributed` (the same path as torchrun jobs: gloo on CPU, nccl on GPUs),
calls ``fn(ctx, *args)`` in each and returns the per-rank results in rank order. A rank that raises or
hangs fails the call with that rank's traceback. ``fn`` must be importable by name (module level).
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import tempfile
import traceback
from typing import Any, Callable

import torch


def _worker(
    rank: int, world_size: int, store_path: str, threads: int, fn: Callable[..., Any], args: tuple, out: Any
) -> None:
    torch.set_num_threads(threads)
    try:
        from largefr.distributed.env import init_distributed, shutdown

        ctx = init_distributed(rank, world_size, f"file://{store_path}", local_rank=rank, timeout_s=300)
        try:
            result = fn(ctx, *args)
        finally:
            shutdown()
        # tensors travel as bytes: a queue would share their memory, which dies with this process
        buffer = io.BytesIO()
        torch.save(result, buffer)
        out.put((rank, True, buffer.getvalue()))
    except BaseException:  # report every failure, assertion errors included, to the parent
        out.put((rank, False, traceback.format_exc()))


def run_local_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 600.0, threads_per_rank: int = 1
) -> list[Any]:
    """Run ``fn(ctx, *args)`` on ``world_size`` local ranks; return the results ordered by rank."""
    if not 1 <= world_size <= 64:
        raise ValueError(f"world_size must be in [1, 64], got {world_size}")
    context = mp.get_context("spawn")
    out = context.Queue()
    with tempfile.TemporaryDirectory(prefix="largefr-ranks-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            context.Process(target=_worker, args=(r, world_size, store, threads_per_rank, fn, args, out), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        try:
            return _collect(out, world_size, timeout_s)
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()


def _collect(out: Any, world_size: int, timeout_s: float) -> list[Any]:
    results: dict[int, Any] = {}
    for _ in range(world_size):
        try:
            rank, ok, payload = out.get(timeout=timeout_s)
        except queue.Empty:
            missing = sorted(set(range(world_size)) - set(results))
            raise TimeoutError(f"ranks {missing} of {world_size} did not finish within {timeout_s}s") from None
        if not ok:
            raise RuntimeError(f"rank {rank} of {world_size} failed:\n{payload}")
        results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    return [results[r] for r in range(world_size)]
