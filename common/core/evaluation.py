"""Held-out evaluation shared by the node, `cdimf reproduce` and the tuner.

One held-out set type (rows, items and their fixed candidates), one candidate draw (the
paper's target + uniform negatives, drawn once from a seed), one sampled evaluation (HR@k and
NDCG@k) and one top-k for serving. The ranking kernels they build on live in metrics.py.
"""

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from cdimf.common.core.metrics import hit_rate, ndcg, sample_negatives, sampled_ranks, top_k_positions
from cdimf.common.core.sparse import pairs_to_csr

PAPER_NEGATIVES = 999


@dataclass(frozen=True)
class HeldOut:
    """Held-out (user row, item column) pairs of one split with their fixed candidates (target first)."""

    users: np.ndarray
    items: np.ndarray
    candidates: np.ndarray


def draw_candidates(n_items: int, users: np.ndarray, items: np.ndarray, n_users: int, seed: int,
                    negatives: int = PAPER_NEGATIVES, *, shrink: bool = True) -> HeldOut:
    """The paper's candidates (target + uniform negatives over the whole catalog), drawn once from `seed`.

    Negatives leave out the row's user's held-out items. `negatives` per row (the paper's 999 by
    default); with `shrink`, on a catalog too small for that (tiny test data), as many as every
    row can get, so that the protocol still ranks each target among the same number of
    candidates; without it, such a catalog is a ValueError.
    """
    if negatives < 1:
        raise ValueError(f"negatives must be >= 1, got {negatives}")
    exclude = pairs_to_csr(users, items, (n_users, n_items))
    n_negatives = negatives
    if shrink:
        allowed = n_items - np.diff(exclude.indptr)[users] if len(users) else np.array([negatives])
        n_negatives = int(min(negatives, allowed.min()))
        if n_negatives < 1:
            raise ValueError(f"a catalog of {n_items} items leaves no negatives to rank held-out items against")
    candidates = sample_negatives(n_items, users, items, exclude, n_negatives, seed, np.arange(n_items))
    return HeldOut(users, items, candidates)


def evaluate(held: HeldOut, user_vecs: np.ndarray, item_vecs: np.ndarray, train: sp.csr_matrix, k: int) -> dict[str, float]:
    """HR@k and NDCG@k (fractions) of a held-out split under the paper's sampled protocol; `train`'s items are pushed down."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ranks = sampled_ranks(user_vecs, item_vecs, held.candidates, held.users, train)
    return {f"HR@{k}": hit_rate(ranks, k), f"NDCG@{k}": ndcg(ranks, k)}


def top_k(user_vec: np.ndarray, item_vecs: np.ndarray, seen: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Item columns and scores of the k best items for one user vector, best first, `seen` columns left out."""
    scores = item_vecs @ user_vec
    scores[seen] = -np.inf
    available = len(scores) - len(np.unique(seen))
    k = max(0, min(k, available))
    if k == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    best, best_scores = top_k_positions(scores[None, :], k)
    return best[0].astype(np.int64), best_scores[0].astype(np.float32)
