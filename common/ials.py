"""Local implicit ALS in Rendle et al.'s 2021 form, with an optional ADMM proximal term.

Loss (weights w_ui = 1 for plain implicit data):

    sum_{(u,i) observed} w_ui (x_u.y_i - 1)^2 + alpha * sum_{all u,i} (x_u.y_i)^2
    + sum_u ridge_u ||x_u||^2 + sum_i ridge_i ||y_i||^2 [+ rho sum_{u in P} ||x_u - h_u||^2]

with ridge_u = lambda * (|I_u| + alpha |I|)^nu (and the mirror for items). A half-step solves
every row exactly:  (Y_S^T W_S Y_S + alpha G + (ridge_u + rho_u) I) x_u = Y_S^T w_S + rho_u h_u.

How it is fast without a Python loop over rows: in the eigenbasis of alpha*G the shared part
alpha*G + ridge + rho is diagonal for every row, so rows shorter than the rank are solved by
Woodbury (an n_u x n_u system instead of d x d) and longer rows by one batched dense solve.
Rows are bucketed by length, padded to the bucket length with a zero factor row, and the
buckets are cut into chunks that a small thread pool solves with BLAS pinned to one thread
(numpy releases the GIL; oversubscribed BLAS on small batched products is far slower).
"""

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

FLOAT = np.float32
# Floats of padded gathers per chunk: big enough to amortise per-call overhead, small
# enough to stay near cache and to keep peak memory flat.
_CHUNK_FLOATS = 1 << 20


@dataclass(frozen=True)
class Proximal:
    """ADMM proximal term rho * ||x_r - target_r||^2 on a subset of rows."""

    rows: np.ndarray
    target: np.ndarray
    rho: float

    def __post_init__(self) -> None:
        if self.rho < 0:
            raise ValueError(f"rho must be >= 0, got {self.rho}")
        if self.target.ndim != 2 or self.target.shape[0] != len(self.rows):
            raise ValueError(
                f"proximal target has shape {self.target.shape}, expected ({len(self.rows)}, d)"
            )


def frequency_ridge(counts: np.ndarray, n_other: int, lam: float, alpha: float, nu: float) -> np.ndarray:
    """Rendle's frequency-scaled ridge lambda * (count + alpha * n_other) ** nu, one per row."""
    counts = np.asarray(counts, dtype=np.float64)
    if nu == 0.0:
        return np.full(counts.shape, lam, dtype=np.float64)
    return lam * np.power(counts + alpha * n_other, nu)


def row_counts(matrix: sp.csr_matrix) -> np.ndarray:
    """Number of stored entries in each row of a CSR matrix."""
    return np.diff(matrix.indptr).astype(np.int64)


def init_factors(n_rows: int, rank: int, sigma: float, seed: int | np.random.Generator) -> np.ndarray:
    """Factors drawn from N(0, sigma / sqrt(rank)) as float32; the same seed gives the same factors."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    scale = sigma / np.sqrt(rank)
    return (rng.standard_normal((n_rows, rank), dtype=np.float32) * FLOAT(scale)).astype(FLOAT)


def as_csr32(matrix: sp.spmatrix) -> sp.csr_matrix:
    """The matrix as canonical float32 CSR with int64-free int32 indices where they fit."""
    csr = sp.csr_matrix(matrix, dtype=FLOAT)
    csr.sum_duplicates()
    csr.sort_indices()
    return csr


def default_threads() -> int:
    """Solver threads: the cores this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


@lru_cache(maxsize=4)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ials")


def _bucket_edges(max_len: int) -> np.ndarray:
    """Padded lengths: exact up to 8, then growing by ~12.5% so padding wastes little."""
    edges = list(range(0, min(max_len, 8) + 1))
    while edges[-1] < max_len:
        edges.append(max(edges[-1] + 1, int(np.ceil(edges[-1] * 1.125))))
    return np.asarray(edges, dtype=np.int64)


def _plan_chunks(lengths: np.ndarray, rank: int) -> list[tuple[np.ndarray, int]]:
    """Group rows (sorted by length) into chunks of (row ids, padded length)."""
    order = np.argsort(lengths, kind="stable")
    sorted_len = lengths[order]
    max_len = int(sorted_len[-1]) if len(sorted_len) else 0
    edges = _bucket_edges(max_len)
    # bucket b holds rows with edges[b-1] < len <= edges[b]; bucket 0 is the empty rows
    bounds = np.searchsorted(sorted_len, edges, side="right")
    chunks: list[tuple[np.ndarray, int]] = []
    start = 0
    for pad_len, stop in zip(edges.tolist(), bounds.tolist()):
        if stop <= start:
            continue
        per_row = pad_len * rank + min(pad_len, rank) ** 2 + rank
        step = max(1, _CHUNK_FLOATS // per_row)
        for lo in range(start, stop, step):
            chunks.append((order[lo : min(stop, lo + step)], pad_len))
        start = stop
    return chunks


def _solve_chunk(
    rows: np.ndarray,
    pad_len: int,
    indptr: np.ndarray,
    indices: np.ndarray,
    sqrt_weights: np.ndarray | None,
    rotated: np.ndarray,
    eigvals: np.ndarray,
    shift: np.ndarray,
    rhs: np.ndarray,
    out: np.ndarray,
) -> None:
    """Solve the rows of one chunk in the eigenbasis and write them into out."""
    rank = rotated.shape[1]
    diag_inv = (1.0 / (eigvals[None, :] + shift[rows, None])).astype(FLOAT)
    b = rhs[rows]
    if pad_len == 0:
        out[rows] = b * diag_inv
        return
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    offsets = np.arange(pad_len, dtype=np.int64)
    valid = offsets[None, :] < lengths[:, None]
    positions = np.where(valid, starts[:, None] + offsets[None, :], 0)
    sentinel = rotated.shape[0] - 1  # the appended zero row
    cols = np.where(valid, indices[positions], sentinel)
    v = rotated[cols]  # (B, L, d)
    if sqrt_weights is not None:
        v *= np.where(valid, sqrt_weights[positions], 0.0)[:, :, None]
    if pad_len <= rank:
        # Woodbury: A = D + V^T V  =>  A^-1 b = D^-1 b - D^-1 V^T (I + V D^-1 V^T)^-1 V D^-1 b
        w = v * diag_inv[:, None, :]
        k = np.matmul(w, v.transpose(0, 2, 1))
        k[:, offsets, offsets] += 1.0
        db = b * diag_inv
        t = np.matmul(v, db[:, :, None])
        s = np.linalg.solve(k, t)
        out[rows] = db - np.matmul(w.transpose(0, 2, 1), s)[:, :, 0]
    else:
        a = np.matmul(v.transpose(0, 2, 1), v)
        diag = np.arange(rank)
        a[:, diag, diag] += 1.0 / diag_inv
        out[rows] = np.linalg.solve(a, b[:, :, None])[:, :, 0]


def solve_half_step(
    interactions: sp.csr_matrix,
    fixed: np.ndarray,
    alpha: float,
    ridge: np.ndarray,
    prox: Proximal | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """Exactly solve every row of `interactions` given the other side's factors `fixed`.

    Row r solves (Y_S^T W Y_S + alpha Y^T Y + (ridge_r + rho_r) I) x = Y_S^T w + rho_r h_r, where
    rho_r and h_r come from `prox` for its rows and are zero elsewhere. Returns float32 (rows, d).
    """
    csr = interactions if isinstance(interactions, sp.csr_matrix) else sp.csr_matrix(interactions)
    n_rows, n_cols = csr.shape
    if fixed.shape[0] != n_cols:
        raise ValueError(f"fixed factors have {fixed.shape[0]} rows, the matrix has {n_cols} columns")
    if ridge.shape != (n_rows,):
        raise ValueError(f"ridge has shape {ridge.shape}, expected ({n_rows},)")
    rank = fixed.shape[1]
    fixed = np.ascontiguousarray(fixed, dtype=FLOAT)
    gram = fixed.T.astype(np.float64) @ fixed.astype(np.float64)
    eigvals, basis = np.linalg.eigh(alpha * gram)
    eigvals = np.clip(eigvals, 0.0, None)
    basis32 = basis.astype(FLOAT)
    rotated = np.empty((n_cols + 1, rank), dtype=FLOAT)
    np.matmul(fixed, basis32, out=rotated[:n_cols])
    rotated[n_cols] = 0.0
    data = csr.data.astype(FLOAT, copy=False)
    weighted = bool(data.size) and not np.all(data == 1.0)
    pattern = sp.csr_matrix((data, csr.indices, csr.indptr), shape=csr.shape)
    rhs = np.asarray(pattern @ rotated[:n_cols], dtype=FLOAT)
    shift = ridge.astype(np.float64, copy=True)
    if prox is not None and len(prox.rows):
        if prox.target.shape[1] != rank:
            raise ValueError(f"proximal target has rank {prox.target.shape[1]}, factors have {rank}")
        shift[prox.rows] += prox.rho
        rhs[prox.rows] += FLOAT(prox.rho) * (np.asarray(prox.target, dtype=FLOAT) @ basis32)
    if np.any(eigvals[0] + shift <= 0):
        raise ValueError("a row's system is singular: use lambda > 0 or alpha > 0")
    sqrt_weights = np.sqrt(data) if weighted else None
    indptr = csr.indptr.astype(np.int64, copy=False)
    solved = np.empty((n_rows, rank), dtype=FLOAT)
    chunks = _plan_chunks(np.diff(indptr), rank)
    args = (indptr, csr.indices, sqrt_weights, rotated, eigvals.astype(FLOAT), shift, rhs, solved)
    n_threads = threads or default_threads()
    with threadpool_limits(limits=1, user_api="blas"):
        if n_threads == 1 or len(chunks) < 2:
            for rows, pad_len in chunks:
                _solve_chunk(rows, pad_len, *args)
        else:
            futures = [_pool(n_threads).submit(_solve_chunk, rows, pad_len, *args) for rows, pad_len in chunks]
            for future in futures:
                future.result()
    return solved @ basis32.T


def observed_residual_sq(interactions: sp.csr_matrix, users: np.ndarray, items: np.ndarray) -> float:
    """sum over stored entries of w_ui (x_u.y_i - 1)^2, computed in bounded-memory chunks."""
    csr = interactions
    rows = np.repeat(np.arange(csr.shape[0], dtype=np.int64), np.diff(csr.indptr))
    total = 0.0
    step = max(1, (1 << 22) // max(1, users.shape[1]))
    for lo in range(0, csr.nnz, step):
        hi = min(csr.nnz, lo + step)
        pred = np.einsum("ij,ij->i", users[rows[lo:hi]], items[csr.indices[lo:hi]], dtype=np.float64)
        total += float(np.dot(csr.data[lo:hi].astype(np.float64), (pred - 1.0) ** 2))
    return total


def ials_loss(
    interactions: sp.csr_matrix,
    users: np.ndarray,
    items: np.ndarray,
    alpha: float,
    user_ridge: np.ndarray,
    item_ridge: np.ndarray,
    prox: Proximal | None = None,
) -> float:
    """The full iALS objective (plus the proximal term when given), in float64."""
    u64 = users.astype(np.float64)
    i64 = items.astype(np.float64)
    loss = observed_residual_sq(interactions, users, items)
    loss += alpha * float(np.sum((u64.T @ u64) * (i64.T @ i64)))
    loss += float(np.dot(user_ridge, np.einsum("ij,ij->i", u64, u64)))
    loss += float(np.dot(item_ridge, np.einsum("ij,ij->i", i64, i64)))
    if prox is not None and len(prox.rows):
        diff = u64[prox.rows] - prox.target.astype(np.float64)
        loss += prox.rho * float(np.sum(diff * diff))
    return loss


def ials_epoch(
    interactions: sp.csr_matrix,
    interactions_t: sp.csr_matrix,
    users: np.ndarray,
    items: np.ndarray,
    alpha: float,
    user_ridge: np.ndarray,
    item_ridge: np.ndarray,
    user_prox: Proximal | None = None,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One epoch: solve all users given items (with the proximal term), then all items given users."""
    users = solve_half_step(interactions, items, alpha, user_ridge, user_prox, threads)
    items = solve_half_step(interactions_t, users, alpha, item_ridge, None, threads)
    return users, items
