"""One domain's local CDIMF model (iALS factors, ADMM duals and the last consensus, as plain arrays) and one plain iALS epoch."""

from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp

from cdimf.common.core.admm import dual_update, proximal_target
from cdimf.common.core.ials import FLOAT, Proximal, frequency_ridge, init_factors, resolve_backend, solve_half_step
from cdimf.common.core.params import IALSParams
from cdimf.common.core.sparse import as_csr32, row_counts


@dataclass
class TrainerState:
    """Everything needed to resume a domain's training exactly.

    Its arrays are replaced by each step, never written into: a shallow copy of the state (a
    checkpoint being written, the published model) keeps that moment's values.
    """

    users: np.ndarray
    items: np.ndarray
    duals: np.ndarray
    consensus: np.ndarray | None
    receiver_consensus: np.ndarray | None
    epochs: int
    exchanges: int


class DomainTrainer:
    """Trains one domain's iALS locally and takes part in the ADMM consensus on its shared rows.

    `shared_rows` are this domain's user rows (with interactions) that other domains hold too:
    they are pushed as X + U and pulled towards Z - U. `receiver_rows` are rows with no
    interactions here that other domains hold: they only receive Z and are scored with it.
    """

    def __init__(
        self,
        name: str,
        train: sp.csr_matrix,
        params: IALSParams,
        rho: float,
        shared_rows: np.ndarray | None = None,
        receiver_rows: np.ndarray | None = None,
        user_step: Literal["paper", "reference-code"] = "paper",
    ) -> None:
        if user_step == "reference-code" and params.nu != 0.0:  # mutation: equivalent Eq_GtE (of the two names)
            raise ValueError(f"domain {name}: user_step 'reference-code' is defined here for nu = 0 only")
        self.user_step = user_step
        self.name = name
        self.params = params
        self.rho = float(rho)
        self.train = as_csr32(train)
        self.train_t = as_csr32(self.train.T)
        n_users, n_items = self.train.shape
        user_counts = row_counts(self.train)
        self.shared_rows = _checked_rows(shared_rows, n_users, "shared_rows")
        self.receiver_rows = _checked_rows(receiver_rows, n_users, "receiver_rows")
        if np.any(user_counts[self.receiver_rows] > 0):  # mutation: equivalent Gt_NotEq (counts)
            raise ValueError(f"domain {name}: receiver rows must have no interactions")
        self.user_ridge = frequency_ridge(user_counts, n_items, params.lam, params.alpha, params.nu)
        self.item_ridge = frequency_ridge(row_counts(self.train_t), n_users, params.lam, params.alpha, params.nu)
        rng = np.random.default_rng(params.seed)
        self.state = TrainerState(
            users=init_factors(n_users, params.rank, params.sigma, rng),
            items=init_factors(n_items, params.rank, params.sigma, rng),
            duals=np.zeros((len(self.shared_rows), params.rank), dtype=FLOAT),
            consensus=None,
            receiver_consensus=None,
            epochs=0,
            exchanges=0,
        )

    def proximal(self) -> Proximal | None:
        """The proximal term on shared rows (target Z - U), or None before the first Z or when rho = 0."""
        state = self.state
        if self.rho == 0.0 or state.consensus is None or len(self.shared_rows) == 0:  # mutation: equivalent Eq_LtE (a length)
            return None
        return Proximal(self.shared_rows, proximal_target(state.consensus, state.duals), self.rho)

    def user_system(self) -> tuple[np.ndarray, Proximal | None]:
        """The users' ridge and proximal term for the next half-step.

        "paper": (A_u + rho I) x = b_u + rho (z - u). "reference-code" (the authors' public code,
        at nu = 0): rho enters only the right-hand side, scaled by lambda: A_u x = b_u +
        rho lambda (z - u); expressed as a proximal weight rho*lambda whose diagonal part the
        ridge gives back.
        """
        prox = self.proximal()
        if prox is None or self.user_step == "paper":  # mutation: equivalent Eq_LtE (of the two names)
            return self.user_ridge, prox
        weight = self.rho * self.params.lam
        ridge = self.user_ridge.copy()
        ridge[prox.rows] -= weight
        return ridge, Proximal(prox.rows, prox.target, weight)

    def local_epochs(self, n_epochs: int) -> None:
        """Run n local iALS epochs (users with the proximal term, then items)."""
        for _ in range(n_epochs):
            self.users_half_step()
            self.items_half_step()

    def epochs_to_contribution(self, n_epochs: int) -> None:
        """Run n local epochs but the last one's item half-step, which `items_half_step` finishes.

        The contribution X + U is final once the users are solved: a node sends it while the
        items are solved, so the exchange overlaps with that work. local_epochs(n) equals
        epochs_to_contribution(n) then items_half_step(), bit for bit.
        """
        if n_epochs < 1:
            raise ValueError(f"domain {self.name}: n_epochs must be >= 1, got {n_epochs}")
        self.local_epochs(n_epochs - 1)
        self.users_half_step()

    def users_half_step(self) -> None:
        """Solve every user given the items (shared rows with the proximal term)."""
        user_ridge, prox = self.user_system()
        state = self.state
        state.users = solve_half_step(
            self.train, state.items, self.params.alpha, user_ridge, prox, self.params.threads, backend=self.params.backend
        )

    def items_half_step(self) -> None:
        """Solve every item given the users; completes an epoch."""
        state = self.state
        state.items = solve_half_step(
            self.train_t, state.users, self.params.alpha, self.item_ridge, None, self.params.threads, backend=self.params.backend
        )
        state.epochs += 1

    def contribution(self) -> np.ndarray:
        """What this domain sends: X + U on its shared rows."""
        return (self.state.users[self.shared_rows] + self.state.duals).astype(FLOAT, copy=False)

    def receive_consensus(self, consensus: np.ndarray, receiver_consensus: np.ndarray | None = None) -> None:
        """Take a new Z for the shared rows (dual step U += X - Z) and for the receiver rows.

        The trainer keeps the float32 arrays it is given (no copy: the caller hands them over and
        never writes into them; the trainer never writes into its arrays either).
        """
        state = self.state
        expected = (len(self.shared_rows), self.params.rank)
        if consensus.shape != expected:
            raise ValueError(f"domain {self.name}: consensus has shape {consensus.shape}, expected {expected}")
        if not np.all(np.isfinite(consensus)):
            raise ValueError(f"domain {self.name}: consensus holds NaN or Inf")
        if receiver_consensus is not None:
            want = (len(self.receiver_rows), self.params.rank)
            if receiver_consensus.shape != want:
                raise ValueError(
                    f"domain {self.name}: receiver consensus has shape {receiver_consensus.shape}, expected {want}"
                )
            state.receiver_consensus = receiver_consensus.astype(FLOAT, copy=False)
        state.duals = dual_update(state.duals, state.users[self.shared_rows], consensus)
        state.consensus = consensus.astype(FLOAT, copy=False)
        state.exchanges += 1

    def scoring_users(self) -> np.ndarray:
        """User vectors for ranking: local factors, with cold (receiver) rows scored by their consensus."""
        users = self.state.users.copy()
        if self.state.receiver_consensus is not None and len(self.receiver_rows):
            users[self.receiver_rows] = self.state.receiver_consensus
        return users

    def backend(self) -> str:
        """The solver backend this trainer's half-steps run on here (IALSParams.backend with "auto" resolved)."""
        return resolve_backend(self.params.backend)


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
    warm = method == "cg"  # only CG starts from the current factors  # mutation: equivalent Eq_GtE,Eq_LtE (exact ignores a start)
    users = solve_half_step(interactions, items, alpha, user_ridge, user_prox, threads, method=method, cg_steps=cg_steps,
                            initial=users if warm else None, backend=backend)
    items = solve_half_step(interactions_t, users, alpha, item_ridge, None, threads, method=method, cg_steps=cg_steps,
                            initial=items if warm else None, backend=backend)
    return users, items


def _checked_rows(rows: np.ndarray | None, n_rows: int, field: str) -> np.ndarray:
    """Sorted unique int64 row ids within range, or a clear error naming the field."""
    if rows is None:
        return np.zeros(0, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1:
        raise ValueError(f"{field} must be one-dimensional")
    if len(rows) and (rows.min() < 0 or rows.max() >= n_rows):
        raise ValueError(f"{field} has a row outside 0..{n_rows - 1}")
    if len(rows) > 1 and np.any(np.diff(rows) <= 0):  # mutation: equivalent Gt_NotEq,Gt_GtE (one row has no diffs)
        raise ValueError(f"{field} must be sorted and unique")
    return rows
