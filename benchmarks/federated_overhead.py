"""Federated overhead: `cdimf simulate` (separate processes, gRPC on loopback, mutual TLS) vs the in-process engine.

    python benchmarks/federated_overhead.py [--rounds 10] [--insecure]

Both arms do the same job on the embedded warm Sport&Cloth pair with the simulation's default
config (configs/warm-sport-cloth.toml's CDIMF hyperparameters, synchronous rounds):
load each domain's own files (validation carved from train, candidates drawn), train R rounds,
evaluate each domain on its validation split after every round (what the nodes report), then
on its test split. The engine arm runs in this process (imports already done: no interpreter
start-up is charged to it); the simulate arm is the wall time of the `cdimf simulate` process
(four interpreters, throwaway certificates, pseudonyms, registration, gRPC). Target (issue 4):
simulate / engine <= 1.10. Also printed: the engine without per-round validation, the load
average, and both arms' test metrics (equal up to float rounding: same seeds, same factors).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from cdimf.engine import CDIMFEngine, DomainInput  # noqa: E402
from cdimf.simulate import SimulateConfig  # noqa: E402
from domain_node.node_data import evaluate, load_node_data  # noqa: E402


def engine_arm(config: SimulateConfig, rounds: int, validate: bool) -> tuple[float, dict[str, dict[str, float]]]:
    """Wall seconds of the in-process job and each domain's test metrics."""
    started = time.perf_counter()
    data = [load_node_data(d.name, d.train_path, d.valid_path, d.test_path, d.data_format) for d in config.domains]
    ials = config.ials.model_copy(update={"rank": config.run.rank})
    engine = CDIMFEngine([DomainInput(d.domain, d.users.keys, d.train, ials, config.run.period_for(d.domain)) for d in data],
                         config.run.admm)
    for _ in range(rounds):
        engine.step()
        if validate:
            for domain, trainer in zip(data, engine.trainers):
                evaluate(domain.split("valid"), trainer.scoring_users(), trainer.state.items, domain.train, config.k)
    results = {}
    for domain, trainer in zip(data, engine.trainers):
        split = "test" if domain.test is not None else "valid"
        results[domain.domain] = evaluate(domain.split(split), trainer.scoring_users(), trainer.state.items, domain.train, config.k)
    return time.perf_counter() - started, results


def simulate_arm(rounds: int, insecure: bool) -> tuple[float, dict]:
    """Wall seconds of `cdimf simulate --rounds R --json` and its results."""
    command = [sys.executable, "-m", "cdimf", "simulate", "--rounds", str(rounds), "--json", *(["--insecure"] if insecure else [])]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"cdimf simulate failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, json.loads(done.stdout)


def main() -> None:
    """Run both arms once each and print the ratio."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default: the simulation's default)")
    parser.add_argument("--insecure", action="store_true", help="plaintext gRPC instead of mutual TLS")
    args = parser.parse_args()
    config = SimulateConfig()
    rounds = args.rounds or config.run.rounds
    load_before = os.getloadavg()
    simulate_s, simulated = simulate_arm(rounds, args.insecure)
    engine_s, engine_metrics = engine_arm(config, rounds, validate=True)
    engine_train_s, _ = engine_arm(config, rounds, validate=False)
    load_after = os.getloadavg()
    k = config.k
    print(f"warm Sport&Cloth, {rounds} rounds, rank {config.run.rank}, {os.cpu_count()} cores, "
          f"load average {load_before[0]:.2f} -> {load_after[0]:.2f}")
    print(f"  cdimf simulate ({simulated['transport']}):        {simulate_s:8.2f} s  (run start to finish {simulated['train_seconds']:.2f} s)")
    print(f"  in-process engine, same job:                {engine_s:8.2f} s")
    print(f"  in-process engine, no per-round validation: {engine_train_s:8.2f} s")
    print(f"  ratio simulate / engine (target <= 1.10):   {simulate_s / engine_s:8.3f}")
    print(f"  ratio simulate / engine without validation: {simulate_s / engine_train_s:8.3f}")
    for name, metrics in engine_metrics.items():
        fed = simulated["domains"][name]
        print(f"  {name:<6} HR@{k} engine {100 * metrics[f'HR@{k}']:.2f} federated {100 * fed[f'HR@{k}']:.2f}   "
              f"NDCG@{k} engine {100 * metrics[f'NDCG@{k}']:.2f} federated {100 * fed[f'NDCG@{k}']:.2f}")


if __name__ == "__main__":
    main()
