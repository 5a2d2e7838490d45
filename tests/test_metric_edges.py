"""Edges of the metrics the known-answer tests leave alone: range checks at their bounds, gather blocks, top-k of all columns, big key spaces."""

import numpy as np
import pytest
import scipy.sparse as sp

from cdimf.common.core import metrics
from cdimf.common.core.metrics import full_catalog_metrics, sample_negatives, sampled_ranks, top_k_positions


def _binary(pairs: list[tuple[int, int]], shape: tuple[int, int]) -> sp.csr_matrix:
    """Binary CSR from (row, column) pairs."""
    rows, cols = zip(*pairs, strict=True) if pairs else ((), ())
    return sp.csr_matrix((np.ones(len(pairs), dtype=np.float32), (rows, cols)), shape=shape)


def test_membership_of_keys_beyond_the_largest_is_false() -> None:
    """A key above every sorted key is absent (its search slot is one past the end), odd and even sizes."""
    assert metrics._contains(np.array([2, 5, 9]), np.array([1, 5, 10, 9])).tolist() == [False, True, False, True]
    assert metrics._contains(np.array([2, 5]), np.array([6, 2])).tolist() == [False, True]


def test_test_items_past_the_catalog_are_refused_whatever_their_distance() -> None:
    """An item index n_items + 1 is out of range as much as n_items is."""
    train = _binary([(0, 0), (1, 1)], (2, 3))
    vecs = np.ones((2, 2)), np.ones((3, 2))
    for item in (3, 4):
        with pytest.raises(ValueError, match="test_items holds indices outside"):
            full_catalog_metrics(*vecs, train, np.array([0]), np.array([item]))


def test_one_dimensional_item_factors_are_refused() -> None:
    """item_vecs must be 2-d: a 1-d array is a ValueError naming the shapes, not an IndexError later."""
    train = _binary([(0, 0), (1, 1)], (2, 3))
    with pytest.raises(ValueError, match="must be 2-d with equal rank"):
        full_catalog_metrics(np.ones((2, 2)), np.ones(3), train, np.array([0]), np.array([2]))


def test_a_candidate_equal_to_the_item_count_is_refused() -> None:
    """Candidate n_items is one past the last item: a ValueError before any scoring."""
    train = _binary([(0, 0)], (1, 3))
    with pytest.raises(ValueError, match="candidates hold item indices outside"):
        sampled_ranks(np.ones((1, 2)), np.ones((3, 2)), np.array([[1, 3]]), np.array([0]), train, method="gather")


def test_gathered_ranks_over_several_row_blocks_equal_a_brute_force() -> None:
    """200 candidates of rank 512 make blocks of 20 rows (2**21 floats each): 50 rows span three blocks.

    Integer factors in {-1, 0, 1} score exactly in float32, so ties are exact too; the rank is
    1 + the negatives scoring >= the target that are not the user's training items.
    """
    rng = np.random.default_rng(5)
    n_users, n_items, rank, n_cand = 50, 400, 512, 200
    users = rng.integers(-1, 2, size=(n_users, rank)).astype(np.float32)
    items = rng.integers(-1, 2, size=(n_items, rank)).astype(np.float32)
    candidates = np.stack([rng.choice(n_items, size=n_cand, replace=False) for _ in range(n_users)])
    train_pairs = sorted({(int(u), int(i)) for u, i in zip(rng.integers(0, n_users, 3000), rng.integers(0, n_items, 3000), strict=True)
                          if i != candidates[u, 0]})
    train = _binary(train_pairs, (n_users, n_items))
    seen = set(train_pairs)
    expected = []
    for user in range(n_users):
        scores = [int(np.dot(users[user].astype(np.int64), items[item].astype(np.int64))) for item in candidates[user]]
        expected.append(1 + sum(1 for column in range(1, n_cand)
                                if scores[column] >= scores[0] and (user, int(candidates[user, column])) not in seen))
    ranks = sampled_ranks(users, items, candidates, np.arange(n_users), train, method="gather")
    assert ranks.tolist() == expected


def test_top_k_of_every_column_sorts_the_whole_row() -> None:
    """k equal to the number of columns is allowed and gives the full descending order."""
    best, scores = top_k_positions(np.array([[3.0, 1.0, 2.0], [0.5, 4.0, 1.5]]), 3)
    assert best.tolist() == [[0, 2, 1], [1, 2, 0]]
    assert scores.tolist() == [[3.0, 2.0, 1.0], [4.0, 1.5, 0.5]]


def test_an_empty_catalog_covers_nothing() -> None:
    """Coverage over no catalog is 0, not a division by zero or full coverage."""
    assert metrics._coverage(np.full((2, 3), -1), 0) == 0.0
    assert metrics._coverage(np.array([[0, 2, -1], [2, 1, -1]]), 4) == 3 / 4


def test_negatives_from_a_key_space_beyond_int32_stay_distinct_allowed_and_in_range() -> None:
    """20,000 negatives from 100,000 items: about 24,500 draws, so draw keys reach 2.4e9 > 2**31 - 1.

    The keys must then be int64; int32 keys would wrap and give repeats or items out of range.
    """
    n_items, n_negatives = 100_000, 20_000
    exclude = _binary([(0, 7), (0, 99_999)], (1, n_items))
    candidates = sample_negatives(n_items, np.array([0]), np.array([3]), exclude, n_negatives=n_negatives, seed=1)
    negatives = candidates[0, 1:].astype(np.int64)
    assert candidates.shape == (1, 1 + n_negatives) and candidates[0, 0] == 3
    assert np.unique(negatives).size == n_negatives
    assert negatives.min() >= 0 and negatives.max() < n_items
    assert not set(negatives.tolist()) & {3, 7, 99_999}


@pytest.mark.parametrize(("users", "items"), [([0, 1], [2]), ([0], [2, 1]), ([[0]], [[2]]), (0, 2)])
def test_test_rows_must_be_equal_length_one_dimensional_arrays(users: object, items: object) -> None:
    """Unequal lengths either way, 2-d and 0-d rows are all refused with the same message."""
    train = _binary([(0, 0), (1, 1)], (2, 3))
    with pytest.raises(ValueError, match="must be equal-length 1-d arrays"):
        full_catalog_metrics(np.ones((2, 2)), np.ones((3, 2)), train, np.array(users), np.array(items))


@pytest.mark.parametrize(("users", "items", "message"), [
    ([], [], "no test rows"),
    ([-1], [0], "test_users holds indices outside"),
    ([3], [0], "test_users holds indices outside"),
    ([0], [-1], "test_items holds indices outside"),
])
def test_empty_rows_and_indices_just_outside_either_end_are_refused(users: list[int], items: list[int], message: str) -> None:
    """No rows, user -1 or n_users + 1 (2 users) and item -1 are each refused with their own message."""
    train = _binary([(0, 0), (1, 1)], (2, 3))
    with pytest.raises(ValueError, match=message):
        full_catalog_metrics(np.ones((2, 2)), np.ones((3, 2)), train, np.array(users, dtype=np.int64), np.array(items, dtype=np.int64))


def test_a_catalog_without_item_zero_is_valid_and_one_past_its_end_plus_one_is_refused() -> None:
    """Catalog [1, 2] of 3 items: user 0 (trained on item 0) scores item 2 at 4, item 1 at 2, so its top 1 is its test item 2.

    HR, NDCG and Recall@1 are then 1 and Coverage@1 is one of the catalog's two items; a catalog
    naming item 4 of 3 is refused.
    """
    train = _binary([(0, 0), (1, 1)], (2, 3))
    users, items = np.ones((2, 2)), np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    result = full_catalog_metrics(users, items, train, np.array([0]), np.array([2]), k=1, catalog=np.array([1, 2]))
    assert result == {"HR@1": 1.0, "NDCG@1": 1.0, "Recall@1": 1.0, "Coverage@1": 0.5, "users": 1.0}
    with pytest.raises(ValueError, match="catalog holds item indices outside"):
        full_catalog_metrics(users, items, train, np.array([0]), np.array([2]), k=1, catalog=np.array([0, 4]))
