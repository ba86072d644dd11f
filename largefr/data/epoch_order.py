"""Which samples each rank reads in an epoch (shared by the DALI and the torch loader).

For (seed, epoch) the shards are put in a random order and each shard's samples in a random order;
concatenated, they form the epoch's global sequence of all N samples. Rank r owns the contiguous block
``[r*M, (r+1)*M)`` of that sequence, ``M = N // world_size``; it yields ``steps = M // batch_size`` full
batches. Blocks are disjoint, every rank has the same number of batches, and the samples of the tail
(``N - world_size*steps*batch_size``, fewer than ``world_size*(batch_size+1)``) change every epoch.

A rank walks its block through *positions* q = 0, 1, 2, ...: a corrupt sample is skipped and the batch is
filled from the next positions; the unused rest of the block (``M - steps*batch_size`` samples) is the
first reserve, and past the block end positions wrap around to the block start (q mod M).

Resumed at another world size or batch size mid-epoch, the rest of the epoch is a *pool*: the sequence
ranges that no rank has read yet (each old rank's block past its position, then the old plan's tail), in
that order (:func:`unread_pool`). An ``EpochPlan`` with ``pool`` deals the pool as above (blocks of
``len(pool) // world_size``), so the epoch ends reading only samples not read before it, at any new world
size; a pool can itself be resumed elsewhere again.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from largefr.seeding import derive_seed


def _check(name: str, value: int, low: int) -> None:
    if not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class Segment:
    """Consecutive positions ``[start, start+len(rows))`` that all read rows of one shard."""

    shard: int
    start: int
    rows: np.ndarray


@dataclass
class EpochPlan:
    """The epoch's sample order for one rank; cheap to build, picklable, deterministic."""

    shard_counts: tuple[int, ...]
    seed: int
    epoch: int
    rank: int
    world_size: int
    batch_size: int
    pool: tuple[tuple[int, int], ...] | None = None  # [start, stop) ranges of the epoch's sequence; None: all
    _rows_cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check("seed", self.seed, 0)
        _check("epoch", self.epoch, 0)
        _check("world_size", self.world_size, 1)
        _check("batch_size", self.batch_size, 1)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside [0, world_size={self.world_size})")
        if not self.shard_counts or min(self.shard_counts) <= 0:
            raise ValueError(f"shard_counts must be non-empty and positive, got {self.shard_counts[:8]}...")
        total = int(sum(self.shard_counts))
        ranges = ((0, total),) if self.pool is None else tuple((int(a), int(b)) for a, b in self.pool)
        if any(not 0 <= a < b <= total for a, b in ranges):
            raise ValueError(f"pool ranges {ranges[:4]}... must be non-empty ranges inside [0, {total})")
        self._ranges = ranges
        self._pool_starts = np.concatenate([[0], np.cumsum([b - a for a, b in ranges])]).astype(np.int64)
        if self.steps < 1:
            raise ValueError(
                f"{self.num_samples} samples give no full batch: world_size={self.world_size} x "
                f"batch_size={self.batch_size} needs at least {self.world_size * self.batch_size}"
            )
        rng = np.random.default_rng(derive_seed(self.seed, "epoch_order", self.epoch))
        self.order = rng.permutation(len(self.shard_counts))
        counts = np.asarray(self.shard_counts, dtype=np.int64)[self.order]
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.flip_key = np.uint64(derive_seed(self.seed, "flips", self.epoch, self.rank))

    @property
    def num_samples(self) -> int:
        """Samples this plan deals: the whole epoch, or its pool."""
        return int(self._pool_starts[-1])

    def pool_ranges(self, p0: int, p1: int) -> list[tuple[int, int]]:
        """Pool indices ``[p0, p1)`` as ranges of the epoch's sequence."""
        out = []
        while p0 < p1:
            i = int(np.searchsorted(self._pool_starts, p0, side="right")) - 1
            start = self._ranges[i][0] + p0 - int(self._pool_starts[i])
            n = min(p1 - p0, int(self._pool_starts[i + 1]) - p0)
            out.append((start, start + n))
            p0 += n
        return out

    @property
    def block_size(self) -> int:
        """M: samples owned by each rank this epoch."""
        return self.num_samples // self.world_size

    @property
    def steps(self) -> int:
        """Batches per epoch, equal on every rank."""
        return self.block_size // self.batch_size

    def shard_rows(self, shard: int) -> np.ndarray:
        """The epoch's order of the rows (samples) inside ``shard``."""
        rows = self._rows_cache.get(shard)
        if rows is None:
            if len(self._rows_cache) > 64:
                self._rows_cache.clear()
            rng = np.random.default_rng(derive_seed(self.seed, "shard_rows", self.epoch, shard))
            rows = rng.permutation(self.shard_counts[shard])
            self._rows_cache[shard] = rows
        return rows

    def segments(self, q0: int, q1: int) -> list[Segment]:
        """The samples at rank positions ``[q0, q1)`` as runs within one shard each."""
        if q0 < 0 or q1 < q0:
            raise ValueError(f"positions [{q0}, {q1}) are not a valid range")
        out: list[Segment] = []
        m, base = self.block_size, self.rank * self.block_size
        q = q0
        while q < q1:
            p = base + q % m
            ((g, _),) = self.pool_ranges(p, p + 1)
            run = int(self._pool_starts[np.searchsorted(self._pool_starts, p, side="right")]) - p
            slot = int(np.searchsorted(self.starts, g, side="right")) - 1
            shard = int(self.order[slot])
            k = g - int(self.starts[slot])
            n = min(q1 - q, int(self.starts[slot + 1]) - g, m - q % m, run)
            out.append(Segment(shard, q, self.shard_rows(shard)[k : k + n]))
            q += n
        return out

    def flips(self, positions: np.ndarray) -> np.ndarray:
        """A fair coin per position, fixed by (seed, epoch, rank, position): horizontal flip or not."""
        x = positions.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x ^= self.flip_key
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
        return (x & np.uint64(1)).astype(bool)


def unread_pool(plan: EpochPlan, positions: list[int]) -> tuple[tuple[int, int], ...]:
    """The sequence ranges of ``plan``'s epoch (or pool) that its ranks have not read, rank ``r`` having
    consumed positions ``[0, positions[r])``: each rank's block past its position, then the tail that no
    block holds. (A position past the block end wrapped around: that whole block was read.)"""
    if len(positions) != plan.world_size:
        raise ValueError(f"expected {plan.world_size} rank positions (one per rank of the plan), got {len(positions)}")
    m = plan.block_size
    pieces: list[tuple[int, int]] = []
    for rank, position in enumerate(positions):
        if position < 0:
            raise ValueError(f"rank {rank} position must be >= 0, got {position}")
        pieces += plan.pool_ranges(rank * m + min(position, m), (rank + 1) * m)
    pieces += plan.pool_ranges(plan.world_size * m, plan.num_samples)
    merged: list[tuple[int, int]] = []
    for a, b in pieces:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return tuple(merged)
