"""The one helper that runs a function on N gloo ranks (CPU) for the multi-rank tests.

``run_ranks(fn, world_size, *args)`` spawns ``world_size`` processes, initialises a gloo group through
largefr.distributed (the same path as torchrun jobs), calls ``fn(ctx, *args)`` in each and returns the
per-rank results in rank order. A rank that raises or hangs fails the call with that rank's traceback.
``fn`` must be a module-level function (it is pickled by name into the spawned processes).
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

DEFAULT_TIMEOUT_S = 240.0


def _worker(rank: int, world_size: int, store_path: str, fn: Callable[..., Any], args: tuple, out: Any) -> None:
    torch.set_num_threads(1)
    try:
        from largefr.distributed import init_distributed, shutdown

        ctx = init_distributed(rank, world_size, f"file://{store_path}", local_rank=rank, timeout_s=120)
        try:
            result = fn(ctx, *args)
        finally:
            shutdown()
        # tensors travel as bytes: a queue would share their memory, which dies with this process
        buffer = io.BytesIO()
        torch.save(result, buffer)
        out.put((rank, True, buffer.getvalue()))
    except BaseException:  # report every failure, including assertion errors, to the parent
        out.put((rank, False, traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Any]:
    """Run ``fn(ctx, *args)`` on ``world_size`` gloo ranks; return results ordered by rank."""
    if not 1 <= world_size <= 8:
        raise ValueError(f"world_size must be in [1, 8], got {world_size}")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="largefr-ranks-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, store, fn, args, out), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        try:
            for _ in range(world_size):
                try:
                    rank, ok, payload = out.get(timeout=timeout_s)
                except queue.Empty:
                    missing = sorted(set(range(world_size)) - set(results))
                    raise TimeoutError(f"ranks {missing} of {world_size} did not finish within {timeout_s}s")
                if not ok:
                    raise AssertionError(f"rank {rank} of {world_size} failed:\n{payload}")
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
    return [results[r] for r in range(world_size)]
