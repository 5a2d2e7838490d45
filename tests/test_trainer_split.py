"""A node's split epoch (users solved, contribution sent, items solved meanwhile) equals whole epochs bit for bit."""

import numpy as np
import pytest
import scipy.sparse as sp

from cdimf.common.core.model import DomainTrainer, ials_epoch
from cdimf.common.core.params import IALSParams


def _trainer() -> DomainTrainer:
    """A small domain with shared rows, a receiver row and a consensus already applied (proximal term on)."""
    rng = np.random.default_rng(3)
    dense = (rng.random((30, 20)) < 0.2).astype(np.float32)
    dense[7] = 0.0  # user 7 has no interactions here: a receiver row
    matrix = sp.csr_matrix(dense)
    receivers = np.array([7])
    shared = np.arange(0, 30, 3)  # 0, 3, ..., 27: never 7
    trainer = DomainTrainer("sport", matrix, IALSParams(rank=4, alpha=0.5, lam=0.3, seed=5, threads=1), 1.5, shared, receivers)
    trainer.local_epochs(1)
    trainer.receive_consensus(rng.standard_normal((len(shared), 4)).astype(np.float32),
                              rng.standard_normal((len(receivers), 4)).astype(np.float32))
    return trainer


@pytest.mark.parametrize("epochs", [1, 3])
def test_epochs_to_contribution_then_items_equals_local_epochs(epochs: int) -> None:
    """Same contribution before the items are solved, same users, items, duals and epoch count after."""
    whole, split = _trainer(), _trainer()
    whole.local_epochs(epochs)
    split.epochs_to_contribution(epochs)
    contribution = split.contribution()
    split.items_half_step()
    np.testing.assert_array_equal(contribution, whole.contribution())
    for name in ("users", "items", "duals"):
        np.testing.assert_array_equal(getattr(split.state, name), getattr(whole.state, name))
    assert split.state.epochs == whole.state.epochs


def test_half_steps_reproduce_the_solvers_epoch() -> None:
    """users_half_step + items_half_step is cdimf.common.core.model.ials_epoch with the trainer's ridges and proximal term."""
    trainer = _trainer()
    user_ridge, prox = trainer.user_system()
    users, items = ials_epoch(trainer.train, trainer.train_t, trainer.state.users, trainer.state.items, trainer.params.alpha,
                              user_ridge, trainer.item_ridge, prox, trainer.params.threads)
    trainer.local_epochs(1)
    np.testing.assert_array_equal(trainer.state.users, users)
    np.testing.assert_array_equal(trainer.state.items, items)


def test_a_split_epoch_needs_at_least_one_epoch() -> None:
    """epochs_to_contribution(0) would leave nothing for items_half_step to finish: refused."""
    with pytest.raises(ValueError, match="n_epochs"):
        _trainer().epochs_to_contribution(0)


def test_a_trainer_keeps_the_float32_consensus_arrays_it_is_given() -> None:
    """receive_consensus stores the caller's float32 Z and receiver Z themselves (no copy), as it promises."""
    trainer = _trainer()
    rng = np.random.default_rng(8)
    z = rng.standard_normal((len(trainer.shared_rows), 4)).astype(np.float32)
    receiver_z = rng.standard_normal((1, 4)).astype(np.float32)
    trainer.receive_consensus(z, receiver_z)
    assert trainer.state.consensus is z and trainer.state.receiver_consensus is receiver_z


def test_a_cg_epoch_named_by_a_literal_warm_starts_from_the_factors_passed_in() -> None:
    """ials_epoch(method="cg") with the literal name: both half-steps start from the factors passed in, not from zero."""
    from cdimf.common.core.ials import solve_half_step

    rng = np.random.default_rng(9)
    train = sp.csr_matrix((rng.random((12, 9)) < 0.4).astype(np.float32))
    train_t = train.T.tocsr()
    users, items = rng.standard_normal((12, 3)).astype(np.float32), rng.standard_normal((9, 3)).astype(np.float32)
    ridge_u, ridge_i = np.full(12, 0.5), np.full(9, 0.5)
    got_users, got_items = ials_epoch(train, train_t, users, items, 0.1, ridge_u, ridge_i, threads=1, method="cg", cg_steps=1,
                                      backend="numpy")
    want_users = solve_half_step(train, items, 0.1, ridge_u, None, 1, method="cg", cg_steps=1, initial=users, backend="numpy")
    want_items = solve_half_step(train_t, want_users, 0.1, ridge_i, None, 1, method="cg", cg_steps=1, initial=items, backend="numpy")
    np.testing.assert_array_equal(got_users, want_users)
    np.testing.assert_array_equal(got_items, want_items)
    cold = solve_half_step(train, items, 0.1, ridge_u, None, 1, method="cg", cg_steps=1, backend="numpy")
    assert not np.allclose(cold, want_users, rtol=1e-4, atol=1e-5)
