"""Reconstruction experiment: how well a curious party recovers cloth's training interactions from what it sees.

    python benchmarks/reconstruction_attack.py [--rank 32] [--rounds 10] [--users 2000] [--noise 0.05 0.2 1 2 5]
                                               [--table docs/results/reconstruction-attack.md]

Training: the in-process engine on the shipped warm Sport & Cloth pair with benchmarks/dp_tradeoff.py's
settings (rank 32, 10 rounds, identity prox, rho 1; DP arms clip to 1.0 and add seeded noise).
After the last round two attackers recover one row per cloth user:

  (a) the aggregator: cloth's pushed row of the last round as it arrives. Without protection
      that is X + U in the clear; with masks it is mask_contribution's words (the ring branch's
      AES masks), which the attacker decodes as fixed point the way an unmasked push would be;
      with DP it is the clipped, noised row.
  (b) sport, with two domains and the identity prox: 2 Z - its own push, which is cloth's push
      exactly (masks do not change Z, so secure aggregation does not hide cloth from sport).

Each recovered row scores every cloth item against the attacker's guess of cloth's item
factors: the oracle (cloth's true item factors: the worst case, where they leaked) and a
realistic guess (the attacker knows the training interactions of 10% of cloth's users, for
instance their public reviews, and fits item factors to them by ridge least squares on their
recovered rows). The attack's AUC is per user: training items against all other items,
averaged over `--users` attacked users (a fixed random sample of the other 90%). Also shown:
item popularity among the known users (a user-independent guess that uses no recovered row).
"""

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from scipy.stats import rankdata

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from dp_tradeoff import DELTA, NOISE_SEED, epsilon_of, load_warm_pair, trained_engine  # noqa: E402

from cdimf.common.core.params import PrivacyParams  # noqa: E402
from cdimf.common.core.ring import RING_SCALE  # noqa: E402
from cdimf.engine import CDIMFEngine  # noqa: E402

ATTACKED_DOMAIN = "cloth"
KNOWN_FRACTION = 0.1
RIDGE = 1.0
# users per block of scores: the block's (users x items) float32 scores stay a few tens of MB
AUC_BLOCK_USERS = 256


def mean_auc(scores_of: Callable[[np.ndarray], np.ndarray], interactions: sp.csr_matrix, users: np.ndarray) -> float:
    """Mean over `users` (with at least one item and one non-item) of the AUC of their scores: items they interacted with vs the rest.

    scores_of(block of user rows) -> float (len(block), n_items); ties count one half (average ranks).
    """
    interactions = sp.csr_matrix(interactions)
    n_items = interactions.shape[1]
    total, counted = 0.0, 0
    for start in range(0, len(users), AUC_BLOCK_USERS):
        block = users[start : start + AUC_BLOCK_USERS]
        positives = interactions[block].toarray() > 0
        n_pos = positives.sum(axis=1)
        keep = (n_pos > 0) & (n_pos < n_items)
        ranks = rankdata(scores_of(block), axis=1)
        # Mann-Whitney: AUC = (sum of the positives' ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg)
        rank_sum = np.where(positives, ranks, 0.0).sum(axis=1)
        auc = (rank_sum - n_pos * (n_pos + 1) / 2.0) / np.maximum(n_pos * (n_items - n_pos), 1)
        total += float(auc[keep].sum())
        counted += int(keep.sum())
    return total / max(counted, 1)


def factor_scores(rows: np.ndarray, items: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """scores_of for recovered user rows (indexed by user) against item factors."""
    return lambda block: rows[block] @ items.T


def fitted_items(rows: np.ndarray, interactions: sp.csr_matrix, known: np.ndarray, ridge: float = RIDGE) -> np.ndarray:
    """Item factors fitted to the known users' interactions: argmin_Y ||P_k - V_k Y^T||^2 + ridge ||Y||^2 (the attacker's guess)."""
    v = rows[known].astype(np.float64)
    gram = v.T @ v + ridge * np.eye(v.shape[1])
    return np.linalg.solve(gram, (sp.csr_matrix(interactions)[known].T @ v).T).T.astype(np.float32)


def decode_as_fixed_point(words: np.ndarray, rank: int) -> np.ndarray:
    """What the aggregator reads from a masked push: its first `rank` words as fixed point, as it would an unmasked one."""
    return (words[:, :rank].view(np.int64) / RING_SCALE).astype(np.float32)


def peer_view(engine: CDIMFEngine, attacker: int, target: int) -> np.ndarray:
    """The target's pushed rows (in its shared-row order) as the attacker recovers them from its own push and Z.

    Two domains, identity prox: a row both push has Z = (mine + theirs) / 2, so theirs = 2 Z - mine;
    a row the attacker holds without interactions (a receiver row) gets Z = theirs as it is.
    """
    assert engine.consensus is not None
    own, theirs = engine.memberships[attacker], engine.memberships[target]
    position = np.full(len(engine.global_keys), -1, dtype=np.int64)
    position[own.shared_global] = np.arange(len(own.shared_global))
    mine = position[theirs.shared_global]
    received = np.isin(theirs.shared_global, own.receiver_global)
    if np.any((mine < 0) & ~received):
        raise ValueError("every attacked row must be pushed or received by the attacker")
    z = engine.consensus[theirs.shared_global]
    recovered = z.copy()
    pushed = mine >= 0
    recovered[pushed] = 2.0 * z[pushed] - engine.released[attacker][mine[pushed]]
    return recovered


def by_user(engine: CDIMFEngine, domain: int, shared_values: np.ndarray) -> np.ndarray:
    """Per-row values of a domain's shared rows placed at its user rows (zero elsewhere)."""
    trainer = engine.trainers[domain]
    rows = np.zeros((trainer.train.shape[0], shared_values.shape[1]), dtype=np.float32)
    rows[trainer.shared_rows] = shared_values
    return rows


@dataclass(frozen=True)
class Views:
    """One arm's recovered rows of the attacked domain (user-indexed) from the aggregator and from the peer, and its true item factors."""

    label: str
    epsilon: float | None
    aggregator: np.ndarray
    peer: np.ndarray
    oracle_items: np.ndarray


def masked_aggregator_view(engine: CDIMFEngine, target: int, round_index: int) -> np.ndarray:
    """The target's last push as the aggregator sees it under secure aggregation (the ring branch's masks), decoded as fixed point."""
    from cdimf.common.security.masks import mask_contribution
    from cdimf.common.security.pseudonyms import pseudonymize

    secret = b"reconstruction-experiment-federation-secret-0123456789"
    trainer = engine.trainers[target]
    keys = engine.domains[target].user_keys[trainer.shared_rows]
    words = mask_contribution(engine.released[target], pseudonymize(keys, secret), secret, "attack-run", trainer.name, round_index)
    return decode_as_fixed_point(words, engine.rank)


def views_of(engine: CDIMFEngine, label: str, epsilon: float | None, masked: bool) -> Views:
    """The aggregator's and sport's recovered rows of cloth in the engine's last round."""
    target = [t.name for t in engine.trainers].index(ATTACKED_DOMAIN)
    attacker = 1 - target
    aggregator = masked_aggregator_view(engine, target, engine.round) if masked else engine.released[target]
    return Views(label, epsilon, by_user(engine, target, aggregator), by_user(engine, target, peer_view(engine, attacker, target)),
                 engine.trainers[target].state.items)


def split_users(n_users: int, attacked: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(known users: KNOWN_FRACTION of all, attacked users: `attacked` of the rest), both sorted, fixed seed."""
    order = np.random.default_rng(seed).permutation(n_users)
    n_known = int(KNOWN_FRACTION * n_users)
    return np.sort(order[:n_known]), np.sort(order[n_known : n_known + attacked])


def main() -> None:
    """Train each arm, attack cloth from both views with both item guesses, print and write the AUC table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--users", type=int, default=2000, help="attacked users (a fixed sample)")
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.05, 0.2, 1.0, 2.0, 5.0])
    parser.add_argument("--table", type=Path, default=REPO_ROOT / "docs/results/reconstruction-attack.md")
    args = parser.parse_args()
    data = load_warm_pair()
    train = next(d.train for d in data if d.domain == ATTACKED_DOMAIN)
    known, attacked = split_users(train.shape[0], args.users)
    plain = trained_engine(data, PrivacyParams(), args.rank, args.rounds)
    arms = [views_of(plain, "no protection", None, masked=False)]
    masked_run = trained_engine(data, PrivacyParams(), args.rank, args.rounds, quantize=True)
    arms.append(views_of(masked_run, "masks (secure aggregation)", None, masked=True))
    for z in args.noise:
        privacy = PrivacyParams(clip_norm=args.clip_norm, noise_multiplier=z, delta=DELTA, noise_seed=NOISE_SEED)
        engine = trained_engine(data, privacy, args.rank, args.rounds)
        arms.append(views_of(engine, f"DP clip {args.clip_norm:g}, noise x{z:g}", epsilon_of(privacy, args.rounds, 1.0), masked=False))
        print(f"trained {arms[-1].label}", file=sys.stderr, flush=True)
    popularity = np.asarray(train[known].sum(axis=0)).ravel().astype(np.float32)
    popularity_auc = mean_auc(lambda block: np.broadcast_to(popularity, (len(block), len(popularity))), train, attacked)
    lines = [f"Attack on cloth's training interactions, warm Sport & Cloth, engine, rank {args.rank}, {args.rounds} rounds; "
             f"mean per-user AUC over {len(attacked)} attacked users (training items vs the rest of its {train.shape[1]} items).",
             f"Fitted items: ridge least squares on the recovered rows of the {len(known)} users whose interactions the attacker knows.",
             f"Reference without any recovered row: item popularity among the known users, AUC {popularity_auc:.3f}; random scores: 0.5.", "",
             "| protection | epsilon (delta 1e-5) | aggregator, oracle items | aggregator, fitted items "
             "| sport (2Z - own), oracle items | sport, fitted items |",
             "|---|---|---|---|---|---|"]
    for arm in arms:
        cells = []
        for rows in (arm.aggregator, arm.peer):
            cells.append(mean_auc(factor_scores(rows, arm.oracle_items), train, attacked))
            cells.append(mean_auc(factor_scores(rows, fitted_items(rows, train, known)), train, attacked))
        shown = "inf (no guarantee)" if arm.epsilon is None else f"{arm.epsilon:.2f}"
        lines.append(f"| {arm.label} | {shown} | " + " | ".join(f"{value:.3f}" for value in cells) + " |")
        print(lines[-1], file=sys.stderr, flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(text)


if __name__ == "__main__":
    main()
