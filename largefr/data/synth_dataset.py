"""``largefr synth``: synthetic train shards plus held-out verification pairs in insightface .bin format.

Train samples are written in a seeded random order (every shard mixes identities). The verification set
``verification.bin`` is a pickle of ``(list of JPEG bytes, list of bool)`` exactly like insightface's
``lfw.bin``: pair i is images 2i and 2i+1, same identity or not; half the pairs are positive and every
image is a fresh render of one of the held-out identities, which never appear in the train shards.
"""
from __future__ import annotations

import io
import logging
import multiprocessing as mp
import os
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from largefr.data.build import (DEFAULT_SHARD_BYTES, ShardTask, check_params, finish_manifest, plan_by_bytes, run_tasks,
                                shard_bytes_for)
from largefr.data.manifest import Manifest
from largefr.data.synth import IMAGE_SIZE, FaceGenerator, SynthSpec, render_jpegs
from largefr.eval.verification import grid_kfold_accuracy, pair_squared_distance
from largefr.seeding import derive_seed

log = logging.getLogger("largefr.data")

VERIFICATION_NAME = "verification.bin"
_generator: FaceGenerator | None = None


def _gen() -> FaceGenerator:
    global _generator
    if _generator is None:
        if mp.parent_process() is not None:
            torch.set_num_threads(1)  # a worker process: one core each, no OpenMP pool after fork
        _generator = FaceGenerator()
    return _generator


def train_order(spec: SynthSpec) -> np.ndarray:
    """Sample j of the dataset is image ``order[j] % per_identity`` of identity ``order[j] // per_identity``."""
    return np.random.default_rng(derive_seed(spec.seed, "train_order")).permutation(spec.num_samples)


@dataclass(frozen=True)
class SynthSource:
    """Task items are (first, end) sample numbers of the shuffled train order."""

    spec: SynthSpec

    def samples(self, items: tuple[int, int]) -> Iterator[tuple[str, bytes | None, int, str]]:
        codes = train_order(self.spec)[items[0] : items[1]]
        ids, instances = codes // self.spec.per_identity, codes % self.spec.per_identity
        for start in range(0, len(codes), 256):
            jpegs = render_jpegs(_gen(), self.spec, ids[start : start + 256], instances[start : start + 256])
            for k, data in enumerate(jpegs):
                i, j = int(ids[start + k]), int(instances[start + k])
                yield f"{i:07d}_{j:05d}", data, i, ""


def verification_pairs(spec: SynthSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(identity ids [2P], instance numbers [2P], issame [P]) of the held-out pairs."""
    rng = np.random.default_rng(derive_seed(spec.seed, "verification_pairs"))
    first = rng.integers(0, spec.holdout, spec.pairs)
    other = (first + rng.integers(1, spec.holdout, spec.pairs)) % spec.holdout
    issame = np.arange(spec.pairs) % 2 == 0
    second = np.where(issame, first, other)
    ids = spec.identities + np.stack([first, second], 1).reshape(-1)
    return ids, np.arange(2 * spec.pairs), issame


def _render_range(spec: SynthSpec, start: int, end: int) -> list[bytes]:
    ids, instances, _ = verification_pairs(spec)
    return render_jpegs(_gen(), spec, ids[start:end], instances[start:end])


def write_verification(spec: SynthSpec, path: Path, workers: int) -> tuple[list[bytes], list[bool]]:
    """Render the held-out pairs and pickle them as insightface's (bins, issame_list)."""
    _, _, issame = verification_pairs(spec)
    n = 2 * spec.pairs
    bounds = [(s, min(s + 512, n)) for s in range(0, n, 512)]
    if workers > 1 and len(bounds) > 1:
        with mp.get_context().Pool(min(workers, len(bounds))) as pool:
            parts = pool.starmap(_render_range, [(spec, s, e) for s, e in bounds])
    else:
        parts = [_render_range(spec, s, e) for s, e in bounds]
    bins = [b for part in parts for b in part]
    data = (bins, [bool(x) for x in issame])
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(data, f, protocol=4)
    os.replace(tmp, path)
    return data


def pixel_verification_accuracy(bins: list[bytes], issame: list[bool], folds: int = 10) -> float:
    """Verification accuracy of raw pixels: per-image standardised, flattened, then ``largefr eval``'s
    default (insightface) k-fold protocol, at most one fold per pair. The floor any learned embedding must beat."""
    x = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.float32).reshape(-1) for b in bins])
    x -= x.mean(axis=1, keepdims=True)
    dist = pair_squared_distance(x[0::2], x[1::2])
    accs, _ = grid_kfold_accuracy(dist, np.asarray(issame, dtype=bool), min(folds, len(issame)))
    return float(accs.mean())


def write_synthetic_dataset(out_dir: str | os.PathLike[str], spec: SynthSpec, *, workers: int = 2,
          shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True) -> Manifest:
    """Write ``spec``'s train shards + manifest (and ``verification.bin`` when spec.pairs > 0) to ``out_dir``.

    Resumable like the converters. The manifest's ``extra`` records the spec and the raw-pixel
    verification accuracy of the held-out pairs.
    """
    out = Path(out_dir)
    probe = render_jpegs(_gen(), spec, np.arange(min(32, spec.identities)), np.zeros(min(32, spec.identities), int))
    sizes = [int(np.mean([len(b) for b in probe]) * 1.1)] * spec.num_samples
    plan_bytes = check_params(out, {"synth": asdict(spec), "shard_bytes": shard_bytes},
                              shard_bytes_for(sizes, shard_bytes, workers))
    groups = plan_by_bytes(sizes, plan_bytes)
    tasks = [ShardTask(n, (g.start, g.stop), len(g)) for n, g in enumerate(groups)]
    stats = run_tasks(SynthSource(spec), tasks, out, workers, "synth", progress)
    extra: dict[str, object] = {"synth": asdict(spec), "generator": "largefr.data.synth.FaceGenerator"}
    if spec.pairs:
        bins, issame = write_verification(spec, out / VERIFICATION_NAME, workers)
        accuracy = pixel_verification_accuracy(bins, issame)
        log.info("raw-pixel verification accuracy on %d held-out pairs: %.3f", spec.pairs, accuracy)
        extra.update(verification=VERIFICATION_NAME, pixel_baseline_accuracy=round(accuracy, 4))
    return finish_manifest(out, stats, (IMAGE_SIZE, IMAGE_SIZE), spec.identities, "synth", extra)
