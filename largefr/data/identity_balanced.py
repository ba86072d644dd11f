"""P x K identity-balanced epoch order: every rank batch holds P identities x K images each.

Pair and triplet losses need positives in the batch. For (seed, epoch) the plan is built for the GLOBAL
batch of G = world_size * P identities, so it is the same sequence of global batches at any world size
with the same G; rank r takes identity slots [r*P, (r+1)*P) of each global batch.

- Each identity's images are shuffled for (seed, epoch) and cut into g_i = ceil(n_i / K) groups of K
  consecutive images of that order, read cyclically: the last group wraps to the identity's first
  images, and an identity with fewer than K images is drawn WITH REPLACEMENT (its images repeated in
  turn, each ceil or floor of K / n_i times).
- Round j holds one group (its j-th) of every identity with g_i > j, in a random order; it is cut into
  floor(m_j / G) global batches of G distinct identities, and its last m_j mod G groups are left out of
  this epoch (at most G - 1 per round; other groups are left out the next epoch). The steps per epoch,
  sum_j floor(m_j / G), depend only on the label counts: equal on every rank and in every epoch.
- In a global batch the identities are distinct, so the ranks' batches are disjoint.
A rank's positions q = step * P*K + p*K + k are read like :class:`largefr.data.epoch_order.EpochPlan`'s:
``block_size`` is its steps x P*K, and positions past it wrap to the start (the reserve the loaders use
when a corrupt sample is skipped; a skip shifts the rest of that epoch's batches by one position, so
one identity group straddles two batches).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from largefr.data.epoch_order import Segment, _check
from largefr.data.labels import parse_label
from largefr.data.manifest import Manifest
from largefr.data.samples import ShardReader

_PK_TAG, _FLIP_TAG = 3, 4


def read_label_table(manifest: Manifest) -> np.ndarray:
    """int64 label of every sample, shards in manifest order (-1 for an unreadable label): one small read
    per sample through the index files (about 3 s per million samples from page cache)."""
    reader = ShardReader(manifest, max_open=2)
    out = np.empty(manifest.num_samples, dtype=np.int64)
    k = 0
    try:
        for shard, count in enumerate(manifest.shard_counts):
            index = reader.index(shard)
            with open(manifest.tar_path(shard), "rb") as f:
                for offset, size in zip(index.label_offset.tolist(), index.label_size.tolist()):
                    f.seek(offset)
                    label = parse_label(f.read(size), manifest.num_classes)
                    out[k] = -1 if label is None else label
                    k += 1
    finally:
        reader.close()
    return out


@dataclass
class IdentityBalancedPlan:
    """A rank's P x K sample order for one epoch; the interface of :class:`EpochPlan` the loaders use."""

    shard_counts: tuple[int, ...]
    labels: np.ndarray = field(repr=False)  # one per sample (shards in order); < 0: excluded
    seed: int
    epoch: int
    rank: int
    world_size: int
    batch_size: int
    images_per_identity: int

    def __post_init__(self) -> None:
        for name, low in (("seed", 0), ("epoch", 0), ("world_size", 1), ("batch_size", 1), ("images_per_identity", 1)):
            _check(name, getattr(self, name), low)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside [0, world_size={self.world_size})")
        k = self.images_per_identity
        if self.batch_size % k:
            raise ValueError(f"batch_size={self.batch_size} is not a multiple of images_per_identity K={k} "
                             "(a P x K batch holds P identities x K images)")
        if len(self.labels) != sum(self.shard_counts):
            raise ValueError(f"{len(self.labels)} labels for {sum(self.shard_counts)} samples")
        self.identities_per_batch = self.batch_size // k
        samples = self._global_samples()
        self.starts = np.concatenate([[0], np.cumsum(np.asarray(self.shard_counts, dtype=np.int64))])
        self.sample_shard = (np.searchsorted(self.starts, samples, side="right") - 1).astype(np.int64)
        self.sample_row = samples - self.starts[self.sample_shard]

    @property
    def num_samples(self) -> int:
        return int(sum(self.shard_counts))

    @property
    def steps(self) -> int:
        return len(self.sample_shard) // self.batch_size

    @property
    def block_size(self) -> int:
        return self.steps * self.batch_size

    def _global_samples(self) -> np.ndarray:
        """Global sample index of each of this rank's positions [steps * P * K]."""
        k, p = self.images_per_identity, self.identities_per_batch
        width = p * self.world_size
        rng = np.random.default_rng([self.seed, self.epoch, _PK_TAG])
        valid = np.flatnonzero(self.labels >= 0)
        keys = rng.random(len(valid))
        members = valid[np.lexsort((keys, self.labels[valid]))]  # by identity, shuffled inside each
        _, first, counts = np.unique(self.labels[members], return_index=True, return_counts=True)
        ident, group = balanced_rounds(-(-counts // k), width, rng)
        if len(ident) == 0:
            raise ValueError(
                f"{len(counts)} identities give no P x K batch: world_size={self.world_size} x P={p} needs at "
                f"least {width} identities with images"
            )
        steps = len(ident) // width
        mine = np.arange(steps)[:, None] * width + self.rank * p + np.arange(p)[None, :]
        ident, group = ident[mine].reshape(-1, 1), group[mine].reshape(-1, 1)
        offsets = (group * k + np.arange(k)[None, :]) % counts[ident]  # cyclic: with replacement when n_i < K
        return members[first[ident] + offsets].reshape(-1)

    def segments(self, q0: int, q1: int) -> list[Segment]:
        """The samples at rank positions ``[q0, q1)`` (mod ``block_size``) as runs within one shard each."""
        if q0 < 0 or q1 < q0:
            raise ValueError(f"positions [{q0}, {q1}) are not a valid range")
        if q1 == q0:
            return []
        q = np.arange(q0, q1)
        where = q % self.block_size
        shards, rows = self.sample_shard[where], self.sample_row[where]
        cuts = np.flatnonzero(np.diff(shards)) + 1
        bounds = np.concatenate([[0], cuts, [len(q)]])
        return [Segment(int(shards[a]), q0 + int(a), rows[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    def flips(self, positions: np.ndarray) -> np.ndarray:
        """A fair coin per position, fixed by (seed, epoch, rank, position)."""
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, _FLIP_TAG])
        coins = rng.random(self.block_size) < 0.5
        return coins[np.asarray(positions, dtype=np.int64) % self.block_size]


def balanced_rounds(groups: np.ndarray, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(identity, group number) per slot of the epoch's global batches of ``width`` distinct identities.

    Round j: the identities with more than j groups, in a random order, cut into whole batches (see the
    module doc); the steps come out as sum_j floor(m_j / width) whatever the draws.
    """
    idents, numbers = [], []
    for j in range(int(groups.max(initial=0))):
        active = np.flatnonzero(groups > j)
        take = len(active) // width * width
        if take == 0:
            break  # later rounds are no larger
        idents.append(rng.permutation(active)[:take])
        numbers.append(np.full(take, j, dtype=np.int64))
    if not idents:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(idents), np.concatenate(numbers)
