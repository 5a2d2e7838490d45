"""The numpy backend of the iALS half-step, with the row systems every backend solves and the solver's thread pool.

Rows are bucketed by length, padded to the bucket length with a zero factor row, and each
chunk of a bucket is solved as one batch: rows shorter than the rank by Woodbury (an n_u x n_u
system instead of d x d), longer rows by a dense d x d solve. Chunks run in a small thread
pool (numpy releases the GIL) with BLAS pinned to one thread by the caller. `method="cg"`
runs warm-started conjugate-gradient steps over all rows at once instead.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache, partial

import numpy as np
import scipy.sparse as sp

FLOAT = np.float32
# Floats of padded gathers per chunk: big enough to amortise per-call overhead, small
# enough to stay near cache and to keep peak memory flat.
CHUNK_FLOATS = 1 << 20


def default_threads() -> int:
    """Solver threads: the cores this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))  # mutation: equivalent (rows are solved independently: a thread count never changes the answer)


@lru_cache(maxsize=4)  # mutation: equivalent (how many pools stay cached: speed only)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ials")


@dataclass(frozen=True)
class RowSystems:
    """Every row's system in the eigenbasis of alpha*G: (diag(eigvals + shift_r) + V_r^T W_r V_r) x = V_r^T w_r + extra_r."""

    pattern: sp.csr_matrix  # float32 weights w in the interactions' layout
    weighted: bool  # False when every weight is 1 (the kernels then skip the scalings)
    rotated: np.ndarray  # (n_cols + 1, d) float32 factors in the eigenbasis, plus a zero row for padding
    eigvals: np.ndarray  # (d,) float64 eigenvalues of alpha*G
    shift: np.ndarray  # (n_rows,) float64 ridge + rho
    # rho*h in the eigenbasis, float32, one row per proximal row only (an (n_rows, d) array would
    # be mostly zeros: a quarter GiB at a million users, rank 64), or None without a proximal term
    extra: np.ndarray | None
    extra_row: np.ndarray | None  # (n_rows,) int32: each row's row of extra, -1 for none

    def rhs(self, rows: np.ndarray | None = None) -> np.ndarray:
        """V^T w + extra for all rows (or only `rows`), float32."""
        pattern = self.pattern if rows is None else self.pattern[rows]
        product = np.asarray(pattern @ self.rotated[: self.pattern.shape[1]], dtype=FLOAT)
        if self.extra is not None and self.extra_row is not None:
            slots = self.extra_row if rows is None else self.extra_row[rows]
            hit = np.flatnonzero(slots >= 0)
            product[hit] += self.extra[slots[hit]]
        return product


def _solve_chunk(systems: RowSystems, rows: np.ndarray, pad_len: int, rhs: np.ndarray, out: np.ndarray) -> None:
    """Solve the rows of one chunk by batched numpy (rows padded to pad_len) and write them into out."""
    rotated = systems.rotated
    indptr = systems.pattern.indptr.astype(np.int64, copy=False)
    rank = rotated.shape[1]
    diag_inv = (1.0 / (systems.eigvals[None, :] + systems.shift[rows, None])).astype(FLOAT)
    b = rhs
    if pad_len == 0:
        out[rows] = b * diag_inv
        return
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    offsets = np.arange(pad_len, dtype=np.int64)
    valid = offsets[None, :] < lengths[:, None]
    positions = np.where(valid, starts[:, None] + offsets[None, :], 0)
    sentinel = rotated.shape[0] - 1  # the appended zero row
    cols = np.where(valid, systems.pattern.indices[positions], sentinel)
    v = rotated[cols]  # (B, L, d)
    if systems.weighted:
        v *= np.where(valid, np.sqrt(systems.pattern.data[positions]), 0.0)[:, :, None]
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
        step = max(1, CHUNK_FLOATS // per_row)
        for lo in range(start, stop, step):
            chunks.append((order[lo : min(stop, lo + step)], pad_len))
        start = stop
    return chunks


def run_parallel(tasks: list, n_threads: int) -> list:
    """Run zero-argument callables, on the solver pool when more than one thread is asked for."""
    if n_threads == 1 or len(tasks) < 2:
        return [task() for task in tasks]
    futures = [_pool(n_threads).submit(task) for task in tasks]
    return [future.result() for future in futures]


def solve_exact(systems: RowSystems, rows: np.ndarray | None, out: np.ndarray, n_threads: int) -> None:
    """Exact solves of all rows (or of `rows` only) by bucketed batched numpy, written into out."""
    lengths = np.diff(systems.pattern.indptr)
    chunks = _plan_chunks(lengths if rows is None else lengths[rows], systems.rotated.shape[1])
    if rows is not None:
        chunks = [(rows[members], pad_len) for members, pad_len in chunks]

    def solve(members: np.ndarray, pad_len: int) -> None:
        """One chunk, with its right-hand sides."""
        # the right-hand sides of a chunk are formed inside its task, so memory stays bounded
        _solve_chunk(systems, members, pad_len, systems.rhs(members), out)

    run_parallel([partial(solve, members, pad_len) for members, pad_len in chunks], n_threads)


def _apply_rows(systems: RowSystems, diagonal: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(D_r + V_r^T W_r V_r) x_r for every row r at once, gathering in bounded chunks."""
    csr, rotated = systems.pattern, systems.rotated
    n_rows, rank = x.shape
    result = diagonal * x
    row_of = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(csr.indptr))
    scale = np.empty(csr.nnz, dtype=FLOAT)
    step = max(1, CHUNK_FLOATS // rank)
    for lo in range(0, csr.nnz, step):
        hi = min(csr.nnz, lo + step)
        scale[lo:hi] = np.einsum("ij,ij->i", rotated[csr.indices[lo:hi]], x[row_of[lo:hi]])
    scale *= csr.data
    result += sp.csr_matrix((scale, csr.indices, csr.indptr), shape=csr.shape) @ rotated[: csr.shape[1]]
    return result


def _solve_cg(systems: RowSystems, start: np.ndarray, cg_steps: int) -> np.ndarray:
    """cg_steps conjugate-gradient steps from `start` for all rows at once (vectorised over rows)."""
    diagonal = (systems.eigvals[None, :] + systems.shift[:, None]).astype(FLOAT)
    x = start.copy()
    residual = systems.rhs() - _apply_rows(systems, diagonal, x)
    direction = residual.copy()
    rs_old = np.einsum("ij,ij->i", residual, residual)
    for _ in range(cg_steps):
        applied = _apply_rows(systems, diagonal, direction)
        curvature = np.einsum("ij,ij->i", direction, applied)
        # rows that converged (zero residual) take no step instead of dividing by zero
        active = (rs_old > 1e-20) & (curvature > 0)
        step_len = np.where(active, rs_old / np.where(active, curvature, 1.0), 0.0).astype(FLOAT)
        x += step_len[:, None] * direction
        residual -= step_len[:, None] * applied
        rs_new = np.einsum("ij,ij->i", residual, residual)
        beta = np.where(active, rs_new / np.where(active, rs_old, 1.0), 0.0).astype(FLOAT)
        direction = residual + beta[:, None] * direction
        rs_old = rs_new
    return x


def solve(systems: RowSystems, start: np.ndarray | None, cg_steps: int, n_threads: int) -> np.ndarray:
    """Every row of `systems` in the eigenbasis: exactly when cg_steps is 0, else cg_steps CG steps from `start`."""
    if cg_steps:
        if start is None:
            raise ValueError("conjugate-gradient steps need a starting point")
        return _solve_cg(systems, start, cg_steps)
    solved = np.empty((systems.shift.shape[0], systems.rotated.shape[1]), dtype=FLOAT)
    solve_exact(systems, None, solved, n_threads)
    return solved
