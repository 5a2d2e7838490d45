"""The engine's quantized mode: close to the float consensus, deterministic, and bit-equal to masked aggregation."""

import numpy as np
import scipy.sparse as sp

from cdimf.common.core.params import ADMMParams, IALSParams
from cdimf.common.core.ring import consensus_from_ring, ring_sums
from cdimf.common.security.masks import holders_of, mask_contribution, unmask_sum
from cdimf.common.security.pseudonyms import pseudonymize
from cdimf.engine import CDIMFEngine, DomainInput

PARAMS = IALSParams(rank=5, alpha=0.2, lam=0.5, nu=0.0, sigma=0.5, seed=3, threads=1)
SECRET = b"engine-quantize-test-secret-0001"
RUN = "quantize-run"


def matrix(n_users: int, n_items: int, seed: int, cold: tuple[int, ...] = ()) -> sp.csr_matrix:
    """A random binary interaction matrix; rows in `cold` have no interactions (receivers)."""
    rng = np.random.default_rng(seed)
    dense = rng.random((n_users, n_items)) < 0.25
    dense[np.arange(n_users), rng.integers(0, n_items, n_users)] = True
    dense[list(cold)] = False
    return sp.csr_matrix(dense.astype(np.float32))


def domains() -> list[DomainInput]:
    """Three domains with partial overlap (users 0-29, 10-39, 20-44) and cold users in two of them."""
    return [
        DomainInput("books", np.array([str(u) for u in range(30)]), matrix(30, 12, 1, cold=(15,)), PARAMS),
        DomainInput("movies", np.array([str(u) for u in range(10, 40)]), matrix(30, 9, 2), PARAMS, 2),
        DomainInput("music", np.array([str(u) for u in range(20, 45)]), matrix(25, 10, 3, cold=(0, 24)), PARAMS),
    ]


def run(quantize: bool, rounds: int, admm: ADMMParams) -> tuple[CDIMFEngine, list[np.ndarray]]:
    """An engine run; the consensus after every round."""
    engine = CDIMFEngine(domains(), admm, quantize=quantize)
    history = []
    for _ in range(rounds):
        engine.step()
        assert engine.consensus is not None
        history.append(engine.consensus.copy())
    return engine, history


def test_quantized_run_tracks_the_float_run_and_is_deterministic() -> None:
    """Over 5 rounds (identity and L2 prox) the quantized Z stays within 1e-6 of the float Z; two quantized runs are bit-equal."""
    for admm in (ADMMParams(rho=1.0), ADMMParams(rho=2.0, prox="l2", lambda_z=0.5)):
        _, plain = run(False, 5, admm)
        quantized_engine, quantized = run(True, 5, admm)
        again_engine, again = run(True, 5, admm)
        for z_plain, z_quantized, z_again in zip(plain, quantized, again):
            assert np.max(np.abs(z_quantized - z_plain)) <= 1e-6
            np.testing.assert_array_equal(z_quantized, z_again)
        assert np.max(np.abs(quantized[-1])) > 0.01  # a Z that moved: the comparison is not of zeros
        for first, second in zip(quantized_engine.trainers, again_engine.trainers):
            np.testing.assert_array_equal(first.state.users, second.state.users)


def test_masked_aggregation_equals_quantized_engine_bit_for_bit() -> None:
    """Masking, a secret-less ring sum, per-node unmasking and consensus_from_ring give the quantized engine's Z exactly."""
    admm = ADMMParams(rho=2.0, prox="l2", lambda_z=0.5)
    reference = CDIMFEngine(domains(), admm, quantize=True)
    masked = CDIMFEngine(domains(), admm, quantize=True)
    names = tuple(d.name for d in masked.domains)
    ids = pseudonymize(masked.global_keys.tolist(), SECRET)
    for round_index in range(4):
        reference.step()
        assert reference.consensus is not None
        contributions = []
        for trainer, domain, membership in zip(masked.trainers, masked.domains, masked.memberships):
            trainer.local_epochs(domain.aggregation_period)
            rows = membership.shared_global
            contributions.append((rows, mask_contribution(trainer.contribution(), ids[rows], SECRET, RUN, domain.name, round_index)))
        # the aggregator: no secret, a ring sum over global rows
        total = ring_sums(contributions, len(masked.global_keys), PARAMS.rank + 1)
        contributors = [(name, round_index) for name in names]
        for trainer, membership in zip(masked.trainers, masked.memberships):
            pulled_local = np.concatenate([membership.shared_rows, membership.receiver_rows])
            pulled = np.concatenate([membership.shared_global, membership.receiver_global])
            holds = holders_of(membership.holder_masks[pulled_local], names, contributors)
            sums, holders = unmask_sum(total[pulled], ids[pulled], contributors, holds, SECRET, RUN, expected_round=round_index)
            z = consensus_from_ring(sums, holders, admm)
            np.testing.assert_array_equal(z, reference.consensus[pulled])
            shared = len(membership.shared_rows)
            trainer.receive_consensus(z[:shared], z[shared:])
    assert sum(len(m.receiver_rows) for m in masked.memberships) == 2  # books user 15 and music user 20, cold there, were pulled
    for first, second in zip(reference.trainers, masked.trainers):
        np.testing.assert_array_equal(first.state.users, second.state.users)
