"""Federated overhead: `cdimf simulate` (separate processes, gRPC on loopback, mutual TLS) vs the in-process engine.

    python benchmarks/federated_overhead.py [--rounds 10] [--rank 64] [--repeats 3] [--insecure] [--secure]

The target: federated `cdimf simulate` on warm Sport&Cloth vs the in-process engine with
the same config, wall-time ratio <= 1.10. Both arms do the same work with the simulation's
default config (configs/warm-sport-cloth.toml's CDIMF hyperparameters, synchronous rounds, same
rounds and rank): load each domain's own files (validation carved from train, candidates
drawn), train R rounds, validate when `ValidationParams.due` says so (the nodes' rule), then
evaluate each domain on its test split. Two settings, each measured on both arms:

  (a) per-round validation off on both sides (`--validation-every 0`): training + exchange;
  (b) the default per-round validation on both sides (every round, 99 negatives, k = 10).

Both arms are whole jobs in a fresh interpreter, timed by this script from process start to exit:
simulate is `python -m cdimf simulate` (four interpreters, throwaway certificates, data loading,
pseudonyms, registration, the run, test evaluation and shutdown); the engine is this script
re-run with --engine-only (its imports, loading, rounds, validation and test evaluation). Timing
the engine inside this process instead would leave out the ~1 s of imports that the simulate
arm pays, and flatter the engine. Also shown: the run itself (simulate: StartRun to the end of
the watch, the JSON's train_seconds; engine: its rounds and validation).

Load on a shared machine varies: --repeats N alternates the arms N times and reports medians
(and the 1-minute load average before and after). The last two lines are the median whole-job
ratios: `ratio_default_config=` for (b), simulate as shipped against the engine with the same
config (the target), and `ratio_validation_off=` for (a), the exchange with nothing to dilute it.

--secure: setting (a) also runs `cdimf simulate --secure-aggregation` in each repeat, between the
other two arms; `ratio_secure_vs_plain=` is the median whole-job ratio of the secure simulation
to the plain one of the same repeat (the cost of masking, ring sums and unmasking), and
`ratio_secure_vs_engine=` the secure simulation against the engine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from cdimf.common.config import ValidationParams  # noqa: E402
from cdimf.common.core.evaluation import evaluate  # noqa: E402
from cdimf.domain_node.node_data import load_node_data  # noqa: E402
from cdimf.engine import CDIMFEngine, DomainInput  # noqa: E402
from cdimf.simulate import SimulateConfig  # noqa: E402


@dataclass(frozen=True)
class Timing:
    """One arm's wall seconds (whole job and the run itself) and each domain's test metrics."""

    whole_s: float
    run_s: float
    metrics: dict[str, dict[str, float]]


def simulation_config(rank: int | None) -> SimulateConfig:
    """The simulation's default config, at `rank` when given."""
    config = SimulateConfig()
    if rank is not None:
        config = config.model_copy(update={"run": config.run.model_copy(update={"rank": rank})})
    return config


def engine_arm(config: SimulateConfig, rounds: int, validation: ValidationParams) -> Timing:
    """The in-process job: load, R rounds with the nodes' validation rule, test evaluation."""
    started = time.perf_counter()
    data = [load_node_data(d.name, d.train_path, d.valid_path, d.test_path, d.data_format, valid_negatives=validation.negatives)
            for d in config.domains]
    ials = config.ials.at_rank(config.run.rank)
    engine = CDIMFEngine([DomainInput(d.domain, d.users.keys, d.train, ials, config.run.period_for(d.domain)) for d in data],
                         config.run.admm)
    run_started = time.perf_counter()
    for round_index in range(1, rounds + 1):
        engine.step()
        if validation.due(round_index, rounds):
            for domain, trainer in zip(data, engine.trainers):
                if domain.valid is not None:
                    evaluate(domain.valid, trainer.scoring_users(), trainer.state.items, domain.train, validation.k)
    run_s = time.perf_counter() - run_started
    results = {}
    for domain, trainer in zip(data, engine.trainers):
        split = "test" if domain.test is not None else "valid"
        results[domain.domain] = evaluate(domain.split(split), trainer.scoring_users(), trainer.state.items, domain.train, config.k)
    return Timing(time.perf_counter() - started, run_s, results)


def _validation_flags(validation: ValidationParams) -> list[str]:
    """The command-line flags of a validation setting (shared by both arms' commands)."""
    return ["--validation-every", str(validation.every), "--validation-negatives", str(validation.negatives),
            "--validation-k", str(validation.k)]


def _timed(command: list[str]) -> tuple[float, str]:
    """Run a command from REPO_ROOT; (wall seconds from start to exit, its stdout); exits on failure."""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=3600)
    whole_s = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return whole_s, done.stdout


def engine_process_arm(rounds: int, rank: int, validation: ValidationParams) -> Timing:
    """The engine arm as a whole job: this script with --engine-only in a fresh interpreter."""
    command = [sys.executable, str(Path(__file__).resolve()), "--engine-only", "--rounds", str(rounds), "--rank", str(rank),
               *_validation_flags(validation)]
    whole_s, stdout = _timed(command)
    inner = json.loads(stdout)
    return Timing(whole_s, inner["run_s"], inner["metrics"])


def simulate_arm(rounds: int, rank: int, insecure: bool, validation: ValidationParams, secure: bool = False) -> tuple[Timing, str]:
    """`cdimf simulate --rounds R --rank D --json` with the same validation settings (secure: with secure aggregation); (timing, transport)."""
    command = [sys.executable, "-m", "cdimf", "simulate", "--rounds", str(rounds), "--rank", str(rank), "--json",
               *_validation_flags(validation), *(["--insecure"] if insecure else []), *(["--secure-aggregation"] if secure else [])]
    whole_s, stdout = _timed(command)
    results = json.loads(stdout)
    # simulate labels its metrics in % ("test HR@10 (999 neg)": 12.5); the engine arm's are fractions keyed "HR@10"
    metrics = {name: {label.split()[1]: value / 100 for label, value in row["metrics"].items()} for name, row in results["domains"].items()}
    return Timing(whole_s, results["train_seconds"], metrics), results["transport"]


def main() -> None:
    """Measure (a) without and (b) with per-round validation on both arms; print median times and ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default: the simulation's default)")
    parser.add_argument("--rank", type=int, default=None, help="rank (default: the simulation's default)")
    parser.add_argument("--repeats", type=int, default=1, help="measure each arm this many times (alternating) and take medians")
    parser.add_argument("--insecure", action="store_true", help="plaintext gRPC instead of mutual TLS")
    parser.add_argument("--secure", action="store_true", help="also time setting (a) with secure aggregation (masked exchange)")
    parser.add_argument("--engine-only", action="store_true", help=argparse.SUPPRESS)  # the engine arm's child
    parser.add_argument("--validation-every", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--validation-negatives", type=int, default=ValidationParams().negatives, help=argparse.SUPPRESS)
    parser.add_argument("--validation-k", type=int, default=ValidationParams().k, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    config = simulation_config(args.rank)
    rounds = args.rounds or config.run.rounds
    if args.engine_only:
        validation = ValidationParams(every=args.validation_every, negatives=args.validation_negatives, k=args.validation_k)
        print(json.dumps(asdict(engine_arm(config, rounds, validation))))
        return
    settings = {"(a) validation off": ValidationParams(every=0), "(b) default validation": ValidationParams()}
    load_before = os.getloadavg()
    measured: dict[str, list[tuple[Timing, Timing]]] = {label: [] for label in settings}
    transport = ""
    secure_runs: list[tuple[Timing, Timing, Timing]] = []  # (secure simulate, plain simulate, engine) of setting (a)
    for repeat in range(args.repeats):
        for label, validation in settings.items():
            # alternate which arm goes first, so that a drifting load favours neither
            if repeat % 2 == 0:
                simulated, transport = simulate_arm(rounds, config.run.rank, args.insecure, validation)
                engine = engine_process_arm(rounds, config.run.rank, validation)
            else:
                engine = engine_process_arm(rounds, config.run.rank, validation)
                simulated, transport = simulate_arm(rounds, config.run.rank, args.insecure, validation)
            measured[label].append((simulated, engine))
            if args.secure and validation.every == 0:
                secured, _ = simulate_arm(rounds, config.run.rank, args.insecure, validation, secure=True)
                secure_runs.append((secured, simulated, engine))
                print(f"# repeat {repeat + 1} {label}: secure simulate {secured.whole_s:.2f} s, ratio to plain "
                      f"{secured.whole_s / simulated.whole_s:.3f}", flush=True)
            print(f"# repeat {repeat + 1} {label}: simulate {simulated.whole_s:.2f} s, engine {engine.whole_s:.2f} s, "
                  f"ratio {simulated.whole_s / engine.whole_s:.3f}, 1-min load {os.getloadavg()[0]:.2f}", flush=True)
    load_after = os.getloadavg()
    k = config.k
    print(f"warm Sport&Cloth, {rounds} rounds, rank {config.run.rank}, simulate over {transport}, {os.cpu_count()} cores, "
          f"{args.repeats} repeat(s), medians; 1-min load average {load_before[0]:.2f} -> {load_after[0]:.2f}")
    whole_ratio: dict[str, float] = {}
    for label, pairs in measured.items():
        validation = settings[label]
        sim_whole = statistics.median(s.whole_s for s, _ in pairs)
        eng_whole = statistics.median(e.whole_s for _, e in pairs)
        sim_run = statistics.median(s.run_s for s, _ in pairs)
        eng_run = statistics.median(e.run_s for _, e in pairs)
        whole_ratio[label] = statistics.median(s.whole_s / e.whole_s for s, e in pairs)
        print(f"{label} (every {validation.every}, {validation.negatives} negatives, k {validation.k}):")
        print(f"  whole job:  cdimf simulate process {sim_whole:8.2f} s   engine process {eng_whole:8.2f} s   "
              f"ratio {whole_ratio[label]:6.3f}")
        print(f"  run itself: simulate StartRun..end  {sim_run:8.2f} s   engine rounds  {eng_run:8.2f} s   "
              f"ratio {statistics.median(s.run_s / e.run_s for s, e in pairs):6.3f}")
    simulated, engine = measured["(a) validation off"][0]
    for name, metrics in engine.metrics.items():
        fed = simulated.metrics[name]
        print(f"  test {name:<6} HR@{k} engine {100 * metrics[f'HR@{k}']:.2f} federated {100 * fed[f'HR@{k}']:.2f}   "
              f"NDCG@{k} engine {100 * metrics[f'NDCG@{k}']:.2f} federated {100 * fed[f'NDCG@{k}']:.2f}")
    # (b) is `cdimf simulate` as shipped (per-round validation, what the CLI reports) against the
    # engine with the same config: the target. (a) isolates the exchange: no validation work
    # dilutes it, and on 2 cores the four processes compete for the CPU the engine has to itself.
    print(f"ratio_default_config={whole_ratio['(b) default validation']:.3f}  (target <= 1.10)")
    print(f"ratio_validation_off={whole_ratio['(a) validation off']:.3f}  (exchange overhead isolated)")
    if secure_runs:
        secured, plain, _ = secure_runs[0]
        for name, metrics in plain.metrics.items():
            print(f"  test {name:<6} HR@{k} plain {100 * metrics[f'HR@{k}']:.2f} secure {100 * secured.metrics[name][f'HR@{k}']:.2f}   "
                  f"NDCG@{k} plain {100 * metrics[f'NDCG@{k}']:.2f} secure {100 * secured.metrics[name][f'NDCG@{k}']:.2f}")
        print(f"ratio_secure_vs_plain={statistics.median(s.whole_s / p.whole_s for s, p, _ in secure_runs):.3f}  "
              f"(run itself {statistics.median(s.run_s / p.run_s for s, p, _ in secure_runs):.3f}; validation off)")
        print(f"ratio_secure_vs_engine={statistics.median(s.whole_s / e.whole_s for s, _, e in secure_runs):.3f}  (validation off)")


if __name__ == "__main__":
    main()
