"""Our iALS epoch against `implicit`'s CPU ALS (CG and Cholesky) on synthetic Zipf-like implicit data.

Each contender runs in its own subprocess on the same data (saved once to a temporary .npz), so
its peak RSS is its own; BLAS is pinned to one thread everywhere and the solvers get --threads.
The contenders take turns for --rounds rounds, so drifts in a shared machine's load hit them alike.
Reported per contender: median wall and CPU seconds per full epoch (users then items), peak RSS,
and the iALS loss after the last epoch; ours also reports its error against a float64 per-row
solve of sampled rows, so speed is never bought with wrong answers. The hyperparameters map
exactly (nu = 0): implicit confidence c = (1+alpha)/alpha, regularization lambda*c, factors scaled
by sqrt(1+alpha), both sides starting from the same factors; so the exact solvers' losses agree.

The last line is `ratio_exact_vs_implicit_cg=<our exact epoch / implicit CG epoch>` (median wall)
for the selected case; the default case is size M, d=64.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

SIZES = {  # users, items, interactions
    "S": (10_000, 30_000, 100_000),
    "M": (100_000, 50_000, 2_000_000),
    "L": (300_000, 100_000, 10_000_000),
}
CONTENDERS = ("ours-exact", "ours-exact-numpy", "ours-cg3", "implicit-cg", "implicit-chol")
ALPHA, LAMBDA, CG_STEPS, SEED = 0.1, 0.1, 3, 0
REFERENCE_ROWS = 48  # per side: the longest rows plus random ones, solved in float64


def zipf_interactions(n_users: int, n_items: int, nnz: int, seed: int) -> sp.csr_matrix:
    """Binary user x item CSR with exactly nnz distinct entries, user activity ~ 1/rank^0.8 and
    item popularity ~ 1/rank^0.9, ids shuffled so popular rows are not packed together in memory."""
    rng = np.random.default_rng(seed)
    user_p = 1.0 / np.arange(1, n_users + 1) ** 0.8
    item_p = 1.0 / np.arange(1, n_items + 1) ** 0.9
    user_p /= user_p.sum()
    item_p /= item_p.sum()
    keys = np.empty(0, dtype=np.int64)
    while len(keys) < nnz:
        # duplicates are dropped, so draw the shortfall again (a little more) until there are enough
        draw = int((nnz - len(keys)) * 1.3) + 1000
        users = rng.choice(n_users, size=draw, p=user_p)
        items = rng.choice(n_items, size=draw, p=item_p)
        keys = np.unique(np.concatenate([keys, users.astype(np.int64) * n_items + items]))
    keys = rng.choice(keys, size=nnz, replace=False)
    user_ids = rng.permutation(n_users)[keys // n_items]
    item_ids = rng.permutation(n_items)[keys % n_items]
    matrix = sp.csr_matrix(
        (np.ones(nnz, dtype=np.float32), (user_ids, item_ids)), shape=(n_users, n_items), dtype=np.float32
    )
    matrix.sort_indices()
    return matrix


def rss_mb(peak: bool) -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident memory in MiB, from /proc/self/status.

    Not ru_maxrss: Linux carries the parent's high-water mark into a forked child across exec,
    so every worker would report at least the parent's size."""
    field = "VmHWM:" if peak else "VmRSS:"
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def reference_error(
    matrix: sp.csr_matrix, fixed: np.ndarray, solved: np.ndarray, ridge: np.ndarray, rng: np.random.Generator
) -> float:
    """Largest relative row error of `solved` against float64 per-row solves of sampled rows."""
    lengths = np.diff(matrix.indptr)
    longest = np.argsort(lengths)[-REFERENCE_ROWS // 2 :]
    rows = np.unique(np.concatenate([longest, rng.choice(matrix.shape[0], REFERENCE_ROWS // 2, replace=False)]))
    y = fixed.astype(np.float64)
    gram = ALPHA * (y.T @ y)
    worst = 0.0
    for row in rows:  # a few dozen sampled rows: a check, not the solver
        cols = matrix.indices[matrix.indptr[row] : matrix.indptr[row + 1]]
        lhs = y[cols].T @ y[cols] + gram + ridge[row] * np.eye(y.shape[1])
        exact = np.linalg.solve(lhs, y[cols].sum(axis=0))
        worst = max(worst, float(np.linalg.norm(solved[row] - exact) / max(np.linalg.norm(exact), 1e-30)))
    return worst


def run_ours(matrix: sp.csr_matrix, args: argparse.Namespace, backend: str, method: str) -> dict:
    """Time our epochs; check the last epoch's rows against float64 solves."""
    from cdimf.common.core.ials import available_backends, frequency_ridge, ials_loss, init_factors
    from cdimf.common.core.model import ials_epoch
    from cdimf.common.core.sparse import row_counts

    if backend == "native" and "native" not in available_backends():
        return {"error": "native kernel unavailable (no C compiler?)"}
    transposed = matrix.T.tocsr()
    user_ridge = frequency_ridge(row_counts(matrix), matrix.shape[1], LAMBDA, ALPHA, 0.0)
    item_ridge = frequency_ridge(row_counts(transposed), matrix.shape[0], LAMBDA, ALPHA, 0.0)
    users = init_factors(matrix.shape[0], args.factors, 1.0, SEED)
    items = init_factors(matrix.shape[1], args.factors, 1.0, SEED + 1)
    base_rss = rss_mb(peak=False)
    walls, cpus, losses = [], [], []
    for _ in range(args.epochs):
        previous_items = items
        wall, cpu = time.perf_counter(), time.process_time()
        users, items = ials_epoch(
            matrix, transposed, users, items, ALPHA, user_ridge, item_ridge, threads=args.threads,
            method=method, cg_steps=CG_STEPS, backend=backend,
        )
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        losses.append(ials_loss(matrix, users, items, ALPHA, user_ridge, item_ridge))
    result = {"walls": walls, "cpus": cpus, "losses": losses, "base_rss_mb": base_rss, "peak_rss_mb": rss_mb(peak=True)}
    if method == "exact":
        rng = np.random.default_rng(SEED)
        result["ref_err"] = max(
            reference_error(matrix, previous_items, users, user_ridge, rng),
            reference_error(transposed, users, items, item_ridge, rng),
        )
    return result


def run_implicit(matrix: sp.csr_matrix, args: argparse.Namespace, use_cg: bool) -> dict:
    """Time implicit's own iterations (its per-iteration callback; its fit-time transpose excluded)."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    from cdimf.common.core.ials import frequency_ridge, ials_loss, init_factors
    from cdimf.common.core.sparse import row_counts

    confidence = (1.0 + ALPHA) / ALPHA
    scale = np.float32(np.sqrt(1.0 + ALPHA))
    user_ridge = frequency_ridge(row_counts(matrix), matrix.shape[1], LAMBDA, ALPHA, 0.0)
    item_ridge = frequency_ridge(row_counts(matrix.T.tocsr()), matrix.shape[0], LAMBDA, ALPHA, 0.0)
    walls, cpus, losses = [], [], []
    marks = {"cpu": time.process_time()}

    def on_iteration(_: int, elapsed: float, __: object) -> None:
        """Record one iteration's wall and CPU seconds and the loss (outside implicit's timing)."""
        walls.append(elapsed)
        cpus.append(time.process_time() - marks["cpu"])
        losses.append(ials_loss(matrix, model.user_factors / scale, model.item_factors / scale, ALPHA, user_ridge, item_ridge))
        marks["cpu"] = time.process_time()

    with threadpool_limits(limits=1, user_api="blas"):
        model = AlternatingLeastSquares(
            factors=args.factors, regularization=LAMBDA * confidence, alpha=1.0, iterations=args.epochs,
            use_cg=use_cg, calculate_training_loss=False, num_threads=args.threads,
            random_state=SEED,
        )
        model.user_factors = init_factors(matrix.shape[0], args.factors, 1.0, SEED) * scale
        model.item_factors = init_factors(matrix.shape[1], args.factors, 1.0, SEED + 1) * scale
        weighted = matrix * np.float32(confidence)
        base_rss = rss_mb(peak=False)
        marks["cpu"] = time.process_time()
        model.fit(weighted, show_progress=False, callback=on_iteration)
    return {"walls": walls, "cpus": cpus, "losses": losses, "base_rss_mb": base_rss, "peak_rss_mb": rss_mb(peak=True)}


def worker(args: argparse.Namespace) -> None:
    """Run one contender on the saved data and print its result as one JSON line."""
    matrix = sp.load_npz(args.data).tocsr()
    if args.worker == "ours-exact":
        result = run_ours(matrix, args, "native", "exact")
    elif args.worker == "ours-exact-numpy":
        result = run_ours(matrix, args, "numpy", "exact")
    elif args.worker == "ours-cg3":
        result = run_ours(matrix, args, "auto", "cg")
    else:
        result = run_implicit(matrix, args, use_cg=args.worker == "implicit-cg")
    print(json.dumps(result))


def spawn(name: str, data: Path, args: argparse.Namespace) -> dict:
    """Run one contender in a fresh interpreter with one BLAS thread; return its result."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [
        sys.executable, __file__, "--worker", name, "--data", str(data), "--size", args.size,
        "--factors", str(args.factors), "--epochs", str(args.epochs), "--threads", str(args.threads),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:] or ''}"}
    return json.loads(lines[-1])


def main() -> None:
    """Generate the data once, run each contender in its own process, print the table and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="M")
    parser.add_argument("--factors", type=int, default=64, help="rank d (64 and 128 are the sizes worth comparing)")
    parser.add_argument("--epochs", type=int, default=None, help="timed epochs per process (default 3; 2 for L)")
    parser.add_argument("--rounds", type=int, default=3, help="processes per contender, interleaved")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma list from {CONTENDERS}")
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.epochs is None:
        args.epochs = 2 if args.size == "L" else 3
    if args.worker:
        worker(args)
        return
    chosen = [name.strip() for name in args.contenders.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(CONTENDERS))
    if unknown:
        parser.error(f"--contenders: unknown {unknown}; choose from {CONTENDERS}")
    n_users, n_items, nnz = SIZES[args.size]
    started = time.perf_counter()
    matrix = zipf_interactions(n_users, n_items, nnz, SEED)
    lengths = np.diff(matrix.indptr)
    item_lengths = np.bincount(matrix.indices, minlength=n_items)
    print(
        f"size {args.size}: {n_users} users x {n_items} items, {matrix.nnz} interactions "
        f"(longest user {lengths.max()}, longest item {item_lengths.max()}; "
        f"{np.mean(lengths < args.factors):.0%} of users and {np.mean(item_lengths < args.factors):.0%} of items "
        f"shorter than d), d={args.factors}, {args.threads} threads, {args.epochs} epochs, "
        f"data in {time.perf_counter() - started:.1f}s, load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores",
        flush=True,
    )
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="als-bench-") as folder:
        data = Path(folder) / "interactions.npz"
        sp.save_npz(data, matrix, compressed=False)
        del matrix
        # rounds interleave the contenders, so a change in the machine's load hits them all alike
        for round_index in range(args.rounds):
            for name in chosen:
                if "error" in results.get(name, {}):
                    continue
                report = spawn(name, data, args)
                print(f"  round {round_index + 1} {name}: {report.get('walls', report.get('error'))}", flush=True)
                if "error" in report:
                    results[name] = report
                    continue
                merged = results.setdefault(name, {"walls": [], "cpus": [], "peak_rss_mb": 0.0, "ref_err": 0.0})
                merged["walls"] += report["walls"]
                merged["cpus"] += report["cpus"]
                merged["peak_rss_mb"] = max(merged["peak_rss_mb"], report["peak_rss_mb"])
                merged["base_rss_mb"] = report["base_rss_mb"]
                merged["losses"] = report["losses"]
                if "ref_err" in report:
                    merged["ref_err"] = max(merged["ref_err"], report["ref_err"])
                else:
                    merged.pop("ref_err", None)
    for name, report in results.items():
        if "error" in report:
            print(f"{name:17s} failed: {report['error']}", flush=True)
            continue
        report["median_wall"] = float(np.median(report["walls"]))
        report["median_cpu"] = float(np.median(report["cpus"]))
        check = f"  float64 row check {report['ref_err']:.1e}" if "ref_err" in report else ""
        print(
            f"{name:17s} {report['median_wall']:7.3f} s/epoch wall  {report['median_cpu']:7.3f} s/epoch CPU  "
            f"peak RSS {report['peak_rss_mb']:7.0f} MiB (data loaded {report['base_rss_mb']:.0f})  "
            f"loss {report['losses'][-1]:.6e}{check}",
            flush=True,
        )
    print(f"load average now {os.getloadavg()[0]:.2f}")
    ok = {name: report for name, report in results.items() if "error" not in report}
    if "ours-exact" in ok and "implicit-chol" in ok:
        ours, theirs = ok["ours-exact"]["losses"][-1], ok["implicit-chol"]["losses"][-1]
        print(f"loss_rel_diff_exact_vs_implicit_chol={abs(ours - theirs) / theirs:.2e}")
    for ours in ("ours-exact-numpy", "ours-cg3", "ours-exact"):
        for theirs in ("implicit-chol", "implicit-cg"):
            if ours in ok and theirs in ok:
                label = ours.removeprefix("ours-").replace("-", "_")
                print(f"ratio_rss_{label}_vs_{theirs.replace('-', '_')}={ok[ours]['peak_rss_mb'] / ok[theirs]['peak_rss_mb']:.3f}")
                print(f"ratio_cpu_{label}_vs_{theirs.replace('-', '_')}={ok[ours]['median_cpu'] / ok[theirs]['median_cpu']:.3f}")
                print(f"ratio_{label}_vs_{theirs.replace('-', '_')}={ok[ours]['median_wall'] / ok[theirs]['median_wall']:.3f}")


if __name__ == "__main__":
    main()
