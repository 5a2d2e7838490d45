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
