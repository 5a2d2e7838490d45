"""Held-out evaluation: the candidate draw, the sampled evaluation and the serving top-k."""

import numpy as np
import pytest
import scipy.sparse as sp

from cdimf.common.core.evaluation import DrawnOnUse, draw_candidates, evaluate, top_k
from cdimf.common.core.metrics import hit_rate, ndcg, sample_negatives, sampled_ranks


def _binary(pairs: list[tuple[int, int]], shape: tuple[int, int]) -> sp.csr_matrix:
    """Binary CSR from (row, column) pairs."""
    rows, cols = zip(*pairs) if pairs else ((), ())
    return sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=shape)


def test_candidates_and_top_k() -> None:
    """draw_candidates puts the target first; top_k leaves out seen items and sorts by score."""
    held = draw_candidates(50, np.array([0, 1]), np.array([3, 4]), 2, seed=0)
    assert held.candidates.shape == (2, 50) and list(held.candidates[:, 0]) == [3, 4]
    items = np.eye(5, dtype=np.float32)
    columns, scores = top_k(np.array([5, 4, 3, 2, 1], np.float32), items, np.array([0, 2]), 2)
    assert list(columns) == [1, 3] and list(scores) == [4.0, 2.0]
    assert len(top_k(np.ones(5, np.float32), items, np.arange(5), 3)[0]) == 0


def test_evaluate_matches_ranks_and_perfect_model() -> None:
    """evaluate on drawn candidates equals its parts, keeps the draw of its seed, and scores a perfect model 1."""
    rng = np.random.default_rng(5)
    n_users, n_items, rank = 30, 200, 4
    train = sp.random(n_users, n_items, density=0.05, format="csr", random_state=6, dtype=np.float32)
    test_users = np.arange(n_users)
    test_items = rng.integers(0, n_items, size=n_users)
    item_vecs = rng.standard_normal((n_items, rank), dtype=np.float32)
    user_vecs = rng.standard_normal((n_users, rank), dtype=np.float32)
    held = draw_candidates(n_items, test_users, test_items, n_users, seed=3, negatives=20)
    metrics = evaluate(held, user_vecs, item_vecs, train, k=5)
    exclude = _binary(list(zip(test_users.tolist(), test_items.tolist())), (n_users, n_items))
    ranks = sampled_ranks(user_vecs, item_vecs,
                          sample_negatives(n_items, test_users, test_items, exclude, 20, seed=3), test_users, train)
    assert metrics == {"HR@5": hit_rate(ranks, 5), "NDCG@5": ndcg(ranks, 5)} and len(held.users) == n_users
    candidates = sample_negatives(n_items, test_users, test_items, exclude, 20, seed=3)
    np.testing.assert_array_equal(held.candidates, candidates)
    # A model that scores each user's target far above everything else is perfect.
    one_hot_items = np.eye(n_items, dtype=np.float32)
    oracle_users = 10 * one_hot_items[test_items]
    perfect = evaluate(draw_candidates(n_items, test_users, test_items, n_users, seed=0, negatives=20),
                       oracle_users, one_hot_items, train, k=1)
    assert perfect["HR@1"] == 1.0 and perfect["NDCG@1"] == 1.0


def test_a_strict_draw_refuses_a_catalog_too_small_for_its_negatives() -> None:
    """Without shrink (reproduce's table promises its negatives), too small a catalog is an error, not fewer negatives."""
    users, items = np.array([0, 1]), np.array([3, 4])
    assert draw_candidates(10, users, items, 2, seed=0, negatives=20).candidates.shape == (2, 10)
    with pytest.raises(ValueError, match="only 9 items"):
        draw_candidates(10, users, items, 2, seed=0, negatives=20, shrink=False)
    assert draw_candidates(10, users, items, 2, seed=0, negatives=9, shrink=False).candidates.shape == (2, 10)


def test_k_must_be_positive() -> None:
    """evaluate refuses k < 1."""
    held = draw_candidates(10, np.array([0]), np.array([1]), 1, seed=0, negatives=5)
    with pytest.raises(ValueError, match="k must be"):
        evaluate(held, np.ones((1, 2), np.float32), np.ones((10, 2), np.float32), sp.csr_matrix((1, 10), dtype=np.float32), 0)


def test_candidates_drawn_on_use_are_the_eager_draw_and_bad_catalogs_are_refused_at_once() -> None:
    rng = np.random.default_rng(4)
    users = np.sort(rng.choice(500, 200, replace=False))
    items = rng.integers(0, 300, 200)
    lazy = DrawnOnUse(300, users, items, 500, seed=7, negatives=99)
    assert lazy._candidates is None  # nothing held before the first use
    eager = draw_candidates(300, users, items, 500, seed=7, negatives=99)
    np.testing.assert_array_equal(lazy.candidates, eager.candidates)
    assert lazy.candidates is lazy.candidates  # drawn once
    # one item in the catalog and it is the target: no negative to draw, refused before any use
    with pytest.raises(ValueError, match="leaves no negatives"):
        DrawnOnUse(1, np.array([0]), np.array([0]), 1, seed=0, negatives=5)
