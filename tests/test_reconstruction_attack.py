"""benchmarks/reconstruction_attack.py at a tiny size: its AUC against brute-force pair counting, and the attack run on what a
real sport node process keeps on disk (its Z and duals recover cloth's push exactly) scoring cloth's training items well
above chance, while random rows and heavily noised pushes score at chance."""

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from cdimf.common.config import RunParams
from cdimf.common.core.params import ADMMParams, PrivacyParams
from cdimf.common.rpc.aggregator_client import AggregatorClient
from cdimf.engine import CDIMFEngine, DomainInput
from tests.federation_harness import Processes, ials, node_data, seeds, wait_for_checkpoints, wait_for_domains, write_domains

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from reconstruction_attack import decode_as_fixed_point, factor_scores, fitted_items, mean_auc, peer_view

pytestmark = pytest.mark.timeout(120)


def _brute_force_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Mean over rows of P(score of a positive > score of a negative) + half the ties, counting every pair."""
    aucs = []
    for row, labels in zip(scores, positives):
        pos, neg = row[labels], row[~labels]
        if len(pos) == 0 or len(neg) == 0:
            continue
        wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
        aucs.append(wins / (len(pos) * len(neg)))
    return float(np.mean(aucs))


def test_mean_auc_equals_pair_counting_with_ties_and_skips_users_without_negatives() -> None:
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, size=(7, 9)).astype(np.float32)  # small integers: many ties
    positives = rng.random((7, 9)) < 0.4
    positives[0] = True  # no negative: left out of the mean
    positives[1] = False  # no positive: left out
    positives[2, :2] = True
    interactions = sp.csr_matrix(positives.astype(np.float32))
    got = mean_auc(lambda block: scores[block], interactions, np.arange(7))
    assert got == pytest.approx(_brute_force_auc(scores, positives), abs=1e-12)


def test_fitted_items_solve_the_ridge_least_squares_of_the_known_users() -> None:
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((30, 4)).astype(np.float32)
    interactions = sp.csr_matrix((rng.random((30, 11)) < 0.3).astype(np.float32))
    known = np.arange(0, 30, 2)
    got = fitted_items(rows, interactions, known, ridge=0.7)
    # the same problem as ordinary least squares on a stacked system [V_k; sqrt(ridge) I] y_j = [p_j; 0]
    stacked = np.vstack([rows[known].astype(np.float64), np.sqrt(0.7) * np.eye(4)])
    targets = np.vstack([interactions.toarray()[known], np.zeros((4, 11))])
    expected = np.linalg.lstsq(stacked, targets, rcond=None)[0].T
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


async def _run(address: str, folder: Path) -> None:
    async with AggregatorClient(address, rpc_timeout_s=10, retry_for_s=30) as control:
        await wait_for_domains(control, 2)
        run = await control.start_run(RunParams(rounds=4, rank=6, admm=ADMMParams(rho=1.0, prox="identity"), min_domains=2))
        _ = [event async for event in control.watch_run(run.run_id)]
    await wait_for_checkpoints(folder, 4)


def test_sport_recovers_cloths_push_from_its_own_checkpoint_and_scores_cloths_items(tmp_path: Path, processes: Processes) -> None:
    files = write_domains(tmp_path / "data")
    _, address = processes.aggregator()
    processes.nodes(files, address)
    asyncio.run(_run(address, tmp_path))
    found = asyncio.run(wait_for_checkpoints(tmp_path, 4))
    sport, cloth = found["sport"], found["cloth"]
    sport_keys = node_data(files, "sport").users.keys[sport.shared_rows]
    cloth_data = node_data(files, "cloth")
    # cloth also pushes users 90, 91, which sport holds without interactions (receiver rows): the rest both push
    both = np.isin(cloth_data.users.keys[cloth.shared_rows], sport_keys)
    cloth_keys = cloth_data.users.keys[cloth.shared_rows][both]
    order = np.argsort(sport_keys)[np.searchsorted(np.sort(sport_keys), cloth_keys)]
    assert np.array_equal(sport_keys[order], cloth_keys) and len(cloth_keys) == 25
    # after the last Z a node holds U_r = U_{r-1} + X_r - Z, so its last push X_r + U_{r-1} is U_r + Z;
    # sport's 2Z - own push = Z - U_sport, which must be cloth's push Z + U_cloth
    z = sport.trainer.consensus
    assert z is not None and cloth.trainer.consensus is not None
    recovered_shared = (z - sport.trainer.duals)[order]
    cloth_push = (cloth.trainer.consensus + cloth.trainer.duals)[both]
    np.testing.assert_allclose(recovered_shared, cloth_push, atol=1e-5)

    train = cloth_data.train
    recovered = np.zeros((train.shape[0], 6), dtype=np.float32)
    attacked = cloth.shared_rows[both]
    recovered[attacked] = recovered_shared
    items = cloth.trainer.items
    unprotected = mean_auc(factor_scores(recovered, items), train, attacked)
    # 25 users and four taste groups make one random draw's AUC vary by ~0.06: the mean of 20 draws is at chance within ~0.015
    rng = np.random.default_rng(0)
    chance = np.mean([mean_auc(factor_scores(rng.standard_normal(recovered.shape).astype(np.float32), items), train, attacked)
                      for _ in range(20)])
    assert unprotected > 0.75, unprotected
    assert abs(chance - 0.5) < 0.05, chance
    # a masked push decoded as fixed point by the aggregator: uniform words, not the values
    masked = np.mean([mean_auc(factor_scores(decode_as_fixed_point(rng.integers(0, 2**64, size=(train.shape[0], 7), dtype=np.uint64), 6),
                                             items), train, attacked) for _ in range(20)])
    assert masked == pytest.approx(0.5, abs=0.05)


def test_heavy_noise_leaves_the_peer_view_at_chance(tmp_path: Path) -> None:
    """The same attack in process: without DP the peer view scores well; noise x50 on rows clipped to 0.05 brings it to chance."""
    files = write_domains(tmp_path)
    inputs = [(domain, node_data(files, domain)) for domain in ("sport", "cloth")]

    def attacked_auc(privacy: PrivacyParams) -> float:
        engine = CDIMFEngine([DomainInput(d, data.users.keys, data.train, ials(seeds()[d]), privacy=privacy) for d, data in inputs],
                             ADMMParams(rho=1.0, prox="identity"))
        engine.run(4)
        cloth = engine.trainers[1]
        rows = np.zeros((cloth.train.shape[0], 6), dtype=np.float32)
        rows[cloth.shared_rows] = peer_view(engine, 0, 1)
        return mean_auc(factor_scores(rows, cloth.state.items), cloth.train, cloth.shared_rows)

    assert attacked_auc(PrivacyParams()) > 0.75
    # one noisy run varies like a random draw (~0.06 over 27 users): the mean over 5 noise seeds is at chance within ~0.03
    noised = np.mean([attacked_auc(PrivacyParams(clip_norm=0.05, noise_multiplier=50.0, noise_seed=seed)) for seed in range(5)])
    assert abs(noised - 0.5) < 0.08, noised
