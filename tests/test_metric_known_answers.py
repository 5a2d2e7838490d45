"""HR@k and NDCG@k on ranks that never reach 1, and the sampler's default seed, by hand."""

import numpy as np
import pytest
import scipy.sparse as sp

from cdimf.common.core.metrics import hit_rate, ndcg, sample_negatives


def test_hit_rate_and_ndcg_of_ranks_that_all_miss_the_top() -> None:
    """Ranks 2 and 11 at k = 10: HR = 1/2, NDCG = (1 / log2(3)) / 2; a rank of 0 is refused."""
    ranks = np.array([2, 11])
    assert hit_rate(ranks, 10) == pytest.approx(0.5)
    assert ndcg(ranks, 10) == pytest.approx(0.5 / np.log2(3))
    with pytest.raises(ValueError, match="1-based"):
        hit_rate(np.array([0, 3]), 10)


def test_the_samplers_default_seed_is_zero() -> None:
    """sample_negatives without a seed draws what seed 0 draws (the protocol's fixed draw)."""
    users = np.arange(5)
    exclude = sp.csr_matrix((5, 300))
    default = sample_negatives(300, users, users, exclude, 20)
    np.testing.assert_array_equal(default, sample_negatives(300, users, users, exclude, 20, seed=0))
    assert not np.array_equal(default, sample_negatives(300, users, users, exclude, 20, seed=1))
