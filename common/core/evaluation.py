"""Held-out evaluation shared by the node, `cdimf reproduce` and the tuner.

One held-out set type (rows, items and their fixed candidates), one candidate draw (the
paper's target + uniform negatives, drawn once from a seed), one sampled evaluation (HR@k and
NDCG@k) and one top-k for serving. The ranking kernels they build on live in metrics.py.
"""

import threading
from dataclasses import dataclass
from typing import Protocol

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


class HeldOutRows(Protocol):
    """What an evaluation reads of a held-out split: a HeldOut, or a DrawnOnUse whose candidates come on first use."""

    @property
    def users(self) -> np.ndarray:
        """Held-out user rows."""
        ...

    @property
    def items(self) -> np.ndarray:
        """Held-out item columns."""
        ...

    @property
    def candidates(self) -> np.ndarray:
        """Candidates per row, target first."""
        ...


class DrawnOnUse:
    """A held-out split whose candidates (draw_candidates, the same fixed inputs and seed, so the same draw) are drawn on first use.

    A node that never validates never holds them (a million rows of 100 candidates are 400 MB),
    and one that does holds them only from its first validation on. Bad arguments (a catalog
    with no negatives to draw) are refused here, at once, as the eager draw would.
    """

    def __init__(self, n_items: int, users: np.ndarray, items: np.ndarray, n_users: int, seed: int, negatives: int = PAPER_NEGATIVES) -> None:
        self.users, self.items = users, items
        self._n_items, self._n_users, self._seed = n_items, n_users, seed
        self._negatives = _negatives_to_draw(n_items, users, items, n_users, negatives, shrink=True)
        self._lock = threading.Lock()
        self._candidates: np.ndarray | None = None

    @property
    def negatives(self) -> int:
        """Negatives per row the draw will give (fewer than asked when the catalog has no more for some row)."""
        return self._negatives

    @property
    def candidates(self) -> np.ndarray:
        """The candidates, drawn once (under a lock: a validation and an Evaluate call may ask at once)."""
        with self._lock:
            if self._candidates is None:
                exclude = pairs_to_csr(self.users, self.items, (self._n_users, self._n_items))
                self._candidates = sample_negatives(self._n_items, self.users, self.items, exclude, self._negatives, self._seed,
                                                    np.arange(self._n_items))
            return self._candidates


def _negatives_to_draw(n_items: int, users: np.ndarray, items: np.ndarray, n_users: int, negatives: int, shrink: bool) -> int:
    """Negatives per row: `negatives`, or with `shrink` as many as every row can get; ValueError when none can."""
    if negatives < 1:
        raise ValueError(f"negatives must be >= 1, got {negatives}")
    if not shrink:
        return negatives
    exclude = pairs_to_csr(users, items, (n_users, n_items))
    allowed = n_items - np.diff(exclude.indptr)[users] if len(users) else np.array([negatives])
    n_negatives = int(min(negatives, allowed.min()))
    if n_negatives < 1:
        raise ValueError(f"a catalog of {n_items} items leaves no negatives to rank held-out items against")
    return n_negatives


def draw_candidates(n_items: int, users: np.ndarray, items: np.ndarray, n_users: int, seed: int,
                    negatives: int = PAPER_NEGATIVES, *, shrink: bool = True) -> HeldOut:
    """The paper's candidates (target + uniform negatives over the whole catalog), drawn once from `seed`.

    Negatives leave out the row's user's held-out items. `negatives` per row (the paper's 999 by
    default); with `shrink`, on a catalog too small for that (tiny test data), as many as every
    row can get, so that the protocol still ranks each target among the same number of
    candidates; without it, such a catalog is a ValueError.
    """
    n_negatives = _negatives_to_draw(n_items, users, items, n_users, negatives, shrink)
    exclude = pairs_to_csr(users, items, (n_users, n_items))
    candidates = sample_negatives(n_items, users, items, exclude, n_negatives, seed, np.arange(n_items))
    return HeldOut(users, items, candidates)


def evaluate(held: HeldOutRows, user_vecs: np.ndarray, item_vecs: np.ndarray, train: sp.csr_matrix, k: int) -> dict[str, float]:
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
