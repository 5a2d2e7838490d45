"""The local iALS solver against float64 brute force, its own invariants, and `implicit`'s exact ALS."""

import itertools

import numpy as np
import pytest
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from cdimf.common.core import ials
from cdimf.common.core.model import ials_epoch
from cdimf.common.core.sparse import as_csr32, row_counts

# Every backend present on this machine runs the same tests (the compiled one where gcc exists).
BACKENDS = ials.available_backends()
# float32 solves of well-conditioned systems: a few ulps times the condition number.
SOLVE_RTOL = 2e-4


def random_problem(
    n_rows: int, n_cols: int, rank: int, seed: int, weighted: bool, long_rows: int = 6
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """A CSR with empty rows, rows shorter than the rank and `long_rows` rows longer than it, plus factors and a ridge."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max(2, rank), size=n_rows)
    lengths[rng.choice(n_rows, size=min(long_rows, n_rows), replace=False)] = rng.integers(
        rank, n_cols, size=min(long_rows, n_rows)
    )
    lengths[:: max(1, n_rows // 7)] = 0  # some empty rows
    rows = np.repeat(np.arange(n_rows), lengths)
    cols = np.concatenate([rng.choice(n_cols, size=length, replace=False) for length in lengths])
    values = rng.uniform(0.3, 3.0, size=len(rows)) if weighted else np.ones(len(rows))
    matrix = as_csr32(sp.csr_matrix((values, (rows, cols)), shape=(n_rows, n_cols)))
    fixed = ials.init_factors(n_cols, rank, 1.0, seed + 1)
    ridge = rng.uniform(0.05, 0.5, size=n_rows)
    return matrix, fixed, ridge


def brute_force_half_step(
    matrix: sp.csr_matrix, fixed: np.ndarray, alpha: float, ridge: np.ndarray, prox: ials.Proximal | None
) -> np.ndarray:
    """Each row's normal equations built and solved one by one in float64 (the definition)."""
    y = fixed.astype(np.float64)
    rank = y.shape[1]
    gram = y.T @ y
    rho = np.zeros(matrix.shape[0])
    target = np.zeros((matrix.shape[0], rank))
    if prox is not None:
        rho[prox.rows] = prox.rho
        target[prox.rows] = prox.target
    solved = np.zeros((matrix.shape[0], rank))
    for row in range(matrix.shape[0]):
        cols = matrix.indices[matrix.indptr[row] : matrix.indptr[row + 1]]
        weights = matrix.data[matrix.indptr[row] : matrix.indptr[row + 1]].astype(np.float64)
        lhs = (y[cols].T * weights) @ y[cols] + alpha * gram + (ridge[row] + rho[row]) * np.eye(rank)
        rhs = y[cols].T @ weights + rho[row] * target[row]
        solved[row] = np.linalg.solve(lhs, rhs)
    return solved


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest entry-wise error relative to the largest reference entry."""
    return float(np.abs(actual.astype(np.float64) - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank", [5, 16, 32])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("with_prox", [False, True])
def test_half_step_matches_float64_brute_force(backend: str, rank: int, weighted: bool, with_prox: bool) -> None:
    matrix, fixed, ridge = random_problem(70, 60, rank, seed=rank, weighted=weighted)
    prox = None
    if with_prox:
        rng = np.random.default_rng(3)
        empty = np.flatnonzero(row_counts(matrix) == 0)
        # the empty rows are cold users: only the proximal target pins them
        rows = np.unique(np.concatenate([empty, rng.choice(matrix.shape[0], 10, replace=False)]))
        prox = ials.Proximal(rows, rng.standard_normal((len(rows), rank)).astype(np.float32), 0.7)
    solved = ials.solve_half_step(matrix, fixed, 0.2, ridge, prox, threads=1, backend=backend)
    expected = brute_force_half_step(matrix, fixed, 0.2, ridge, prox)
    assert solved.dtype == np.float32 and solved.shape == expected.shape
    assert relative_error(solved, expected) < SOLVE_RTOL
    if with_prox:
        cold = np.flatnonzero(row_counts(matrix) == 0)
        assert np.abs(solved[cold]).max() > 0.1  # cold rows moved to their targets, not left at zero


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_longer_than_the_rank_and_a_very_long_row(backend: str) -> None:
    matrix, fixed, ridge = random_problem(30, 400, 16, seed=9, weighted=True, long_rows=12)
    assert row_counts(matrix).max() > 16 * 4  # several tiles of the dense Gramian
    solved = ials.solve_half_step(matrix, fixed, 0.05, ridge, threads=1, backend=backend)
    assert relative_error(solved, brute_force_half_step(matrix, fixed, 0.05, ridge, None)) < SOLVE_RTOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["exact", "cg"])
def test_one_and_two_threads_give_the_same_answer(backend: str, method: str) -> None:
    matrix, fixed, ridge = random_problem(400, 300, 16, seed=4, weighted=True, long_rows=40)
    start = ials.init_factors(400, 16, 1.0, 8)
    one = ials.solve_half_step(matrix, fixed, 0.1, ridge, threads=1, backend=backend, method=method, initial=start)
    two = ials.solve_half_step(matrix, fixed, 0.1, ridge, threads=2, backend=backend, method=method, initial=start)
    np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rho_zero_is_plain_als(backend: str) -> None:
    matrix, fixed, ridge = random_problem(50, 40, 8, seed=5, weighted=False)
    target = np.full((50, 8), 3.0, dtype=np.float32)
    plain = ials.solve_half_step(matrix, fixed, 0.3, ridge, None, threads=1, backend=backend)
    with_zero_rho = ials.solve_half_step(matrix, fixed, 0.3, ridge, ials.Proximal(np.arange(50), target, 0.0), threads=1, backend=backend)
    np.testing.assert_array_equal(plain, with_zero_rho)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stored_zero_weight_counts_as_no_interaction(backend: str) -> None:
    matrix, fixed, ridge = random_problem(40, 30, 16, seed=13, weighted=True, long_rows=10)
    with_zeros = matrix.copy()
    with_zeros.data[::3] = 0.0
    without = with_zeros.copy()
    without.eliminate_zeros()
    assert without.nnz < with_zeros.nnz
    kept = ials.solve_half_step(with_zeros, fixed, 0.2, ridge, threads=1, backend=backend)
    dropped = ials.solve_half_step(without, fixed, 0.2, ridge, threads=1, backend=backend)
    assert relative_error(kept, dropped.astype(np.float64)) < SOLVE_RTOL


def test_backends_agree_with_each_other() -> None:
    matrix, fixed, ridge = random_problem(120, 90, 32, seed=6, weighted=True, long_rows=20)
    answers = [ials.solve_half_step(matrix, fixed, 0.1, ridge, threads=2, backend=backend) for backend in BACKENDS]
    for answer in answers[1:]:
        assert relative_error(answer, answers[0].astype(np.float64)) < SOLVE_RTOL


def ridges(matrix: sp.csr_matrix, lam: float, alpha: float, nu: float) -> tuple[np.ndarray, np.ndarray]:
    """Rendle's frequency-scaled ridges for users and items."""
    return (
        ials.frequency_ridge(row_counts(matrix), matrix.shape[1], lam, alpha, nu),
        ials.frequency_ridge(row_counts(matrix.T.tocsr()), matrix.shape[0], lam, alpha, nu),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nu", [0.0, 1.0])
@pytest.mark.parametrize("method", ["exact", "cg"])
def test_loss_never_increases_over_epochs(backend: str, nu: float, method: str) -> None:
    matrix, _, _ = random_problem(150, 120, 16, seed=7, weighted=True, long_rows=15)
    transposed = matrix.T.tocsr()
    user_ridge, item_ridge = ridges(matrix, 0.05, 0.1, nu)
    users, items = ials.init_factors(150, 16, 1.0, 1), ials.init_factors(120, 16, 1.0, 2)
    rng = np.random.default_rng(0)
    prox = ials.Proximal(np.arange(0, 150, 3), rng.standard_normal((50, 16)).astype(np.float32) * 0.1, 0.5)
    losses = [ials.ials_loss(matrix, users, items, 0.1, user_ridge, item_ridge, prox)]
    for _ in range(6):
        users, items = ials_epoch(
            matrix, transposed, users, items, 0.1, user_ridge, item_ridge, prox, threads=2, method=method, backend=backend
        )
        losses.append(ials.ials_loss(matrix, users, items, 0.1, user_ridge, item_ridge, prox))
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in itertools.pairwise(losses)), losses
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_cg_steps_reach_the_exact_solution(backend: str) -> None:
    matrix, fixed, ridge = random_problem(60, 50, 8, seed=8, weighted=True)
    exact = ials.solve_half_step(matrix, fixed, 0.5, ridge, threads=1, backend=backend)
    approx = ials.solve_half_step(matrix, fixed, 0.5, ridge, threads=1, backend=backend, method="cg", cg_steps=40)
    assert relative_error(approx, exact.astype(np.float64)) < 1e-3


def test_loss_matches_its_dense_definition() -> None:
    matrix, _, _ = random_problem(30, 25, 4, seed=10, weighted=True)
    users, items = ials.init_factors(30, 4, 1.0, 3), ials.init_factors(25, 4, 1.0, 4)
    user_ridge, item_ridge = ridges(matrix, 0.1, 0.2, 0.5)
    prox = ials.Proximal(np.array([1, 4]), np.ones((2, 4), dtype=np.float32), 0.3)
    scores = users.astype(np.float64) @ items.astype(np.float64).T
    dense = matrix.toarray().astype(np.float64)
    expected = float(np.sum(dense * (scores - 1.0) ** 2 * (dense > 0)) + 0.2 * np.sum(scores**2))
    expected += float(user_ridge @ np.sum(users.astype(np.float64) ** 2, axis=1))
    expected += float(item_ridge @ np.sum(items.astype(np.float64) ** 2, axis=1))
    expected += 0.3 * float(np.sum((users[[1, 4]].astype(np.float64) - 1.0) ** 2))
    assert ials.ials_loss(matrix, users, items, 0.2, user_ridge, item_ridge, prox) == pytest.approx(expected, rel=1e-6)


def test_init_is_deterministic_for_a_seed() -> None:
    first, again, other = ials.init_factors(500, 32, 0.5, 42), ials.init_factors(500, 32, 0.5, 42), ials.init_factors(500, 32, 0.5, 43)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.dtype == np.float32
    assert np.std(first) == pytest.approx(0.5 / np.sqrt(32), rel=0.05)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, y, r: ials.solve_half_step(m, y[:-1], 0.1, r), "fixed factors"),
        (lambda m, y, r: ials.solve_half_step(m, y, 0.1, r[:-1]), "ridge"),
        (lambda m, y, r: ials.solve_half_step(m, y, 0.1, r, ials.Proximal(np.array([0]), np.zeros((1, 3), np.float32), 1.0)), "proximal target has rank"),
        (lambda m, y, r: ials.solve_half_step(m, y, 0.1, r, ials.Proximal(np.array([99]), np.zeros((1, 8), np.float32), 1.0)), "proximal rows"),
        (lambda m, y, r: ials.Proximal(np.array([0, 1]), np.zeros((1, 8), np.float32), 1.0), "proximal target has shape"),
        (lambda m, y, r: ials.Proximal(np.array([0]), np.zeros((1, 8), np.float32), -1.0), "rho"),
        (lambda m, y, r: ials.solve_half_step(m, y, 0.1, r, method="cg", initial=np.zeros((3, 8), np.float32)), "initial factors"),
        (lambda m, y, r: ials.solve_half_step(m, y, 0.1, r, method="newton"), "method"),
        (lambda m, y, r: ials.solve_half_step(m, y, 0.1, r, backend="gpu"), "backend"),
        (lambda m, y, r: ials.solve_half_step(m, y, 0.1, r, method="cg", cg_steps=0), "cg_steps"),
        (lambda m, y, r: ials.solve_half_step(-m, y, 0.1, r), "weights must be non-negative"),
        (lambda m, y, r: ials.solve_half_step(m, y, 0.0, np.zeros_like(r)), "singular"),
    ],
)
def test_bad_input_raises_a_value_error_naming_it(call, message: str) -> None:
    matrix, fixed, ridge = random_problem(20, 15, 8, seed=11, weighted=False)
    with pytest.raises(ValueError, match=message):
        call(matrix, fixed, ridge)


def test_agrees_with_implicit_exact_als() -> None:
    """nu = 0: implicit with confidence c = (1+alpha)/alpha, regularization lambda*c and factors
    scaled by sqrt(1+alpha) solves the same normal equations (divide ours by alpha to see it)."""
    from implicit.cpu import als as implicit_als  # a dev extra, installed by the tests command

    alpha, lam, rank = 0.25, 0.1, 12
    rng = np.random.default_rng(12)
    matrix = as_csr32(sp.random(300, 200, density=0.05, random_state=rng, format="csr"))
    matrix.data[:] = 1.0
    user_ridge, item_ridge = ridges(matrix, lam, alpha, 0.0)
    users, items = ials.init_factors(300, rank, 1.0, 13), ials.init_factors(200, rank, 1.0, 14)
    confidence = (1.0 + alpha) / alpha
    scale = np.float32(np.sqrt(1.0 + alpha))
    with threadpool_limits(limits=1, user_api="blas"):
        model = implicit_als.AlternatingLeastSquares(
            factors=rank, regularization=lam * confidence, alpha=1.0, iterations=3, use_cg=False,
            calculate_training_loss=False, num_threads=1, random_state=0,
        )
        model.user_factors, model.item_factors = users * scale, items * scale
        model.fit(matrix * np.float32(confidence), show_progress=False)
    transposed = matrix.T.tocsr()
    for _ in range(3):
        users, items = ials_epoch(matrix, transposed, users, items, alpha, user_ridge, item_ridge, threads=1)
    ours = ials.ials_loss(matrix, users, items, alpha, user_ridge, item_ridge)
    theirs = ials.ials_loss(matrix, model.user_factors / scale, model.item_factors / scale, alpha, user_ridge, item_ridge)
    assert abs(ours - theirs) / theirs < 1e-5


def test_the_backend_is_chosen_by_name_in_the_params_and_reported() -> None:
    """IALSParams.backend reaches the solver through the registry; the trainer says which backend runs."""
    from cdimf.common.core.model import DomainTrainer
    from cdimf.common.core.params import IALSParams

    assert ials.resolve_backend() in ials.available_backends()
    assert ials.resolve_backend("numpy") == "numpy"
    matrix, _, _ = random_problem(40, 30, 4, seed=13, weighted=False)
    trainer = DomainTrainer("sport", matrix, IALSParams(rank=4, threads=1, backend="numpy"), 0.0)
    assert trainer.backend() == "numpy"
    start = trainer.state.items
    trainer.users_half_step()
    expected = ials.solve_half_step(trainer.train, start, trainer.params.alpha, trainer.user_ridge, threads=1, backend="numpy")
    np.testing.assert_array_equal(trainer.state.users, expected)


def test_factors_are_float32_normals_scaled_by_sigma_over_root_rank() -> None:
    """Scaled in place, the factors are still exactly the float32 draws times float32(sigma / sqrt(rank))."""
    draws = np.random.default_rng(5).standard_normal((300, 16), dtype=np.float32)
    expected = draws * np.float32(0.5 / np.sqrt(16))
    factors = ials.init_factors(300, 16, 0.5, 5)
    assert factors.dtype == np.float32
    np.testing.assert_array_equal(factors, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_half_step_holds_one_result_sized_array(backend: str) -> None:
    """Traced peak of a half-step with a proximal term on a few rows stays near one (rows, rank) result.

    A proximal right-hand side held for every row, or a second array to rotate the result back
    into, would each add another result-sized array: the bound below leaves room for neither.
    """
    import tracemalloc

    n_rows, n_cols, rank = 100_000, 500, 64
    rng = np.random.default_rng(21)
    rows = rng.integers(0, n_rows, size=3 * n_rows)
    cols = rng.integers(0, n_cols, size=3 * n_rows)
    matrix = as_csr32(sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_rows, n_cols)))
    matrix.data[:] = 1.0
    fixed = ials.init_factors(n_cols, rank, 1.0, 22)
    ridge = rng.uniform(0.05, 0.5, size=n_rows)
    shared = np.sort(rng.choice(n_rows, size=200, replace=False))
    prox = ials.Proximal(shared, rng.standard_normal((len(shared), rank)).astype(np.float32), 1.0)
    result_bytes = n_rows * rank * 4
    # the result, the rotated fixed side, per-row bookkeeping (ridge + rho, row maps, lengths,
    # orders: under 64 bytes a row) and a solver chunk's and a rotation block's scratch
    bound = result_bytes + (n_cols + 1) * rank * 4 + 64 * n_rows + 4 * ials.CHUNK_FLOATS * 4
    assert bound < 2 * result_bytes  # so that one more result-sized array fails the test
    tracemalloc.start()
    try:
        solved = ials.solve_half_step(matrix, fixed, 0.1, ridge, prox, threads=1, backend=backend)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert solved.shape == (n_rows, rank)
    assert peak < bound, f"peak {peak / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB"
