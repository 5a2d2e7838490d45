"""Federated overhead: `cdimf simulate` (separate processes, gRPC on loopback, mutual TLS) vs the in-process engine.

    python benchmarks/federated_overhead.py [--rounds 10] [--rank 64] [--insecure]

Issue 4's target: federated `cdimf simulate` on warm Sport&Cloth vs the in-process engine with
the same config, wall-time ratio <= 1.10. Both arms do the same work with the simulation's
default config (configs/warm-sport-cloth.toml's CDIMF hyperparameters, synchronous rounds, same
rounds and rank): load each domain's own files (validation carved from train, candidates
drawn), train R rounds, validate when `ValidationParams.due` says so (the nodes' rule), then
evaluate each domain on its test split. Two settings, each measured on both arms:

  (a) per-round validation off on both sides (`--validation-every 0`): training + exchange;
  (b) the default per-round validation on both sides (every round, 99 negatives, k = 10).

Per arm two times: the whole job (simulate: the `cdimf simulate` process from start to exit,
i.e. four interpreters, throwaway certificates, data loading, pseudonyms, registration, the run,
test evaluation and shutdown; engine: loading, rounds, validation and test evaluation in this
process, whose imports are already paid) and the run itself (simulate: StartRun to the end of
the watch, as the JSON's train_seconds; engine: its rounds and validation). The last line is
`ratio_simulate_vs_engine=<whole-job ratio of (a)>`.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from cdimf.engine import CDIMFEngine, DomainInput  # noqa: E402
from cdimf.simulate import SimulateConfig  # noqa: E402
from common.config import ValidationParams  # noqa: E402
from domain_node.node_data import evaluate, load_node_data  # noqa: E402


@dataclass(frozen=True)
class Timing:
    """One arm's wall seconds (whole job and the run itself) and each domain's test metrics."""

    whole_s: float
    run_s: float
    metrics: dict[str, dict[str, float]]


def engine_arm(config: SimulateConfig, rounds: int, validation: ValidationParams) -> Timing:
    """The in-process job: load, R rounds with the nodes' validation rule, test evaluation."""
    started = time.perf_counter()
    data = [load_node_data(d.name, d.train_path, d.valid_path, d.test_path, d.data_format, valid_negatives=validation.negatives)
            for d in config.domains]
    ials = config.ials.model_copy(update={"rank": config.run.rank})
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


def simulate_arm(rounds: int, rank: int, insecure: bool, validation: ValidationParams) -> tuple[Timing, str]:
    """`cdimf simulate --rounds R --rank D --json` with the same validation settings; (timing, transport)."""
    command = [sys.executable, "-m", "cdimf", "simulate", "--rounds", str(rounds), "--rank", str(rank), "--json",
               "--validation-every", str(validation.every), "--validation-negatives", str(validation.negatives),
               "--validation-k", str(validation.k), *(["--insecure"] if insecure else [])]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=3600)
    whole_s = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"cdimf simulate failed ({done.returncode}):\n{done.stderr[-3000:]}")
    results = json.loads(done.stdout)
    metrics = {name: {key: value for key, value in row.items() if key.startswith(("HR@", "NDCG@"))}
               for name, row in results["domains"].items()}
    return Timing(whole_s, results["train_seconds"], metrics), results["transport"]


def main() -> None:
    """Measure (a) without and (b) with per-round validation on both arms; print times and ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default: the simulation's default)")
    parser.add_argument("--rank", type=int, default=None, help="rank (default: the simulation's default)")
    parser.add_argument("--insecure", action="store_true", help="plaintext gRPC instead of mutual TLS")
    args = parser.parse_args()
    config = SimulateConfig()
    if args.rank is not None:
        config = config.model_copy(update={"run": config.run.model_copy(update={"rank": args.rank})})
    rounds = args.rounds or config.run.rounds
    settings = {"(a) validation off": ValidationParams(every=0), "(b) default validation": ValidationParams()}
    load_before = os.getloadavg()
    measured: dict[str, tuple[Timing, Timing]] = {}
    transport = ""
    for label, validation in settings.items():
        simulated, transport = simulate_arm(rounds, config.run.rank, args.insecure, validation)
        measured[label] = simulated, engine_arm(config, rounds, validation)
    load_after = os.getloadavg()
    k = config.k
    print(f"warm Sport&Cloth, {rounds} rounds, rank {config.run.rank}, simulate over {transport}, {os.cpu_count()} cores, "
          f"1-min load average {load_before[0]:.2f} -> {load_after[0]:.2f}")
    for label, (simulated, engine) in measured.items():
        validation = settings[label]
        print(f"{label} (every {validation.every}, {validation.negatives} negatives, k {validation.k}):")
        print(f"  whole job:  cdimf simulate process {simulated.whole_s:8.2f} s   engine {engine.whole_s:8.2f} s   "
              f"ratio {simulated.whole_s / engine.whole_s:6.3f}")
        print(f"  run itself: simulate StartRun..end  {simulated.run_s:8.2f} s   engine {engine.run_s:8.2f} s   "
              f"ratio {simulated.run_s / engine.run_s:6.3f}")
    simulated, engine = measured["(a) validation off"]
    for name, metrics in engine.metrics.items():
        fed = simulated.metrics[name]
        print(f"  test {name:<6} HR@{k} engine {100 * metrics[f'HR@{k}']:.2f} federated {100 * fed[f'HR@{k}']:.2f}   "
              f"NDCG@{k} engine {100 * metrics[f'NDCG@{k}']:.2f} federated {100 * fed[f'NDCG@{k}']:.2f}")
    print(f"ratio_simulate_vs_engine={simulated.whole_s / engine.whole_s:.3f}")


if __name__ == "__main__":
    main()
