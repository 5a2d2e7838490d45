"""Local implicit ALS in Rendle et al.'s 2021 form, with an optional ADMM proximal term.

Loss (weights w_ui = 1 for plain implicit data):

    sum_{(u,i) observed} w_ui (x_u.y_i - 1)^2 + alpha * sum_{all u,i} (x_u.y_i)^2
    + sum_u ridge_u ||x_u||^2 + sum_i ridge_i ||y_i||^2 [+ rho sum_{u in P} ||x_u - h_u||^2]

with ridge_u = lambda * (|I_u| + alpha |I|)^nu (and the mirror for items). A half-step solves
every row exactly:  (Y_S^T W_S Y_S + alpha G + (ridge_u + rho_u) I) x_u = Y_S^T w_S + rho_u h_u.

How it is fast without a Python loop over rows: in the eigenbasis of alpha*G the shared part
alpha*G + ridge + rho is diagonal for every row, so each row's system is a diagonal plus its
own low-rank part (`RowSystems`), which a backend solves.

Backends, chosen by name (IALSParams.backend) through one registry, give the same exact
answer: "numpy" (ials_numpy.py, batched numpy over length buckets) and "native"
(ials_native.py, a C kernel compiled on first use). Both run in a small thread pool with BLAS
pinned to one thread (numpy and ctypes release the GIL; oversubscribed BLAS on small products
is far slower). "auto" (the default) picks native where it builds; `resolve_backend` says
which one runs. method="cg" is an optional approximation: warm-started conjugate gradient.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import pairwise

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from cdimf.common.core import ials_native, ials_numpy
from cdimf.common.core.ials_numpy import CHUNK_FLOATS, FLOAT, RowSystems, default_threads, run_parallel

METHODS = ("exact", "cg")


@dataclass(frozen=True)
class Backend:
    """One way to solve a half-step's row systems, and whether it can run here."""

    available: Callable[[], bool]
    # solve(systems, start, cg_steps, n_threads): the rows in the eigenbasis; cg_steps 0 solves exactly
    solve: Callable[[RowSystems, np.ndarray | None, int, int], np.ndarray]
    missing: str  # why it cannot run, for the error when it is asked for by name


# The solver backends by name: a new one (a GPU solver) is one entry here and its name in
# IALSParams.backend. "auto" takes the first available in _AUTO_ORDER.
_REGISTRY: dict[str, Backend] = {
    "numpy": Backend(lambda: True, ials_numpy.solve, ""),
    "native": Backend(ials_native.available, ials_native.solve, "the C kernel could not be built (is gcc installed?)"),
}
_AUTO_ORDER = ("native", "numpy")
BACKENDS = ("auto", *_REGISTRY)


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


def init_factors(n_rows: int, rank: int, sigma: float, seed: int | np.random.Generator) -> np.ndarray:
    """Factors drawn from N(0, sigma / sqrt(rank)) as float32; the same seed gives the same factors."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    scale = sigma / np.sqrt(rank)
    # scaled in place: the product and its astype copy were two more (n_rows, rank) arrays at
    # once (0.5 GiB at a million users and rank 64); float32 times float32 either way
    factors = rng.standard_normal((n_rows, rank), dtype=np.float32)
    factors *= FLOAT(scale)
    return factors


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine, in registry order."""
    return [name for name, backend in _REGISTRY.items() if backend.available()]


def resolve_backend(backend: str = "auto") -> str:
    """The backend that `backend` runs as here ("auto" resolved); ValueError for an unknown or unavailable one."""
    if backend == "auto":
        return next(name for name in _AUTO_ORDER if _REGISTRY[name].available())
    if backend not in _REGISTRY:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not _REGISTRY[backend].available():
        raise ValueError(f"backend {backend!r} requested but {_REGISTRY[backend].missing}")
    return backend


# partial Gramians per half-step: more than any thread count used (default_threads caps at 8)
GRAM_LANES = 8


def _row_blocks(n_rows: int, n_blocks: int) -> list[slice]:
    """n_blocks contiguous, near-equal row ranges covering range(n_rows) (fewer when rows are few)."""
    edges = np.linspace(0, n_rows, max(1, min(n_blocks, n_rows)) + 1).astype(np.int64)  # mutation: equivalent Add_LShift (2n edges: more blocks, same rows)
    return [slice(int(lo), int(hi)) for lo, hi in pairwise(edges)]


def _gram64(factors: np.ndarray, n_threads: int) -> np.ndarray:
    """factors^T factors accumulated in float64, a block at a time (no full float64 copy), split over threads."""
    rank = factors.shape[1]
    step = max(1, CHUNK_FLOATS // max(1, rank))  # mutation: equivalent (rows per float64 block: any step >= 1 sums the same rows)

    def partial_gram(rows: slice) -> np.ndarray:
        """The Gramian of one range of rows."""
        gram = np.zeros((rank, rank), dtype=np.float64)
        for lo in range(rows.start, rows.stop, step):
            block = factors[lo : min(rows.stop, lo + step)].astype(np.float64)
            gram += block.T @ block
        return gram

    # A fixed split, whatever the thread count, summed in a fixed order: the Gramian (and so
    # every factor) is the same bits with one thread or eight (BLAS reassociates otherwise)
    parts = run_parallel([partial(partial_gram, rows) for rows in _row_blocks(factors.shape[0], GRAM_LANES)], n_threads)
    total = np.zeros((rank, rank), dtype=np.float64)
    for part in parts:
        total += part
    return total


def _matmul_rows(left: np.ndarray, right: np.ndarray, out: np.ndarray, n_threads: int) -> np.ndarray:
    """out = left @ right with the rows of left split over threads (BLAS itself is pinned to one)."""

    def block_product(rows: slice) -> None:
        """One range of rows of the product."""
        np.matmul(left[rows], right, out=out[rows])

    # blocks of a fixed size, not one per thread: a GEMM's rounding may depend on how many rows
    # it is given, so the rows are cut the same way for any thread count
    block_rows = max(1, CHUNK_FLOATS // max(1, left.shape[1]))
    blocks = [slice(lo, min(left.shape[0], lo + block_rows)) for lo in range(0, left.shape[0], block_rows)]
    run_parallel([partial(block_product, rows) for rows in blocks], n_threads)
    return out


def _matmul_rows_in_place(rows: np.ndarray, right: np.ndarray, n_threads: int) -> np.ndarray:
    """rows = rows @ right (square right), a block of rows at a time, so only one block's product is extra."""

    def block_product(block: slice) -> None:
        """One range of rows, overwritten by its product."""
        rows[block] = rows[block] @ right

    # the same fixed blocks as _matmul_rows: the same GEMMs, so the same bits for any thread count
    block_rows = max(1, CHUNK_FLOATS // max(1, rows.shape[1]))
    blocks = [slice(lo, min(rows.shape[0], lo + block_rows)) for lo in range(0, rows.shape[0], block_rows)]
    run_parallel([partial(block_product, block) for block in blocks], n_threads)
    return rows


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
    `initial` (the rows' current factors; zeros when None), an approximation. `backend` names a
    registered backend or "auto" (see `resolve_backend`); all give the same exact answer.
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
    if method == "cg" and cg_steps < 1:  # mutation: equivalent Eq_LtE (METHODS is exact, cg)
        raise ValueError(f"cg_steps must be >= 1, got {cg_steps}")
    chosen = resolve_backend(backend)
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
    data = csr.data.astype(FLOAT, copy=False)  # mutation: equivalent FalseWithTrue (data is only read)
    if data.size and not np.all(data >= 0):
        raise ValueError("interaction weights must be non-negative (and not NaN)")
    fixed = np.ascontiguousarray(fixed, dtype=FLOAT)
    n_threads = threads or default_threads()
    eigvals, basis = np.linalg.eigh(alpha * _gram64(fixed, n_threads))
    eigvals = np.clip(eigvals, 0.0, None)
    shift = ridge.astype(np.float64, copy=True)
    active = prox if prox is not None and len(prox.rows) > 0 else None  # mutation: equivalent Gt_GtE,Gt_NotEq (an empty term adds nothing)
    if active is not None:
        shift[active.rows] += active.rho
    if n_rows and np.any(eigvals[0] + shift <= 0):
        raise ValueError("a row's system is singular: use lambda > 0 or alpha > 0")
    basis32 = basis.astype(FLOAT)
    rotated = np.empty((n_cols + 1, rank), dtype=FLOAT)
    _matmul_rows(fixed, basis32, rotated[:n_cols], n_threads)
    rotated[n_cols] = 0.0  # the zero row that the numpy path pads with
    extra = extra_row = None
    if active is not None:
        # scaled in place: the same float32 products without a second (shared rows, rank) temporary
        extra = np.asarray(active.target, dtype=FLOAT) @ basis32
        extra *= FLOAT(active.rho)
        extra_row = np.full(n_rows, -1, dtype=np.int32)  # mutation: equivalent USub_Invert (a sentinel compared by sign only)
        extra_row[active.rows] = np.arange(len(active.rows), dtype=np.int32)
    systems = RowSystems(
        pattern=sp.csr_matrix((data, csr.indices, csr.indptr), shape=csr.shape),
        weighted=bool(data.size) and not np.all(data == 1.0),  # mutation: equivalent AndWithOr (weighting ones solves the same systems)
        rotated=rotated,
        eigvals=eigvals,
        shift=shift,
        extra=extra,
        extra_row=extra_row,
    )
    start = None
    if method == "cg":  # mutation: equivalent Eq_LtE (METHODS is exact, cg)
        start = np.zeros((n_rows, rank), FLOAT) if initial is None else np.asarray(initial, FLOAT) @ basis32
    solved = _REGISTRY[chosen].solve(systems, start, cg_steps if method == "cg" else 0, n_threads)  # mutation: equivalent Eq_LtE (METHODS is exact, cg)
    # The systems are solved: their proximal right-hand sides and CG start go, and the result is
    # rotated back in place (a second (n_rows, rank) array was the node's peak: 256 MiB at 1M users, rank 64).
    del systems, extra, extra_row, start
    return _matmul_rows_in_place(solved, np.ascontiguousarray(basis32.T), n_threads)


def observed_residual_sq(interactions: sp.csr_matrix, users: np.ndarray, items: np.ndarray) -> float:
    """sum over stored entries of w_ui (x_u.y_i - 1)^2, computed in bounded-memory chunks."""
    csr = interactions
    rows = np.repeat(np.arange(csr.shape[0], dtype=np.int64), np.diff(csr.indptr))
    total = 0.0
    step = max(1, (1 << 22) // max(1, users.shape[1]))  # mutation: equivalent (entries per chunk: any step >= 1 sums the same terms)
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
