"""What the tests marked ``cuda`` share: the skip without a CUDA device, and 2 gloo ranks on one GPU.

``CUDA_TESTS`` (a ``pytestmark``) marks a module ``cuda`` and skips it, with the reason, where torch sees
no CUDA device (every development and CI machine of this project); ``launch/gpu_check.sh`` runs them
on a GPU machine with ``pytest -m cuda``. Multi-rank cases use tests/multirank.py (largefr's own
group setup: nccl on ``cuda:LOCAL_RANK``); :func:`run_gloo_ranks_on_one_gpu` instead joins N ranks over
gloo with every rank's tensors on ``cuda:0``, which one GPU allows and nccl does not.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import tempfile
import traceback
from typing import Any, Callable

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
NO_CUDA_REASON = "no CUDA device visible to torch: the cuda tests run on a GPU machine (launch/gpu_check.sh)"
CUDA_TESTS = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)]
UNSUPPORTED = ("not supported", "unsupported", "no support", "not implemented")


def _gloo_worker(rank: int, world: int, store: str, fn: Callable[..., Any], args: tuple, out: Any) -> None:
    try:
        import torch.distributed as dist

        from largefr.distributed import DistContext

        torch.cuda.set_device(0)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        try:
            group = dist.group.WORLD
            result = fn(DistContext(rank, world, rank, "gloo", torch.device("cuda", 0), group), *args)
        finally:
            dist.destroy_process_group()
        buffer = io.BytesIO()
        torch.save(result, buffer)
        out.put((rank, "ok", buffer.getvalue()))
    except BaseException as exc:  # the parent reports (or, for an unsupported collective, skips)
        kind = "unsupported" if any(u in str(exc).lower() for u in UNSUPPORTED) else "failed"
        out.put((rank, kind, traceback.format_exc()))


def run_gloo_ranks_on_one_gpu(fn: Callable[..., Any], world: int, *args: Any, timeout_s: float = 300.0) -> list[Any]:
    """``fn(ctx, *args)`` on ``world`` gloo ranks sharing cuda:0; skips if gloo refuses CUDA tensors."""
    context = mp.get_context("spawn")
    out = context.Queue()
    with tempfile.TemporaryDirectory(prefix="largefr-gloo-cuda-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [context.Process(target=_gloo_worker, args=(r, world, store, fn, args, out), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        try:
            for _ in range(world):
                try:
                    rank, kind, payload = out.get(timeout=timeout_s)
                except queue.Empty:
                    raise TimeoutError(f"gloo ranks on one GPU did not finish within {timeout_s}s") from None
                if kind == "unsupported":
                    pytest.skip(f"gloo here does not run this collective on CUDA tensors:\n{payload.splitlines()[-1]}")
                if kind == "failed":
                    raise RuntimeError(f"rank {rank} of {world} (gloo, cuda:0) failed:\n{payload}")
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
    return [results[r] for r in range(world)]
