"""Packing samples into rows: O(n log n) first-fit-decreasing, the same bins as the old linear scan."""

import random

import pytest

from benchmarks.packing import linear_first_fit_decreasing  # the previous implementation, as the reference
from speculators_hf.training.data import pack
from speculators_hf.utils import UserError


@pytest.mark.parametrize("seed", range(6))
def test_pack_matches_first_fit_decreasing_and_is_valid(seed):
    rng = random.Random(seed)
    capacity = rng.choice([64, 256, 1000])
    n = rng.choice([1, 7, 300, 2000])
    high = rng.choice([capacity, capacity // 3, 5])
    lengths = [rng.randint(0 if seed % 2 else 1, high) for _ in range(n)]
    bins = pack(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(n))  # every sample exactly once
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)  # no row over capacity
    reference = linear_first_fit_decreasing(lengths, capacity)
    assert len(bins) <= len(reference)
    assert bins == reference  # the very same packing, hence deterministic and no worse
    assert pack(lengths, capacity) == bins


def test_pack_edge_cases():
    assert pack([], 8) == []
    assert pack([8, 8, 0], 8) == [[0, 2], [1]]
    with pytest.raises(UserError, match="--total-seq-len 8 is smaller than sample 1"):
        pack([3, 9], 8)
