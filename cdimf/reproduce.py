"""`cdimf reproduce`: train ALS-separate, ALS-joined and CDIMF on a pair and evaluate them the paper's way."""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import scipy.sparse as sp

from cdimf.common.core.evaluation import HeldOut, draw_candidates, evaluate
from cdimf.common.core.metrics import full_catalog_metrics, sample_negatives
from cdimf.common.core.model import DomainTrainer
from cdimf.common.core.sparse import pairs_to_csr
from cdimf.engine import CDIMFEngine, DomainInput
from cdimf.pairs import DomainSplit, load_pair
from cdimf.reproduce_config import ReproduceConfig

Vectors = list[tuple[np.ndarray, np.ndarray]]


class Contender(Protocol):
    """A model that trains in rounds and yields (user vectors, item vectors) per domain."""

    name: str

    def step(self) -> None:
        """Train one round."""

    def vectors(self) -> Vectors:
        """Copies of the scoring vectors of every domain, in domain order."""


class SeparateALS:
    """Each domain trains iALS alone (CDIMF with rho = 0): no data or factors shared."""

    name = "ALS-separate"

    def __init__(self, trains: Sequence[sp.csr_matrix], config: ReproduceConfig) -> None:
        self.trainers = [
            DomainTrainer(d.name, t, config.separate.for_domain(d.name), 0.0) for d, t in zip(config.data.domains, trains)
        ]

    def step(self) -> None:
        """One local epoch per domain."""
        for trainer in self.trainers:
            trainer.local_epochs(1)

    def vectors(self) -> Vectors:
        """Each domain's own factors."""
        return [(t.state.users.copy(), t.state.items.copy()) for t in self.trainers]


class JoinedALS:
    """One iALS on the union of the domains' matrices (the no-privacy upper reference)."""

    name = "ALS-joined"

    def __init__(self, trains: Sequence[sp.csr_matrix], config: ReproduceConfig) -> None:
        self.widths = [t.shape[1] for t in trains]
        self.trainer = DomainTrainer("joined", sp.hstack(list(trains), format="csr"), config.joined, 0.0)

    def step(self) -> None:
        """One epoch on the joined matrix."""
        self.trainer.local_epochs(1)

    def vectors(self) -> Vectors:
        """Shared user factors with each domain's block of item factors."""
        users = self.trainer.state.users
        bounds = np.cumsum([0, *self.widths])
        items = self.trainer.state.items
        return [(users.copy(), items[bounds[i] : bounds[i + 1]].copy()) for i in range(len(self.widths))]


class CDIMF:
    """The paper's method through the in-process engine (the federated runtime runs the same code)."""

    name = "CDIMF"

    def __init__(self, trains: Sequence[sp.csr_matrix], config: ReproduceConfig, user_keys: np.ndarray) -> None:
        cfg = config.cdimf
        domains = [
            DomainInput(d.name, user_keys, t, cfg.ials.for_domain(d.name), cfg.aggregation_period)
            for d, t in zip(config.data.domains, trains)
        ]
        self.engine = CDIMFEngine(domains, cfg.admm, cfg.user_step)

    def step(self) -> None:
        """One round: local epochs, exchange, dual step."""
        self.engine.step()

    def vectors(self) -> Vectors:
        """Local factors, with rows unknown to a domain scored by the consensus (cold start)."""
        return [(t.scoring_users(), t.state.items.copy()) for t in self.engine.trainers]


@dataclass
class ModelResult:
    """One contender's outcome: chosen round count, test metrics per domain, time."""

    model: str
    rounds: int
    seconds: float
    metrics: dict[str, dict[str, float]]
    validation: list[float] = field(default_factory=list)
    seen_test_pairs: dict[str, int] = field(default_factory=dict)


def held_out(split: DomainSplit, which: str, n_negatives: int, seed: int) -> HeldOut:
    """Draw the paper's candidates (target + exactly n_negatives uniform negatives) once, from a fixed seed."""
    users, items = (split.valid_users, split.valid_items) if which == "valid" else (split.test_users, split.test_items)
    return draw_candidates(split.n_items, users, items, split.n_users, seed, n_negatives, shrink=False)


def seen_in_train(train: sp.csr_matrix, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Per held-out row, whether its (user, item) pair is also a training entry."""
    if len(users) == 0:
        return np.zeros(0, dtype=bool)
    return np.asarray(train[users, items]).ravel() != 0


def unseen_held_out(split: DomainSplit, train: sp.csr_matrix, users: np.ndarray, items: np.ndarray,
                    n_negatives: int, seed: int) -> HeldOut:
    """DisenCDR/UniCDR candidates: target + n_negatives uniform items the user neither trained on nor holds in test."""
    exclude = (train + pairs_to_csr(users, items, train.shape)).tocsr()
    candidates = sample_negatives(split.n_items, users, items, exclude, n_negatives, seed, np.arange(split.n_items))
    return HeldOut(users, items, candidates)


def score(vectors: Vectors, held: Sequence[HeldOut], trains: Sequence[sp.csr_matrix], k: int) -> list[dict[str, float]]:
    """HR@k and NDCG@k (fractions) of each domain on its held-out rows, its training items pushed down."""
    return [evaluate(rows, users, items, train, k) for (users, items), rows, train in zip(vectors, held, trains)]


def early_stopped(
    model: Contender, valid: Sequence[HeldOut], trains: Sequence[sp.csr_matrix], config: ReproduceConfig
) -> tuple[int, Vectors, list[float]]:
    """Train round by round on `trains`; keep the round with the best mean validation NDCG@k."""
    k = config.evaluation.k
    best_score, best_round, best_vectors = -1.0, 0, model.vectors()
    history = []
    for round_no in range(1, config.stopping.max_rounds + 1):
        model.step()
        vectors = model.vectors()
        mean_ndcg = float(np.mean([m[f"NDCG@{k}"] for m in score(vectors, valid, trains, k)]))
        history.append(mean_ndcg)
        if mean_ndcg > best_score:
            best_score, best_round, best_vectors = mean_ndcg, round_no, vectors
        elif round_no - best_round >= config.stopping.patience:
            break
    return best_round, best_vectors, history


def full_train(split: DomainSplit) -> sp.csr_matrix:
    """The domain's training matrix with its carved validation pairs put back."""
    back = pairs_to_csr(split.valid_users, split.valid_items, (split.n_users, split.n_items))
    merged = (split.train + back).tocsr()
    merged.data[:] = 1.0
    return merged


def run_model(
    make: Callable[[Sequence[sp.csr_matrix]], Contender],
    splits: Sequence[DomainSplit],
    carved: bool,
    config: ReproduceConfig,
) -> ModelResult:
    """Early-stop on validation, refit on all of train when validation was carved from it, test."""
    ev = config.evaluation
    started = time.perf_counter()
    trains = [s.train for s in splits]
    valid = [held_out(s, "valid", config.stopping.valid_negatives, ev.seed) for s in splits]
    model = make(trains)
    rounds, vectors, history = early_stopped(model, valid, trains, config)
    test_trains = trains
    if carved and config.stopping.refit:
        test_trains = [full_train(s) for s in splits]
        model = make(test_trains)
        for _ in range(rounds):
            model.step()
        vectors = model.vectors()
    seconds = time.perf_counter() - started
    metrics, seen_counts = {}, {}
    for split, (users, items), train in zip(splits, vectors, test_trains):
        test_users, test_items, seen_counts[split.name] = scored_test_rows(split, train, ev.seen_test_pairs)
        paper_code = draw_candidates(split.n_items, test_users, test_items, split.n_users, ev.seed + 1, ev.n_negatives, shrink=False)
        unseen = unseen_held_out(split, train, test_users, test_items, ev.n_negatives, ev.seed + 2)
        full = full_catalog_metrics(users, items, train, test_users, test_items, ev.k, np.arange(split.n_items))
        metrics[split.name] = {
            **evaluate(paper_code, users, items, train, ev.k),
            **{f"unseen {k}": v for k, v in evaluate(unseen, users, items, train, ev.k).items()},
            **{f"full {k}": v for k, v in full.items() if k != "users"},
        }
    return ModelResult(model.name, rounds, seconds, metrics, history, seen_counts)


def scored_test_rows(split: DomainSplit, train: sp.csr_matrix, policy: str) -> tuple[np.ndarray, np.ndarray, int]:
    """The test rows to score and how many of the split's test pairs also occur in `train`.

    "drop" leaves those rows out of every metric (a model that learnt the pair would score it
    top, and the full-catalog ranking could never hit it); "keep" scores them as given.
    """
    seen = seen_in_train(train, split.test_users, split.test_items)
    if policy == "keep":
        return split.test_users, split.test_items, int(seen.sum())
    return split.test_users[~seen], split.test_items[~seen], int(seen.sum())


def load_splits(config: ReproduceConfig, with_test: bool = True) -> tuple[list[DomainSplit], bool]:
    """Read the configured pair; True when validation was carved from train (no valid files).

    Without `with_test` the test files are never opened (the tuner) and the test arrays are empty.
    """
    a, b = config.data.domains[:2]
    if len(config.data.domains) != 2:
        raise ValueError("reproduce takes exactly two domains")
    has_valid = a.valid is not None and b.valid is not None
    splits = load_pair(
        a.train, b.train, a.test if with_test else None, b.test if with_test else None,
        a.valid if has_valid else None, b.valid if has_valid else None,
        names=(a.name, b.name), fmt=config.data.format, valid_seed=config.data.valid_seed,
    )
    return list(splits), not has_valid


def reproduce(config: ReproduceConfig, progress: Callable[[str], None] | None = None) -> list[ModelResult]:
    """Train and evaluate every configured model on the configured pair."""
    splits, carved = load_splits(config)
    user_keys = splits[0].users.keys
    makers: dict[str, Callable[[Sequence[sp.csr_matrix]], Contender]] = {
        "ALS-separate": lambda trains: SeparateALS(trains, config),
        "ALS-joined": lambda trains: JoinedALS(trains, config),
        "CDIMF": lambda trains: CDIMF(trains, config, user_keys),
    }
    results = []
    for name in config.models:
        if progress:
            progress(f"training {name} ...")
        results.append(run_model(makers[name], splits, carved, config))
    return results


def format_table(results: Sequence[ModelResult], config: ReproduceConfig) -> str:
    """A plain-text table: ours (sampled HR/NDCG@k, %) beside the paper's, plus full-catalog metrics."""
    k = config.evaluation.k
    header = (
        f"{'model':<13} {'domain':<8} {'HR@' + str(k):>7} {'NDCG@' + str(k):>8} {'paper HR':>9} {'paper NDCG':>10}"
        f" {'uHR@' + str(k):>7} {'uNDCG@' + str(k):>8}"
        f" {'full HR':>8} {'full NDCG':>9} {'cov':>6} {'rounds':>6} {'seconds':>7}"
    )
    lines = [config.title, header, "-" * len(header)]
    for result in results:
        for domain, m in result.metrics.items():
            paper = config.paper.get(result.model, {}).get(domain)
            paper_hr, paper_ndcg = (f"{paper[0]:.2f}", f"{paper[1]:.2f}") if paper else ("-", "-")
            lines.append(
                f"{result.model:<13} {domain:<8} {100 * m[f'HR@{k}']:>7.2f} {100 * m[f'NDCG@{k}']:>8.2f}"
                f" {paper_hr:>9} {paper_ndcg:>10} {100 * m[f'unseen HR@{k}']:>7.2f} {100 * m[f'unseen NDCG@{k}']:>8.2f}"
                f" {100 * m[f'full HR@{k}']:>8.2f} {100 * m[f'full NDCG@{k}']:>9.2f}"
                f" {100 * m[f'full Coverage@{k}']:>6.2f} {result.rounds:>6} {result.seconds:>7.1f}"
            )
    ev = config.evaluation
    lines.append(
        f"HR/NDCG: the paper's code (target + {ev.n_negatives} uniform negatives from the catalog, seed {ev.seed + 1}, "
        "the user's training items among them pushed to the bottom)"
    )
    lines.append(
        f"uHR/uNDCG: DisenCDR/UniCDR (target + {ev.n_negatives} uniform negatives the user neither trained on nor holds "
        f"in test, seed {ev.seed + 2}); full: the whole catalog less the user's training items; values in %"
    )
    if results:
        seen = ", ".join(f"{name} {count}" for name, count in results[0].seen_test_pairs.items())
        handled = "left out of every metric" if ev.seen_test_pairs == "drop" else "scored as given"
        lines.append(f"test pairs that also occur in train: {seen} ({handled}: [evaluation] seen_test_pairs = \"{ev.seen_test_pairs}\")")
    return "\n".join(lines)
