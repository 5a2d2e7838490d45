"""Choose `cdimf reproduce` hyperparameters on validation rows only (never test): a small staged grid.

Usage:
    cdimf tune warm-sport-cloth                                  # staged search, all models
    cdimf tune CONFIG --models cdimf --grid rho=0.3,1,3 --grid prox=identity,l2
    cdimf tune CONFIG --json > tune.json
    cdimf tune CONFIG --valid-negatives 99    # cheaper, but ranks candidates differently

Each candidate is the config's section for one model with some values replaced; it trains with
`cdimf.reproduce.early_stopped` on the validation rows that `cdimf reproduce` itself uses (the
pair's valid files, or the leave-one-out split carved from train) and is scored by its best mean
validation NDCG@k and the round count that reached it. Validation rows get the test's number of
negatives ([evaluation] n_negatives, 999 in the paper's protocol) by default: with fewer (e.g. 99)
the ranking of candidates changes and strong ridges that push popular items up look better than
they are at 999. The test files are read by the loader (they fix the id maps) but their rows are
never scored here.

Staged search (the default; `--stages` picks some, `--base` sets the starting point): local)
alpha x lam at the config's rank with nu = 0; nu) nu > 0 with lam rescaled so the mean user ridge
stays where the best so far put it; rank) half and double; for CDIMF only, consensus) rho x prox,
and period) the aggregation period. Each stage starts from the best candidate so far.
"""

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from cdimf.common.core.evaluation import HeldOut
from cdimf.common.core.sparse import row_counts
from cdimf.pairs import DomainSplit
from cdimf.reproduce import CDIMF, Contender, JoinedALS, SeparateALS, early_stopped, held_out, load_splits
from cdimf.reproduce_config import ReproduceConfig, load_reproduce_config
from cdimf.resources import config_path

MODELS = ("separate", "joined", "cdimf")
IALS_KEYS = ("rank", "alpha", "lam", "nu", "sigma", "seed", "threads", "backend")
ADMM_KEYS = ("rho", "prox", "lambda_z")
CDIMF_KEYS = ("aggregation_period",)
INT_KEYS = ("rank", "seed", "threads", "aggregation_period")
STR_KEYS = ("prox", "backend")

Settings = dict[str, float | int | str]


@dataclass
class Trial:
    """One candidate's outcome on validation."""

    model: str
    stage: str
    settings: Settings
    valid_ndcg: float
    rounds: int
    seconds: float
    history: list[float]


@dataclass
class Validation:
    """What every candidate is trained and scored on: the pair's training matrices and validation rows."""

    splits: list[DomainSplit]
    held: list[HeldOut]
    user_keys: np.ndarray


def load_validation(config: ReproduceConfig) -> Validation:
    """The training matrices and validation candidates exactly as `run_model` draws them."""
    splits, _ = load_splits(config)
    held = [held_out(s, "valid", config.stopping.valid_negatives, config.evaluation.seed) for s in splits]
    return Validation(splits, held, splits[0].users.keys)


def current_settings(config: ReproduceConfig, model: str) -> Settings:
    """A model's tunable values as one flat mapping (CDIMF merges its iALS, ADMM and period)."""
    if model == "cdimf":
        cfg = config.cdimf
        return {**cfg.ials.model_dump(), **cfg.admm.model_dump(), "aggregation_period": cfg.aggregation_period}
    return dict(getattr(config, model).model_dump())


def with_settings(config: ReproduceConfig, model: str, settings: Settings) -> ReproduceConfig:
    """The config with one model's section replaced; pydantic validates the new values."""
    raw = config.model_dump(mode="json")
    unknown = set(settings) - set(IALS_KEYS + (ADMM_KEYS + CDIMF_KEYS if model == "cdimf" else ()))
    if unknown:
        raise ValueError(f"model {model}: unknown setting(s) {sorted(unknown)}")
    if model == "cdimf":
        raw["cdimf"]["ials"].update({k: v for k, v in settings.items() if k in IALS_KEYS})
        raw["cdimf"]["admm"].update({k: v for k, v in settings.items() if k in ADMM_KEYS})
        raw["cdimf"].update({k: v for k, v in settings.items() if k in CDIMF_KEYS})
    else:
        raw[model].update(settings)
    return ReproduceConfig.model_validate(raw)


def make_contender(config: ReproduceConfig, model: str, data: Validation) -> Contender:
    """The reproduce contender for `model`, trained on the validation split's train matrices."""
    trains = [s.train for s in data.splits]
    if model == "separate":
        return SeparateALS(trains, config)
    if model == "joined":
        return JoinedALS(trains, config)
    return CDIMF(trains, config, data.user_keys)


def evaluate(config: ReproduceConfig, model: str, settings: Settings, data: Validation, stage: str) -> Trial:
    """Early-stop one candidate on validation and keep its best mean NDCG@k and round count."""
    candidate = with_settings(config, model, settings)
    started = time.perf_counter()
    trains = [s.train for s in data.splits]
    rounds, _, history = early_stopped(make_contender(candidate, model, data), data.held, trains, candidate)
    seconds = time.perf_counter() - started
    return Trial(model, stage, current_settings(candidate, model), max(history), rounds, seconds, history)


def parse_value(key: str, text: str) -> float | int | str:
    """One grid value typed for its key."""
    if key in STR_KEYS:
        return text
    try:
        return int(text) if key in INT_KEYS else float(text)
    except ValueError:
        raise ValueError(f"--grid {key}: '{text}' is not a number") from None


def parse_grid(items: Sequence[str]) -> dict[str, list[float | int | str]]:
    """`key=v1,v2` strings as key -> values."""
    grid: dict[str, list[float | int | str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ValueError(f"--grid '{item}': expected key=v1,v2,...")
        grid[key] = [parse_value(key, v.strip()) for v in values.split(",") if v.strip()]
    return grid


def product(grid: dict[str, list[float | int | str]]) -> list[Settings]:
    """Every combination of the grid's values."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


class Search:
    """Runs candidates for one model, skipping repeats, and remembers the best."""

    def __init__(self, config: ReproduceConfig, model: str, data: Validation, report: Callable[[Trial], None]) -> None:
        self.config, self.model, self.data, self.report = config, model, data, report
        self.best: Settings = current_settings(config, model)
        self.trials: list[Trial] = []

    def stage(self, name: str, candidates: Sequence[Mapping[str, float | int | str]]) -> None:
        """Try each candidate (changes on top of the best so far); the best overall becomes the new base."""
        base = dict(self.best)
        for change in candidates:
            settings = {**base, **change}
            if any(t.settings == settings for t in self.trials):
                continue
            trial = evaluate(self.config, self.model, settings, self.data, name)
            self.trials.append(trial)
            self.report(trial)
        if self.trials:
            self.best = dict(max(self.trials, key=lambda t: t.valid_ndcg).settings)


def mean_user_weight(data: Validation, model: str, alpha: float, nu: float) -> float:
    """Mean over users of (count + alpha * n_items)^nu: the factor the frequency ridge multiplies lam by."""
    if model == "joined":
        counts = sum(row_counts(s.train) for s in data.splits)
        n_items = sum(s.n_items for s in data.splits)
        return float(np.mean(np.power(counts + alpha * n_items, nu)))
    return float(np.mean([np.mean(np.power(row_counts(s.train) + alpha * s.n_items, nu)) for s in data.splits]))


STAGES = ("local", "nu", "rank", "consensus", "period")


def staged(search: Search, data: Validation, stages: Sequence[str]) -> None:
    """The default search: local model, frequency scaling, rank, then CDIMF's consensus settings."""
    if "local" in stages:
        search.stage("alpha x lam", [{"alpha": a, "lam": lam, "nu": 0.0} for a in (0.001, 0.003, 0.01) for lam in (1.0, 3.0, 10.0)])
    if "nu" in stages:
        best = search.best
        # nu > 0 moves the ridge by orders of magnitude; holding its user mean fixed keeps the
        # candidates comparable to stage 1, so only the shape across frequencies changes.
        changes: list[Settings] = []
        for nu in (0.5, 1.0):
            base_lam = float(best["lam"]) / mean_user_weight(data, search.model, float(best["alpha"]), nu)
            changes += [{"nu": nu, "lam": float(f"{base_lam * s:.3g}")} for s in (0.5, 1.0)]
        search.stage("nu", changes)
    if "rank" in stages:
        rank = int(search.best["rank"])
        search.stage("rank", [{"rank": r} for r in sorted({rank // 2, rank, rank * 2})])
    if search.model != "cdimf":
        return
    if "consensus" in stages:
        rhos = (0.3, 1.0, 3.0, 10.0)
        strength = float(search.best["lam"])
        grid: list[Settings] = [{"rho": r, "prox": "identity", "lambda_z": 0.0} for r in rhos]
        grid += [{"rho": r, "prox": "l2", "lambda_z": strength} for r in rhos[1:3]]
        search.stage("rho x prox", grid)
    if "period" in stages:
        search.stage("aggregation period", [{"aggregation_period": p} for p in (1, 2)])


def format_trial(trial: Trial) -> str:
    """One line per candidate."""
    shown = " ".join(f"{k}={v}" for k, v in trial.settings.items() if k not in ("seed", "threads", "sigma", "backend"))
    return f"{trial.model:<8} {trial.stage:<18} {100 * trial.valid_ndcg:7.2f} {trial.rounds:6d} {trial.seconds:7.1f}  {shown}"


def format_table(trials: Sequence[Trial], k: int) -> str:
    """Every candidate sorted by validation NDCG (best first) within each model, then the winners."""
    header = f"{'model':<8} {'stage':<18} {'NDCG@' + str(k):>7} {'rounds':>6} {'seconds':>7}  settings"
    lines = [header, "-" * len(header)]
    winners = []
    for model in MODELS:
        rows = sorted((t for t in trials if t.model == model), key=lambda t: -t.valid_ndcg)
        lines += [format_trial(t) for t in rows]
        if rows:
            winners.append(format_trial(rows[0]))
    return "\n".join([*lines, "", f"best per model (validation NDCG@{k}, %):", *winners])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the search and print the table (or JSON)."""
    parser = argparse.ArgumentParser(prog="cdimf tune", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a shipped config by name or a reproduce config's path (TOML); its values are the starting point")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of separate,joined,cdimf")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="one-stage grid instead of the staged search (repeat for a product)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"staged search: comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--base", action="append", default=[], metavar="KEY=V",
                        help="starting values for every searched model (e.g. the winner of an earlier stage)")
    parser.add_argument("--threads", type=int, default=None,
                        help="solver threads for every candidate (a run setting, not tuned; 1 lets searches run side by side)")
    parser.add_argument("--valid-negatives", type=int, default=None,
                        help="negatives per validation row (default: the config's [evaluation] n_negatives, so "
                             "validation is scored like the test; [stopping] valid_negatives is for reproduce's per-round check)")
    parser.add_argument("--json", action="store_true", help="print every trial and the best per model as JSON")
    args = parser.parse_args(argv)
    config = load_reproduce_config(config_path(args.config))
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if bad := [m for m in models if m not in MODELS]:
        parser.error(f"--models: unknown {bad}; choose from {list(MODELS)}")
    try:
        grid = parse_grid(args.grid)
        base = {k: v[0] for k, v in parse_grid(args.base).items()}
    except ValueError as error:
        parser.error(str(error))
    negatives = config.evaluation.n_negatives if args.valid_negatives is None else args.valid_negatives
    if negatives != config.stopping.valid_negatives:
        stopping = config.stopping.model_dump() | {"valid_negatives": negatives}
        config = config.model_copy(update={"stopping": type(config.stopping).model_validate(stopping)})
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if bad := [s for s in stages if s not in STAGES]:
        parser.error(f"--stages: unknown {bad}; choose from {list(STAGES)}")
    threads = {} if args.threads is None else {"threads": args.threads}
    for model in models:
        common = {k: v for k, v in base.items() if k in IALS_KEYS or model == "cdimf"}
        config = with_settings(config, model, {**common, **threads})
    for model in models:
        for settings in product(grid) or [{}]:
            try:  # reject a bad grid value before any candidate trains
                with_settings(config, model, settings)
            except ValueError as error:
                parser.error(f"--grid for {model}: {error}")
    data = load_validation(config)
    trials: list[Trial] = []
    best: dict[str, Trial] = {}
    for model in models:
        search = Search(config, model, data, lambda t: print(format_trial(t), file=sys.stderr, flush=True))
        if grid:
            search.stage("grid", product(grid))
        else:
            staged(search, data, stages)
        trials += search.trials
        best[model] = max(search.trials, key=lambda t: t.valid_ndcg)
    if args.json:
        print(json.dumps({"config": str(args.config), "trials": [asdict(t) for t in trials],
                          "best": {m: asdict(t) for m, t in best.items()}}, indent=2))
    else:
        print(format_table(trials, config.evaluation.k))
    return 0


if __name__ == "__main__":
    sys.exit(main())
