"""Class sharding, world-size-independent initialisation of W, and Partial FC class sampling."""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import torch

from largefr.seeding import derive_seed

# W is initialised in blocks of this many global rows, each from its own seeded stream, so a rank
# generates only the blocks that overlap its slice and the global matrix never depends on world size.
INIT_BLOCK_ROWS = 4096
INIT_STD = 0.01


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of the classes owned by ``rank``; shards differ by at most one class."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    if num_classes < world_size:
        raise ValueError(f"num_classes={num_classes} must be >= world size {world_size} (every rank owns a class)")
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def init_weight_rows(start: int, stop: int, embedding_size: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows [start, stop) of the global initial W ~ N(0, INIT_STD^2), identical for any sharding; each block is
    drawn in fp32 and stored in ``dtype`` (rounded to nearest), so no fp32 copy of a 16-bit slice exists.

    Blocks are drawn in parallel threads (each from its own stream; torch releases the GIL): one thread
    draws ~0.1-0.2 G normal values per second, so a 32M x 512 slice would take minutes alone.
    """
    out = torch.empty(stop - start, embedding_size, dtype=dtype)
    if out.is_meta:  # the planner's dry run: shapes only, nothing to draw
        return out
    first_block, last_block = start // INIT_BLOCK_ROWS, (stop - 1) // INIT_BLOCK_ROWS

    def fill(block: int) -> None:
        block_start = block * INIT_BLOCK_ROWS
        lo, hi = max(start, block_start), min(stop, block_start + INIT_BLOCK_ROWS)
        gen = torch.Generator().manual_seed(derive_seed(seed, "head_weight_init", block))
        # always the whole block: a stream's first values depend on how many are drawn at once
        rows = torch.empty(INIT_BLOCK_ROWS, embedding_size).normal_(0.0, INIT_STD, generator=gen)
        out[lo - start : hi - start] = rows[lo - block_start : hi - block_start]

    blocks = range(first_block, last_block + 1)
    threads = min(len(blocks), os.cpu_count() or 1, 32)
    if threads <= 1:
        for block in blocks:
            fill(block)
    else:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="init-w") as pool:
            list(pool.map(fill, blocks))
    return out


def num_sampled(sample_rate: float, num_local: int) -> int:
    """ceil(r * local classes), the sample size before positives that do not fit are added."""
    # exact: in floats 0.07 * 100 = 7.000000000000001 would round up to 8
    return min(num_local, math.ceil(Fraction(repr(float(sample_rate))) * num_local))


def sample_classes(
    local_labels: torch.Tensor,
    owned: torch.Tensor,
    num_local: int,
    sample_rate: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted local row ids to use this step, and each label's column among them (-1 if not owned).

    Every owned positive is kept; negatives are uniform without replacement (top-k of i.i.d. uniform
    scores with positives forced to the top), filling ceil(r * num_local) rows. The size is fixed, so
    no device->host copy happens, unless ceil(r * num_local) < min(global batch, num_local) (tiny r
    such as r = 0): then the sample grows to the number of distinct positives, which needs one count.
    """
    size = num_sampled(sample_rate, num_local)
    if size < min(local_labels.numel(), num_local):
        distinct_positives = torch.unique(local_labels[owned]).numel()
        size = max(size, distinct_positives)
    # slot num_local absorbs labels owned by other ranks
    slot = torch.where(owned, local_labels, torch.full_like(local_labels, num_local))
    scores = torch.rand(num_local + 1, generator=generator, device=local_labels.device)
    scores.index_fill_(0, slot, 2.0)
    ids = torch.topk(scores[:num_local], size, sorted=False).indices.sort().values
    cols = torch.searchsorted(ids, slot)
    return ids, torch.where(owned, cols, torch.full_like(cols, -1))
