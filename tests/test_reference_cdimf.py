"""An independent dense float64 CDIMF (the paper's user/item steps, consensus and dual step) that the engine and real processes must follow.

The reference below shares no code with cdimf's solver, trainer, consensus or membership: it
aligns users by key, solves every row by a dense float64 solve of the normal equations and
keeps X, Y, U and Z per domain as plain dictionaries. Only the initial factors are drawn the
way the engine draws them (numpy's generator, users then items), so both start equal.
"""

import asyncio
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from cdimf.common.config import RunParams
from cdimf.common.core.params import ADMMParams, IALSParams
from cdimf.common.rpc.aggregator_client import AggregatorClient
from cdimf.engine import CDIMFEngine, DomainInput
from tests.federation_harness import (
    DOMAINS,
    RANK,
    Processes,
    node_data,
    seeds,
    wait_for_checkpoints,
    wait_for_domains,
    write_domains,
)

pytestmark = pytest.mark.timeout(120)


@dataclass
class RefDomain:
    """One domain of the reference: keys, dense 0/1 interactions, hyperparameters and its state."""

    keys: list[str]
    r: np.ndarray  # (users, items) float64
    lam: float
    alpha: float
    nu: float
    period: int
    x: np.ndarray
    y: np.ndarray
    u: dict[str, np.ndarray]  # the scaled dual of each shared user key
    z: dict[str, np.ndarray]  # the last consensus of each shared or receiver key


def ref_domain(keys: list[str], train: sp.csr_matrix, params: IALSParams, period: int = 1) -> RefDomain:
    """A reference domain started from the engine's initial factors: N(0, sigma / sqrt(d)), users then items."""
    rng = np.random.default_rng(params.seed)
    scale = np.float32(params.sigma / np.sqrt(params.rank))
    n_users, n_items = train.shape
    x = (rng.standard_normal((n_users, params.rank), dtype=np.float32) * scale).astype(np.float64)
    y = (rng.standard_normal((n_items, params.rank), dtype=np.float32) * scale).astype(np.float64)
    return RefDomain(list(keys), (train.toarray() > 0).astype(np.float64), params.lam, params.alpha, params.nu, period, x, y, {}, {})


def _solve(r: np.ndarray, fixed: np.ndarray, alpha: float, ridge: np.ndarray, rho: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Every row's (sum_{j in S} y_j y_j^T + alpha Y^T Y + (ridge + rho) I) x = sum_{j in S} y_j + rho h."""
    eye = np.eye(fixed.shape[1])
    lhs = np.einsum("um,md,me->ude", r, fixed, fixed) + alpha * fixed.T @ fixed + (ridge + rho)[:, None, None] * eye
    return np.linalg.solve(lhs, (r @ fixed + rho[:, None] * h)[:, :, None])[:, :, 0]


def reference_round(domains: dict[str, RefDomain], rho: float, lambda_z: float = 0.0) -> dict[str, np.ndarray]:
    """One synchronous CDIMF round; returns Z by user key."""
    for d in domains.values():
        n_users, n_items = d.r.shape
        user_ridge = d.lam * (d.r.sum(axis=1) + d.alpha * n_items) ** d.nu
        item_ridge = d.lam * (d.r.sum(axis=0) + d.alpha * n_users) ** d.nu
        weight = np.array([rho if k in d.u and k in d.z else 0.0 for k in d.keys])  # no pull before the first Z
        target = np.array([d.z[k] - d.u[k] if w else np.zeros(d.x.shape[1]) for k, w in zip(d.keys, weight)])
        for _ in range(d.period):
            d.x = _solve(d.r, d.y, d.alpha, user_ridge, weight, target)  # (11): users with the proximal term
            d.y = _solve(d.r.T, d.x, d.alpha, item_ridge, np.zeros(n_items), np.zeros_like(d.y))  # (12): items
    # (13)/(27): Z = prox(mean over the domains that hold the user of X + U)
    sums: dict[str, np.ndarray] = {}
    holders: dict[str, int] = {}
    for d in domains.values():
        for row, key in enumerate(d.keys):
            if key in d.u:
                sums[key] = sums.get(key, 0.0) + d.x[row] + d.u[key]
                holders[key] = holders.get(key, 0) + 1
    z = {k: sums[k] / holders[k] * (holders[k] * rho / (holders[k] * rho + lambda_z)) for k in sums}
    for d in domains.values():
        for row, key in enumerate(d.keys):
            if key in d.u:
                d.u[key] = d.u[key] + d.x[row] - z[key]
            if key in z:
                d.z[key] = z[key]
    return z


def start_reference(domains: dict[str, RefDomain]) -> None:
    """A zero dual for each user a domain trains on that another domain trains on too or registers cold.

    A user trained on in one domain only but registered without interactions in another is
    pushed by its one holder: the cold domain scores it with that consensus.
    """
    held: dict[str, int] = {}
    cold: dict[str, int] = {}
    for d in domains.values():
        for row, key in enumerate(d.keys):
            trains = bool(d.r[row].sum() > 0)
            held[key] = held.get(key, 0) + trains
            cold[key] = cold.get(key, 0) + (not trains)
    for d in domains.values():
        d.u = {key: np.zeros(d.x.shape[1]) for row, key in enumerate(d.keys)
               if d.r[row].sum() > 0 and (held[key] >= 2 or cold[key] >= 1)}


def _close(mine: np.ndarray, reference: np.ndarray, what: str) -> None:
    """float32 engine against the float64 reference, relative to the array's scale."""
    np.testing.assert_allclose(mine, reference, rtol=2e-4, atol=2e-4 * float(np.abs(reference).max()), err_msg=what)


def _tiny_problem() -> tuple[dict[str, tuple[list[str], sp.csr_matrix, IALSParams, int]], str]:
    """Three domains with partial overlap and a user ("cold") who only the third domain trains on."""
    rng = np.random.default_rng(11)
    users = {"a": [f"u{i}" for i in range(0, 9)], "b": [f"u{i}" for i in range(5, 14)], "c": [f"u{i}" for i in range(8, 16)]}
    users["a"].append("cold")  # a registers it without interactions; c trains on it
    users["c"].append("cold")
    problem = {}
    for index, (name, keys) in enumerate(users.items()):
        n_items = 7 + index
        dense = (rng.random((len(keys), n_items)) < 0.35).astype(np.float32)
        dense[np.arange(len(keys)), rng.integers(0, n_items, len(keys))] = 1.0
        if name == "a":
            dense[keys.index("cold")] = 0.0
        params = IALSParams(rank=3, lam=0.3, alpha=0.4, nu=0.5 if name != "b" else 0.0, seed=index + 1, backend="numpy", threads=1)
        problem[name] = (keys, sp.csr_matrix(dense), params, 2 if name == "c" else 1)
    return problem, "cold"


@pytest.mark.parametrize("admm", [ADMMParams(rho=1.3), ADMMParams(rho=0.8, prox="l2", lambda_z=0.5)], ids=["identity", "l2"])
def test_the_engine_follows_the_dense_reference_round_by_round(admm: ADMMParams) -> None:
    """X, Y, U of every domain and Z of every shared and cold user equal the reference after each of 5 rounds."""
    problem, cold = _tiny_problem()
    engine = CDIMFEngine([DomainInput(n, np.array(k), m, p, period) for n, (k, m, p, period) in problem.items()], admm)
    reference = {n: ref_domain(k, m, p, period) for n, (k, m, p, period) in problem.items()}
    start_reference(reference)
    assert {n: sorted(d.u) for n, d in reference.items()} == {
        "a": ["u5", "u6", "u7", "u8"], "b": ["u10", "u11", "u12", "u13", "u5", "u6", "u7", "u8", "u9"],
        "c": ["cold", "u10", "u11", "u12", "u13", "u8", "u9"]}
    for round_index in range(1, 6):
        engine.step()
        z = reference_round(reference, admm.rho, admm.lambda_z)
        for trainer in engine.trainers:
            ref = reference[trainer.name]
            _close(trainer.state.users, ref.x, f"round {round_index} X of {trainer.name}")
            _close(trainer.state.items, ref.y, f"round {round_index} Y of {trainer.name}")
            shared_keys = [ref.keys[row] for row in trainer.shared_rows]
            assert set(shared_keys) == set(ref.u)
            _close(trainer.state.duals, np.array([ref.u[k] for k in shared_keys]), f"round {round_index} U of {trainer.name}")
        # the cold user of "a" is scored with its consensus, which only "c" contributes to
        a = engine.trainers[0]
        assert [reference["a"].keys[row] for row in a.receiver_rows] == [cold]
        _close(a.scoring_users()[a.receiver_rows[0]], z[cold], f"round {round_index} cold user's Z")


# ----- the same against real processes -----



def test_a_federation_of_real_processes_follows_the_dense_reference(tmp_path: Path, processes: Processes) -> None:
    """`cdimf serve-aggregator` + two `cdimf serve-node` on loopback, 3 rounds: the checkpoints equal the reference."""
    files = write_domains(tmp_path / "data")
    _, address = processes.aggregator()
    processes.nodes(files, address)
    admm = ADMMParams(rho=1.2)
    rounds = 3

    async def run() -> None:
        """Start the run once both registered; follow it to its end."""
        async with AggregatorClient(address, rpc_timeout_s=10, retry_for_s=30) as control:
            await wait_for_domains(control, 2)
            run = await control.start_run(RunParams(rounds=rounds, rank=RANK, admm=admm, min_domains=2))
            _ = [event async for event in control.watch_run(run.run_id)]

    asyncio.run(run())
    found = asyncio.run(wait_for_checkpoints(tmp_path, rounds))
    reference = {}
    for domain in DOMAINS:
        data = node_data(files, domain)  # the node's own rows (its validation entries carved out)
        params = IALSParams(rank=RANK, alpha=0.1, lam=0.5, seed=seeds()[domain], threads=1)
        reference[domain] = ref_domain([str(k) for k in data.users.keys], data.train, params)
    start_reference(reference)
    for _ in range(rounds):
        z = reference_round(reference, admm.rho)
    for domain in DOMAINS:
        state, ref = found[domain].trainer, reference[domain]
        _close(state.users, ref.x, f"X of {domain}")
        _close(state.items, ref.y, f"Y of {domain}")
        shared_keys = [ref.keys[row] for row in found[domain].shared_rows]
        assert set(shared_keys) == set(ref.u) and len(shared_keys) == {"sport": 25, "cloth": 27}[domain]  # cloth also pushes 90, 91
        _close(state.duals, np.array([ref.u[k] for k in shared_keys]), f"U of {domain}")
    receivers = [reference["sport"].keys[row] for row in found["sport"].receiver_rows]
    assert len(receivers) == 2
    assert found["sport"].trainer.receiver_consensus is not None
    _close(found["sport"].trainer.receiver_consensus, np.array([z[k] for k in receivers]), "the cold users' Z")
