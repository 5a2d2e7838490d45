"""Before/after of a change: run the same benchmarks in two checkouts, alternating, and print after/before ratios.

    python benchmarks/compare_trees.py BEFORE_CHECKOUT AFTER_CHECKOUT [--alternations 2] [--quick]

Each checkout needs its own environment in CHECKOUT/.venv (`python3 -m venv .venv &&
.venv/bin/pip install -e '.[dev]'`). The arms take turns (before, after, before, after, ...)
so load that drifts on a shared machine hits both alike; each arm's figure is the median of its
runs. Figures compared: the solver's CPU per epoch relative to implicit's CG in the same run
(benchmarks/als_vs_implicit.py's ratio_cpu_exact_vs_implicit_cg, lower is better), push and pull
throughput (benchmarks/exchange_throughput.py --json, higher is better) and the federated
overhead (benchmarks/federated_overhead.py's ratio_default_config, lower is better).
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path


def _run(checkout: Path, script: str, arguments: list[str]) -> str:
    """Run one benchmark script of a checkout with that checkout's interpreter; its stdout."""
    python = checkout / ".venv" / "bin" / "python"
    done = subprocess.run([str(python), f"benchmarks/{script}", *arguments], cwd=checkout, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        sys.exit(f"{checkout}: {script} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def _ratio_line(text: str, name: str) -> float:
    """The value of a `name=value` line."""
    match = re.search(rf"^{name}=([0-9.]+)", text, re.M)
    if match is None:
        sys.exit(f"no {name}= line in:\n{text[-2000:]}")
    return float(match.group(1))


def measures(checkout: Path, quick: bool) -> dict[str, float]:
    """One pass of every benchmark in a checkout."""
    size = ["--size", "S", "--rounds", "2"] if quick else ["--size", "M", "--rounds", "2"]
    als = _run(checkout, "als_vs_implicit.py", [*size, "--threads", "1"])
    users = ["--users", "250000", "--repeat", "3"] if quick else ["--repeat", "3"]
    exchange = json.loads(_run(checkout, "exchange_throughput.py", [*users, "--json"]))
    overhead = _run(checkout, "federated_overhead.py", ["--repeats", "1"])
    return {
        "solver_cpu_vs_implicit_cg (lower better)": _ratio_line(als, "ratio_cpu_exact_vs_implicit_cg"),
        "push_mb_s (higher better)": exchange["push_mb_s"],
        "pull_mb_s (higher better)": exchange["pull_mb_s"],
        "push_closing_round_mb_s (higher better)": exchange["push_closing_round_mb_s"],
        "federated_overhead_ratio (lower better)": _ratio_line(overhead, "ratio_default_config"),
    }


def main() -> None:
    """Alternate the two checkouts and print each figure's medians and after/before ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--alternations", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (S solver case, 250k x 64 exchange)")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for turn in range(args.alternations):
        for arm in ("before", "after"):
            figures = measures(getattr(args, arm), args.quick)
            runs[arm].append(figures)
            print(f"turn {turn + 1} {arm}: " + ", ".join(f"{k.split(' ')[0]}={v:.3f}" for k, v in figures.items()), flush=True)
    for name in runs["before"][0]:
        before = statistics.median(run[name] for run in runs["before"])
        after = statistics.median(run[name] for run in runs["after"])
        print(f"{name}: before {before:.3f}  after {after:.3f}  after/before {after / before:.3f}")


if __name__ == "__main__":
    main()
