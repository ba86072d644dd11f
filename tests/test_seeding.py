"""derive_seed: pinned values (a change would silently change every run's streams) and no collisions."""
import numpy as np
import pytest

from largefr.seeding import derive_seed


def test_pinned_values():
    assert derive_seed(2048) == 1918077970024757944
    assert derive_seed(2048, "rank_streams", 0) == 1140301216673155139
    assert derive_seed(0, "x", 1) == 8429743243267631432


def test_seed_rank_pairs_do_not_collide_as_seed_times_1000_plus_rank_did():
    assert 5 * 1000 + 1 + 1000 == 6 * 1000 + 1 + 0  # the old derivation: seed 5 / rank 1000 == seed 6 / rank 0
    assert derive_seed(5, "rank_streams", 1000) != derive_seed(6, "rank_streams", 0)
    pairs = [(seed, rank) for seed in range(64) for rank in (*range(64), 1000, 1001, 2**32)]
    values = {derive_seed(seed, "rank_streams", rank) for seed, rank in pairs}
    assert len(values) == len(pairs)


def test_tag_encoding_is_unambiguous():
    """Trailing zeros, 64-bit splits and str-vs-int tags name different streams."""
    seeds = [derive_seed(7), derive_seed(7, 0), derive_seed(7, 0, 0), derive_seed(2**32 + 7), derive_seed(7, 1),
             derive_seed(7, "0"), derive_seed(7, "a"), derive_seed(7, "a", 0), derive_seed(0, 7)]
    assert len(set(seeds)) == len(seeds)


def test_result_fits_the_generators():
    value = derive_seed(2**64 - 1, "t", 2**64 - 1)
    assert 0 <= value < 2**63
    np.random.default_rng(value)
    assert derive_seed(np.int64(3), np.uint32(4)) == derive_seed(3, 4)


@pytest.mark.parametrize("bad", [-1, 2**64, 1.5, True, None])
def test_bad_seed_or_tag_is_named(bad):
    with pytest.raises(ValueError, match=r"seed of derive_seed must be an int in \[0, 2\*\*64\) or a str"):
        derive_seed(bad)
    with pytest.raises(ValueError, match="tag 2 of derive_seed"):
        derive_seed(1, "t", bad)
