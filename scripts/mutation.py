"""Mutation testing (cosmic-ray) of the numerical core and the config merge, accumulated in a committed ledger.

    python scripts/mutation.py --budget-s 3000    # continue the campaign: run mutants the ledger lacks, ~50 min
    python scripts/mutation.py --only metrics     # only the targets whose path contains "metrics"
    python scripts/mutation.py --limit 100        # at most 100 more mutants, in line order
    python scripts/mutation.py --report           # the ledger's score and survivors, nothing run
    python scripts/mutation.py --sample 12 --seed 16 --min-score 75   # CI: a fresh seeded sample

The campaign accumulates across sessions and checkouts in tests/mutation-ledger.json: per target
the hash of the source's syntax tree (with positions; a comment changes nothing), the hashes of
its test files and each mutant's (operator, occurrence, line, outcome). A run executes only the
mutants in scope that the ledger holds no verdict for under the current source hash, in batches
(--batch), writing the ledger after each, so a killed run loses one batch; commit the ledger.
A verdict recorded against another source hash is not counted and is dropped on the next write.
When a target's test files changed, its survivors run again first (they may die now); killed
verdicts stand. --report prints per target killed / timed out / survived / not yet run and each
survivor with its reason from tests/mutation-survivors.json ("path operator#occurrence" -> why:
an equivalent mutant, a speed constant), or NOT EXPLAINED. --sample runs real mutants afresh
and never reads or writes the ledger.

Score so far (2026-12-02): 94.6 % of the 1,847 run killed; ials.py, admm.py, model.py, config.py
and evaluation.py complete (89.5-99.6 %), metrics.py 572 of 1,422 run (86.9 %), ials_numpy.py not
yet run (table in tests/README.md). 3,308 mutants in scope, 1.4-9 s each on 2 shared cores:
metrics.py 1,422 (8.6 s each, 2-3 h), ials_numpy.py 611, ials.py 434, model.py 289, admm.py 270,
config.py 187, evaluation.py 95.

Each target is one source file (optionally only some of its functions) and the fast test files
that must kill its mutants. cosmic-ray edits the file in place for each mutant and restores it,
so run this in a clean work tree with nothing else importing the package meanwhile. Exit status
1 when the score (killed / run, a timeout counts as killed) is below --min-score.
"""

import argparse
import ast
import hashlib
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_ENGINE = "tests/test_reference_cdimf.py::test_the_engine_follows_the_dense_reference_round_by_round"
KNOWN = "tests/test_known_answers.py"


@dataclass(frozen=True)
class Target:
    """A source file, the functions of it to mutate (None: all) and the tests that must kill its mutants."""

    path: str
    tests: tuple[str, ...]
    functions: tuple[str, ...] | None = None


TARGETS = (
    Target("common/core/ials_numpy.py", ("tests/test_ials.py", "tests/test_solver_plan.py", KNOWN)),
    Target("common/core/ials.py", ("tests/test_ials.py", KNOWN),
           ("frequency_ridge", "init_factors", "_row_blocks", "_gram64", "_solve_half_step", "observed_residual_sq", "ials_loss")),
    Target("common/core/admm.py", (KNOWN, REFERENCE_ENGINE, "tests/test_engine.py", "tests/test_aggregator_state.py")),
    Target("common/core/model.py", (KNOWN, REFERENCE_ENGINE, "tests/test_trainer_split.py", "tests/test_engine.py")),
    Target("common/core/metrics.py", ("tests/test_metrics.py", "tests/test_metric_known_answers.py", "tests/test_metric_edges.py",
                                      "tests/test_evaluation.py", KNOWN)),
    Target("common/core/evaluation.py", ("tests/test_evaluation.py", "tests/test_metric_known_answers.py", KNOWN, "tests/test_metrics.py")),
    Target("common/config.py", ("tests/test_config.py", "tests/test_config_flags.py", "tests/test_documented_promises.py"),
           ("_env_value", "_env_overrides", "_nested_model", "_apply", "_resolve_paths", "load_config")),
)


# A line ending in this marker holds an equivalent mutant's site (a speed constant, a sentinel only
# ever compared by sign): the marker says why, and its mutants are not run. Naming operators
# (`# mutation: equivalent Gt_NotEq (why)`) excludes only the mutants whose operator name ends
# in one of them, so the line's other mutants still run.
EQUIVALENT = "# mutation: equivalent"
_MARKER = re.compile(re.escape(EQUIVALENT) + r"(?: (?P<operators>[A-Za-z_]+(?:,[A-Za-z_]+)*))? \(")


@dataclass(frozen=True)
class Scope:
    """The mutants of a target that count: on its lines, less the ones marked equivalent."""

    lines: set[int] | None  # None: every line
    equivalent: dict[int, tuple[str, ...]]  # line -> operator name endings excluded there (empty: all)

    def covers(self, line: int, operator: str) -> bool:
        """Whether the mutant `operator` at `line` is run and scored."""
        if self.lines is not None and line not in self.lines:
            return False
        excluded = self.equivalent.get(line)
        return excluded is None or (len(excluded) > 0 and not operator.endswith(excluded))


def _scope(path: Path, names: tuple[str, ...] | None) -> Scope:
    """The lines of the named top-level functions (None: every line) and the equivalence markers."""
    text = path.read_text()
    equivalent: dict[int, tuple[str, ...]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if EQUIVALENT in line:
            marker = _MARKER.search(line)
            if marker is None:
                raise SystemExit(f"{path}:{number}: write the marker as '{EQUIVALENT} [OPERATOR,...] (why)'")
            operators = marker.group("operators")
            equivalent[number] = tuple(operators.split(",")) if operators else ()
    if names is None:
        return Scope(None, equivalent)
    lines: set[int] = set()
    found = set()
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            found.add(node.name)
            lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    missing = set(names) - found
    if missing:
        raise SystemExit(f"{path}: no function {', '.join(sorted(missing))}")
    return Scope(lines, equivalent)


def _config(target: Target, timeout_s: float) -> str:
    """The cosmic-ray session config of one target."""
    tests = " ".join(target.tests)
    # -B and no bytecode: a mutant of the same size and second as the source must not run as the old .pyc
    command = f"{sys.executable} -B -m pytest -x -q -p no:cacheprovider {tests}"
    return (
        "[cosmic-ray]\n"
        f'module-path = "{target.path}"\n'
        f"timeout = {timeout_s}\n"
        "excluded-modules = []\n"
        f'test-command = "{command}"\n'
        "[cosmic-ray.distributor]\n"
        'name = "local"\n'
    )


# The committed record of the campaign (tests/, beside the tests it judges; it is data, small and
# reviewed with them): per target the source's syntax-tree hash, the test files' hashes and each
# mutant's verdict. Every session starts on a fresh checkout, so only what git keeps accumulates.
LEDGER = ROOT / "tests" / "mutation-ledger.json"
# Survivors looked at and explained (equivalent, a tuning constant): "path operator#occurrence" -> why.
EXPLAINED = ROOT / "tests" / "mutation-survivors.json"
OUTCOMES = ("killed", "survived", "timeout")
# (operator, occurrence): cosmic-ray numbers each operator's sites in a module in source order,
# so the pair names one mutant of one source
MutantKey = tuple[str, int]
Ledger = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Verdict:
    """One mutant's line and outcome (killed, survived or timeout)."""

    line: int
    outcome: str


def source_hash(path: Path) -> str:
    """The hash of a source's syntax tree with positions: a comment (an equivalence marker) keeps the verdicts."""
    tree = ast.dump(ast.parse(path.read_text()), include_attributes=True)
    return hashlib.sha256(tree.encode()).hexdigest()


def hash_tests(tests: tuple[str, ...], root: Path = ROOT) -> dict[str, str]:
    """The sha256 of each test file a target names (a `file::test` names its file)."""
    files = sorted({test.split("::")[0] for test in tests})
    return {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in files}


def load_ledger(path: Path) -> Ledger:
    """The ledger's targets (none when there is no ledger yet)."""
    if not path.exists():
        return {}
    targets: Ledger = json.loads(path.read_text())["targets"]
    return targets


def current_verdicts(ledger: Ledger, target_path: str, source: str) -> dict[MutantKey, Verdict]:
    """The target's recorded verdicts if they were recorded for this source hash, else none."""
    entry = ledger.get(target_path)
    if entry is None or entry["source"] != source:
        return {}
    return {(operator, occurrence): Verdict(line, outcome) for operator, occurrence, line, outcome in entry["mutants"]}


def record(ledger: Ledger, target_path: str, source: str, tests: dict[str, str], verdicts: dict[MutantKey, Verdict]) -> Ledger:
    """A new ledger: `verdicts` merged into the target's current ones; an old source's verdicts are dropped."""
    merged = current_verdicts(ledger, target_path, source) | verdicts
    updated = dict(ledger)
    updated[target_path] = {
        "source": source,
        "tests": dict(sorted(tests.items())),
        "mutants": sorted([operator, occurrence, verdict.line, verdict.outcome] for (operator, occurrence), verdict in merged.items()),
    }
    return updated


def dump_ledger(ledger: Ledger) -> str:
    """The ledger as JSON, targets and mutants sorted, one mutant a line: a run's diff is its new verdicts."""
    blocks = []
    for path in sorted(ledger):
        entry = ledger[path]
        mutants = ",\n".join(f"        {json.dumps(mutant)}" for mutant in sorted(entry["mutants"]))
        blocks.append(
            f"    {json.dumps(path)}: {{\n"
            f"      \"source\": {json.dumps(entry['source'])},\n"
            f"      \"tests\": {json.dumps(entry['tests'], sort_keys=True)},\n"
            f"      \"mutants\": [\n{mutants}\n      ]\n"
            "    }"
        )
    return '{\n  "format": 1,\n  "targets": {\n' + ",\n".join(blocks) + "\n  }\n}\n"


def tally(verdicts: dict[MutantKey, Verdict], in_scope: set[MutantKey]) -> dict[str, int]:
    """How many of the in-scope mutants were killed, survived, timed out; `unrun` those with no verdict."""
    counts = dict.fromkeys(OUTCOMES, 0)
    for key in in_scope & verdicts.keys():
        counts[verdicts[key].outcome] += 1
    counts["unrun"] = len(in_scope - verdicts.keys())
    return counts


def score(counts: dict[str, int]) -> float | None:
    """Killed (a timeout counts as killed) over run, in percent; None when nothing ran."""
    run = counts["killed"] + counts["timeout"] + counts["survived"]
    return 100.0 * (counts["killed"] + counts["timeout"]) / run if run else None


@dataclass(frozen=True)
class Site:
    """Where a mutant of the session lies, and its job there."""

    line: int
    column: int
    job_id: str


def _sites(db_path: Path, scope: Scope) -> dict[MutantKey, Site]:
    """The session's mutants in scope, by key."""
    with use_db(str(db_path), WorkDB.Mode.open) as db:
        found = {}
        for item in db.work_items:
            spec = item.mutations[0]
            if scope.covers(spec.start_pos[0], spec.operator_name):
                found[(spec.operator_name, spec.occurrence)] = Site(spec.start_pos[0], spec.start_pos[1], item.job_id)
    return found


def _run_only(db_path: Path, jobs: set[str]) -> None:
    """Make `jobs` the session's only pending mutants: the rest, not yet run, are marked skipped."""
    with sqlite3.connect(db_path) as connection:
        # an earlier batch's skips are pending again
        connection.execute("DELETE FROM work_results WHERE worker_outcome = 'SKIPPED'")
    with use_db(str(db_path), WorkDB.Mode.open) as db:
        for item in list(db.pending_work_items):
            if item.job_id not in jobs:
                db.set_result(item.job_id, WorkResult(worker_outcome=WorkerOutcome.SKIPPED))


def _verdicts(db_path: Path, sites: dict[MutantKey, Site], jobs: set[str]) -> dict[MutantKey, Verdict]:
    """The verdicts the session holds for `jobs`."""
    by_job = {site.job_id: (key, site) for key, site in sites.items() if site.job_id in jobs}
    found = {}
    with use_db(str(db_path), WorkDB.Mode.open) as db:
        for job_id, result in db.results:
            if job_id not in by_job or result.worker_outcome == WorkerOutcome.SKIPPED:
                continue
            key, site = by_job[job_id]
            if result.worker_outcome != WorkerOutcome.NORMAL or result.test_outcome == TestOutcome.INCOMPETENT:
                # the worker or the test command itself failed: a broken run, never a kill
                raise SystemExit(f"mutant {key} at line {site.line}: {result.worker_outcome} {result.test_outcome}: {result.output}")
            # cosmic-ray reports a timeout as a kill whose output is "timeout"
            timed_out = result.output == "timeout"
            outcome = "survived" if result.test_outcome == TestOutcome.SURVIVED else "timeout" if timed_out else "killed"
            found[key] = Verdict(site.line, outcome)
    return found

def _clear_bytecode() -> None:
    """Remove the package's compiled files, so that no mutant runs as a stale .pyc."""
    for folder in ("cdimf", "common", "aggregator", "domain_node", "protos", "configs", "tests"):
        for cache in (ROOT / folder).rglob("__pycache__"):
            shutil.rmtree(cache, ignore_errors=True)


def _cosmic_ray() -> str:
    """The cosmic-ray command beside this interpreter (a venv not on PATH), else the one on PATH."""
    beside = Path(sys.executable).parent / "cosmic-ray"
    return str(beside) if beside.exists() else (shutil.which("cosmic-ray") or "cosmic-ray")


def _session(target: Target, folder: Path, timeout_s: float, environ: dict[str, str]) -> tuple[Path, Path]:
    """(config, database) of a fresh `cosmic-ray init` of the target in `folder`."""
    slug = target.path.replace("/", "_").removesuffix(".py")
    config_path, db_path = folder / f"{slug}.toml", folder / f"{slug}.sqlite"
    config_path.write_text(_config(target, timeout_s))
    subprocess.run([_cosmic_ray(), "init", str(config_path), str(db_path)], cwd=ROOT, env=environ, check=True,
                   stdout=subprocess.DEVNULL)
    return config_path, db_path


def main() -> int:
    """Run the not yet recorded mutants into the ledger, or a fresh sample, or report the ledger."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=0,
                        help="run this many mutants over all targets, fresh: the ledger is neither read nor written (CI)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument("--only", default="", help="targets whose path contains this text")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="per-mutant test timeout (a timeout counts as killed)")
    parser.add_argument("--min-score", type=float, default=90.0, help="exit 1 below this percentage killed")
    parser.add_argument("--ledger", type=Path, default=LEDGER, help="the campaign's record (default: %(default)s)")
    parser.add_argument("--report", action="store_true", help="print the ledger's scores and survivors, run nothing")
    parser.add_argument("--limit", type=int, default=0, help="run at most this many not yet recorded mutants (0: all)")
    parser.add_argument("--batch", type=int, default=20, help="mutants per cosmic-ray exec; the ledger is written after each")
    parser.add_argument("--budget-s", type=float, default=0.0, help="start no batch after this many seconds (0: no limit)")
    args = parser.parse_args()
    targets = [target for target in TARGETS if args.only in target.path]
    environ = {name: value for name, value in os.environ.items() if not name.startswith("CDIMF_")}
    environ["PYTHONDONTWRITEBYTECODE"] = "1"
    if args.report:
        # reads the ledger and the sources, writes nothing: it must not run beside a campaign,
        # whose mutant in place would hash as another source
        with tempfile.TemporaryDirectory(prefix="cdimf-mutation-") as scratch:
            return _report(targets, args, environ, Path(scratch))
    _clear_bytecode()
    originals = {target.path: (ROOT / target.path).read_bytes() for target in targets}
    try:
        with tempfile.TemporaryDirectory(prefix="cdimf-mutation-") as scratch:
            if args.sample:
                return _sample(targets, args, environ, Path(scratch))
            return _campaign(targets, args, environ, Path(scratch))
    finally:
        # cosmic-ray restores each mutant itself; this covers an interrupted run
        for path, content in originals.items():
            if (ROOT / path).read_bytes() != content:
                (ROOT / path).write_bytes(content)
                print(f"restored {path}", file=sys.stderr)


def _in_line_order(sites: dict[MutantKey, Site], keys: Iterable[MutantKey]) -> list[MutantKey]:
    """`keys` by line, column, operator, occurrence: a seeded sample and a batch do not depend on job ids."""
    return sorted(keys, key=lambda key: (sites[key].line, sites[key].column, key))


def _exec(config: Path, db_path: Path, jobs: set[str], environ: dict[str, str]) -> None:
    """Run exactly `jobs` of the session."""
    _run_only(db_path, jobs)
    subprocess.run([_cosmic_ray(), "exec", str(config), str(db_path)], cwd=ROOT, env=environ, check=True)


def _campaign(targets: list[Target], args: argparse.Namespace, environ: dict[str, str], scratch: Path) -> int:
    """Run the mutants the ledger holds no verdict for (and, under changed tests, its survivors) into it."""
    started = time.monotonic()
    ledger = load_ledger(args.ledger)
    ran = 0
    for target in targets:
        config, db_path = _session(target, scratch, args.timeout_s, environ)
        sites = _sites(db_path, _scope(ROOT / target.path, target.functions))
        source, tests = source_hash(ROOT / target.path), hash_tests(target.tests)
        verdicts = current_verdicts(ledger, target.path, source)
        recorded_tests = ledger.get(target.path, {}).get("tests", tests) if verdicts else tests
        # a survivor may die under tests changed since it was recorded: those run first
        again = [key for key in _in_line_order(sites, verdicts.keys() & sites.keys())
                 if verdicts[key].outcome == "survived"] if recorded_tests != tests else []
        todo = again + _in_line_order(sites, sites.keys() - verdicts.keys())
        began = time.monotonic()
        done = 0
        while todo and not (args.limit and ran >= args.limit) and not (args.budget_s and time.monotonic() - started > args.budget_s):
            room = args.batch if not args.limit else min(args.batch, args.limit - ran)
            batch, todo = todo[:room], todo[room:]
            jobs = {sites[key].job_id for key in batch}
            _exec(config, db_path, jobs, environ)
            found = _verdicts(db_path, sites, jobs)
            ran += len(batch)
            done += len(batch)
            # the tests' hashes move on once every survivor recorded under the old ones ran again
            again = [key for key in again if key not in found]
            ledger = record(ledger, target.path, source, recorded_tests if again else tests, found)
            _write_ledger(args.ledger, ledger)
        counts = tally(current_verdicts(ledger, target.path, source), set(sites))
        pace = f", {(time.monotonic() - began) / done:.1f} s per mutant" if done else ""
        print(f"{target.path}: {done} run now{pace}; {_line(counts)}", flush=True)
    print(f"{ran} mutants run in {time.monotonic() - started:.0f} s; the ledger: python scripts/mutation.py --report")
    return 0


def _write_ledger(path: Path, ledger: Ledger) -> None:
    """Replace the ledger at once: a run killed while writing, or a commit meanwhile, never sees half of it."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(dump_ledger(ledger))
    os.replace(partial, path)


def _line(counts: dict[str, int]) -> str:
    """One target's or the total's counts and score."""
    share = score(counts)
    shown = f"{share:.1f} %" if share is not None else "-"
    return (f"{counts['killed']} killed, {counts['timeout']} timed out, {counts['survived']} survived ({shown}), "
            f"{counts['unrun']} not yet run")


def _report(targets: list[Target], args: argparse.Namespace, environ: dict[str, str], scratch: Path) -> int:
    """Print each target's recorded score and survivors (with their explanation, if any) and the total."""
    ledger = load_ledger(args.ledger)
    explained: dict[str, str] = json.loads(EXPLAINED.read_text()) if EXPLAINED.exists() else {}
    total = dict.fromkeys((*OUTCOMES, "unrun"), 0)
    survivors = []
    for target in targets:
        _, db_path = _session(target, scratch, args.timeout_s, environ)
        sites = _sites(db_path, _scope(ROOT / target.path, target.functions))
        verdicts = current_verdicts(ledger, target.path, source_hash(ROOT / target.path))
        if target.path in ledger and not verdicts:
            print(f"{target.path}: the ledger's verdicts are for an older source: not counted")
        counts = tally(verdicts, set(sites))
        for name in total:
            total[name] += counts[name]
        print(f"{target.path}: {_line(counts)}")
        for key in _in_line_order(sites, [key for key in verdicts.keys() & sites.keys() if verdicts[key].outcome == "survived"]):
            name = f"{target.path} {key[0]}#{key[1]}"
            survivors.append(f"  survived {target.path}:{sites[key].line} {key[0]}#{key[1]}: {explained.get(name, 'NOT EXPLAINED')}")
    share = score(total)
    unexplained = sum(line.endswith("NOT EXPLAINED") for line in survivors)
    print(f"mutation score {share if share is not None else 100.0:.1f} % over the ledger: {_line(total)}; "
          f"{len(survivors) - unexplained} survivors explained, {unexplained} not")
    print("\n".join(survivors))
    return 0 if (share if share is not None else 100.0) >= args.min_score else 1


def _sample(targets: list[Target], args: argparse.Namespace, environ: dict[str, str], scratch: Path) -> int:
    """Run a seeded sample of every target's mutants afresh (the ledger untouched) and print its score."""
    started = time.monotonic()
    sessions = []
    everything = []
    for target in targets:
        config, db_path = _session(target, scratch, args.timeout_s, environ)
        sites = _sites(db_path, _scope(ROOT / target.path, target.functions))
        sessions.append((target, config, db_path, sites))
        everything += [(target.path, sites[key].line, sites[key].column, key) for key in sites]
    chosen = set(random.Random(args.seed).sample(sorted(everything), min(args.sample, len(everything))))
    total = dict.fromkeys((*OUTCOMES, "unrun"), 0)
    survivors = []
    for target, config, db_path, sites in sessions:
        keys = [key for path, _, _, key in chosen if path == target.path]
        if not keys:
            continue
        jobs = {sites[key].job_id for key in keys}
        _exec(config, db_path, jobs, environ)
        found = _verdicts(db_path, sites, jobs)
        counts = tally(found, set(keys))
        for name in total:
            total[name] += counts[name]
        survivors += [f"  survived {target.path}:{found[key].line} {key[0]}#{key[1]}" for key in sorted(keys) if found[key].outcome == "survived"]
        print(f"{target.path}: {_line(counts)}", flush=True)
    share = score(total)
    print(f"mutation score {share if share is not None else 100.0:.1f} % of a sample of {len(chosen)} "
          f"(seed {args.seed}) in {time.monotonic() - started:.0f} s")
    print("\n".join(survivors))
    return 0 if (share if share is not None else 100.0) >= args.min_score else 1


if __name__ == "__main__":
    sys.exit(main())
