"""Per-epoch iALS solver time inside the cdimf image against outside it, in one run.

    python benchmarks/container_epoch.py [--image cdimf:local] [--rank 192] [--epochs 5]

Both sides time the same local epochs (users then items) of DomainTrainer on the embedded warm-start
Sport training file at the compose run's hyperparameters, with the backend each resolves ("auto"),
taking turns (outside, inside, outside, ...) so a shared machine's load drifts hit them alike.
The container gets the host's CPUs. Last line: `ratio_inside_vs_outside=<median inside / median outside>`.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

TRAIN = "data/amazon-cdr/warm-start_sport_cloth/sport_cloth/train.txt"


def inner(train_path: str, rank: int, epochs: int) -> dict[str, object]:
    """Seconds per epoch of `epochs` epochs here (after one warm-up epoch) and the backend used."""
    from cdimf.common.core.model import DomainTrainer
    from cdimf.common.core.params import IALSParams
    from cdimf.domain_node.node_data import load_node_data

    data = load_node_data("sport", Path(train_path), fmt="paper")
    trainer = DomainTrainer("sport", data.train, IALSParams(rank=rank, alpha=0.003, lam=1.0), rho=1.0)
    trainer.local_epochs(1)
    times = []
    for _ in range(epochs):
        started = time.perf_counter()
        trainer.local_epochs(1)
        times.append(time.perf_counter() - started)
    return {"backend": trainer.backend(), "epoch_s": statistics.median(times)}


def main() -> int:
    """Alternate outside and inside runs; print each and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="cdimf:local")
    parser.add_argument("--rank", type=int, default=192)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        print(json.dumps(inner(TRAIN, args.rank, args.epochs)))
        return 0
    root = Path(__file__).resolve().parent.parent
    inner_args = ["benchmarks/container_epoch.py", "--inner", "--rank", str(args.rank), "--epochs", str(args.epochs)]
    commands = {
        "outside": [sys.executable, *inner_args],
        "inside": ["docker", "run", "--rm", "--read-only", "--tmpfs", "/tmp", "-v", f"{root}/benchmarks:/srv/cdimf/benchmarks:ro",
                   "-v", f"{root}/data:/srv/cdimf/data:ro", "--entrypoint", "python", args.image, *inner_args],
    }
    seen: dict[str, list[float]] = {"outside": [], "inside": []}
    for _ in range(args.turns):
        for where, command in commands.items():
            done = subprocess.run(command, cwd=root, capture_output=True, text=True, check=True, timeout=1800)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            seen[where].append(float(result["epoch_s"]))
            print(f"{where:<8} backend {result['backend']:<7} {result['epoch_s']:.3f} s per epoch (rank {args.rank})", flush=True)
    ratio = statistics.median(seen["inside"]) / statistics.median(seen["outside"])
    print(f"ratio_inside_vs_outside={ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
