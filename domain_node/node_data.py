"""One node's private data: its own train/valid/test files only, its user rows and the paper's held-out protocol.

Rows of the node = users of its train file plus users that appear only in its valid/test files.
The latter have no interactions here: they register as non-holders and, when another domain
holds them, become receiver rows (cold-start users scored with their consensus vector Z).
Without a valid file, validation is one leave-one-out entry per user carved from train, seeded
by (`valid_seed`, crc32 of the domain name) so that it never depends on the other domains.
"""

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from cdimf.common.config import VALID_NEGATIVES
from cdimf.common.core.metrics import hit_rate, ndcg, pairs_to_csr, sample_negatives, sampled_ranks
from cdimf.domain_node.data import DataError, IdMap, RawInteractions, leave_one_out, read_interactions

PAPER_NEGATIVES = 999
EVALUATION_SEED = 0


@dataclass(frozen=True)
class HeldOut:
    """Held-out (user row, item column) pairs of one split with their fixed candidates (target first)."""

    users: np.ndarray
    items: np.ndarray
    candidates: np.ndarray


@dataclass(eq=False)
class NodeData:
    """What a node reads from disk: id maps, the training matrix, holder flags, held-out splits."""

    domain: str
    users: IdMap
    items: IdMap
    train: sp.csr_matrix
    valid: HeldOut | None
    test: HeldOut | None
    valid_carved: bool

    @property
    def holder(self) -> np.ndarray:
        """Per user row: True when it has at least one training interaction here."""
        return np.diff(self.train.indptr) > 0

    def split(self, name: str) -> HeldOut:
        """The held-out split "valid" or "test"; ValueError when the node has none."""
        if name not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {name!r}")
        held = self.valid if name == "valid" else self.test
        if held is None:
            raise ValueError(f"domain {self.domain} has no {name} split")
        return held


def _indices(raw: RawInteractions, keys: np.ndarray, ids: IdMap, what: str) -> np.ndarray:
    """Indices of keys, or DataError naming the file and line of the first unknown one."""
    found = ids.index_of(keys, missing=-1)
    if np.any(found < 0):
        first = int(np.argmax(found < 0))
        raise DataError(raw.path, f"{what} {str(keys[first])!r} does not occur in the domain's training file",
                        int(raw.lines[first]))
    return found


def fixed_candidates(n_items: int, users: np.ndarray, items: np.ndarray, n_users: int, seed: int,
                     negatives: int = PAPER_NEGATIVES) -> HeldOut:
    """The paper's candidates (target + uniform negatives over the catalog), drawn once from `seed`.

    `negatives` per row (the paper's 999 by default); on a catalog too small for that (tiny test
    data), as many as every row can get, so that the protocol still ranks each target among the
    same number of candidates.
    """
    if negatives < 1:
        raise ValueError(f"negatives must be >= 1, got {negatives}")
    exclude = pairs_to_csr(users, items, (n_users, n_items))
    allowed = n_items - np.diff(exclude.indptr)[users] if len(users) else np.array([negatives])
    n_negatives = int(min(negatives, allowed.min()))
    if n_negatives < 1:
        raise ValueError(f"a catalog of {n_items} items leaves no negatives to rank held-out items against")
    candidates = sample_negatives(n_items, users, items, exclude, n_negatives, seed, np.arange(n_items))
    return HeldOut(users, items, candidates)


def load_node_data(domain: str, train_path: Path, valid_path: Path | None = None, test_path: Path | None = None,
                   fmt: str = "auto", valid_seed: int = 0, valid_negatives: int = VALID_NEGATIVES) -> NodeData:
    """Read this domain's files (and no other domain's); DataError names the file and line of bad input.

    Validation rows are ranked against `valid_negatives` negatives (per-round checks), test rows
    against the paper's 999.
    """
    raw_train = read_interactions(train_path, fmt)
    raw_valid = read_interactions(valid_path, fmt) if valid_path is not None else None
    raw_test = read_interactions(test_path, fmt) if test_path is not None else None
    held_files = [raw for raw in (raw_valid, raw_test) if raw is not None]
    users = IdMap.from_keys(np.concatenate([raw_train.users, *[raw.users for raw in held_files]]))
    items = IdMap.from_keys(raw_train.items)
    rows = users.index_of(raw_train.users)
    train = pairs_to_csr(rows, items.index_of(raw_train.items), (len(users), len(items)), raw_train.weights)

    def held_pairs(raw: RawInteractions) -> tuple[np.ndarray, np.ndarray]:
        """(user rows, item columns) of a held-out file, sorted by user then item."""
        user_rows = users.index_of(raw.users)
        item_cols = _indices(raw, raw.items, items, "item")
        order = np.lexsort((item_cols, user_rows))
        return user_rows[order], item_cols[order]

    carved = raw_valid is None
    if carved:
        train, valid_users, valid_items = leave_one_out(train, seed=(valid_seed, zlib.crc32(domain.encode())))
    else:
        valid_users, valid_items = held_pairs(raw_valid)  # type: ignore[arg-type]
    n_users, n_items = train.shape
    valid = fixed_candidates(n_items, valid_users, valid_items, n_users, EVALUATION_SEED, valid_negatives) if len(valid_users) else None
    test = None
    if raw_test is not None:
        test_users, test_items = held_pairs(raw_test)
        test = fixed_candidates(n_items, test_users, test_items, n_users, EVALUATION_SEED + 1)
    return NodeData(domain, users, items, train, valid, test, carved)


def evaluate(held: HeldOut, user_vecs: np.ndarray, item_vecs: np.ndarray, train: sp.csr_matrix, k: int) -> dict[str, float]:
    """HR@k and NDCG@k (fractions) of a held-out split under the paper's sampled protocol."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ranks = sampled_ranks(user_vecs, item_vecs, held.candidates, held.users, train)
    return {f"HR@{k}": hit_rate(ranks, k), f"NDCG@{k}": ndcg(ranks, k)}


def top_k(user_vec: np.ndarray, item_vecs: np.ndarray, seen: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Item columns and scores of the k best items for one user vector, `seen` columns left out."""
    scores = item_vecs @ user_vec
    scores[seen] = -np.inf
    available = len(scores) - len(np.unique(seen))
    k = max(0, min(k, available))
    if k == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    best = np.argpartition(-scores, k - 1)[:k]
    best = best[np.argsort(-scores[best], kind="stable")]
    return best.astype(np.int64), scores[best].astype(np.float32)
