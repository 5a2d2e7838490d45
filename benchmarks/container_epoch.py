"""Per-epoch iALS solver time inside the cdimf image against outside it, in one run, and where a gap comes from.

    python benchmarks/container_epoch.py [--image cdimf:local] [--rank 192] [--epochs 5] [--turns 3]
        [--python /usr/bin/python3-venv/bin/python ...]

Every side times the same local epochs (users then items) of DomainTrainer on the embedded warm-start
Sport training file at the compose run's hyperparameters, with the backend each resolves ("auto"),
taking turns (outside, inside, outside, ...) so a shared machine's load drifts hit them alike.
The container gets the host's CPUs. Each side also reports the CPU seconds of an epoch over all its
threads (`cpu_s`: equal CPU seconds with unequal wall time means an unequal CPU share, not slower
code), the compiled kernel's share (`kernel_s`), a float32 BLAS product (`blas_s`) and a pure-Python
loop (`interp_s`), plus its Python, numpy/OpenBLAS and threads, so a gap can be put on the
scheduler, the interpreter, BLAS or the kernel. `--python` adds outside sides on other interpreters (e.g. a venv of the image's Python build).
Last line: `ratio_inside_vs_outside=<median inside / median outside>`.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TRAIN = "data/amazon-cdr/warm-start_sport_cloth/sport_cloth/train.txt"


def inner(train_path: str, rank: int, epochs: int) -> dict[str, object]:
    """Seconds per epoch of `epochs` epochs here (after one warm-up epoch), its parts, and what ran them."""
    import platform

    import numpy as np
    import threadpoolctl

    from cdimf.common.core import ials
    from cdimf.common.core.ials_numpy import default_threads
    from cdimf.common.core.model import DomainTrainer
    from cdimf.common.core.params import IALSParams
    from cdimf.domain_node.node_data import load_node_data

    data = load_node_data("sport", Path(train_path), fmt="paper")
    trainer = DomainTrainer("sport", data.train, IALSParams(rank=rank, alpha=0.003, lam=1.0), rho=1.0)
    backend = trainer.backend()
    kernel = [0.0]
    entry = ials._REGISTRY[backend]
    solve = entry.solve

    def timed_solve(*args: object) -> object:
        """The backend's row solve, its seconds added up."""
        started = time.perf_counter()
        try:
            return solve(*args)
        finally:
            kernel[0] += time.perf_counter() - started

    ials._REGISTRY[backend] = type(entry)(entry.available, timed_solve, entry.missing)
    trainer.local_epochs(1)
    times, kernel_times, cpu_times = [], [], []
    for _ in range(epochs):
        kernel[0] = 0.0
        started, cpu_started = time.perf_counter(), time.process_time()
        trainer.local_epochs(1)
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)  # all threads' CPU seconds: the work, whatever the CPU share
        kernel_times.append(kernel[0])
    factors = np.random.default_rng(0).standard_normal((100_000, rank)).astype(np.float32)
    blas = []
    with threadpoolctl.threadpool_limits(1):  # as the solver runs BLAS
        for _ in range(epochs):
            started = time.perf_counter()
            factors.T @ factors
            blas.append(time.perf_counter() - started)
    interp = []
    for _ in range(epochs):
        started = time.perf_counter()
        total = 0
        for value in range(2_000_000):
            total += value & 7
        interp.append(time.perf_counter() - started)
    blas_info = next((lib for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"), {})
    return {"backend": backend, "epoch_s": statistics.median(times), "cpu_s": statistics.median(cpu_times),
            "kernel_s": statistics.median(kernel_times),
            "blas_s": statistics.median(blas), "interp_s": statistics.median(interp),
            "python": f"{platform.python_version()} {platform.python_build()[1]} {platform.python_compiler()}",
            "numpy": np.__version__, "blas": f"{blas_info.get('internal_api')} {blas_info.get('version')} {blas_info.get('architecture')}",
            "threads": default_threads()}


def main() -> int:
    """Alternate the outside and inside runs; print each, the parts' ratios and the epoch ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="cdimf:local")
    parser.add_argument("--rank", type=int, default=192)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--python", action="append", default=[], help="another outside interpreter (repeatable)")
    parser.add_argument("--own-cgroup", action="store_true",
                        help="add an outside side run in a CPU cgroup of its own, as a container is (cgroup v1, root)")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        print(json.dumps(inner(TRAIN, args.rank, args.epochs)))
        return 0
    root = Path(__file__).resolve().parent.parent
    inner_args = ["benchmarks/container_epoch.py", "--inner", "--rank", str(args.rank), "--epochs", str(args.epochs)]
    commands = {"outside": [sys.executable, *inner_args]}
    for number, python in enumerate(args.python, 1):
        commands[f"outside{number}"] = [python, *inner_args]
    group = Path(f"/sys/fs/cgroup/cpu/cdimf-bench-{os.getpid()}")
    if args.own_cgroup:
        # a sibling of /docker: the scheduler then shares the CPUs out to it as one group, as to a container
        group.mkdir()
        commands["outside-group"] = ["sh", "-c", f'echo $$ > {group}/tasks && exec "$0" "$@"', sys.executable, *inner_args]
    commands["inside"] = ["docker", "run", "--rm", "--read-only", "--tmpfs", "/tmp", "-v", f"{root}/benchmarks:/srv/cdimf/benchmarks:ro",
                          "-v", f"{root}/data:/srv/cdimf/data:ro", "--entrypoint", "python", args.image, *inner_args]
    parts = ("epoch_s", "cpu_s", "kernel_s", "blas_s", "interp_s")
    seen: dict[str, dict[str, list[float]]] = {where: {part: [] for part in parts} for where in commands}
    try:
        for _ in range(args.turns):
            for where, command in commands.items():
                done = subprocess.run(command, cwd=root, capture_output=True, text=True, check=True, timeout=1800)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                for part in parts:
                    seen[where][part].append(float(result[part]))
                print(f"{where:<13} {result['backend']:<6} epoch {result['epoch_s']:.3f} s (cpu {result['cpu_s']:.3f}, "
                      f"kernel {result['kernel_s']:.3f})  blas {result['blas_s']:.4f} s  python loop {result['interp_s']:.3f} s  "
                      f"| python {result['python']}, numpy {result['numpy']}, {result['blas']}, {result['threads']} threads", flush=True)
    finally:
        if args.own_cgroup:
            group.rmdir()
    medians = {where: {part: statistics.median(values) for part, values in found.items()} for where, found in seen.items()}
    for where in commands:
        if where != "outside":
            print(f"{where} / outside: " + "  ".join(f"{part} {medians[where][part] / medians['outside'][part]:.3f}" for part in parts))
    print(f"ratio_inside_vs_outside={medians['inside']['epoch_s'] / medians['outside']['epoch_s']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
