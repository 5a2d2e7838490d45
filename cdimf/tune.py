"""`cdimf tune CONFIG`: choose `cdimf reproduce` hyperparameters on validation rows only, with Optuna.

Usage:
    cdimf tune warm-sport-cloth --trials 30                    # every model, 30 trials each
    cdimf tune my-pair.toml --models cdimf --timeout 600 --output my-pair-tuned.toml
    cdimf tune CONFIG --json > trials.json                     # every trial, machine-readable

One Optuna study per model (TPE, seeded; the config's own values are its first trial, so the
winner is never worse on validation than where it started). A trial trains round by round on
the training matrices and is scored after each round by the mean validation NDCG@k over the
domains; it stops when that has not improved for [stopping] patience rounds, and the median
pruner stops it early when its best so far falls below the median of earlier trials at the same
round. Its value is its best round's NDCG@k. Validation rows get the test's number of negatives
([evaluation] n_negatives) unless --valid-negatives says otherwise; the written config's [stopping]
valid_negatives is set to that number, so `cdimf reproduce` early-stops on the same protocol.

The search space: rank (shared by the domains) up to --max-rank (512); each domain's own alpha
(1e-3..1, log), lambda (1e-3..10, log) and nu (0..1), or one set for all with --shared-local
(ALS-joined has one set: it is one model); for CDIMF also the consensus: off (rho = 0, each
domain alone) or rho 0.1..50 (log) with the identity or the L2 prox (lambda_z 1e-3..10, log),
and the aggregation period (1..3 local epochs per exchange).

Only the training files and the validation rows (the valid files, or the leave-one-out split
carved from train) are read: the test files are never opened. The winners are written as a
runnable reproduce config (--output) whose comments summarise the trials; progress goes to
stderr, one line per trial.
"""

import argparse
import json
import math
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cdimf.common.core.evaluation import HeldOut
from cdimf.pairs import DomainSplit
from cdimf.reproduce import CDIMF, Contender, JoinedALS, SeparateALS, held_out, load_splits, score
from cdimf.reproduce_config import ReproduceConfig, load_reproduce_config
from cdimf.resources import config_path

MODELS = ("separate", "joined", "cdimf")
RANKS = (16, 32, 64, 128, 192, 256, 384, 512)
ALPHA = (1e-3, 1.0)
LAM = (1e-3, 10.0)
NU = (0.0, 1.0)
RHO = (0.1, 50.0)
LAMBDA_Z = (1e-3, 10.0)
PERIOD = (1, 3)
LOCAL_KEYS = ("alpha", "lam", "nu")


@dataclass
class TrialRecord:
    """One trial's outcome on validation: its values, state, best mean NDCG@k and that round."""

    model: str
    number: int
    state: str
    params: dict[str, Any]
    valid_ndcg: float
    rounds: int
    seconds: float
    history: list[float] = field(default_factory=list)
    cut_by_timeout: bool = False


@dataclass
class Validation:
    """What every trial trains and is scored on: the pair's training matrices and validation rows."""

    splits: list[DomainSplit]
    held: list[HeldOut]
    user_keys: np.ndarray


def load_validation(config: ReproduceConfig, negatives: int) -> Validation:
    """The training matrices and validation candidates; the test files are never opened."""
    splits, _ = load_splits(config, with_test=False)
    held = [held_out(s, "valid", negatives, config.evaluation.seed) for s in splits]
    return Validation(splits, held, splits[0].users.keys)


def domain_names(config: ReproduceConfig) -> list[str]:
    """The pair's domain names in config order."""
    return [d.name for d in config.domains]


def _clamp(value: float, bounds: tuple[float, float]) -> float:
    """A value moved into the search range (the config's own values start the search)."""
    return float(min(max(value, bounds[0]), bounds[1]))


def baseline_params(config: ReproduceConfig, model: str, per_domain: bool) -> dict[str, Any]:
    """The config's own values of one model in the study's parameter names (the first trial)."""
    params: dict[str, Any] = {}
    if model == "joined":
        section = config.joined
        params["rank"] = section.rank
        params.update(alpha=_clamp(section.alpha, ALPHA), lam=_clamp(section.lam, LAM), nu=_clamp(section.nu, NU))
        return params
    per = config.separate if model == "separate" else config.cdimf.ials
    params["rank"] = per.rank
    for name in domain_names(config) if per_domain else [None]:
        local = per.for_domain(name) if name is not None else per
        suffix = f".{name}" if name is not None else ""
        params.update({f"alpha{suffix}": _clamp(local.alpha, ALPHA), f"lam{suffix}": _clamp(local.lam, LAM),
                       f"nu{suffix}": _clamp(local.nu, NU)})
    if model == "cdimf":
        admm = config.cdimf.admm
        params["consensus"] = "on" if admm.rho > 0 else "off"
        if admm.rho > 0:
            params["rho"] = _clamp(admm.rho, RHO)
            params["prox"] = admm.prox if admm.prox in ("identity", "l2") else "identity"
            if params["prox"] == "l2":
                params["lambda_z"] = _clamp(admm.lambda_z, LAMBDA_Z)
        params["aggregation_period"] = int(_clamp(config.cdimf.aggregation_period, PERIOD))
    return params


def suggest(trial: Any, model: str, names: Sequence[str], ranks: Sequence[int], per_domain: bool, nu_free: bool = True) -> dict[str, Any]:
    """One point of the search space (Optuna's define-by-run: the consensus settings are conditional).

    `nu_free` False holds nu at 0 (CDIMF's "reference-code" user step is defined for nu = 0 only).
    """
    params: dict[str, Any] = {"rank": trial.suggest_categorical("rank", list(ranks))}
    suffixes = [f".{n}" for n in names] if per_domain and model != "joined" else [""]
    for suffix in suffixes:
        params[f"alpha{suffix}"] = trial.suggest_float(f"alpha{suffix}", *ALPHA, log=True)
        params[f"lam{suffix}"] = trial.suggest_float(f"lam{suffix}", *LAM, log=True)
        params[f"nu{suffix}"] = trial.suggest_float(f"nu{suffix}", *NU) if nu_free else 0.0
    if model == "cdimf":
        params["consensus"] = trial.suggest_categorical("consensus", ["on", "off"])
        if params["consensus"] == "on":
            params["rho"] = trial.suggest_float("rho", *RHO, log=True)
            params["prox"] = trial.suggest_categorical("prox", ["identity", "l2"])
            if params["prox"] == "l2":
                params["lambda_z"] = trial.suggest_float("lambda_z", *LAMBDA_Z, log=True)
        params["aggregation_period"] = trial.suggest_int("aggregation_period", *PERIOD)
    return params


def with_params(config: ReproduceConfig, model: str, params: dict[str, Any], threads: int | None = None) -> ReproduceConfig:
    """The config with one model's section set from a trial's values; pydantic validates them."""
    raw = config.model_dump(mode="json", exclude_none=True)
    section = raw["joined"] if model == "joined" else raw["separate"] if model == "separate" else raw["cdimf"]["ials"]
    section["rank"] = int(params["rank"])
    if threads is not None:
        section["threads"] = threads
    if all(key in params for key in LOCAL_KEYS):
        section.update({key: float(params[key]) for key in LOCAL_KEYS})
        if model != "joined":
            section["domains"] = {}
    else:
        section["domains"] = {name: {key: float(params[f"{key}.{name}"]) for key in LOCAL_KEYS} for name in domain_names(config)}
    if model == "cdimf":
        on = params.get("consensus", "on") == "on"
        raw["cdimf"]["admm"] = {"rho": float(params["rho"]) if on else 0.0, "prox": params.get("prox", "identity") if on else "identity",
                                "lambda_z": float(params.get("lambda_z", 0.0)) if on else 0.0}
        raw["cdimf"]["aggregation_period"] = int(params["aggregation_period"])
    return ReproduceConfig.model_validate(raw)


def make_contender(config: ReproduceConfig, model: str, data: Validation) -> Contender:
    """The reproduce contender for `model` on the validation split's training matrices."""
    trains = [s.train for s in data.splits]
    if model == "separate":
        return SeparateALS(trains, config)
    if model == "joined":
        return JoinedALS(trains, config)
    return CDIMF(trains, config, data.user_keys)


class Objective:
    """Trains one trial round by round, reports its best validation NDCG@k so far, prunes and early-stops."""

    def __init__(self, config: ReproduceConfig, model: str, data: Validation, per_domain: bool, ranks: Sequence[int],
                 threads: int | None, deadline: float | None, report: Callable[[TrialRecord], None]) -> None:
        self.config, self.model, self.data, self.per_domain, self.ranks = config, model, data, per_domain, ranks
        self.threads, self.deadline, self.report = threads, deadline, report
        self.records: list[TrialRecord] = []

    def __call__(self, trial: Any) -> float:
        """One trial: its value is the best round's mean validation NDCG@k."""
        import optuna

        nu_free = self.model != "cdimf" or self.config.cdimf.user_step == "paper"
        params = suggest(trial, self.model, domain_names(self.config), self.ranks, self.per_domain, nu_free)
        candidate = with_params(self.config, self.model, params, self.threads)
        started = time.perf_counter()
        contender = make_contender(candidate, self.model, self.data)
        trains = [s.train for s in self.data.splits]
        k, stopping = self.config.evaluation.k, self.config.stopping
        history: list[float] = []
        best, best_round, cut = -1.0, 0, False
        for round_no in range(1, stopping.max_rounds + 1):
            contender.step()
            value = float(np.mean([m[f"NDCG@{k}"] for m in score(contender.vectors(), self.data.held, trains, k)]))
            history.append(value)
            if value > best:
                best, best_round = value, round_no
            elif round_no - best_round >= stopping.patience:
                break
            trial.report(best, round_no)
            if trial.should_prune():
                self._record(trial.number, "pruned", params, best, best_round, started, history, False)
                raise optuna.TrialPruned()
            if self.deadline is not None and time.monotonic() > self.deadline:
                cut = True  # the time budget ends here: keep what this trial reached
                break
        self._record(trial.number, "complete", params, best, best_round, started, history, cut)
        return best

    def _record(self, number: int, state: str, params: dict[str, Any], best: float, rounds: int, started: float,
                history: list[float], cut: bool) -> None:
        """Keep and report one finished trial."""
        record = TrialRecord(self.model, number, state, params, best, rounds, time.perf_counter() - started, history, cut)
        self.records.append(record)
        self.report(record)


def run_study(config: ReproduceConfig, model: str, data: Validation, args: argparse.Namespace,
              report: Callable[[TrialRecord], None]) -> list[TrialRecord]:
    """One model's study: the config's values first, then TPE; stops at --trials or --timeout."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # the rank is categorical: the usual ranks up to --max-rank, --max-rank itself and every starting point's
    starts = {int(start["rank"]) for start in args.start if "rank" in start}
    if not args.no_baseline:
        starts.add(int(baseline_params(config, model, True)["rank"]))
    ranks = sorted({r for r in RANKS if r <= args.max_rank} | {args.max_rank} | starts)
    sampler = optuna.samplers.TPESampler(seed=args.seed, n_startup_trials=args.startup_trials)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=args.startup_trials, n_warmup_steps=args.warmup_rounds)
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner, study_name=f"cdimf-tune-{model}")
    per_domain = not args.shared_local
    if not args.no_baseline:
        study.enqueue_trial(baseline_params(config, model, per_domain))
    for start in args.start:
        study.enqueue_trial(start)  # keys it leaves out are sampled
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    objective = Objective(config, model, data, per_domain, ranks, args.threads, deadline, report)
    study.optimize(objective, n_trials=args.trials, timeout=args.timeout, catch=())
    return objective.records


def parse_start(text: str) -> dict[str, Any]:
    """`key=value,...` as trial parameters: numbers where they parse, else strings (prox, consensus)."""
    params: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"'{item}': expected key=value")
        key, value = key.strip(), value.strip()
        try:
            params[key] = int(value) if key in ("rank", "aggregation_period") else float(value)
        except ValueError:
            params[key] = value
    return params


def best_record(records: Sequence[TrialRecord]) -> TrialRecord | None:
    """The complete trial with the highest validation NDCG@k (the earliest on a tie)."""
    complete = [r for r in records if r.state == "complete"]
    return max(complete, key=lambda r: (r.valid_ndcg, -r.number)) if complete else None


def shown(params: dict[str, Any]) -> str:
    """A trial's values on one line, numbers to three significant digits."""
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def format_record(record: TrialRecord, total: int | None = None) -> str:
    """One progress line."""
    count = f"{record.number + 1}/{total}" if total else f"{record.number + 1}"
    cut = " (cut by --timeout)" if record.cut_by_timeout else ""
    return (f"{record.model:<8} trial {count:>7} {record.state:<8} NDCG {100 * record.valid_ndcg:6.2f} % at round {record.rounds:>3}"
            f" {record.seconds:7.1f} s{cut}  {shown(record.params)}")


# --- the tuned config as TOML ---------------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(name: str) -> str:
    """A TOML key, quoted unless bare."""
    return name if _BARE_KEY.match(name) else json.dumps(name)


def _value(value: Any) -> str:
    """A TOML value of the config's kinds (numbers, strings, booleans, lists)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write {value} to TOML")
        text = repr(value)
        return text if any(c in text for c in ".en") else f"{text}.0"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _table(lines: list[str], path: list[str], table: dict[str, Any]) -> None:
    """A table's plain values, then its sub-tables and arrays of tables."""
    for name, value in table.items():
        if not isinstance(value, dict) and not (isinstance(value, list) and value and isinstance(value[0], dict)):
            lines.append(f"{_key(name)} = {_value(value)}")
    for name, value in table.items():
        if isinstance(value, dict) and value:
            if any(not isinstance(v, dict) for v in value.values()):  # a table of tables needs no header of its own
                lines += ["", f"[{'.'.join(_key(p) for p in [*path, name])}]"]
            _table(lines, [*path, name], value)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for entry in value:
                lines += ["", f"[[{'.'.join(_key(p) for p in [*path, name])}]]"]
                _table(lines, [*path, name], entry)


def render_config(config: ReproduceConfig, folder: Path, comments: Sequence[str]) -> str:
    """The config as TOML (data paths relative to `folder`, where it will be written), comments first."""
    raw = config.model_dump(mode="json", exclude_none=True)
    for domain in raw["domains"]:
        for key in ("train_path", "test_path", "valid_path"):
            if key in domain:
                domain[key] = os.path.relpath(domain[key], folder.resolve())
    lines = [f"# {line}" if line else "#" for line in comments]
    _table(lines, [], raw)
    return "\n".join(lines) + "\n"


def summary(model: str, records: Sequence[TrialRecord], k: int, top: int = 5, baseline_first: bool = True) -> list[str]:
    """Comment lines on one model's study: counts, the baseline, the best few trials."""
    if not records:
        return [f"{model}: no trial ran"]
    pruned = sum(r.state == "pruned" for r in records)
    seconds = sum(r.seconds for r in records)
    lines = [f"{model}: {len(records)} trials ({pruned} pruned) in {seconds:.0f} s; validation NDCG@{k} %, best round:"]
    baseline = next((r for r in records if r.number == 0), None) if baseline_first else None
    ranked = sorted((r for r in records if r.state == "complete"), key=lambda r: -r.valid_ndcg)[:top]
    for record in ranked:
        tag = " (the source config's values)" if record is baseline else ""
        lines.append(f"  trial {record.number:>3}: {100 * record.valid_ndcg:6.2f} at round {record.rounds:>3}{tag}  {shown(record.params)}")
    if baseline is not None and baseline not in ranked:
        lines.append(f"  trial   0: {100 * baseline.valid_ndcg:6.2f} ({baseline.state}; the source config's values)")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Run one study per model, write the winners as a reproduce config, print the trials."""
    parser = argparse.ArgumentParser(prog="cdimf tune", allow_abbrev=False, description=(__doc__ or "").splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join((__doc__ or "").splitlines()[2:]))
    parser.add_argument("config", help="a shipped config by name or a reproduce config's path (TOML): the pair and the starting values")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of separate,joined,cdimf")
    parser.add_argument("--trials", type=int, default=20, help="trials per model, the config's own values included (default 20)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="wall-clock budget per model: no trial starts after it, and a running one stops at its next round")
    parser.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler (default 0)")
    parser.add_argument("--startup-trials", type=int, default=5, help="random trials before TPE models the space, and before pruning starts")
    parser.add_argument("--warmup-rounds", type=int, default=5, help="rounds a trial always runs before it may be pruned")
    parser.add_argument("--max-rank", type=int, default=512, help="largest rank tried (default 512)")
    parser.add_argument("--shared-local", action="store_true", help="one alpha/lam/nu for every domain instead of each domain's own")
    parser.add_argument("--no-baseline", action="store_true", help="do not start from the config's own values")
    parser.add_argument("--start", action="append", default=[], metavar="KEY=V,...",
                        help="an extra first trial, e.g. rank=256,alpha=0.3,nu=0.5 (names as in --json's params; repeatable)")
    parser.add_argument("--threads", type=int, default=None, help="solver threads of every trial (a run setting, not tuned)")
    parser.add_argument("--valid-negatives", type=int, default=None,
                        help="negatives per validation row (default: the config's [evaluation] n_negatives, so validation is scored like the test)")
    parser.add_argument("--output", type=Path, default=None,
                        help="where to write the tuned reproduce config (default: NAME-tuned.toml in the current folder)")
    parser.add_argument("--json", action="store_true", help="print every trial and the winners as JSON on stdout")
    args = parser.parse_args(argv)
    try:
        import optuna  # noqa: F401
    except ImportError:
        parser.error("cdimf tune needs Optuna: pip install 'cdimf[tune]'")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if bad := [m for m in models if m not in MODELS]:
        parser.error(f"--models: unknown {bad}; choose from {list(MODELS)}")
    for flag, value, least in (("--trials", args.trials, 1), ("--max-rank", args.max_rank, 1), ("--startup-trials", args.startup_trials, 0),
                               ("--warmup-rounds", args.warmup_rounds, 0), ("--valid-negatives", args.valid_negatives or 1, 1)):
        if value < least:
            parser.error(f"{flag}: must be >= {least}, got {value}")
    try:
        args.start = [parse_start(text) for text in args.start]
    except ValueError as error:
        parser.error(f"--start: {error}")
    if args.timeout is not None and args.timeout <= 0:
        parser.error(f"--timeout: must be > 0, got {args.timeout}")
    source = config_path(args.config)
    config = load_reproduce_config(source)
    output = args.output or Path(f"{source.stem}-tuned.toml")
    negatives = config.evaluation.n_negatives if args.valid_negatives is None else args.valid_negatives
    started = time.perf_counter()
    data = load_validation(config, negatives)
    records: dict[str, list[TrialRecord]] = {}
    for model in models:
        records[model] = run_study(config, model, data, args,
                                   lambda r: print(format_record(r, args.trials), file=sys.stderr, flush=True))
    wall = time.perf_counter() - started
    tuned = config
    best: dict[str, TrialRecord] = {}
    for model in models:
        winner = best_record(records[model])
        if winner is not None:
            best[model] = winner
            tuned = with_params(tuned, model, winner.params)
    # reproduce early-stops on [stopping] valid_negatives: it must be the protocol the trials were scored on, or
    # reproduce picks (and refits for) another round count than the winner's and the tune's choice is not what ships.
    # Writing the negatives rather than a fixed round count keeps reproduce choosing the round itself, so the same
    # config still stops correctly when its data or seed changes; its rounds equal the trial's when nothing did.
    tuned = tuned.model_copy(update={"stopping": tuned.stopping.model_copy(update={"valid_negatives": negatives})})
    tuned = tuned.model_copy(update={"title": config.title if config.title.endswith("(tuned)") else f"{config.title} (tuned)"})
    k = config.evaluation.k
    command = shlex.join(sys.argv[1:] if argv is None else list(argv))
    comments = [
        f"Tuned by `cdimf tune {command}` from {source.name}:",
        f"mean validation NDCG@{k} over the domains ({negatives} negatives per validation row), the best round by early",
        f"stopping ([stopping] patience {config.stopping.patience}, at most {config.stopping.max_rounds} rounds); the test files were never opened.",
        f"[stopping] valid_negatives = {negatives}: `cdimf reproduce` early-stops on the protocol the trials were scored on.",
        f"Wall time {wall:.0f} s. Sections of models not tuned are the source config's.",
        "",
    ]
    for model in models:
        comments += [*summary(model, records[model], k, baseline_first=not args.no_baseline), ""]
    output.write_text(render_config(tuned, output.parent, comments))
    load_reproduce_config(output)  # what was written must load back as it is
    print(f"wrote {output} (validation NDCG@{k}: " + ", ".join(f"{m} {100 * r.valid_ndcg:.2f} %" for m, r in best.items()) + ")",
          file=sys.stderr)
    if args.json:
        print(json.dumps({"config": str(source), "output": str(output), "wall_s": wall, "valid_negatives": negatives,
                          "trials": [asdict(r) for m in models for r in records[m]],
                          "best": {m: asdict(r) for m, r in best.items()}}, indent=2))
    else:
        for model in models:
            print("\n".join(summary(model, records[model], k, top=10, baseline_first=not args.no_baseline)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
