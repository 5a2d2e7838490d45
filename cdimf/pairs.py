"""Two or more domains for `cdimf reproduce`, the tuner and the benchmarks: any pair by path, and the paper's Sport&Cloth.

Both domains share one user index (the union of their train files' users); item ids are per
domain. The node reads only its own files (domain_node/data.py); this loader is for the
single-process tools that see both domains.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from cdimf.common.core.sparse import pairs_to_csr
from cdimf.domain_node.data import IdMap, RawInteractions, indices_or_error, leave_one_out, read_interactions, to_csr, union_keys


@dataclass(eq=False)
class DomainSplit:
    """One domain of a pair: id maps, the training matrix and held-out validation/test pairs (indices)."""

    name: str
    users: IdMap
    items: IdMap
    train: sp.csr_matrix
    valid_users: np.ndarray
    valid_items: np.ndarray
    test_users: np.ndarray
    test_items: np.ndarray

    @property
    def n_users(self) -> int:
        """Rows of the training matrix (the pair's shared user index)."""
        return len(self.users)

    @property
    def n_items(self) -> int:
        """Columns of the training matrix."""
        return len(self.items)

    def catalog(self) -> np.ndarray:
        """Indices of the items with at least one training entry (the paper's negative pool)."""
        return np.flatnonzero(np.bincount(self.train.indices, minlength=self.n_items)).astype(np.int64)

    def held_out_matrix(self, which: str = "test") -> sp.csr_matrix:
        """Users x items CSR of the held-out pairs ("valid" or "test"): the negatives' exclusion set."""
        if which not in ("valid", "test"):
            raise ValueError(f"which must be 'valid' or 'test', got {which!r}")
        users, items = (self.valid_users, self.valid_items) if which == "valid" else (self.test_users, self.test_items)
        return pairs_to_csr(users, items, (self.n_users, self.n_items))


def _held_out_indices(raw: RawInteractions, users: IdMap, items: IdMap,
                      train_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """User and item indices of a validation/test file, rejecting keys unknown to training."""
    user_idx = indices_or_error(raw, "user", users, "has no training interactions in any domain of the federation")
    item_idx = indices_or_error(raw, "item", items, f"does not occur in the domain's training file {train_path}")
    order = np.lexsort((item_idx, user_idx))
    return user_idx[order], item_idx[order]


def load_pair(train_a: str | Path, train_b: str | Path, test_a: str | Path | None, test_b: str | Path | None,
              valid_a: str | Path | None = None, valid_b: str | Path | None = None,
              names: tuple[str, str] = ("a", "b"), fmt: str = "auto",
              valid_seed: int = 0) -> tuple[DomainSplit, DomainSplit]:
    """Load a two-domain pair on one shared user index (load_domains for two domains in one format)."""
    if (valid_a is None) != (valid_b is None):
        raise ValueError("give both valid files or neither")
    if (test_a is None) != (test_b is None):
        raise ValueError("give both test files or neither")
    tests = None if test_a is None or test_b is None else [test_a, test_b]
    valids = None if valid_a is None or valid_b is None else [valid_a, valid_b]
    a, b = load_domains(list(names), [train_a, train_b], tests, valids, [fmt, fmt], valid_seed)
    return a, b


def load_domains(names: Sequence[str], trains: Sequence[str | Path], tests: Sequence[str | Path] | None,
                 valids: Sequence[str | Path] | None, formats: Sequence[str], valid_seed: int = 0,
                 on_file: Callable[[str], None] | None = None) -> list[DomainSplit]:
    """Load two or more domains on one shared user index (the union of every train file's users).

    Item ids are per domain. Validation comes from the valid files when given, else a
    leave-one-out carved from each domain's train (seeded by (valid_seed, domain number)).
    A held-out row whose user has no training row in any domain, or whose item is not in
    that domain's train, raises DataError naming its file and line. Without test paths (the
    tuner) the test files are never opened and the test arrays are empty: the id maps come from
    the train files alone. `on_file` hears each file's path before it is read.
    """

    def read(path: str | Path, fmt: str) -> RawInteractions:
        """One file, announced first."""
        if on_file is not None:
            on_file(str(path))
        return read_interactions(path, fmt)

    train_paths = [Path(path) for path in trains]
    raw_train = [read(path, fmt) for path, fmt in zip(train_paths, formats)]
    raw_test = None if tests is None else [read(path, fmt) for path, fmt in zip(tests, formats)]
    raw_valid = None if valids is None else [read(path, fmt) for path, fmt in zip(valids, formats)]
    users = IdMap.from_keys(union_keys(*[raw.user_keys for raw in raw_train]))
    domains = []
    for number, (name, raw, train_path) in enumerate(zip(names, raw_train, train_paths)):
        items = IdMap.from_keys(raw.item_keys)
        train = to_csr(raw, users, items)
        test_users, test_items = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        if raw_test is not None:
            test_users, test_items = _held_out_indices(raw_test[number], users, items, train_path)
        if raw_valid is not None:
            valid_users, valid_items = _held_out_indices(raw_valid[number], users, items, train_path)
        else:
            train, valid_users, valid_items = leave_one_out(train, seed=(valid_seed, number))
        domains.append(DomainSplit(name, users, items, train, valid_users, valid_items, test_users, test_items))
    return domains


def load_warm_pair(root: str | Path, valid_seed: int = 0) -> tuple[DomainSplit, DomainSplit]:
    """The paper's warm-start Sport&Cloth pair (validation = leave-one-out carved from train)."""
    root = Path(root)
    return load_pair(root / "sport_cloth" / "train.txt", root / "cloth_sport" / "train.txt",
                     root / "sport_cloth" / "test.txt", root / "cloth_sport" / "test.txt",
                     names=("sport", "cloth"), fmt="paper", valid_seed=valid_seed)


def load_cold_pair(root: str | Path) -> tuple[DomainSplit, DomainSplit]:
    """The paper's cold-start Sport&Cloth pair (validation and test from the shipped files)."""
    root = Path(root)
    return load_pair(root / "sport_cloth" / "train.txt", root / "cloth_sport" / "train.txt",
                     root / "sport_cloth" / "test.txt", root / "cloth_sport" / "test.txt",
                     root / "sport_cloth" / "valid.txt", root / "cloth_sport" / "valid.txt",
                     names=("sport", "cloth"), fmt="paper")
