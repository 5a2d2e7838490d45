"""CSR builders and row counts shared by the solver, the metrics and the data readers."""

import numpy as np
import scipy.sparse as sp

FLOAT = np.float32


def canonical_csr(matrix: sp.csr_matrix, name: str = "matrix") -> sp.csr_matrix:
    """A CSR with sorted, unique indices (copied only when needed), or ValueError naming the argument."""
    if not sp.issparse(matrix) or matrix.format != "csr":
        raise ValueError(f"{name} must be a scipy CSR matrix, got {type(matrix).__name__}")
    if not matrix.has_canonical_format:
        matrix = matrix.copy()
        matrix.sum_duplicates()
    return matrix


def pairs_to_csr(users: np.ndarray, items: np.ndarray, shape: tuple[int, int],
                 weights: np.ndarray | None = None) -> sp.csr_matrix:
    """Canonical float32 CSR (sorted indices, duplicates summed) from index pairs; weight 1 when none given."""
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    data = np.ones(len(users), dtype=FLOAT) if weights is None else np.asarray(weights, dtype=FLOAT)
    matrix = sp.csr_matrix((data, (users, items)), shape=shape, dtype=FLOAT)
    matrix.sum_duplicates()
    matrix.sort_indices()
    return matrix


def as_csr32(matrix: sp.spmatrix) -> sp.csr_matrix:
    """Any sparse matrix as a canonical float32 CSR copy (duplicates summed, indices sorted)."""
    csr = sp.csr_matrix(matrix, dtype=FLOAT)
    csr.sum_duplicates()
    csr.sort_indices()
    return csr


def row_counts(matrix: sp.csr_matrix) -> np.ndarray:
    """Number of stored entries in each row of a CSR matrix."""
    return np.diff(matrix.indptr).astype(np.int64)
