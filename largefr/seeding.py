"""One seed derivation for every random stream of largefr: ``derive_seed(seed, *tags)``.

A stream is named by the run's seed and a path of tags, e.g. ``derive_seed(seed, "rank_streams", rank)``
or ``derive_seed(seed, "epoch_order", epoch)``. The tags are encoded without ambiguity (the count of
items first, then per item a kind word and two 32-bit words: a non-negative int < 2**64 as is, a str
as its 64-bit BLAKE2b digest) and hashed by numpy's ``SeedSequence``, so distinct (seed, tags) give
independent streams. Arithmetic mixing does not: ``seed*1000 + 1 + rank`` gives seed s / rank 1000
the stream of seed s+1 / rank 0.
"""
from __future__ import annotations

import functools
import hashlib

import numpy as np

_WORD = 0xFFFFFFFF
_INT_KIND, _STR_KIND = 0, 1


@functools.lru_cache(maxsize=256)
def _str_value(tag: str) -> int:
    return int.from_bytes(hashlib.blake2b(tag.encode("utf-8"), digest_size=8).digest(), "little")


def _words(item: int | str, index: int) -> tuple[int, int, int]:
    if isinstance(item, str):
        kind, value = _STR_KIND, _str_value(item)
    elif isinstance(item, (int, np.integer)) and not isinstance(item, bool) and 0 <= item < 2**64:
        kind, value = _INT_KIND, int(item)
    else:
        what = "seed" if index == 0 else f"tag {index}"
        raise ValueError(f"{what} of derive_seed must be an int in [0, 2**64) or a str, got {item!r}")
    return kind, value & _WORD, value >> 32


def derive_seed(seed: int, *tags: int | str) -> int:
    """A 63-bit seed (fits ``torch.manual_seed`` and ``np.random.default_rng``) for the stream ``tags`` of ``seed``."""
    items = (seed, *tags)
    words = [len(items)] + [w for i, item in enumerate(items) for w in _words(item, i)]
    state = np.random.SeedSequence(np.array(words, dtype=np.uint32)).generate_state(2, dtype=np.uint32)
    return (int(state[0]) | int(state[1]) << 32) >> 1
