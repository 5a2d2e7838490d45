"""Local implicit ALS in Rendle et al.'s 2021 form, with an optional ADMM proximal term.

Loss (weights w_ui = 1 for plain implicit data):

    sum_{(u,i) observed} w_ui (x_u.y_i - 1)^2 + alpha * sum_{all u,i} (x_u.y_i)^2
    + sum_u ridge_u ||x_u||^2 + sum_i ridge_i ||y_i||^2 [+ rho sum_{u in P} ||x_u - h_u||^2]

with ridge_u = lambda * (|I_u| + alpha |I|)^nu (and the mirror for items). A half-step solves
every row exactly:  (Y_S^T W_S Y_S + alpha G + (ridge_u + rho_u) I) x_u = Y_S^T w_S + rho_u h_u.

How it is fast without a Python loop over rows: in the eigenbasis of alpha*G the shared part
alpha*G + ridge + rho is diagonal for every row, so rows shorter than the rank are solved by
Woodbury (an n_u x n_u system instead of d x d) and longer rows by a dense d x d solve.

Two backends give the same exact answer: "native" (common/ials_kernel.c, compiled with the
system C compiler on first use, see common/ials_native.py) does per-row register-tiled
Gramians and Cholesky solves over a length-sorted row list; "numpy" buckets rows by length,
pads them to the bucket length with a zero factor row and solves batches with numpy. Both
run in a small thread pool with BLAS pinned to one thread (numpy and ctypes release the GIL;
oversubscribed BLAS on small products is far slower). "auto" (the default) picks native
where it builds. method="cg" is an optional approximation: warm-started conjugate gradient.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache, partial

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from cdimf.common.core import ials_native

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


@dataclass(frozen=True)
class _RowSystems:
    """Every row's system in the eigenbasis of alpha*G: (diag(eigvals + shift_r) + V_r^T W_r V_r) x = V_r^T w_r + extra_r."""

    pattern: sp.csr_matrix  # float32 weights w in the interactions' layout
    weighted: bool  # False when every weight is 1 (the kernels then skip the scalings)
    rotated: np.ndarray  # (n_cols + 1, d) float32 factors in the eigenbasis, plus a zero row for padding
    eigvals: np.ndarray  # (d,) float64 eigenvalues of alpha*G
    shift: np.ndarray  # (n_rows,) float64 ridge + rho
    extra: np.ndarray | None  # (n_rows, d) float32 rho*h in the eigenbasis, or None without a proximal term

    def rhs(self, rows: np.ndarray | None = None) -> np.ndarray:
        """V^T w + extra for all rows (or only `rows`), float32."""
        pattern = self.pattern if rows is None else self.pattern[rows]
        product = np.asarray(pattern @ self.rotated[: self.pattern.shape[1]], dtype=FLOAT)
        if self.extra is not None:
            product += self.extra if rows is None else self.extra[rows]
        return product


def _solve_chunk(systems: _RowSystems, rows: np.ndarray, pad_len: int, rhs: np.ndarray, out: np.ndarray) -> None:
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


def _row_blocks(n_rows: int, n_blocks: int) -> list[slice]:
    """n_blocks contiguous, near-equal row ranges covering range(n_rows) (fewer when rows are few)."""
    edges = np.linspace(0, n_rows, max(1, min(n_blocks, n_rows)) + 1).astype(np.int64)
    return [slice(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:])]


def _gram64(factors: np.ndarray, n_threads: int) -> np.ndarray:
    """factors^T factors accumulated in float64, a block at a time (no full float64 copy), split over threads."""
    rank = factors.shape[1]
    step = max(1, _CHUNK_FLOATS // max(1, rank))

    def partial_gram(rows: slice) -> np.ndarray:
        """The Gramian of one range of rows."""
        gram = np.zeros((rank, rank), dtype=np.float64)
        for lo in range(rows.start, rows.stop, step):
            block = factors[lo : min(rows.stop, lo + step)].astype(np.float64)
            gram += block.T @ block
        return gram

    parts = _run_parallel([partial(partial_gram, rows) for rows in _row_blocks(factors.shape[0], n_threads)], n_threads)
    return np.sum(parts, axis=0) if parts else np.zeros((rank, rank), dtype=np.float64)


def _matmul_rows(left: np.ndarray, right: np.ndarray, out: np.ndarray, n_threads: int) -> np.ndarray:
    """out = left @ right with the rows of left split over threads (BLAS itself is pinned to one)."""

    def block_product(rows: slice) -> None:
        """One range of rows of the product."""
        np.matmul(left[rows], right, out=out[rows])

    _run_parallel([partial(block_product, rows) for rows in _row_blocks(left.shape[0], n_threads)], n_threads)
    return out


METHODS = ("exact", "cg")
BACKENDS = ("auto", "numpy", "native")
# Light rows (shorter than the rank) per grab from the native kernel's shared cursor; heavy
# rows are taken one at a time, longest first, so the threads finish together.
_NATIVE_BLOCK = 16


def native_available() -> bool:
    """Whether the compiled kernel (common/ials_kernel.c) could be built and loaded here."""
    return ials_native.load_kernel() is not None


def _pick_backend(backend: str) -> str:
    """Resolve "auto" to the native kernel where it loads, else numpy; reject unknown names."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "native" if native_available() else "numpy"
    if backend == "native" and not native_available():
        raise ValueError("backend 'native' requested but the C kernel could not be built (is gcc installed?)")
    return backend


def _run_parallel(tasks: list, n_threads: int) -> list:
    """Run zero-argument callables, on the solver pool when more than one thread is asked for."""
    if n_threads == 1 or len(tasks) < 2:
        return [task() for task in tasks]
    futures = [_pool(n_threads).submit(task) for task in tasks]
    return [future.result() for future in futures]


def _solve_numpy_exact(systems: _RowSystems, rows: np.ndarray | None, out: np.ndarray, n_threads: int) -> None:
    """Exact solves of all rows (or of `rows` only) by bucketed batched numpy, written into out."""
    lengths = np.diff(systems.pattern.indptr)
    chunks = _plan_chunks(lengths if rows is None else lengths[rows], systems.rotated.shape[1])
    if rows is not None:
        chunks = [(rows[members], pad_len) for members, pad_len in chunks]

    def solve(members: np.ndarray, pad_len: int) -> None:
        """One chunk, with its right-hand sides."""
        # the right-hand sides of a chunk are formed inside its task, so memory stays bounded
        _solve_chunk(systems, members, pad_len, systems.rhs(members), out)

    _run_parallel([partial(solve, members, pad_len) for members, pad_len in chunks], n_threads)


def _apply_rows(systems: _RowSystems, diagonal: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(D_r + V_r^T W_r V_r) x_r for every row r at once, gathering in bounded chunks."""
    csr, rotated = systems.pattern, systems.rotated
    n_rows, rank = x.shape
    result = diagonal * x
    row_of = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(csr.indptr))
    scale = np.empty(csr.nnz, dtype=FLOAT)
    step = max(1, _CHUNK_FLOATS // rank)
    for lo in range(0, csr.nnz, step):
        hi = min(csr.nnz, lo + step)
        scale[lo:hi] = np.einsum("ij,ij->i", rotated[csr.indices[lo:hi]], x[row_of[lo:hi]])
    scale *= csr.data
    result += sp.csr_matrix((scale, csr.indices, csr.indptr), shape=csr.shape) @ rotated[: csr.shape[1]]
    return result


def _solve_numpy_cg(systems: _RowSystems, start: np.ndarray, cg_steps: int) -> np.ndarray:
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


def _solve_native(
    systems: _RowSystems, start: np.ndarray | None, cg_steps: int, out: np.ndarray, n_threads: int
) -> np.ndarray:
    """All rows through the C kernel; returns the ids of rows whose float32 Cholesky broke down."""
    csr = systems.pattern
    indptr = csr.indptr.astype(np.int64, copy=False)
    indices = np.ascontiguousarray(csr.indices, dtype=np.int32)
    lengths = np.diff(indptr)
    heavy = np.flatnonzero(lengths >= systems.rotated.shape[1])
    heavy = heavy[np.argsort(-lengths[heavy], kind="stable")]
    light = np.flatnonzero(lengths < systems.rotated.shape[1])
    heavy_cursor, light_cursor = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64)
    failed = np.zeros(csr.shape[0], dtype=np.uint8)
    kernel = ials_native.RowKernel(
        indptr=indptr,
        indices=indices,
        weights=csr.data if systems.weighted else None,
        rotated=systems.rotated,
        eigvals=systems.eigvals.astype(FLOAT),
        shift=systems.shift,
        extra=systems.extra,
        start=start,
        out=out,
        cg_steps=cg_steps,
        failed=failed,
    )

    def task() -> int:
        """One thread's share: rows from the shared cursors until none are left; returns its failures."""
        # every thread drains the heavy rows one by one, then the light rows in blocks
        return kernel.solve(heavy, heavy_cursor, 1) + kernel.solve(light, light_cursor, _NATIVE_BLOCK)

    n_failed = sum(_run_parallel([task] * n_threads, n_threads))
    return np.flatnonzero(failed) if n_failed else np.empty(0, dtype=np.int64)


def solve_half_step(
    interactions: sp.csr_matrix,
    fixed: np.ndarray,
    alpha: float,
    ridge: np.ndarray,
    prox: Proximal | None = None,
    threads: int | None = None,
    *,
    method: str = "exact",
    cg_steps: int = 3,
    initial: np.ndarray | None = None,
    backend: str = "auto",
) -> np.ndarray:
    """Solve every row of `interactions` given the other side's factors `fixed`.

    Row r solves (Y_S^T W Y_S + alpha Y^T Y + (ridge_r + rho_r) I) x = Y_S^T w + rho_r h_r, where
    rho_r and h_r come from `prox` for its rows and are zero elsewhere. Returns float32 (rows, d).
    method "exact" (default) solves exactly; "cg" takes `cg_steps` conjugate-gradient steps from
    `initial` (the rows' current factors; zeros when None), an approximation. backend "auto" uses
    the compiled kernel where it builds and numpy otherwise; both give the same exact answer.
    """
    # One BLAS thread throughout: the solver parallelises itself, and idle OpenBLAS threads
    # spin-wait on the same cores the row solves need.
    with threadpool_limits(limits=1, user_api="blas"):
        return _solve_half_step(interactions, fixed, alpha, ridge, prox, threads, method, cg_steps, initial, backend)


def _solve_half_step(
    interactions: sp.csr_matrix,
    fixed: np.ndarray,
    alpha: float,
    ridge: np.ndarray,
    prox: Proximal | None,
    threads: int | None,
    method: str,
    cg_steps: int,
    initial: np.ndarray | None,
    backend: str,
) -> np.ndarray:
    """solve_half_step's body, run with BLAS pinned to one thread."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "cg" and cg_steps < 1:
        raise ValueError(f"cg_steps must be >= 1, got {cg_steps}")
    chosen = _pick_backend(backend)
    csr = interactions if isinstance(interactions, sp.csr_matrix) else sp.csr_matrix(interactions)
    n_rows, n_cols = csr.shape
    if fixed.ndim != 2 or fixed.shape[0] != n_cols:
        raise ValueError(f"fixed factors have shape {fixed.shape}, expected ({n_cols}, rank) for a matrix with {n_cols} columns")
    if ridge.shape != (n_rows,):
        raise ValueError(f"ridge has shape {ridge.shape}, expected ({n_rows},)")
    rank = fixed.shape[1]
    if initial is not None and initial.shape != (n_rows, rank):
        raise ValueError(f"initial factors have shape {initial.shape}, expected ({n_rows}, {rank})")
    if prox is not None and len(prox.rows):
        if prox.target.shape[1] != rank:
            raise ValueError(f"proximal target has rank {prox.target.shape[1]}, factors have {rank}")
        if prox.rows.min() < 0 or prox.rows.max() >= n_rows:
            raise ValueError(f"proximal rows must lie in [0, {n_rows}), got {prox.rows.min()}..{prox.rows.max()}")
    data = csr.data.astype(FLOAT, copy=False)
    if data.size and not np.all(data >= 0):
        raise ValueError("interaction weights must be non-negative (and not NaN)")
    fixed = np.ascontiguousarray(fixed, dtype=FLOAT)
    n_threads = threads or default_threads()
    eigvals, basis = np.linalg.eigh(alpha * _gram64(fixed, n_threads))
    eigvals = np.clip(eigvals, 0.0, None)
    shift = ridge.astype(np.float64, copy=True)
    has_prox = prox is not None and len(prox.rows) > 0
    if has_prox:
        shift[prox.rows] += prox.rho
    if n_rows and np.any(eigvals[0] + shift <= 0):
        raise ValueError("a row's system is singular: use lambda > 0 or alpha > 0")
    basis32 = basis.astype(FLOAT)
    rotated = np.empty((n_cols + 1, rank), dtype=FLOAT)
    _matmul_rows(fixed, basis32, rotated[:n_cols], n_threads)
    rotated[n_cols] = 0.0  # the zero row that the numpy path pads with
    extra = None
    if has_prox:
        extra = np.zeros((n_rows, rank), dtype=FLOAT)
        extra[prox.rows] = FLOAT(prox.rho) * (np.asarray(prox.target, dtype=FLOAT) @ basis32)
    systems = _RowSystems(
        pattern=sp.csr_matrix((data, csr.indices, csr.indptr), shape=csr.shape),
        weighted=bool(data.size) and not np.all(data == 1.0),
        rotated=rotated,
        eigvals=eigvals,
        shift=shift,
        extra=extra,
    )
    start = None
    if method == "cg":
        start = np.zeros((n_rows, rank), FLOAT) if initial is None else np.asarray(initial, FLOAT) @ basis32
    solved = np.empty((n_rows, rank), dtype=FLOAT)
    if chosen == "native":
        failed = _solve_native(systems, start, cg_steps if method == "cg" else 0, solved, n_threads)
        if len(failed):
            # float32 Cholesky broke down on a nearly singular row: redo those rows with pivoted LU
            _solve_numpy_exact(systems, failed, solved, n_threads)
    elif method == "cg":
        solved = _solve_numpy_cg(systems, start, cg_steps)
    else:
        _solve_numpy_exact(systems, None, solved, n_threads)
    return _matmul_rows(solved, np.ascontiguousarray(basis32.T), np.empty_like(solved), n_threads)


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
    *,
    method: str = "exact",
    cg_steps: int = 3,
    backend: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """One epoch: solve all users given items (with the proximal term), then all items given users.

    With method "cg" each half-step is warm-started from the factors passed in.
    """
    options = {"method": method, "cg_steps": cg_steps, "backend": backend}
    warm = method == "cg"  # only CG starts from the current factors
    users = solve_half_step(interactions, items, alpha, user_ridge, user_prox, threads, initial=users if warm else None, **options)
    items = solve_half_step(interactions_t, users, alpha, item_ridge, None, threads, initial=items if warm else None, **options)
    return users, items
