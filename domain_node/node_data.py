"""One node's private data: its own train/valid/test files only, its user rows and its held-out splits.

Rows of the node = users of its train file plus users that appear only in its valid/test files.
The latter have no interactions here: they register as non-holders and, when another domain
holds them, become receiver rows (cold-start users scored with their consensus vector Z).
Without a valid file, validation is one leave-one-out entry per user carved from train, seeded
by (`valid_seed`, crc32 of the domain name) so that it never depends on the other domains.
"""

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from cdimf.common.config import VALID_NEGATIVES
from cdimf.common.core.evaluation import PAPER_NEGATIVES, DrawnOnUse, HeldOutRows
from cdimf.domain_node.data import IdMap, RawInteractions, indices_or_error, leave_one_out, read_interactions, to_csr, union_keys

EVALUATION_SEED = 0

log = logging.getLogger(__name__)


@dataclass(eq=False)
class NodeData:
    """What a node reads from disk: id maps, the training matrix, holder flags, held-out splits."""

    domain: str
    users: IdMap
    items: IdMap
    train: sp.csr_matrix
    valid: HeldOutRows | None
    test: HeldOutRows | None
    valid_carved: bool

    @property
    def holder(self) -> np.ndarray:
        """Per user row: True when it has at least one training interaction here."""
        return np.diff(self.train.indptr) > 0

    def split(self, name: str) -> HeldOutRows:
        """The held-out split "valid" or "test"; ValueError when the node has none."""
        if name not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {name!r}")
        held = self.valid if name == "valid" else self.test
        if held is None:
            raise ValueError(f"domain {self.domain} has no {name} split")
        return held


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
    users = IdMap.from_keys(union_keys(raw_train.user_keys, *[raw.user_keys for raw in held_files]))
    items = IdMap.from_keys(raw_train.item_keys)
    train = to_csr(raw_train, users, items)
    del raw_train

    def held_pairs(raw: RawInteractions) -> tuple[np.ndarray, np.ndarray]:
        """(user rows, item columns) of a held-out file, sorted by user then item."""
        user_rows = indices_or_error(raw, "user", users, "is not in the user id map")
        item_cols = indices_or_error(raw, "item", items, "does not occur in the domain's training file")
        order = np.lexsort((item_cols, user_rows))
        return user_rows[order], item_cols[order]

    carved = raw_valid is None
    if carved:
        train, valid_users, valid_items = leave_one_out(train, seed=(valid_seed, zlib.crc32(domain.encode())))
    else:
        valid_users, valid_items = held_pairs(raw_valid)  # type: ignore[arg-type]
    n_users, n_items = train.shape
    # candidates are drawn on first use: a node that never validates never holds them
    valid = DrawnOnUse(n_items, valid_users, valid_items, n_users, EVALUATION_SEED, valid_negatives) if len(valid_users) else None
    test = None
    if raw_test is not None:
        test_users, test_items = held_pairs(raw_test)
        test = DrawnOnUse(n_items, test_users, test_items, n_users, EVALUATION_SEED + 1, PAPER_NEGATIVES)
    for split, held, asked in (("valid", valid, valid_negatives), ("test", test, PAPER_NEGATIVES)):
        if held is not None and held.negatives < asked:
            # the metrics carry the number actually used in their labels; the log says why it is lower
            log.warning("domain %s: %s rows ranked against %d negatives, not %d: a catalog of %d items has no more for every row",
                        domain, split, held.negatives, asked, n_items)
    return NodeData(domain, users, items, train, valid, test, carved)
