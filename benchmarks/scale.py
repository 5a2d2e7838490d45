"""Scale: the whole federation (`cdimf simulate`, real processes) on synthetic domains of a million users, against named baselines.

    python benchmarks/scale.py [--users 1000000] [--items 100000] [--interactions 5000000]
                               [--domains 2 4] [--rank 64] [--rounds 3] [--overlap 0.5] [--no-engine] [--json]

For each domain count it writes synthetic paper-format files (benchmarks/synthetic.py:
power-law users and items, consecutive domains sharing `overlap` of their users), then runs, each
in a fresh process so that its peak resident memory (VmHWM) is its own:
- baseline `implicit`: the first domain's matrix loaded (pyarrow + scipy) and fitted by
  implicit's CPU ALS at the same rank (one iteration: its memory does not grow with more);
- one local epoch of the product's solver (DomainTrainer) on the node's data (load_node_data);
- the in-process engine (cdimf.engine) over all domains for the same rounds (unless --no-engine);
- `cdimf simulate --insecure` over all domains: the aggregator and one node per domain, each
  process's VmHWM sampled every POLL_S until it exits (VmHWM only grows: the last sample is the
  peak up to the last POLL_S of its life, when it only shuts down).
Prints per process its peak and the ratio to implicit's (target <= 2x per node), the
aggregator's peak over the matrices it must hold (one contribution per domain plus Z, float32;
target <= 2x), the startup (launch to the run's start: every node loaded its data and
registered; the aggregator's saved started_wall) over one local epoch, and the median round of the federation over the engine's. --json prints the rows,
--markdown adds README's scaling-table rows. Sizes are options so that a small configuration runs in seconds
(tests/test_scale_benchmark.py runs it tiny).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.synthetic import write_domains  # noqa: E402

MB = 1 << 20
POLL_S = 0.2
# float32 bytes per value of the matrices the aggregator holds
FLOAT_BYTES = 4

_PEAK = r"""
import json, sys, time
from pathlib import Path
def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)
"""

_IMPLICIT = _PEAK + r"""
import numpy as np, pyarrow.csv as pa_csv, scipy.sparse as sp
from threadpoolctl import threadpool_limits
from implicit.cpu.als import AlternatingLeastSquares
path, rank, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
table = pa_csv.read_csv(path, read_options=pa_csv.ReadOptions(column_names=["u", "i"]), parse_options=pa_csv.ParseOptions(delimiter="\t"))
users, user_rows = np.unique(table["u"].to_numpy(), return_inverse=True)
items, item_cols = np.unique(table["i"].to_numpy(), return_inverse=True)
del table
matrix = sp.csr_matrix((np.ones(len(user_rows), np.float32), (user_rows.astype(np.int32), item_cols.astype(np.int32))), shape=(len(users), len(items)))
del user_rows, item_cols, users, items
with threadpool_limits(1, "blas"):
    model = AlternatingLeastSquares(factors=rank, iterations=1, dtype=np.float32, num_threads=threads, calculate_training_loss=False, random_state=0)
    start = time.perf_counter()
    model.fit(matrix, show_progress=False)
print(json.dumps({"peak": status("VmHWM"), "epoch_s": time.perf_counter() - start, "users": matrix.shape[0], "items": matrix.shape[1], "nnz": matrix.nnz}))
"""

_EPOCH = _PEAK + r"""
from cdimf.common.core.model import DomainTrainer
from cdimf.common.core.params import LocalIALSParams
from cdimf.domain_node.node_data import load_node_data
path, rank, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = load_node_data("d0", Path(path), fmt="paper")
trainer = DomainTrainer("d0", data.train, LocalIALSParams(alpha=0.01, lam=1.0, threads=threads).at_rank(rank), rho=1.0)
start = time.perf_counter()
trainer.local_epochs(1)
print(json.dumps({"peak": status("VmHWM"), "epoch_s": time.perf_counter() - start}))
"""

_ENGINE = _PEAK + r"""
from cdimf.common.core.params import ADMMParams, LocalIALSParams
from cdimf.domain_node.node_data import load_node_data
from cdimf.engine import CDIMFEngine, DomainInput
paths, rank, rounds = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
data = [load_node_data(f"d{i}", Path(p), fmt="paper") for i, p in enumerate(paths)]
params = LocalIALSParams(alpha=0.01, lam=1.0).at_rank(rank)
engine = CDIMFEngine([DomainInput(d.domain, d.users.keys, d.train, params) for d in data], ADMMParams(rho=1.0))
del data
seconds = []
for _ in range(rounds):
    start = time.perf_counter()
    engine.step()
    seconds.append(time.perf_counter() - start)
print(json.dumps({"peak": status("VmHWM"), "round_s": seconds}))
"""


def _run_json(code: str, *args: str) -> dict[str, Any]:
    """Run a measuring snippet in a fresh interpreter (from the repository); its last stdout line as JSON."""
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"a measuring process failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _children_of(pid: int) -> list[int]:
    """Every descendant process id of `pid` (Linux /proc)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            tasks = Path(f"/proc/{parent}/task").iterdir()
            kids = [int(k) for task in tasks for k in (task / "children").read_text().split()]
        except OSError:
            continue
        found.extend(kids)
        frontier.extend(kids)
    return found


def _role(pid: int) -> str | None:
    """'aggregator' or 'node-<domain>' for a simulate child, from its command line and environment."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"serve-aggregator" in command:
            return "aggregator"
        if b"serve-node" in command:
            environment = dict(entry.split(b"=", 1) for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in entry)
            return f"node-{json.loads(environment[b'CDIMF_DOMAIN'])}"
    except (OSError, KeyError, ValueError):
        return None
    return None


def _vm_hwm(pid: int) -> int | None:
    """A process's peak resident bytes, None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakSampler:
    """Samples the VmHWM of every simulate child by role every POLL_S in a thread, until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        """Record the largest VmHWM seen per role."""
        roles: dict[int, str] = {}
        while not self._stop.wait(POLL_S):
            for child in _children_of(self.pid):
                # a child seen between fork and exec still shows simulate's command line: ask again
                role = roles.get(child) or _role(child)
                if role:
                    roles[child] = role
                peak = _vm_hwm(child) if role else None
                if role and peak is not None:
                    self.peaks[role] = max(self.peaks.get(role, 0), peak)

    def stop(self) -> dict[str, int]:
        """Stop sampling; the peaks by role."""
        self._stop.set()
        self._thread.join()
        return self.peaks


def _run_started_wall(state_dir: Path) -> float:
    """Wall time the aggregator started the run (its saved run's started_wall)."""
    from cdimf.aggregator.store import RUN_FILE
    from cdimf.common.atomic_files import read_arrays

    return float(json.loads(read_arrays(state_dir / RUN_FILE)["meta"].tobytes())["started_wall"])


def _simulate(paths: list[Path], work: Path, rank: int, rounds: int, validation_every: int) -> dict[str, Any]:
    """`cdimf simulate --insecure --json` over the files; peaks by role, startup by node, round seconds."""
    domains = "\n".join(f'[[domains]]\nname = "d{i}"\ntrain_path = "{p}"\ndata_format = "paper"\n' for i, p in enumerate(paths))
    config = work / "simulate.toml"
    config.write_text(f'insecure = true\nwork_dir = "{work / "run"}"\nstartup_timeout_s = 3600\n{domains}\n'
                      f"[ials]\nalpha = 0.01\nlam = 1.0\n[run]\nrounds = {rounds}\nrank = {rank}\nmin_domains = {len(paths)}\n"
                      f"[run.admm]\nrho = 1.0\n[validation]\nevery = {validation_every}\n")
    launched = time.time()
    process = subprocess.Popen([sys.executable, "-m", "cdimf", "simulate", "--config", str(config), "--json"], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = PeakSampler(process.pid)
    stdout, stderr = process.communicate()
    peaks = sampler.stop()
    if process.returncode != 0:
        raise SystemExit(f"cdimf simulate failed ({process.returncode}):\n{stderr[-3000:]}\n{stdout[-2000:]}")
    results = json.loads(stdout)
    closed = [event["elapsed_s"] for event in results["history"] if event["kind"] == "round_closed"]
    round_s = [later - earlier for earlier, later in zip([0.0, *closed], closed)]
    # from the launch until every node loaded its data, registered, and the run started
    startup = _run_started_wall(work / "run" / "state" / "aggregator") - launched
    return {"peaks": peaks, "startup_s": startup, "round_s": round_s, "train_s": results["train_seconds"]}


def _held_bytes(n_domains: int, users: int, overlap: float, rank: int) -> int:
    """Bytes of what the aggregator must hold: each domain's contribution on its shared rows plus Z over the exchanged rows.

    Domain d holds users [d * stride, d * stride + users) (benchmarks/synthetic.py); a user is
    exchanged when two or more domains hold it.
    """
    stride = max(1, round(users * (1.0 - overlap)))
    coverage = np.zeros((n_domains - 1) * stride + users + 1, dtype=np.int32)
    starts = np.arange(n_domains) * stride
    np.add.at(coverage, starts, 1)
    np.add.at(coverage, starts + users, -1)
    shared = np.cumsum(coverage)[:-1] >= 2
    prefix = np.concatenate([[0], np.cumsum(shared)])
    contributions = int(np.sum(prefix[starts + users] - prefix[starts]))
    return (contributions + int(shared.sum())) * rank * FLOAT_BYTES


def measure(n_domains: int, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """All measurements for one domain count."""
    work = scratch / f"{n_domains}-domains"
    paths = write_domains(work / "data", n_domains, args.users, args.items, args.interactions, args.overlap, seed=args.seed)
    threads = max(1, (os.cpu_count() or 1) // n_domains)
    implicit = _run_json(_IMPLICIT, str(paths[0]), str(args.rank), str(threads))
    epoch = _run_json(_EPOCH, str(paths[0]), str(args.rank), str(threads))
    engine = None if args.no_engine else _run_json(_ENGINE, json.dumps([str(p) for p in paths]), str(args.rank), str(args.rounds))
    simulated = _simulate(paths, work, args.rank, args.rounds, args.validation_every)
    for path in paths:
        path.unlink()
    held = _held_bytes(n_domains, args.users, args.overlap, args.rank)
    nodes = {role: peak for role, peak in simulated["peaks"].items() if role.startswith("node-")}
    if len(nodes) != n_domains or "aggregator" not in simulated["peaks"]:
        raise SystemExit(f"peaks were sampled for {sorted(simulated['peaks'])} only")
    return {
        "domains": n_domains, "users": args.users, "items": args.items, "interactions": args.interactions, "rank": args.rank,
        "rounds": args.rounds, "overlap": args.overlap, "threads_per_node": threads,
        "implicit_peak_mb": implicit["peak"] / MB, "implicit_epoch_s": implicit["epoch_s"],
        "epoch_s": epoch["epoch_s"], "epoch_process_peak_mb": epoch["peak"] / MB,
        "node_peak_mb": {role: peak / MB for role, peak in sorted(nodes.items())},
        "node_over_implicit": {role: peak / implicit["peak"] for role, peak in sorted(nodes.items())},
        "aggregator_peak_mb": simulated["peaks"].get("aggregator", 0) / MB,
        "aggregator_held_mb": held / MB,
        "aggregator_over_held": simulated["peaks"].get("aggregator", 0) / held if held else float("nan"),
        "startup_s": simulated["startup_s"],
        "startup_over_epoch": simulated["startup_s"] / epoch["epoch_s"],
        "round_s": simulated["round_s"], "train_s": simulated["train_s"],
        "engine_round_s": None if engine is None else engine["round_s"],
        "engine_peak_mb": None if engine is None else engine["peak"] / MB,
        "round_over_engine": None if engine is None else statistics.median(simulated["round_s"]) / statistics.median(engine["round_s"]),
        "load_average": os.getloadavg()[0],
    }


def report(row: dict[str, Any]) -> None:
    """Print one domain count's measurements with their ratios."""
    print(f"{row['domains']} domains x {row['users']:,} users, {row['items']:,} items, {row['interactions']:,} interactions each, "
          f"rank {row['rank']}, {row['rounds']} rounds, overlap {row['overlap']:.0%} ({row['threads_per_node']} solver threads per node, "
          f"1-min load {row['load_average']:.1f})")
    print(f"  implicit ALS on d0's matrix   peak {row['implicit_peak_mb']:7.0f} MiB, one epoch {row['implicit_epoch_s']:.2f} s")
    for role, peak in row["node_peak_mb"].items():
        print(f"  {role:<28}  peak {peak:7.0f} MiB  {row['node_over_implicit'][role]:.2f}x implicit (target <= 2x)")
    print(f"  aggregator                    peak {row['aggregator_peak_mb']:7.0f} MiB  {row['aggregator_over_held']:.2f}x the "
          f"{row['aggregator_held_mb']:.0f} MiB of contributions + Z it holds (target <= 2x)")
    print(f"  startup                       {row['startup_s']:.1f} s from launch to the run's start (load, pseudonyms, registration) "
          f"= {row['startup_over_epoch']:.1f} local epochs ({row['epoch_s']:.2f} s each)")
    rounds = " ".join(f"{s:.1f}" for s in row["round_s"])
    if row["engine_round_s"] is not None:
        engine = " ".join(f"{s:.1f}" for s in row["engine_round_s"])
        print(f"  round time                    federation {rounds} s, in-process engine {engine} s: median {row['round_over_engine']:.2f}x "
              f"the engine (engine peak {row['engine_peak_mb']:.0f} MiB)")
    else:
        print(f"  round time                    federation {rounds} s (engine not run)")


TABLE_HEADER = ("| domains | users / domain | interactions / domain | rank | node peak (max) | x implicit | aggregator peak | x held "
                "| startup | one local epoch | round (median) | x engine |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def table_row(row: dict[str, Any]) -> str:
    """One README scaling-table row (markdown) of a domain count's measurements."""
    node = max(row["node_peak_mb"].values())
    ratio = max(row["node_over_implicit"].values())
    engine = "—" if row["round_over_engine"] is None else f"{row['round_over_engine']:.2f}x"
    return (f"| {row['domains']} | {row['users']:,} | {row['interactions']:,} | {row['rank']} | {node:,.0f} MiB | {ratio:.2f}x "
            f"| {row['aggregator_peak_mb']:,.0f} MiB | {row['aggregator_over_held']:.2f}x | {row['startup_s']:.0f} s | {row['epoch_s']:.1f} s "
            f"| {statistics.median(row['round_s']):.1f} s | {engine} |")


def main() -> None:
    """Measure every requested domain count and print (or --json) the rows."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000, help="users per domain")
    parser.add_argument("--items", type=int, default=100_000, help="items per domain")
    parser.add_argument("--interactions", type=int, default=5_000_000, help="interactions per domain")
    parser.add_argument("--domains", type=int, nargs="+", default=[2, 4], help="domain counts to run")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--overlap", type=float, default=0.5, help="share of users consecutive domains have in common")
    parser.add_argument("--validation-every", type=int, default=0, help="the nodes' per-round validation (0: off, as in the baselines)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-engine", action="store_true", help="skip the in-process engine (it holds every domain in one process)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the data and logs go (default: a temporary folder)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--markdown", action="store_true", help="also print README's scaling-table rows")
    args = parser.parse_args()
    if not 0.0 <= args.overlap < 1.0 or args.interactions < args.users:
        parser.error("--overlap must be in [0, 1) and --interactions >= --users (every user interacts once)")
    with tempfile.TemporaryDirectory(prefix="cdimf-scale-", dir=args.work_dir) as scratch:
        rows = []
        for n_domains in args.domains:
            row = measure(n_domains, args, Path(scratch))
            rows.append(row)
            if not args.json:
                report(row)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif args.markdown:
        print(TABLE_HEADER)
        for row in rows:
            print(table_row(row))


if __name__ == "__main__":
    main()
