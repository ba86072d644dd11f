"""Periodic verification during training, on every rank at once.

Every rank embeds an equal contiguous share of each .bin's images (flip test, eval mode, the same
network: rank 0's BatchNorm statistics are broadcast first), then the shares are all-gathered and rank 0
computes the 10-fold accuracy. No rank waits inside a collective while another rank computes, so eval
time is never charged against a collective's timeout, and N ranks embed N times faster than one.
Broadcasting rank 0's buffers does not change training: DDP does the same at the next forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from largefr.distributed import DistContext, all_gather_objects, broadcast_buffers
from largefr.eval.bin_io import VerificationBin, load_bin
from largefr.eval.embed import embed_images
from largefr.eval.verification import verify_interleaved


@dataclass(frozen=True)
class _Share:
    name: str
    images: list[bytes]
    issame: np.ndarray


class PeriodicVerifier:
    """``verifier(model)`` -> {"val/<set>_acc": accuracy} on rank 0, {} on other ranks (collective)."""

    def __init__(self, bins: list[Path], ctx: DistContext, image_size: int, batch_size: int = 64, workers: int = 2):
        self.ctx, self.image_size, self.batch_size, self.workers = ctx, image_size, batch_size, workers
        self.sets = [self._share(load_bin(path)) for path in bins]

    def _share(self, vb: VerificationBin) -> _Share:
        bounds = np.linspace(0, len(vb.images), self.ctx.world_size + 1).round().astype(int)
        lo, hi = bounds[self.ctx.rank], bounds[self.ctx.rank + 1]
        return _Share(vb.name, list(vb.images[lo:hi]), np.asarray(vb.issame))

    def __bool__(self) -> bool:
        return bool(self.sets)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        broadcast_buffers(model, self.ctx.group)
        results: dict[str, float] = {}
        try:
            for share in self.sets:
                accuracy = self._evaluate(model, share)
                if accuracy is not None:
                    results[f"val/{share.name}_acc"] = accuracy
        finally:
            model.train(was_training)
        return results

    def _evaluate(self, model: nn.Module, share: _Share) -> float | None:
        if share.images:
            emb = embed_images(model, share.images, self.image_size, self.batch_size, self.workers, self.ctx.device)
        else:
            emb = np.zeros((0, 0), dtype=np.float32)
        gathered: list[np.ndarray] = all_gather_objects(emb, self.ctx.group)
        if not self.ctx.is_main:
            return None
        full = np.concatenate([g for g in gathered if g.size])
        return float(verify_interleaved(full, share.issame)["accuracy_mean"])

