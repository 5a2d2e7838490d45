"""Known answers for the formulas and protocol constants the README states, each computed here by hand.

Every expected value below comes from a hand formula, a float64 brute force written in this
file, or a literal of the protocol (1000 candidates, 300 s, HMAC-SHA256), never from the
function under test: a wrong formula shared by the code and its callers still fails here.
"""

import dataclasses
import datetime
import hashlib
import hmac
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from cryptography.hazmat.primitives import serialization

from cdimf.common.config import NodeConfig, ValidationParams
from cdimf.common.core import ials
from cdimf.common.core.admm import (
    ADMMParams,
    block_plan,
    blockwise_consensus,
    consensus,
    consensus_mean,
    dual_update,
    prox_identity,
    prox_l2,
    proximal_target,
)
from cdimf.common.core.evaluation import draw_candidates
from cdimf.common.core.ials import Proximal, frequency_ridge, ials_loss, observed_residual_sq, solve_half_step
from cdimf.common.core.metrics import sample_negatives, sampled_ranks
from cdimf.common.core.model import DomainTrainer
from cdimf.common.core.params import IALSParams
from cdimf.common.security import call_proof, pki
from cdimf.common.security.pseudonyms import pseudonymize
from cdimf.domain_node.node_data import load_node_data
from cdimf.reproduce_config import EvaluationConfig, StoppingConfig

RNG = np.random.default_rng(7)


def _interactions(n_users: int, n_items: int, density: float, seed: int, weighted: bool = False) -> sp.csr_matrix:
    """A random implicit matrix where every row and column holds at least one entry."""
    rng = np.random.default_rng(seed)
    dense = (rng.random((n_users, n_items)) < density).astype(np.float64)
    dense[np.arange(n_users), rng.integers(0, n_items, n_users)] = 1.0
    dense[rng.integers(0, n_users, n_items), np.arange(n_items)] = 1.0
    if weighted:
        dense *= rng.uniform(0.5, 3.0, dense.shape)
    return sp.csr_matrix(dense.astype(np.float32))


def _dense_solve(matrix: sp.csr_matrix, fixed: np.ndarray, alpha: float, ridge: np.ndarray,
                 rows: np.ndarray | None = None, target: np.ndarray | None = None, rho: float = 0.0) -> np.ndarray:
    """Brute force in float64: (sum_S w y y^T + alpha Y^T Y + (ridge_r + rho_r) I) x_r = sum_S w y + rho_r h_r."""
    weights = matrix.toarray().astype(np.float64)
    y = fixed.astype(np.float64)
    rank = y.shape[1]
    lhs = np.einsum("um,md,me->ude", weights, y, y) + alpha * (y.T @ y) + ridge[:, None, None] * np.eye(rank)
    rhs = weights @ y
    if rows is not None and target is not None:
        lhs[rows] += rho * np.eye(rank)
        rhs[rows] += rho * target.astype(np.float64)
    return np.linalg.solve(lhs, rhs[:, :, None])[:, :, 0]


# ----- the local model: ridge, loss, the shared-row system -----


@pytest.mark.parametrize(("lam", "alpha", "nu"), [(0.3, 0.5, 1.0), (0.2, 2.0, 0.5), (0.7, 0.1, 0.0)])
def test_frequency_ridge_is_lambda_times_count_plus_alpha_times_catalog_to_the_nu(lam: float, alpha: float, nu: float) -> None:
    """ridge_u = lam * (|I_u| + alpha |I|)^nu (users) and lam * (|U_i| + alpha |U|)^nu (items), by hand."""
    train = _interactions(9, 13, 0.3, seed=1)
    trainer = DomainTrainer("d", train, IALSParams(rank=3, lam=lam, alpha=alpha, nu=nu), rho=0.0)
    dense = train.toarray() > 0
    user_counts, item_counts = dense.sum(axis=1), dense.sum(axis=0)
    np.testing.assert_allclose(trainer.user_ridge, [lam * (c + alpha * 13) ** nu for c in user_counts], rtol=1e-12)
    np.testing.assert_allclose(trainer.item_ridge, [lam * (c + alpha * 9) ** nu for c in item_counts], rtol=1e-12)
    # one literal: 2 items of 10, lam 0.5, alpha 3, nu 1 -> 0.5 * (2 + 30) = 16
    assert frequency_ridge(np.array([2]), 10, lam=0.5, alpha=3.0, nu=1.0).tolist() == [16.0]
    # the formula holds for a negative exponent too: 0.5 * 32 ** -1 = 1 / 64
    assert frequency_ridge(np.array([2]), 10, lam=0.5, alpha=3.0, nu=-1.0).tolist() == [1 / 64]


def test_a_users_half_step_solves_the_hand_built_system_with_the_frequency_ridge() -> None:
    """The trainer's users after one half-step equal the float64 brute force with the hand ridge (nu > 0)."""
    train = _interactions(12, 10, 0.3, seed=2)
    params = IALSParams(rank=4, lam=0.4, alpha=0.8, nu=1.0, backend="numpy", threads=1)
    trainer = DomainTrainer("d", train, params, rho=0.0)
    items = trainer.state.items.copy()
    trainer.users_half_step()
    ridge = 0.4 * ((train.toarray() > 0).sum(axis=1) + 0.8 * 10) ** 1.0
    expected = _dense_solve(train, items, 0.8, ridge)
    np.testing.assert_allclose(trainer.state.users, expected, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("backend", ["numpy", "native"])
@pytest.mark.parametrize("weighted", [False, True])
def test_the_shared_row_system_adds_rho_to_the_diagonal_and_rho_h_to_the_right_hand_side(backend: str, weighted: bool) -> None:
    """Rows under the proximal term solve (A_u + rho I) x = b_u + rho h_u; the others A_u x = b_u (float64 brute force)."""
    train = _interactions(20, 15, 0.25, seed=3, weighted=weighted)
    fixed = RNG.standard_normal((15, 5)).astype(np.float32)
    ridge = RNG.uniform(0.1, 1.0, 20)
    rows = np.array([1, 4, 5, 17])
    target = RNG.standard_normal((4, 5)).astype(np.float32)
    solved = solve_half_step(train, fixed, 0.3, ridge, Proximal(rows, target, 2.5), threads=1, backend=backend)
    np.testing.assert_allclose(solved, _dense_solve(train, fixed, 0.3, ridge, rows, target, 2.5), rtol=5e-4, atol=5e-5)
    # the same rows without the term differ: rho really enters both sides
    plain = _dense_solve(train, fixed, 0.3, ridge)
    assert np.abs(solved[rows] - plain[rows]).min() > 1e-4
    np.testing.assert_allclose(np.delete(solved, rows, 0), np.delete(plain, rows, 0), rtol=5e-4, atol=5e-5)


def test_the_loss_is_the_observed_residual_plus_alpha_all_pairs_plus_ridges_plus_the_proximal_term() -> None:
    """ials_loss equals a double loop over every (user, item) pair written out here."""
    train = _interactions(6, 5, 0.4, seed=4, weighted=True)
    users = RNG.standard_normal((6, 3)).astype(np.float32)
    items = RNG.standard_normal((5, 3)).astype(np.float32)
    user_ridge, item_ridge = RNG.uniform(0.1, 1.0, 6), RNG.uniform(0.1, 1.0, 5)
    rows, target = np.array([0, 3]), RNG.standard_normal((2, 3)).astype(np.float32)
    weights = train.toarray()
    expected = 0.0
    for u in range(6):
        for i in range(5):
            score = float(np.dot(users[u].astype(np.float64), items[i].astype(np.float64)))
            if weights[u, i] > 0:
                expected += float(weights[u, i]) * (score - 1.0) ** 2
            expected += 0.7 * score**2
    expected += sum(user_ridge[u] * float(np.sum(users[u].astype(np.float64) ** 2)) for u in range(6))
    expected += sum(item_ridge[i] * float(np.sum(items[i].astype(np.float64) ** 2)) for i in range(5))
    expected += 1.5 * float(np.sum((users[rows].astype(np.float64) - target) ** 2))
    got = ials_loss(train, users, items, 0.7, user_ridge, item_ridge, Proximal(rows, target, 1.5))
    assert got == pytest.approx(expected, rel=1e-9)


# ----- the ADMM exchange: X + U, U += X - Z, h = Z - U -----


def _trainer_with_shared_rows() -> DomainTrainer:
    """A trainer whose rows 1, 3 and 4 are shared."""
    train = _interactions(6, 8, 0.4, seed=5)
    return DomainTrainer("d", train, IALSParams(rank=3, lam=0.5, alpha=0.2, backend="numpy", threads=1), rho=1.7,
                         shared_rows=np.array([1, 3, 4]))


def test_the_contribution_is_x_plus_u_the_dual_step_adds_x_minus_z_and_the_target_is_z_minus_u() -> None:
    """Two exchanges on a trainer, every quantity computed here from its arrays."""
    trainer = _trainer_with_shared_rows()
    shared = np.array([1, 3, 4])
    trainer.local_epochs(1)
    x1 = trainer.state.users[shared].astype(np.float64)
    np.testing.assert_allclose(trainer.contribution(), x1, rtol=1e-6)  # U starts at 0
    z1 = RNG.standard_normal((3, 3)).astype(np.float32)
    trainer.receive_consensus(z1)
    u1 = x1 - z1  # U = 0 + X - Z: the full step (half of it fails here)
    np.testing.assert_allclose(trainer.state.duals, u1, rtol=1e-5, atol=1e-6)
    prox = trainer.proximal()
    assert prox is not None and prox.rho == 1.7
    np.testing.assert_array_equal(prox.rows, shared)
    np.testing.assert_allclose(prox.target, z1 - u1, rtol=1e-5, atol=1e-6)
    # second round: the users solve towards Z - U with rho; then X + U is pushed
    items = trainer.state.items.copy()
    trainer.users_half_step()
    ridge = np.full(6, 0.5)
    expected_x = _dense_solve(trainer.train, items, 0.2, ridge, shared, (z1 - u1).astype(np.float32), 1.7)
    np.testing.assert_allclose(trainer.state.users, expected_x, rtol=5e-4, atol=5e-5)
    x2 = trainer.state.users[shared].astype(np.float64)
    np.testing.assert_allclose(trainer.contribution(), x2 + u1, rtol=1e-5, atol=1e-6)
    z2 = RNG.standard_normal((3, 3)).astype(np.float32)
    trainer.receive_consensus(z2)
    np.testing.assert_allclose(trainer.state.duals, u1 + x2 - z2, rtol=1e-5, atol=1e-6)


def test_the_admm_functions_on_literals() -> None:
    """dual_update and proximal_target on numbers small enough to check by eye."""
    u = np.array([[1.0, -2.0]], np.float32)
    x = np.array([[4.0, 0.5]], np.float32)
    z = np.array([[1.0, 1.5]], np.float32)
    assert dual_update(u, x, z).tolist() == [[4.0, -3.0]]  # 1 + 4 - 1, -2 + 0.5 - 1.5
    assert proximal_target(z, u).tolist() == [[0.0, 3.5]]  # 1 - 1, 1.5 + 2


# ----- the aggregator's consensus: mean over holders, the L2 shrink -----


def test_consensus_is_the_mean_over_the_domains_that_hold_each_row() -> None:
    """Rows held by 1, 2 or 3 domains, and one held by none, on literals."""
    a = (np.array([0, 1, 2]), np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], np.float32))
    b = (np.array([2, 1]), np.array([[7.0, 8.0], [9.0, 10.0]], np.float32))
    c = (np.array([2]), np.array([[0.0, -2.0]], np.float32))
    mean, holders = consensus_mean([a, b, c], n_rows=4, rank=2)
    assert holders.tolist() == [1, 2, 3, 0]
    assert mean.tolist() == [[1.0, 2.0], [6.0, 7.0], [4.0, 4.0], [0.0, 0.0]]
    z, _ = consensus([a, b, c], 4, 2, ADMMParams(rho=1.0))
    assert z.tolist() == mean.tolist()


def test_the_l2_prox_shrinks_the_mean_by_n_rho_over_n_rho_plus_lambda_z() -> None:
    """N = 1, 2, 3 holders, rho 2, lambda_z 2: factors 2/4, 4/6, 6/8; a row nobody holds stays 0."""
    a = (np.array([0, 1, 2]), np.array([[4.0], [6.0], [8.0]], np.float32))
    b = (np.array([1, 2]), np.array([[6.0], [8.0]], np.float32))
    c = (np.array([2]), np.array([[8.0]], np.float32))
    z, holders = consensus([a, b, c], 4, 1, ADMMParams(rho=2.0, prox="l2", lambda_z=2.0))
    assert holders.tolist() == [1, 2, 3, 0]
    np.testing.assert_allclose(z[:, 0], [4.0 * 2 / 4, 6.0 * 4 / 6, 8.0 * 6 / 8, 0.0], rtol=1e-6)
    assert prox_l2(np.array([[3.0]]), np.array([0]), ADMMParams(rho=1.0, prox="l2", lambda_z=1.0)).tolist() == [[0.0]]
    # a denominator N rho + lambda_z below 1 still divides: 1 * 0.25 / (0.25 + 0.25) = 0.5
    assert prox_l2(np.array([[3.0]]), np.array([1]), ADMMParams(rho=0.25, prox="l2", lambda_z=0.25)).tolist() == [[1.5]]


def test_a_contribution_of_another_shape_is_refused_naming_both_shapes() -> None:
    """One row or one column too many or too few: a ValueError that names the shape sent and the one expected."""
    rows = np.array([0, 1, 2])
    for shape in ((4, 2), (3, 3), (2, 2), (3, 1)):
        with pytest.raises(ValueError, match=rf"^contribution has shape \({shape[0]}, {shape[1]}\), expected \(3, 2\)$"):
            consensus_mean([(rows, np.zeros(shape, np.float32))], n_rows=5, rank=2)
    for repeated in ([0, 1, 0], [3, 1, 3], [4, 2, 0, 2]):  # the smallest row twice, or another one
        with pytest.raises(ValueError, match="^contribution names a row twice$"):
            consensus_mean([(np.array(repeated), np.zeros((len(repeated), 2), np.float32))], n_rows=5, rank=2)


def test_the_identity_prox_returns_the_mean_as_a_copy() -> None:
    """Z = mean, in a new array: changing Z leaves the mean it came from as it was."""
    mean = np.array([[1.5, -2.0], [0.0, 3.0]], np.float32)
    z = prox_identity(mean, np.array([1, 2]), ADMMParams(rho=1.0))
    assert z.tolist() == [[1.5, -2.0], [0.0, 3.0]] and z.dtype == np.float32
    z[0, 0] = 9.0
    assert mean[0, 0] == 1.5


# ----- the sampled protocol: 1000 candidates on test, 100 on validation -----


def _big_catalog_files(folder: Path, n_items: int = 1200) -> tuple[Path, Path]:
    """A train file over n_items items (each trained by two users) and a test file of three users."""
    folder.mkdir(parents=True, exist_ok=True)
    train = folder / "train.csv"
    lines = [f"u{u},i{i}" for u in range(6) for i in range(u % 3, n_items, 3)]  # every item has two users
    train.write_text("user,item\n" + "\n".join(lines) + "\n")
    test = folder / "test.csv"
    test.write_text("user,item\nu0,i1\nu1,i2\nu2,i3\n")
    return train, test


def test_the_paper_protocol_ranks_each_target_among_1000_candidates_and_validation_among_100(tmp_path: Path) -> None:
    """The defaults everywhere: 999 test negatives + target, 99 validation negatives + target."""
    train, test = _big_catalog_files(tmp_path)
    data = load_node_data("d", train, None, test, "csv")
    assert data.test is not None and data.valid is not None
    assert data.test.candidates.shape == (3, 1000)
    assert data.valid.candidates.shape == (6, 100)
    assert np.all(data.test.candidates[:, 0] == data.test.items)  # target first
    assert all(len(set(row.tolist())) == 1000 for row in data.test.candidates)
    users = np.arange(4)
    assert draw_candidates(1500, users, users, 4, seed=0).candidates.shape == (4, 1000)
    assert sample_negatives(1500, users, users, sp.csr_matrix((4, 1500)), seed=0).shape == (4, 1000)
    assert ValidationParams().negatives == 99
    assert NodeConfig.model_fields["validation"].get_default(call_default_factory=True).negatives == 99
    assert EvaluationConfig().n_negatives == 999
    assert StoppingConfig().valid_negatives == 99


# ----- security: the proof window and the pseudonym MAC -----


TARGET = "cdimf://aggregator/aggregator"
DIGEST = hashlib.sha256(b"").digest()


def test_a_call_proof_is_accepted_within_300_seconds_of_the_server_clock_and_refused_beyond() -> None:
    """Skews of +-299 s pass, +-301 s are refused (the window is 300 s, both ways)."""
    ca = pki.create_ca()
    sport = pki.issue_domain_certificate(ca, "sport")
    der = sport.certificate.public_bytes(serialization.Encoding.DER)
    now = datetime.datetime.now(datetime.UTC).timestamp()
    method = "/cdimf.v1.Aggregator/PushContribution"
    authenticator = call_proof.CallAuthenticator(ca.certificate, TARGET, clock=lambda: now)
    for skew in (-299.0, 299.0):
        authenticator.authenticate(call_proof.proof_metadata(der, sport.private_key, method, target=TARGET, digest=DIGEST, now=now + skew), method, DIGEST)
    for skew in (-301.0, 301.0):
        with pytest.raises(call_proof.CallRefused):
            authenticator.authenticate(call_proof.proof_metadata(der, sport.private_key, method, target=TARGET, digest=DIGEST, now=now + skew), method, DIGEST)


def test_pseudonyms_are_hmac_sha256_of_the_context_and_the_key_under_the_secret() -> None:
    """Known answers from the standard library's hmac, and not a plain hash of secret + key."""
    secret = b"0123456789abcdef-federation"
    context = b"cdimf.v1.user-pseudonym\x00"
    keys: list[object] = ["alice", 42, b"\x00raw"]
    got = pseudonymize(keys, secret)
    expected = [hmac.new(secret, context + k, hashlib.sha256).digest() for k in (b"alice", b"42", b"\x00raw")]
    assert [bytes(row) for row in got] == expected
    # a literal vector, so that the context string itself is pinned too
    assert bytes(got[0]).hex() == hmac.new(secret, b"cdimf.v1.user-pseudonym\x00alice", "sha256").hexdigest()
    assert bytes(got[0]) != hashlib.sha256(secret + context + b"alice").digest()


def test_a_row_outside_the_matrix_is_refused_naming_the_valid_range() -> None:
    """A shared row past the last user is refused with the range of rows that exist (0..n-1, here 0..5)."""
    train = sp.csr_matrix(np.eye(6, 4, dtype=np.float32))
    for rows in ([1, 6], [1, 9], [-1, 2]):
        with pytest.raises(ValueError, match=re.escape("shared_rows has a row outside 0..5")):
            DomainTrainer("shop", train, IALSParams(rank=2), rho=1.0, shared_rows=np.array(rows))
    for field, rows in (("shared_rows", [3, 1]), ("shared_rows", [2, 2]), ("receiver_rows", [5, 4])):
        with pytest.raises(ValueError, match=f"^{field} must be sorted and unique$"):
            DomainTrainer("shop", sp.csr_matrix((6, 4), dtype=np.float32), IALSParams(rank=2), rho=1.0, **{field: np.array(rows)})


def test_a_catalog_outside_the_items_is_refused_at_either_end() -> None:
    """Items are 0..3 here: a catalog holding -1 or 4 (first or last of its sorted ids) is refused, 0..3 is not."""
    exclude = sp.csr_matrix((2, 4), dtype=np.float32)
    users, items = np.array([0, 1]), np.array([0, 1])
    for catalog in ([-1, 1, 2], [0, 1, 4], [0, 1, 2, 3, 4]):
        with pytest.raises(ValueError, match=re.escape("catalog holds item indices outside [0, 4)")):
            sample_negatives(4, users, items, exclude, n_negatives=1, catalog=np.array(catalog))
    drawn = sample_negatives(4, users, items, exclude, n_negatives=1, catalog=np.array([0, 1, 2, 3]))
    assert drawn.shape == (2, 2) and set(drawn[:, 1].tolist()) <= {0, 1, 2, 3}


def test_ranks_with_no_training_pairs_at_all_count_only_the_scores() -> None:
    """No user has a training item (an empty train matrix): a target's rank is 1 + the candidates scored above it."""
    users = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    items = np.array([[3.0, 0.0], [2.0, 5.0], [1.0, 1.0], [0.0, 4.0]], dtype=np.float32)
    candidates = np.array([[2, 0, 1], [1, 3, 2]])
    # user 0 scores items by their first factor: 3, 2, 1 for items 0, 1, 2, so item 2 ranks 3rd;
    # user 1 by their second: 5, 4, 1 for items 1, 3, 2, so item 1 ranks 1st
    for method in ("gemm", "gather"):
        ranks = sampled_ranks(users, items, candidates, np.array([0, 1]), sp.csr_matrix((2, 4), dtype=np.float32), method=method)
        np.testing.assert_array_equal(ranks, [3, 1])


def test_blockwise_consensus_of_one_row_and_of_rows_not_filling_a_block() -> None:
    """One shared row, and 5 rows in blocks of 2 (the last block short): the mean over holders by hand."""
    one = [(np.array([0]), np.array([[2.0, 4.0]], np.float32)), (np.array([0]), np.array([[4.0, 0.0]], np.float32))]
    for block_rows in (None, 1, 64):
        z = blockwise_consensus(one, 1, 2, ADMMParams(rho=1.0), block_rows)
        assert z.tolist() == [[3.0, 2.0]]
    a = (np.array([4, 0, 2]), np.array([[1.0], [2.0], [3.0]], np.float32))
    b = (np.array([1, 4]), np.array([[5.0], [7.0]], np.float32))
    for block_rows in (1, 2, 3, 5, 6):
        z = blockwise_consensus([a, b], 5, 1, ADMMParams(rho=1.0), block_rows)
        assert z[:, 0].tolist() == [2.0, 5.0, 3.0, 0.0, 4.0]


def _mean_by_hand(contributions: list[tuple[np.ndarray, np.ndarray]], n_rows: int, rank: int) -> np.ndarray:
    """The float64 mean over holders, row by row and domain by domain (rows nobody holds are 0)."""
    total = np.zeros((n_rows, rank))
    count = np.zeros(n_rows)
    for rows, values in contributions:
        for row, value in zip(rows.tolist(), values.astype(np.float64)):
            total[row] += value
            count[row] += 1
    return np.array([total[row] / count[row] if count[row] else total[row] for row in range(n_rows)], np.float32)


def test_blockwise_consensus_of_decreasing_and_first_smallest_row_ids_in_many_blocks() -> None:
    """Row ids decreasing, or smallest first but unsorted, over hundreds of blocks: the mean by hand."""
    rng = np.random.default_rng(3)
    n_rows, rank = 600, 2
    decreasing = np.arange(n_rows - 1, -1, -2)
    first_smallest = np.array([0, 7, 3, 599, 12, 5, 400])
    contributions = [(rows, rng.standard_normal((len(rows), rank)).astype(np.float32)) for rows in (decreasing, first_smallest)]
    expected = _mean_by_hand(contributions, n_rows, rank)
    for block_rows in (2, 5):
        z = blockwise_consensus(contributions, n_rows, rank, ADMMParams(rho=1.0), block_rows)
        np.testing.assert_allclose(z, expected, rtol=1e-6, atol=0)
    # a permutation of every row with the first row first and the last last (not increasing)
    permutation = np.array([0, *range(n_rows - 2, 0, -1), n_rows - 1])
    values = rng.standard_normal((n_rows, rank)).astype(np.float32)
    mean, holders = consensus_mean([(permutation, values)], n_rows, rank)
    np.testing.assert_array_equal(mean[permutation], values)
    assert holders.tolist() == [1] * n_rows


def test_blockwise_consensus_of_three_hundred_domains() -> None:
    """300 domains holding one row each of 4 (75 per row): the mean by hand; a plan fewer or more is refused."""
    rng = np.random.default_rng(4)
    contributions = [(np.array([domain % 4]), rng.standard_normal((1, 3)).astype(np.float32)) for domain in range(300)]
    z = blockwise_consensus(contributions, 4, 3, ADMMParams(rho=1.0), 2)
    np.testing.assert_allclose(z, _mean_by_hand(contributions, 4, 3), rtol=1e-5, atol=1e-7)
    plans = [block_plan(rows, 4, 2) for rows, _ in contributions]
    for wrong in (plans[:-1], [*plans, plans[0]]):
        with pytest.raises(ValueError, match=rf"^{len(wrong)} block plans for 300 contributions$"):
            blockwise_consensus(contributions, 4, 3, ADMMParams(rho=1.0), 2, wrong)


def test_a_block_plan_of_other_rows_or_other_blocks_is_refused() -> None:
    """A plan made for one row more or less, or for blocks of another size, does not fit; a plan is frozen."""
    rows = np.array([5, 1, 3])
    contribution = [(rows, np.ones((3, 1), np.float32))]
    for plan, block_rows in [(block_plan(np.array([5, 1, 3, 0]), 8, 2), 2), (block_plan(np.array([5, 1]), 8, 2), 2),
                             (block_plan(rows, 8, 2), 4), (block_plan(rows, 8, 4), 2)]:
        with pytest.raises(ValueError, match=r"does not fit 3 rows in blocks of"):
            blockwise_consensus(contribution, 8, 1, ADMMParams(rho=1.0), block_rows, [plan])
    with pytest.raises(dataclasses.FrozenInstanceError):
        block_plan(rows, 8, 2).order = None  # type: ignore[misc]


def test_a_block_plan_holds_row_ids_beyond_int32_exactly_and_int32_below() -> None:
    """Ids of a Z of 2**31 + 1 rows or more stay exact (int64); below 2**31 rows the plan is int32."""
    for n_rows in (2**31, 2**31 + 1, 2**32 + 8):
        index = np.array([n_rows - 1, 0, 5])
        plan = block_plan(index, n_rows, 2**30)
        assert plan.order is not None and plan.order.tolist() == [1, 2, 0]
        assert plan.sorted_index.tolist() == [0, 5, n_rows - 1]
    small = block_plan(np.array([2**31 - 2, 0]), 2**31 - 1, 2**30)
    assert small.order is not None and small.order.dtype == np.int32 and small.sorted_index.dtype == np.int32
    assert small.sorted_index.tolist() == [0, 2**31 - 2]


def test_a_consensus_of_another_shape_is_refused_naming_both_shapes_and_changes_nothing() -> None:
    """Two shared rows at rank 2: a Z with a row or a column too many or too few is a ValueError
    naming both shapes, and the duals, the consensus and the exchange count stay as they were."""
    train = sp.csr_matrix(np.eye(4, 3, dtype=np.float32))
    trainer = DomainTrainer("sport", train, IALSParams(rank=2, backend="numpy", threads=1), rho=1.0, shared_rows=np.array([0, 2]))
    duals = trainer.state.duals.copy()
    for shape in ((3, 2), (2, 3), (1, 2), (2, 1)):
        with pytest.raises(ValueError, match=rf"^domain sport: consensus has shape \({shape[0]}, {shape[1]}\), expected \(2, 2\)$"):
            trainer.receive_consensus(np.zeros(shape, np.float32))
    assert trainer.state.exchanges == 0 and trainer.state.consensus is None
    np.testing.assert_array_equal(trainer.state.duals, duals)
    cold = DomainTrainer("sport", sp.csr_matrix(np.eye(4, 3, dtype=np.float32)),  # row 3 has no interactions
                         IALSParams(rank=2, backend="numpy", threads=1), rho=1.0, shared_rows=np.array([0]), receiver_rows=np.array([3]))
    for shape in ((2, 2), (1, 3), (0, 2)):
        with pytest.raises(ValueError, match=rf"^domain sport: receiver consensus has shape \({shape[0]}, {shape[1]}\), expected \(1, 2\)$"):
            cold.receive_consensus(np.zeros((1, 2), np.float32), np.zeros(shape, np.float32))
    assert cold.state.exchanges == 0 and cold.state.receiver_consensus is None


def test_an_ials_epoch_with_cg_warm_starts_both_half_steps_with_three_steps_by_default() -> None:
    """ials_epoch(method="cg") without cg_steps: the users' half-step, 3 CG steps from the users passed
    in, then the items' from the items passed in given the new users; a different count gives other factors."""
    from cdimf.common.core.model import ials_epoch

    rng = np.random.default_rng(5)
    train = sp.random(30, 20, density=0.3, format="csr", random_state=5, dtype=np.float32)
    train.data[:] = 1.0
    train_t = train.T.tocsr()
    users, items = rng.standard_normal((30, 4)).astype(np.float32), rng.standard_normal((20, 4)).astype(np.float32)
    ridge_u, ridge_i = np.full(30, 0.5), np.full(20, 0.5)
    cg = "".join(["c", "g"])  # a method name as read from a file: equal to the literal, not the same object
    got_users, got_items = ials_epoch(train, train_t, users.copy(), items.copy(), 0.1, ridge_u, ridge_i, threads=1, method=cg,
                                      backend="numpy")
    want_users = solve_half_step(train, items, 0.1, ridge_u, None, 1, method="cg", cg_steps=3, initial=users, backend="numpy")
    want_items = solve_half_step(train_t, want_users, 0.1, ridge_i, None, 1, method="cg", cg_steps=3, initial=items, backend="numpy")
    np.testing.assert_array_equal(got_users, want_users)
    np.testing.assert_array_equal(got_items, want_items)
    four, _ = ials_epoch(train, train_t, users.copy(), items.copy(), 0.1, ridge_u, ridge_i, threads=1, method="cg", cg_steps=4,
                         backend="numpy")
    assert not np.allclose(four, got_users, rtol=1e-6, atol=1e-7)


def test_a_trainer_counts_its_epochs_and_exchanges_from_zero() -> None:
    """A new trainer has done 0 epochs and 0 exchanges; each local epoch adds 1, each received Z adds 1."""
    train = sp.csr_matrix(np.eye(4, 3, dtype=np.float32))
    trainer = DomainTrainer("sport", train, IALSParams(rank=2, backend="numpy", threads=1), rho=1.0, shared_rows=np.array([0, 2]))
    assert (trainer.state.epochs, trainer.state.exchanges) == (0, 0)
    trainer.local_epochs(2)
    assert (trainer.state.epochs, trainer.state.exchanges) == (2, 0)
    trainer.receive_consensus(np.zeros((2, 2), np.float32))
    trainer.local_epochs(1)
    assert (trainer.state.epochs, trainer.state.exchanges) == (3, 1)


def test_the_proximal_term_of_one_shared_row_and_when_there_is_none() -> None:
    """One shared row gets the term (target Z - U, weight rho); rho = 0 or no shared rows give none;
    a receiver row with interactions is refused; the trainer keeps the Z it is handed and never writes into it."""
    train = sp.csr_matrix(np.eye(4, 3, dtype=np.float32))  # row 3 has no interactions
    params = IALSParams(rank=2, backend="numpy", threads=1)
    one = DomainTrainer("sport", train, params, rho=0.7, shared_rows=np.array([2]))
    z = np.array([[1.0, -1.0]], np.float32)
    x = one.state.users[2].copy()
    one.receive_consensus(z)
    prox = one.proximal()
    assert prox is not None and prox.rows.tolist() == [2] and prox.rho == 0.7
    np.testing.assert_allclose(prox.target, [[1.0 - (x[0] - 1.0), -1.0 - (x[1] + 1.0)]], rtol=1e-6)  # Z - U, U = X - Z
    assert one.state.consensus.tolist() == [[1.0, -1.0]]
    one.epochs_to_contribution(2)  # training reads the handed-over Z and never writes into it
    assert z.tolist() == [[1.0, -1.0]] and one.state.consensus.tolist() == [[1.0, -1.0]]
    plain = DomainTrainer("sport", train, params, rho=0.0, shared_rows=np.array([2]))
    plain.receive_consensus(np.ones((1, 2), np.float32))
    assert plain.proximal() is None
    alone = DomainTrainer("sport", train, params, rho=0.7)
    alone.receive_consensus(np.zeros((0, 2), np.float32))
    assert alone.proximal() is None
    with pytest.raises(ValueError, match="^domain sport: receiver rows must have no interactions$"):
        DomainTrainer("sport", train, params, rho=0.7, receiver_rows=np.array([1, 3]))


def test_rows_of_another_dimension_a_receivers_z_copy_two_epochs_and_the_paper_step_by_value() -> None:
    """Row ids must be one-dimensional (a scalar or a matrix is refused); the trainer scores receivers
    with the Z it is handed and never writes into it; epochs_to_contribution(2) then the item half-step are 2 epochs; a
    user_step read from a file ("paper", equal to the literal but another object) is the paper's step."""
    train = sp.csr_matrix(np.eye(4, 3, dtype=np.float32))  # row 3 has no interactions
    params = IALSParams(rank=2, backend="numpy", threads=1)
    for rows in (np.array(1), np.array([[0, 1]])):
        with pytest.raises(ValueError, match="^shared_rows must be one-dimensional$"):
            DomainTrainer("sport", train, params, rho=0.7, shared_rows=rows)
    trainer = DomainTrainer("sport", train, params, rho=0.7, shared_rows=np.array([0]), receiver_rows=np.array([3]),
                            user_step="".join(["pa", "per"]))
    np.testing.assert_array_equal(trainer.scoring_users(), trainer.state.users)  # before any Z: the local factors
    trainer.epochs_to_contribution(2)
    trainer.items_half_step()
    assert trainer.state.epochs == 2
    receivers = np.array([[0.5, 0.25]], np.float32)
    trainer.receive_consensus(np.ones((1, 2), np.float32), receivers)
    assert trainer.state.receiver_consensus.tolist() == [[0.5, 0.25]]
    assert trainer.scoring_users()[3].tolist() == [0.5, 0.25]
    trainer.epochs_to_contribution(1)
    assert receivers.tolist() == [[0.5, 0.25]] and trainer.scoring_users()[3].tolist() == [0.5, 0.25]
    ridge, prox = trainer.user_system()
    assert prox is not None and prox.rho == 0.7  # the paper's step: rho on both sides
    np.testing.assert_array_equal(ridge, trainer.user_ridge)


# ----- solve_half_step at its edges: one item, weights, methods, shapes -----


def _one_item(weights: list[float]) -> sp.csr_matrix:
    """Every user holds the one item, with these stored weights (zeros kept as stored entries)."""
    n = len(weights)
    return sp.csr_matrix((np.array(weights, np.float32), np.zeros(n, np.int32), np.arange(n + 1)), shape=(n, 1))


def test_a_half_step_against_one_item_solves_its_rank_deficient_system_and_refuses_a_singular_one() -> None:
    """One item at rank 2: alpha y y^T is singular but a ridge of 0.5 makes it solvable; no ridge, or a negative one, is refused."""
    matrix = _one_item([1.0, 2.0, 1.0])
    fixed = np.array([[0.6, -1.2]], np.float32)
    ridge = np.full(3, 0.5)
    solved = solve_half_step(matrix, fixed, 3.0, ridge, threads=1, backend="numpy")
    np.testing.assert_allclose(solved, _dense_solve(matrix, fixed, 3.0, ridge), rtol=1e-5, atol=1e-6)
    for bad in (np.zeros(3), np.array([-1.0, 0.5, 0.5])):
        with pytest.raises(ValueError, match="singular"):
            solve_half_step(matrix, fixed, 3.0, bad, threads=1, backend="numpy")


@pytest.mark.parametrize("weights", [[2.0, 2.0, 2.0], [0.5, 0.5, 0.5], [1.0, 2.0, 1.0], [0.5, 1.0, 1.0], [0.0, 0.0, 0.0]])
def test_weights_all_above_or_below_one_or_all_zero_enter_the_system(weights: list[float]) -> None:
    """Stored weights all 2, all 0.5, ones and twos, halves and ones, all 0 (a proximal row keeps b nonzero): the float64 brute force."""
    n_items = 4
    indices = np.tile(np.arange(n_items, dtype=np.int32), 3)
    matrix = sp.csr_matrix((np.repeat(np.array(weights, np.float32), n_items), indices, np.arange(0, 13, n_items)), shape=(3, n_items))
    rng = np.random.default_rng(11)
    fixed = rng.standard_normal((n_items, 3)).astype(np.float32)
    ridge = np.full(3, 0.3)
    rows, target = np.array([1]), rng.standard_normal((1, 3)).astype(np.float32)
    solved = solve_half_step(matrix, fixed, 0.2, ridge, Proximal(rows, target, 1.5), threads=1, backend="numpy")
    np.testing.assert_allclose(solved, _dense_solve(matrix, fixed, 0.2, ridge, rows, target, 1.5), rtol=1e-4, atol=1e-5)


def test_a_half_step_takes_any_scipy_matrix_and_checks_cg_steps_only_for_cg() -> None:
    """A coo or csc matrix solves as its csr; exact ignores cg_steps; cg needs one step or more, however its name was built."""
    matrix = _interactions(6, 5, 0.4, seed=12, weighted=True)
    fixed = np.random.default_rng(12).standard_normal((5, 3)).astype(np.float32)
    ridge = np.full(6, 0.4)
    expected = _dense_solve(matrix, fixed, 0.5, ridge)
    for other in (matrix.tocoo(), matrix.tocsc()):
        np.testing.assert_allclose(solve_half_step(other, fixed, 0.5, ridge, threads=1, backend="numpy"), expected, rtol=1e-4, atol=1e-5)
    exact = solve_half_step(matrix, fixed, 0.5, ridge, threads=1, backend="numpy", method="exact", cg_steps=0)
    np.testing.assert_allclose(exact, expected, rtol=1e-4, atol=1e-5)
    one_step = solve_half_step(matrix, fixed, 0.5, ridge, threads=1, backend="numpy", method="cg", cg_steps=1)
    assert one_step.shape == (6, 3) and np.all(np.isfinite(one_step)) and np.abs(one_step).max() > 1e-3
    for name in ("cg", "".join(["c", "g"])):  # a literal, and a name read at run time (not interned)
        with pytest.raises(ValueError, match=r"^cg_steps must be >= 1, got 0$"):
            solve_half_step(matrix, fixed, 0.5, ridge, threads=1, backend="numpy", method=name, cg_steps=0)


def test_a_half_step_refuses_factors_ridges_starts_and_proximal_terms_of_another_shape() -> None:
    """Factors of one dimension, three, or a row too many; a ridge or a start too long; a target of another rank; rows outside."""
    matrix = _interactions(4, 3, 0.5, seed=13)
    fixed = np.ones((3, 2), np.float32)
    ridge = np.ones(4)
    for bad in (np.ones(3, np.float32), np.ones((3, 2, 1), np.float32), np.ones((4, 2), np.float32)):
        with pytest.raises(ValueError, match=r"^fixed factors have shape"):
            solve_half_step(matrix, bad, 0.5, ridge, backend="numpy")
    with pytest.raises(ValueError, match=r"^ridge has shape \(5,\), expected \(4,\)$"):
        solve_half_step(matrix, fixed, 0.5, np.ones(5), backend="numpy")
    for start in (np.ones((5, 2), np.float32), np.ones((4, 3), np.float32)):
        with pytest.raises(ValueError, match=r"^initial factors have shape"):
            solve_half_step(matrix, fixed, 0.5, ridge, backend="numpy", method="cg", initial=start)
    with pytest.raises(ValueError, match=r"^proximal target has rank 3, factors have 2$"):
        solve_half_step(matrix, fixed, 0.5, ridge, Proximal(np.array([0, 1]), np.ones((2, 3), np.float32), 1.0), backend="numpy")
    for row in (-1, 4):
        with pytest.raises(ValueError, match=rf"^proximal rows must lie in \[0, 4\), got {row}\.\.{row}$"):
            solve_half_step(matrix, fixed, 0.5, ridge, Proximal(np.array([row]), np.ones((1, 2), np.float32), 1.0), backend="numpy")


def test_one_proximal_row_at_rank_300() -> None:
    """A single shared row under the proximal term at a rank above 256: the float64 brute force."""
    rank = 300
    matrix = _interactions(5, 4, 0.5, seed=14)
    rng = np.random.default_rng(14)
    fixed = rng.standard_normal((4, rank)).astype(np.float32)
    ridge = np.full(5, 1.0)
    rows, target = np.array([2]), rng.standard_normal((1, rank)).astype(np.float32)
    solved = solve_half_step(matrix, fixed, 0.1, ridge, Proximal(rows, target, 2.0), threads=1, backend="numpy")
    expected = _dense_solve(matrix, fixed, 0.1, ridge, rows, target, 2.0)
    np.testing.assert_allclose(solved, expected, rtol=1e-3, atol=1e-4)
    assert np.abs(solved[2] - _dense_solve(matrix, fixed, 0.1, ridge)[2]).max() > 1e-2


def test_the_gramian_in_chunks_not_aligned_to_its_lanes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 4 rows over 8 lanes of 6 or 7 rows (starts not multiples of 4): the solve is still the brute force's."""
    monkeypatch.setattr(ials, "CHUNK_FLOATS", 16)
    matrix = _interactions(6, 50, 0.2, seed=15)
    fixed = np.random.default_rng(15).standard_normal((50, 4)).astype(np.float32)
    ridge = np.full(6, 0.2)
    solved = solve_half_step(matrix, fixed, 2.0, ridge, threads=1, backend="numpy")
    np.testing.assert_allclose(solved, _dense_solve(matrix, fixed, 2.0, ridge), rtol=1e-4, atol=1e-5)


def test_the_observed_residual_of_more_entries_than_four_chunks() -> None:
    """300,000 stored entries at rank 64 (chunks of 65,536): sum w (x.y - 1)^2 by dense float64."""
    rng = np.random.default_rng(16)
    weights = rng.uniform(0.5, 2.0, (1000, 300))
    users = (rng.standard_normal((1000, 64)) / 8).astype(np.float32)
    items = (rng.standard_normal((300, 64)) / 8).astype(np.float32)
    expected = float(np.sum(weights * (users.astype(np.float64) @ items.astype(np.float64).T - 1.0) ** 2))
    assert observed_residual_sq(sp.csr_matrix(weights), users, items) == pytest.approx(expected, rel=1e-10)
