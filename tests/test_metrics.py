"""Evaluation metrics against hand-computed cases, and the negative sampler's properties."""

import math

import numpy as np
import pytest
import scipy.sparse as sp

from cdimf.common.core.evaluation import top_k
from cdimf.common.core.metrics import (
    full_catalog_metrics,
    hit_rate,
    ndcg,
    sample_negatives,
    sampled_ranks,
)


def _binary(pairs: list[tuple[int, int]], shape: tuple[int, int]) -> sp.csr_matrix:
    """Binary CSR from (row, column) pairs."""
    rows, cols = zip(*pairs) if pairs else ((), ())
    return sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=shape)


def test_hit_rate_and_ndcg_by_hand() -> None:
    """HR@k and NDCG@k match hand-computed values."""
    ranks = np.array([1, 2, 11, 10])
    assert hit_rate(ranks, 10) == pytest.approx(0.75)
    assert ndcg(ranks, 10) == pytest.approx((1.0 + 1 / math.log2(3) + 0.0 + 1 / math.log2(11)) / 4)
    assert hit_rate(ranks, 1) == pytest.approx(0.25)
    assert ndcg(ranks, 1) == pytest.approx(0.25)


def test_rank_metrics_reject_bad_input() -> None:
    """Empty ranks, ranks below 1 and k < 1 are errors."""
    with pytest.raises(ValueError, match="no ranks"):
        hit_rate(np.array([], dtype=np.int64), 10)
    with pytest.raises(ValueError, match="1-based"):
        ndcg(np.array([0, 3]), 10)
    with pytest.raises(ValueError, match="k must be"):
        ndcg(np.array([1]), 0)


# Scores of items 0..5 for user 0 are 1, 2, 3, 4, 0, 2 (item 5 ties with item 1).
ITEM_VECS = np.array([[1, 0], [2, 0], [3, 0], [4, 0], [0, 0], [2, 0]], dtype=np.float32)
USER_VECS = np.array([[1, 0], [0, 1]], dtype=np.float32)


@pytest.mark.parametrize("method", ["gemm", "gather"])
def test_sampled_ranks_by_hand(method: str) -> None:
    """Ranks on hand-built scores: outranking, pushed training items, pessimistic ties."""
    candidates = np.array([
        [1, 0, 2, 3, 4],  # target score 2; 3 and 4 above -> rank 3
        [1, 0, 2, 3, 4],  # same, but item 3 is in the user's train -> pushed, rank 2
        [1, 5, 0, 4, 2],  # item 5 ties the target: pessimistic -> 2 (tie) + 3 (item 2) -> rank 3
        [3, 0, 1, 2, 4],  # best item and in train itself: the target is never pushed -> rank 1
        [0, 1, 2, 3, 4],  # user 1 scores every item 0: all four tie the target -> rank 5
    ])
    users = np.array([0, 2, 0, 2, 1])
    # Row 0 of the user-vector matrix is user 0; user 2 has the same vector but item 3 in train.
    user_vecs = np.vstack([USER_VECS, USER_VECS[:1]])
    train = _binary([(2, 3)], (3, 6))
    ranks = sampled_ranks(user_vecs, ITEM_VECS, candidates, users, train, method=method)
    assert ranks.tolist() == [3, 2, 3, 1, 5]


def test_sampled_ranks_paths_agree_on_random_data() -> None:
    """The GEMM and gather scoring paths give the same ranks."""
    rng = np.random.default_rng(3)
    n_users, n_items = 40, 300
    train = sp.random(n_users, n_items, density=0.1, format="csr", random_state=4, dtype=np.float32)
    users = rng.integers(0, n_users, size=200)
    candidates = np.stack([rng.choice(n_items, size=50, replace=False) for _ in range(200)])
    user_vecs = rng.standard_normal((n_users, 8), dtype=np.float32)
    item_vecs = rng.standard_normal((n_items, 8), dtype=np.float32)
    gemm = sampled_ranks(user_vecs, item_vecs, candidates, users, train, method="gemm")
    gather = sampled_ranks(user_vecs, item_vecs, candidates, users, train, method="gather")
    assert np.array_equal(gemm, gather)
    # float64 brute force: 1 + the negatives outside the user's training items scoring at least the target
    trained = train.toarray() != 0
    scores = np.einsum("rk,rck->rc", user_vecs[users].astype(np.float64), item_vecs[candidates].astype(np.float64))
    above = (scores[:, 1:] >= scores[:, :1]) & ~trained[users[:, None], candidates[:, 1:]]
    np.testing.assert_array_equal(gemm, 1 + above.sum(axis=1))


def test_sampled_ranks_rejects_nan_factors() -> None:
    """NaN factors are an error, not a lucky rank."""
    bad = USER_VECS.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sampled_ranks(bad, ITEM_VECS, np.array([[1, 0, 2]]), np.array([0]), _binary([], (2, 6)))


def _check_candidates(candidates: np.ndarray, test_items: np.ndarray, banned: list[set[int]],
                      allowed: set[int], n_negatives: int) -> None:
    """Column 0 is the target; negatives are distinct, allowed, and never banned for their row."""
    assert candidates.shape == (len(test_items), 1 + n_negatives)
    # item indices of a catalog below 2**31 items: int32, half the memory of int64
    assert candidates.dtype == np.int32
    assert np.array_equal(candidates[:, 0], test_items)
    for row, negatives in enumerate(candidates[:, 1:].tolist()):
        assert len(set(negatives)) == n_negatives
        assert set(negatives) <= allowed
        assert not set(negatives) & banned[row]
        assert test_items[row] not in negatives


@pytest.mark.parametrize("n_items", [30, 400])  # small pools take the key path, large ones rejection
def test_sample_negatives_properties(n_items: int) -> None:
    """Negatives are distinct, inside the catalog, never excluded, and reproducible from the seed."""
    rng = np.random.default_rng(0)
    n_users, n_negatives = 25, 10
    test_users = np.repeat(np.arange(n_users), 2)
    test_items = rng.integers(0, n_items, size=test_users.size)
    extra = [(u, int(i)) for u in range(n_users) for i in rng.integers(0, n_items, size=3)]
    exclude = _binary([*zip(test_users.tolist(), test_items.tolist()), *extra], (n_users, n_items))
    catalog = np.setdiff1d(np.arange(n_items), [1, 2, 3])
    candidates = sample_negatives(n_items, test_users, test_items, exclude, n_negatives, seed=7, catalog=catalog)
    banned = [set(exclude[u].indices.tolist()) for u in test_users]
    _check_candidates(candidates, test_items, banned, set(catalog.tolist()), n_negatives)
    again = sample_negatives(n_items, test_users, test_items, exclude, n_negatives, seed=7, catalog=catalog)
    other = sample_negatives(n_items, test_users, test_items, exclude, n_negatives, seed=8, catalog=catalog)
    assert np.array_equal(candidates, again)
    assert not np.array_equal(candidates, other)


def test_sample_negatives_excludes_target_even_without_exclude_matrix() -> None:
    """The target is never a negative, even if exclude does not list it."""
    test_items = np.arange(10)
    candidates = sample_negatives(11, np.zeros(10, dtype=np.int64), test_items, _binary([], (1, 11)), 10, seed=1)
    # 11 items minus the target leaves exactly 10: each row is all other items.
    for row, target in enumerate(test_items):
        assert sorted(candidates[row, 1:].tolist()) == [i for i in range(11) if i != target]


def test_sample_negatives_heavy_exclusion_redraws_rows() -> None:
    """Rows whose first round of draws falls short are redrawn correctly."""
    n_items, n_negatives = 100, 20
    # User 0 may only draw items 80..99, exactly 20: a round of draws misses one of them now and then.
    exclude = _binary([(0, i) for i in range(80)] + [(1, 0)], (2, n_items))
    test_users = np.array([0, 1] * 50)
    test_items = np.where(test_users == 0, 0, 1)
    candidates = sample_negatives(n_items, test_users, test_items, exclude, n_negatives, seed=2)
    banned = [set(range(80)) if u == 0 else {0, 1} for u in test_users]
    _check_candidates(candidates, test_items, banned, set(range(n_items)), n_negatives)
    assert all(set(row) == set(range(80, 100)) for row in candidates[test_users == 0, 1:].tolist())


@pytest.mark.parametrize("n_items", [24, 200])
def test_sample_negatives_is_uniform(n_items: int) -> None:
    """Every allowed item is drawn at the uniform rate."""
    n_rows, n_negatives = 4000, 5
    exclude = _binary([(0, 0), (0, 1)], (1, n_items))
    candidates = sample_negatives(n_items, np.zeros(n_rows, dtype=np.int64), np.zeros(n_rows, dtype=np.int64),
                                  exclude, n_negatives, seed=11)
    counts = np.bincount(candidates[:, 1:].ravel(), minlength=n_items)
    assert counts[:2].sum() == 0
    expected = n_rows * n_negatives / (n_items - 2)
    spread = math.sqrt(expected)
    assert np.abs(counts[2:] - expected).max() < 5 * spread


def test_sample_negatives_too_few_items() -> None:
    """A row with fewer allowed items than negatives is an error."""
    with pytest.raises(ValueError, match="only 3 items"):
        sample_negatives(5, np.array([0]), np.array([0]), _binary([(0, 4)], (1, 5)), n_negatives=4)


def test_full_catalog_metrics_by_hand() -> None:
    """Full-catalog HR, NDCG, Recall and coverage match a hand-computed case."""
    # Item scores for user 0: items 0..5 -> 1, 2, 3, 4, 0, 2.5; user 1 -> reversed preference.
    item_vecs = np.array([[1, 4], [2, 3], [3, 2], [4, 1], [0, 0], [2.5, 0]], dtype=np.float32)
    user_vecs = np.array([[1, 0], [0, 1]], dtype=np.float32)
    # User 0 trained on item 3 (its best): top-2 = items 2, 5. User 1: top-2 = items 0, 1.
    train = _binary([(0, 3), (1, 4)], (2, 6))
    test_users = np.array([0, 0, 1])
    test_items = np.array([5, 0, 1])
    metrics = full_catalog_metrics(user_vecs, item_vecs, train, test_users, test_items, k=2,
                                   catalog=np.arange(6))
    # User 0: item 5 at position 2 (hit), item 0 missed; user 1: item 1 at position 2 (hit).
    ideal_two = 1 + 1 / math.log2(3)
    assert metrics["HR@2"] == pytest.approx(1.0)
    assert metrics["Recall@2"] == pytest.approx((1 / 2 + 1) / 2)
    assert metrics["NDCG@2"] == pytest.approx(((1 / math.log2(3)) / ideal_two + (1 / math.log2(3)) / 1) / 2)
    assert metrics["Coverage@2"] == pytest.approx(4 / 6)
    assert metrics["users"] == 2.0
    # the serving top-k recommends the same items, best first, with their scores
    for user, (expected_items, expected_scores) in enumerate((([2, 5], [3.0, 2.5]), ([0, 1], [4.0, 3.0]))):
        items, scores = top_k(user_vecs[user], item_vecs, train[user].indices, 2)
        assert items.tolist() == expected_items and scores.tolist() == expected_scores


def test_full_catalog_default_catalog_is_training_items() -> None:
    """By default only items with a training entry are recommended."""
    item_vecs = np.array([[1.0], [2.0], [3.0], [9.0]], dtype=np.float32)
    user_vecs = np.array([[1.0], [1.0]], dtype=np.float32)
    # Item 3 scores best but no user trained on it: outside the default catalog, never recommended.
    train = _binary([(0, 0), (1, 1), (1, 2)], (2, 4))
    metrics = full_catalog_metrics(user_vecs, item_vecs, train, np.array([0]), np.array([2]), k=1)
    assert metrics["HR@1"] == 1.0
    assert metrics["Coverage@1"] == pytest.approx(1 / 3)


def test_out_of_range_indices_are_rejected() -> None:
    """Out-of-range user or item indices raise ValueError."""
    train = _binary([(0, 1)], (2, 6))
    with pytest.raises(ValueError, match="test_items holds indices outside"):
        full_catalog_metrics(USER_VECS, ITEM_VECS, train, np.array([0]), np.array([6]))
    with pytest.raises(ValueError, match="test_users holds indices outside"):
        sampled_ranks(USER_VECS, ITEM_VECS, np.array([[1, 0]]), np.array([2]), train)
    with pytest.raises(ValueError, match="candidates hold item indices outside"):
        sampled_ranks(USER_VECS, ITEM_VECS, np.array([[1, 7]]), np.array([0]), train)


def test_small_pool_sampler_keeps_exclusions_across_row_blocks() -> None:
    """The small-pool sampler keeps each row's exclusions and uniformity across row blocks."""
    # 200k rows x 24 items spans more than one block of the small-pool sampler.
    n_items, n_rows = 24, 200_000
    exclude = _binary([(0, 3), (0, 4), (1, 5)], (2, n_items))
    test_users = np.arange(n_rows) % 2
    test_items = np.where(test_users == 0, 0, 1)
    candidates = sample_negatives(n_items, test_users, test_items, exclude, n_negatives=5, seed=9)
    negatives = candidates[:, 1:]
    assert not np.isin(negatives[test_users == 0], [0, 3, 4]).any()
    assert not np.isin(negatives[test_users == 1], [1, 5]).any()
    ordered = np.sort(negatives, axis=1)
    assert np.all(ordered[:, 1:] != ordered[:, :-1])
    # Late rows are as uniform as early ones: item 2 is drawn at its expected rate in the last block.
    late = negatives[-20_000:][test_users[-20_000:] == 0]
    # User 0 draws 5 of 21 allowed items: item 2 is in 5/21 of its rows (standard error ~0.004).
    assert abs(np.mean((late == 2).any(axis=1)) - 5 / 21) < 0.02
