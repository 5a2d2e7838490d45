"""Engine invariants: rho = 0 is separate ALS, identical domains agree, partial overlap uses holders only, L2 shrinks, cold users get Z."""

import numpy as np
import pytest
import scipy.sparse as sp

from cdimf.common.core.admm import apply_prox, consensus, consensus_mean
from cdimf.common.core.membership import align_memberships
from cdimf.common.core.model import DomainTrainer
from cdimf.common.core.params import ADMMParams, IALSParams
from cdimf.engine import CDIMFEngine, DomainInput

PARAMS = IALSParams(rank=6, alpha=0.2, lam=0.5, nu=0.0, sigma=0.5, seed=3, threads=1)


def random_matrix(n_users: int, n_items: int, density: float, seed: int) -> sp.csr_matrix:
    """A binary random interaction matrix where every row has at least one entry."""
    rng = np.random.default_rng(seed)
    dense = rng.random((n_users, n_items)) < density
    dense[np.arange(n_users), rng.integers(0, n_items, n_users)] = True
    return sp.csr_matrix(dense.astype(np.float32))


def keys(values: range | list[int]) -> np.ndarray:
    """User keys as strings."""
    return np.array([str(v) for v in values])


def test_rho_zero_equals_separate_als() -> None:
    """With rho = 0 every domain's factors are exactly those of training it alone."""
    a, b = random_matrix(30, 12, 0.2, 1), random_matrix(30, 9, 0.2, 2)
    engine = CDIMFEngine(
        [DomainInput("a", keys(range(30)), a, PARAMS, 2), DomainInput("b", keys(range(30)), b, PARAMS, 1)],
        ADMMParams(rho=0.0),
    )
    engine.run(3)
    alone_a, alone_b = DomainTrainer("a", a, PARAMS, 0.0), DomainTrainer("b", b, PARAMS, 0.0)
    alone_a.local_epochs(6)
    alone_b.local_epochs(3)
    np.testing.assert_array_equal(engine.trainers[0].state.users, alone_a.state.users)
    np.testing.assert_array_equal(engine.trainers[0].state.items, alone_a.state.items)
    np.testing.assert_array_equal(engine.trainers[1].state.users, alone_b.state.users)


def test_identical_domains_consensus_equals_local_factors() -> None:
    """Two copies of one domain: Z equals each copy's X and the duals stay zero."""
    a = random_matrix(25, 10, 0.25, 4)
    engine = CDIMFEngine(
        [DomainInput("a", keys(range(25)), a, PARAMS), DomainInput("b", keys(range(25)), a.copy(), PARAMS)],
        ADMMParams(rho=1.0),
    )
    engine.run(3)
    first, second = engine.trainers
    np.testing.assert_allclose(first.state.consensus, first.state.users[first.shared_rows], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(first.state.duals, 0.0, atol=1e-6)
    np.testing.assert_array_equal(first.state.users, second.state.users)


def test_partial_overlap_mean_uses_only_holders() -> None:
    """A user held by two of three domains is averaged over those two only."""
    rows_a, rows_b = np.array([0, 1]), np.array([1, 2])
    values_a = np.array([[1.0, 1.0], [2.0, 4.0]], dtype=np.float32)
    values_b = np.array([[6.0, 8.0], [3.0, 3.0]], dtype=np.float32)
    mean, holders = consensus_mean([(rows_a, values_a), (rows_b, values_b)], 4, 2)
    np.testing.assert_array_equal(holders, [1, 2, 1, 0])
    np.testing.assert_allclose(mean, [[1, 1], [4, 6], [3, 3], [0, 0]])


def test_l2_prox_shrinks_by_stated_factor() -> None:
    """Z = mean * N rho / (N rho + lambda_z) per row, N = holders of that row."""
    mean = np.array([[2.0, -4.0], [1.0, 1.0]], dtype=np.float32)
    holders = np.array([2, 1])
    params = ADMMParams(rho=0.5, prox="l2", lambda_z=3.0)
    z = apply_prox(mean, holders, params)
    np.testing.assert_allclose(z[0], mean[0] * (2 * 0.5) / (2 * 0.5 + 3.0), rtol=1e-6)
    np.testing.assert_allclose(z[1], mean[1] * (1 * 0.5) / (1 * 0.5 + 3.0), rtol=1e-6)
    np.testing.assert_array_equal(apply_prox(mean, holders, ADMMParams(rho=0.5)), mean)


def test_l2_prox_requires_strength() -> None:
    """prox = l2 without lambda_z is rejected when the parameters are built."""
    with pytest.raises(ValueError, match="lambda_z"):
        ADMMParams(rho=1.0, prox="l2")


def test_consensus_rejects_wrong_shapes() -> None:
    """A contribution whose shape does not match its rows is an error."""
    with pytest.raises(ValueError, match="shape"):
        consensus([(np.array([0, 1]), np.zeros((3, 2), dtype=np.float32))], 4, 2, ADMMParams())


def test_membership_roles_with_cold_users() -> None:
    """Shared rows are held here and wanted elsewhere; receivers have no history here but are held elsewhere."""
    # users: 0 in a and b; 1 only in a but cold (no history) in b; 2 only in b; 3 in a alone
    memberships, global_keys = align_memberships(
        [keys([0, 1, 3]), keys([0, 1, 2])],
        [np.array([True, True, True]), np.array([True, False, True])],
    )
    a, b = memberships
    np.testing.assert_array_equal(global_keys, keys([0, 1, 2, 3]))
    np.testing.assert_array_equal(a.shared_rows, [0, 1])  # user 1 must be pushed for b's cold row
    np.testing.assert_array_equal(a.receiver_rows, [])
    np.testing.assert_array_equal(b.shared_rows, [0])
    np.testing.assert_array_equal(b.receiver_rows, [1])
    np.testing.assert_array_equal(b.receiver_global, [1])


def test_cold_user_scored_with_consensus() -> None:
    """A user with no history in b gets b's scoring vector from the consensus of a's factors."""
    a = random_matrix(20, 8, 0.3, 5)
    b = random_matrix(20, 7, 0.3, 6).tolil()
    b[4, :] = 0
    b = b.tocsr()
    b.eliminate_zeros()
    engine = CDIMFEngine(
        [DomainInput("a", keys(range(20)), a, PARAMS), DomainInput("b", keys(range(20)), b, PARAMS)],
        ADMMParams(rho=1.0),
    )
    engine.run(2)
    _trainer_a, trainer_b = engine.trainers
    np.testing.assert_array_equal(trainer_b.receiver_rows, [4])
    scored = trainer_b.scoring_users()[4]
    assert np.linalg.norm(scored) > 0
    global_id = int(np.flatnonzero(engine.global_keys == "4")[0])
    np.testing.assert_allclose(scored, engine.consensus[global_id], rtol=1e-6)


def test_admm_pulls_domains_together() -> None:
    """With rho > 0 the shared users' factors of two different domains move towards each other."""
    a, b = random_matrix(40, 15, 0.2, 7), random_matrix(40, 11, 0.2, 8)
    params = IALSParams(rank=6, alpha=0.2, lam=0.5, sigma=0.5, seed=3, threads=1)
    def gap(rho: float) -> float:
        engine = CDIMFEngine(
            [DomainInput("a", keys(range(40)), a, params), DomainInput("b", keys(range(40)), b, params)],
            ADMMParams(rho=rho),
        )
        engine.run(8)
        return float(np.linalg.norm(engine.trainers[0].state.users - engine.trainers[1].state.users))
    assert gap(5.0) < 0.5 * gap(0.0)


def test_engine_rejects_mismatched_ranks() -> None:
    """Domains must share one rank for their factors to be averaged."""
    a = random_matrix(5, 4, 0.5, 9)
    other = PARAMS.model_copy(update={"rank": 3})
    with pytest.raises(ValueError, match="rank"):
        CDIMFEngine([DomainInput("a", keys(range(5)), a, PARAMS), DomainInput("b", keys(range(5)), a, other)], ADMMParams())


def test_reference_code_user_step_puts_rho_lambda_on_the_right_hand_side_only() -> None:
    """user_step 'reference-code': A_u x = b_u + rho lambda (z - u), checked against a dense solve."""
    a = random_matrix(12, 7, 0.3, 10)
    params = IALSParams(rank=3, alpha=0.2, lam=0.5, sigma=0.5, seed=1, threads=1)
    trainer = DomainTrainer("a", a, params, 2.0, np.arange(12), None, "reference-code")
    trainer.receive_consensus(np.ones((12, 3), dtype=np.float32))
    items = trainer.state.items.astype(np.float64)
    h = (trainer.state.consensus - trainer.state.duals).astype(np.float64)
    trainer.local_epochs(1)
    dense = a.toarray().astype(np.float64)
    for user in (0, 5):
        observed = items[dense[user] > 0]
        system = observed.T @ observed + 0.2 * items.T @ items + 0.5 * np.eye(3)
        expected = np.linalg.solve(system, observed.sum(axis=0) + 2.0 * 0.5 * h[user])
        np.testing.assert_allclose(trainer.state.users[user], expected, rtol=2e-4, atol=1e-5)


def test_reference_code_user_step_needs_nu_zero() -> None:
    """The reference-code variant is defined here for nu = 0 only."""
    with pytest.raises(ValueError, match="nu = 0"):
        DomainTrainer("a", random_matrix(4, 3, 0.5, 11), PARAMS.model_copy(update={"nu": 0.5}), 1.0, user_step="reference-code")
