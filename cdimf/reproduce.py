"""`cdimf reproduce`: train ALS-separate, ALS-joined and CDIMF on two or more domains and evaluate them the paper's way."""

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
from cdimf.common.metric_labels import labelled_percent, metric_label
from cdimf.engine import CDIMFEngine, DomainInput
from cdimf.pairs import DomainSplit, load_domains
from cdimf.progress import Progress, say
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
            DomainTrainer(d.name, t, config.separate.for_domain(d.name), 0.0) for d, t in zip(config.domains, trains)
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
            for d, t in zip(config.domains, trains)
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
    model: Contender, valid: Sequence[HeldOut], trains: Sequence[sp.csr_matrix], config: ReproduceConfig,
    progress: Progress | None = None,
) -> tuple[int, Vectors, list[float]]:
    """Train round by round on `trains`; keep the round with the best mean validation NDCG@k.

    `progress` hears every round with its validation score (labelled, in %) and the best round so far.
    """
    k = config.evaluation.k
    label = f"mean {metric_label(f'NDCG@{k}', 'valid', config.stopping.valid_negatives)}"
    best_score, best_round, best_vectors = -1.0, 0, model.vectors()
    history = []
    for round_no in range(1, config.stopping.max_rounds + 1):
        model.step()
        vectors = model.vectors()
        mean_ndcg = float(np.mean([m[f"NDCG@{k}"] for m in score(vectors, valid, trains, k)]))
        history.append(mean_ndcg)
        if mean_ndcg > best_score:
            best_score, best_round, best_vectors = mean_ndcg, round_no, vectors
        if progress is not None:
            progress.update(1, f"{label} {100 * mean_ndcg:.2f}%, best round {best_round}")
        if round_no - best_round >= config.stopping.patience:
            if progress is not None:
                progress.write(f"{model.name}: stopped after round {round_no}: no gain for {config.stopping.patience} rounds "
                               f"([stopping] patience); best round {best_round}, {label} {100 * best_score:.2f}%")
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
    show_progress: bool = False,
) -> ModelResult:
    """Early-stop on validation, refit on all of train when validation was carved from it, test.

    With `show_progress`, each round, the refit and the test scoring are reported on stderr.
    """
    ev = config.evaluation
    started = time.perf_counter()
    trains = [s.train for s in splits]
    valid = [held_out(s, "valid", config.stopping.valid_negatives, ev.seed) for s in splits]
    model = make(trains)
    with Progress(f"{model.name}: early stopping", config.stopping.max_rounds, "rounds", enabled=show_progress) as progress:
        rounds, vectors, history = early_stopped(model, valid, trains, config, progress)
    test_trains = trains
    if carved and config.stopping.refit:
        test_trains = [full_train(s) for s in splits]
        model = make(test_trains)
        with Progress(f"{model.name}: refit on all of train", rounds, "rounds", enabled=show_progress) as progress:
            for _ in range(rounds):
                model.step()
                progress.update(1)
        vectors = model.vectors()
    seconds = time.perf_counter() - started
    if show_progress:
        say(f"{model.name}: scoring the test split ({ev.n_negatives} neg, {ev.n_negatives} unseen neg, full catalog)")
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


def load_splits(config: ReproduceConfig, with_test: bool = True, show_progress: bool = False) -> tuple[list[DomainSplit], bool]:
    """Read the configured domains; True when validation was carved from train (no valid files).

    Without `with_test` the test files are never opened (the tuner) and the test arrays are empty.
    """
    domains = config.domains
    has_valid = all(d.valid_path is not None for d in domains)
    started = time.perf_counter()
    announce = (lambda path: say(f"reading {path}")) if show_progress else None
    splits = load_domains(
        [d.name for d in domains], [d.train_path for d in domains],
        [d.test_path for d in domains if d.test_path is not None] if with_test else None,
        [d.valid_path for d in domains if d.valid_path is not None] if has_valid else None,
        [d.data_format for d in domains], config.stopping.valid_seed, announce,
    )
    if show_progress:
        shapes = ", ".join(f"{s.name} {s.train.nnz} pairs x {s.n_items} items" for s in splits)
        say(f"loaded {len(splits)} domains over {splits[0].n_users} users ({shapes}) in {time.perf_counter() - started:.1f} s")
    return splits, not has_valid


def fewest_negatives(n_items: int, users: np.ndarray, excluded: sp.csr_matrix) -> tuple[int, int]:
    """(the fewest negatives any held-out row can draw, that row) when a row's user's `excluded` items are off limits."""
    allowed = n_items - np.diff(excluded.indptr)[users]
    row = int(np.argmin(allowed))
    return int(allowed[row]), row


def check_negatives(splits: Sequence[DomainSplit], config: ReproduceConfig) -> None:
    """ValueError listing every domain and split whose catalog is too small for the configured negatives, by config key.

    The sampled protocols rank each target among a fixed number of candidates, so a smaller
    catalog is an error here rather than a silently smaller protocol (the paper's 999 would no
    longer be comparable).
    """
    problems = []
    valid_n, test_n = config.stopping.valid_negatives, config.evaluation.n_negatives
    for split in splits:
        shape = (split.n_users, split.n_items)
        valid_pairs = pairs_to_csr(split.valid_users, split.valid_items, shape)
        test_pairs = pairs_to_csr(split.test_users, split.test_items, shape)
        # the unseen protocol also leaves out what the user trained on (validation pairs included after a refit)
        unseen = (split.train + valid_pairs + test_pairs).tocsr()
        checks = [("[stopping] valid_negatives", valid_n, "validation", [(split.valid_users, valid_pairs)]),
                  ("[evaluation] n_negatives", test_n, "test", [(split.test_users, test_pairs), (split.test_users, unseen)])]
        for key, wanted, name, candidates in checks:
            found = [(*fewest_negatives(split.n_items, users, excluded), users) for users, excluded in candidates if len(users)]
            if not found:
                continue
            fewest, row, users = min(found, key=lambda entry: entry[0])
            if fewest < wanted:
                user = str(split.users.key_of(users[row : row + 1])[0])
                problems.append(f"{key} = {wanted}: domain {split.name} has {split.n_items} items, so the {name} row of user "
                                f"{user!r} can draw only {fewest} negatives; set {key.split()[1]} to at most {fewest}")
    if problems:
        raise ValueError("\n".join(problems))


def reproduce(config: ReproduceConfig, show_progress: bool = False) -> list[ModelResult]:
    """Train and evaluate every configured model on the configured domains (progress on stderr when shown)."""
    splits, carved = load_splits(config, show_progress=show_progress)
    check_negatives(splits, config)
    user_keys = splits[0].users.keys
    makers: dict[str, Callable[[Sequence[sp.csr_matrix]], Contender]] = {
        "ALS-separate": lambda trains: SeparateALS(trains, config),
        "ALS-joined": lambda trains: JoinedALS(trains, config),
        "CDIMF": lambda trains: CDIMF(trains, config, user_keys),
    }
    results = []
    for number, name in enumerate(config.models, start=1):
        if show_progress:
            say(f"model {number}/{len(config.models)}: {name} (up to {config.stopping.max_rounds} rounds, "
                f"stopping after {config.stopping.patience} without gain)")
        results.append(run_model(makers[name], splits, carved, config, show_progress))
        if show_progress:
            say(f"model {number}/{len(config.models)}: {name} done in {results[-1].seconds:.1f} s, {results[-1].rounds} rounds")
    return results


def _protocols(config: ReproduceConfig) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """(heading, metric-name prefix, metrics) of each block of test columns."""
    n, k = config.evaluation.n_negatives, config.evaluation.k
    return (
        (f"test ({n} neg)", "", (f"HR@{k}", f"NDCG@{k}")),
        (f"paper ({n} neg)", "paper ", (f"HR@{k}", f"NDCG@{k}")),
        (f"test ({n} unseen neg)", "unseen ", (f"HR@{k}", f"NDCG@{k}")),
        ("test (full catalog)", "full ", (f"HR@{k}", f"NDCG@{k}", f"Coverage@{k}")),
    )


def result_json(result: ModelResult, config: ReproduceConfig) -> dict[str, object]:
    """One model's outcome for `--json`: every metric labelled with its split and protocol (metric_labels), in %."""
    ev = config.evaluation
    label = f"mean {metric_label(f'NDCG@{ev.k}', 'valid', config.stopping.valid_negatives)}"
    return {
        "model": result.model, "rounds": result.rounds, "seconds": round(result.seconds, 3),
        "metrics": {domain: labelled_percent(values, "test", ev.n_negatives) for domain, values in result.metrics.items()},
        "validation_metric": label, "validation": [round(100.0 * value, 4) for value in result.validation],
        "seen_test_pairs": result.seen_test_pairs,
    }


def paper_json(config: ReproduceConfig) -> dict[str, dict[str, dict[str, float]]]:
    """The paper's numbers, labelled like ours (its test split, its 999 negatives), in %."""
    k, n = config.evaluation.k, config.evaluation.n_negatives
    return {model: {domain: {metric_label(f"HR@{k}", "test", n): hr, metric_label(f"NDCG@{k}", "test", n): ndcg}
                    for domain, (hr, ndcg) in domains.items()} for model, domains in config.paper.items()}


def format_table(results: Sequence[ModelResult], config: ReproduceConfig) -> str:
    """A plain-text table in %: each block of columns headed by its split and protocol, the paper's numbers beside ours."""
    blocks = _protocols(config)
    widths = []
    for heading, _, names in blocks:
        # each block is as wide as its heading, its columns share the width
        width = max(8, -(-(len(heading) - len(names) + 1) // len(names)))
        widths.append(width)
    top = f"{'':<13} {'':<8}" + "".join(f" {heading:<{len(names) * (width + 1) - 1}}" for (heading, _, names), width in zip(blocks, widths))
    header = f"{'model':<13} {'domain':<8}" + "".join(
        "".join(f" {name.replace('Coverage', 'Cov'):>{width}}" for name in names) for (_, _, names), width in zip(blocks, widths)
    ) + f" {'rounds':>6} {'seconds':>7}"
    lines = [f"{config.title} (values in %)", top.rstrip(), header, "-" * len(header)]
    for result in results:
        for domain, m in result.metrics.items():
            paper = config.paper.get(result.model, {}).get(domain)
            k = config.evaluation.k
            values = {**m, **({f"paper HR@{k}": paper[0] / 100, f"paper NDCG@{k}": paper[1] / 100} if paper else {})}
            cells = "".join(
                "".join(f" {100 * values[prefix + name]:>{width}.2f}" if prefix + name in values else f" {'-':>{width}}" for name in names)
                for (_, prefix, names), width in zip(blocks, widths)
            )
            lines.append(f"{result.model:<13} {domain:<8}{cells} {result.rounds:>6} {result.seconds:>7.1f}")
    ev = config.evaluation
    lines.append(
        f"({ev.n_negatives} neg): the paper's code (target + {ev.n_negatives} uniform negatives from the catalog, seed {ev.seed + 1}, "
        "the user's training items among them pushed to the bottom); paper: the paper's reported numbers"
    )
    lines.append(
        f"({ev.n_negatives} unseen neg): DisenCDR/UniCDR (target + {ev.n_negatives} uniform negatives the user neither trained on "
        f"nor holds in test, seed {ev.seed + 2}); full catalog: the whole catalog less the user's training items"
    )
    if results:
        seen = ", ".join(f"{name} {count}" for name, count in results[0].seen_test_pairs.items())
        handled = "left out of every metric" if ev.seen_test_pairs == "drop" else "scored as given"
        lines.append(f"test pairs that also occur in train: {seen} ({handled}: [evaluation] seen_test_pairs = \"{ev.seen_test_pairs}\")")
    return "\n".join(lines)
