"""HR@k and NDCG@k on ranks that never reach 1, the sampler's default seed, full-catalog hits on item 0, by hand."""

import numpy as np
import pytest
import scipy.sparse as sp

from cdimf.common.core.metrics import full_catalog_metrics, hit_rate, ndcg, sample_negatives


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


def test_full_catalog_metrics_count_a_hit_on_item_zero_and_pad_short_top_lists() -> None:
    """Item 0 is an item like any other: user 0's best untrained item is 0, its test item, a hit at
    rank 1. User 1 trained on 2 of the 3 items, so its top 2 holds item 2 (its test item, rank 1)
    and then padding, which is never a hit nor a covered item."""
    item_vecs = np.array([[3.0], [2.0], [1.0]], dtype=np.float32)
    user_vecs = np.array([[1.0], [1.0]], dtype=np.float32)
    train = sp.csr_matrix(np.array([[0, 1, 0], [1, 1, 0]], dtype=np.float32))
    metrics = full_catalog_metrics(user_vecs, item_vecs, train, np.array([0, 1]), np.array([0, 2]), k=2, catalog=np.arange(3))
    # user 0: top 2 = items 0, 2 (1 is trained), test item 0 at rank 1; user 1: top = item 2, then padding
    assert metrics["HR@2"] == 1.0
    assert metrics["NDCG@2"] == pytest.approx(1.0)
    assert metrics["Recall@2"] == 1.0
    assert metrics["Coverage@2"] == pytest.approx(2 / 3)


def test_the_samplers_block_size_never_changes_the_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks consume the generator in row order: one row per block, the default and one block for
    everything give the same negatives from one seed (what makes the block size a memory setting)."""
    from cdimf.common.core import metrics

    users = np.arange(60)
    items = (users * 7) % 500
    exclude = sp.random(60, 500, density=0.05, format="csr", random_state=3)
    default = sample_negatives(500, users, items, exclude, 99, seed=4)
    for draws in (1, 1 << 30):
        monkeypatch.setattr(metrics, "_SAMPLER_CHUNK_DRAWS", draws)
        np.testing.assert_array_equal(sample_negatives(500, users, items, exclude, 99, seed=4), default)


def test_the_evaluation_boundaries_by_hand() -> None:
    """negatives >= 1 and k >= 1 (0 refused, 1 accepted); a catalog that leaves one negative gives
    one, none is refused; HeldOut is frozen; top_k leaves seen items out even when every score is
    negative, returns only what is available (nothing when all is seen) with float32 scores."""
    import dataclasses

    from cdimf.common.core.evaluation import HeldOut, draw_candidates, evaluate, top_k

    users, items = np.array([0, 1]), np.array([0, 1])
    with pytest.raises(ValueError, match="^negatives must be >= 1, got 0$"):
        draw_candidates(5, users, items, 2, seed=0, negatives=0)
    held = draw_candidates(5, users, items, 2, seed=0, negatives=1, shrink=False)
    assert held.candidates.shape == (2, 2)
    # two items: each row's user holds one held-out item, so exactly one negative is left
    assert draw_candidates(2, users, items, 2, seed=0, negatives=999).candidates.shape == (2, 2)
    with pytest.raises(ValueError, match="leaves no negatives"):
        draw_candidates(1, np.array([0]), np.array([0]), 1, seed=0, negatives=999)
    with pytest.raises(dataclasses.FrozenInstanceError):
        held.users = users  # type: ignore[misc]
    train = sp.csr_matrix((2, 5), dtype=np.float32)
    vectors = np.ones((2, 1), np.float32)
    with pytest.raises(ValueError, match="^k must be >= 1, got 0$"):
        evaluate(held, vectors, np.ones((5, 1), np.float32), train, 0)
    assert evaluate(held, vectors, np.arange(5, 0, -1, dtype=np.float32)[:, None], train, 1)["HR@1"] == 1.0
    item_vecs = -np.arange(1, 6, dtype=np.float32)[:, None]  # scores -1..-5: item 0 best
    best, scores = top_k(np.ones(1, np.float32), item_vecs, np.array([0, 1, 1]), 10)
    assert best.tolist() == [2, 3, 4] and scores.tolist() == [-3.0, -4.0, -5.0] and scores.dtype == np.float32
    best, scores = top_k(np.ones(1, np.float32), item_vecs, np.array([0]), 1)
    assert best.tolist() == [1] and scores.tolist() == [-2.0]
    best, scores = top_k(np.ones(1, np.float32), item_vecs, np.arange(5), 3)
    assert best.shape == (0,) and scores.shape == (0,) and scores.dtype == np.float32
    best, scores = top_k(np.ones(1, np.float32), item_vecs, np.array([], np.int64), 0)
    assert best.shape == (0,) and scores.shape == (0,)
    assert isinstance(HeldOut, type)
