"""Mutation testing (cosmic-ray) of the numerical core and the config merge: the score and every surviving mutant.

    python scripts/mutation.py                    # every mutant (about 3,300 mutants, 5-10 s each on 2 cores: hours)
    python scripts/mutation.py --sample 20        # a seeded sample of 20 mutants over all targets (CI)
    python scripts/mutation.py --only admm        # the targets whose path contains "admm"
    python scripts/mutation.py --session-dir .mutation --limit 100   # resumable: 100 more each call
    python scripts/mutation.py --session-dir .mutation --report      # the score so far, nothing run

With --session-dir the sessions persist: a later call (after a kill, on another day) runs only
the mutants not yet killed, so a full campaign accumulates over several calls; a source whose
syntax changed starts its session afresh.

Each target is one source file (optionally only some of its functions) and the fast test files
that must kill its mutants. cosmic-ray edits the file in place for each mutant and restores it,
so run this in a clean work tree with nothing else importing the package meanwhile. Exit status
1 when the score (killed / run, a timeout counts as killed) is below --min-score.
"""

import argparse
import ast
import hashlib
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

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
    Target("common/core/metrics.py", ("tests/test_metrics.py", "tests/test_metric_known_answers.py", "tests/test_evaluation.py", KNOWN)),
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


def _reopen(db_path: Path) -> None:
    """Make an earlier session's skipped mutants and survivors pending again.

    A skip belongs to one invocation (a sample, a --limit, a line since marked equivalent), and a
    survivor may die under tests added since; killed mutants keep their verdict.
    """
    with sqlite3.connect(db_path) as connection:
        connection.execute("DELETE FROM work_results WHERE worker_outcome = 'SKIPPED' OR test_outcome = 'SURVIVED'")


def _skip_outside(db_path: Path, scope: Scope, chosen: set[str] | None) -> int:
    """Mark mutants outside the scope, or not chosen, as skipped; the number left to run."""
    left = 0
    with use_db(str(db_path), WorkDB.Mode.open) as db:
        for item in list(db.pending_work_items):
            spec = item.mutations[0]
            if not scope.covers(spec.start_pos[0], spec.operator_name) or (chosen is not None and item.job_id not in chosen):
                db.set_result(item.job_id, WorkResult(worker_outcome=WorkerOutcome.SKIPPED))
            else:
                left += 1
    return left


def _pending_ids(db_path: Path, scope: Scope) -> list[tuple[tuple[str, int, int, str, int], str]]:
    """(stable key, job id) of the mutants in scope not yet run, ordered by the key.

    Job ids are random per `cosmic-ray init`, so a seeded sample is drawn from this order (file,
    line, column, operator, occurrence): the same source gives the same sample on every run.
    """
    with use_db(str(db_path), WorkDB.Mode.open) as db:
        found = []
        for item in db.pending_work_items:
            spec = item.mutations[0]
            if scope.covers(spec.start_pos[0], spec.operator_name):
                found.append(((str(spec.module_path), spec.start_pos[0], spec.start_pos[1], spec.operator_name, spec.occurrence), item.job_id))
    return sorted(found)


def _results(db_path: Path, scope: Scope) -> tuple[int, int, int, list[str]]:
    """(killed, survived, not yet run, one line per survivor) of a session's mutants in scope."""
    killed = survived = 0
    survivors = []
    with use_db(str(db_path), WorkDB.Mode.open) as db:
        items = {item.job_id: item for item in db.work_items}
        in_scope = {job for job, item in items.items() if scope.covers(item.mutations[0].start_pos[0], item.mutations[0].operator_name)}
        done = set()
        for job_id, result in db.results:
            if result.worker_outcome == WorkerOutcome.SKIPPED or job_id not in in_scope:
                continue
            done.add(job_id)
            if result.worker_outcome != WorkerOutcome.NORMAL:
                # the worker itself failed (not the tests): a broken run, never a kill
                raise SystemExit(f"mutant {job_id} of {items[job_id].mutations[0].module_path}: worker {result.worker_outcome}: {result.output}")
            if result.test_outcome == TestOutcome.SURVIVED:
                survived += 1
                spec = items[job_id].mutations[0]
                changed = [line[1:].strip() for line in (result.diff or "").splitlines() if line.startswith("+") and not line.startswith("+++")]
                survivors.append(f"{spec.module_path}:{spec.start_pos[0]} {spec.operator_name}#{spec.occurrence}: {' / '.join(changed)}")
            else:
                killed += 1
    return killed, survived, len(in_scope - done), survivors


def _clear_bytecode() -> None:
    """Remove the package's compiled files, so that no mutant runs as a stale .pyc."""
    for folder in ("cdimf", "common", "aggregator", "domain_node", "protos", "configs", "tests"):
        for cache in (ROOT / folder).rglob("__pycache__"):
            shutil.rmtree(cache, ignore_errors=True)


def _fingerprint(target: Target, timeout_s: float) -> str:
    """What a session's verdicts depend on: the source's syntax tree with positions (comments,
    such as an equivalence marker, leave it alone), the tests and the timeout (not the interpreter's
    path, so that another checkout of the same source reads the same session)."""
    tree = ast.dump(ast.parse((ROOT / target.path).read_text()), include_attributes=True)
    return hashlib.sha256("\0".join((tree, *target.tests, repr(timeout_s))).encode()).hexdigest()


def _session(target: Target, folder: Path, timeout_s: float, environ: dict[str, str], report: bool = False) -> tuple[Path, Path] | None:
    """(config, database) of a target's session in `folder`: the one there if its fingerprint still
    holds (reopened), else a fresh `cosmic-ray init`. With `report`, the one there as it is, or
    None when there is none for this source."""
    slug = target.path.replace("/", "_").removesuffix(".py")
    config_path, db_path, key_path = folder / f"{slug}.toml", folder / f"{slug}.sqlite", folder / f"{slug}.key"
    config = _config(target, timeout_s)
    key = _fingerprint(target, timeout_s)
    if db_path.exists() and key_path.exists() and key_path.read_text() == key:
        if not report:
            _reopen(db_path)
            # this checkout's interpreter and tests: a session made by another checkout must not
            # test that checkout's package
            config_path.write_text(config)
        return config_path, db_path
    if report:
        return None
    for stale in (db_path, key_path):
        stale.unlink(missing_ok=True)
    config_path.write_text(config)
    subprocess.run(["cosmic-ray", "init", str(config_path), str(db_path)], cwd=ROOT, env=environ, check=True)
    key_path.write_text(key)
    return config_path, db_path


def main() -> int:
    """Initialise or resume, optionally sample, execute and report each target's session."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=0, help="run only this many mutants over all targets (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument("--only", default="", help="targets whose path contains this text")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="per-mutant test timeout (a timeout counts as killed)")
    parser.add_argument("--min-score", type=float, default=90.0, help="exit 1 below this percentage killed")
    parser.add_argument("--session-dir", type=Path, default=None,
                        help="keep the sessions here and resume them: killed mutants are not run again "
                             "(default: a temporary folder, a fresh run)")
    parser.add_argument("--report", action="store_true",
                        help="with --session-dir: print the sessions' scores and survivors so far, run nothing")
    parser.add_argument("--limit", type=int, default=0,
                        help="run at most this many not yet run mutants now, in file and line order (0: all)")
    args = parser.parse_args()
    targets = [target for target in TARGETS if args.only in target.path]
    environ = {name: value for name, value in os.environ.items() if not name.startswith("CDIMF_")}
    environ["PYTHONDONTWRITEBYTECODE"] = "1"
    _clear_bytecode()
    started = time.monotonic()
    originals = {target.path: (ROOT / target.path).read_bytes() for target in targets}
    try:
        return _run(targets, args, environ, started)
    finally:
        # cosmic-ray restores each mutant itself; this covers an interrupted run
        for path, content in originals.items():
            if (ROOT / path).read_bytes() != content:
                (ROOT / path).write_bytes(content)
                print(f"restored {path}", file=sys.stderr)


def _run(targets: list[Target], args: argparse.Namespace, environ: dict[str, str], started: float) -> int:
    """The sessions of `targets`: init or resume, choose, exec, report; the exit status."""
    with tempfile.TemporaryDirectory(prefix="cdimf-mutation-") as scratch:
        folder = args.session_dir or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        sessions = []
        for target in targets:
            found = _session(target, folder.resolve(), args.timeout_s, environ, args.report)
            if found is None:
                print(f"{target.path}: no session for this source yet", flush=True)
                continue
            config, db_path = found
            sessions.append((target, config, db_path, _scope(ROOT / target.path, target.functions)))
        chosen: set[str] | None = None
        if args.sample or args.limit:
            everything = [pending for _, _, db_path, scope in sessions for pending in _pending_ids(db_path, scope)]
            if args.sample:
                everything = random.Random(args.seed).sample(everything, min(args.sample, len(everything)))
            if args.limit:
                everything = sorted(everything)[: args.limit]
            chosen = {job for _, job in everything}
        total_killed = total_survived = total_left = ran = 0
        all_survivors: list[str] = []
        executing = 0.0
        for target, config, db_path, scope in sessions:
            left = 0 if args.report else _skip_outside(db_path, scope, chosen)
            if left:
                began = time.monotonic()
                subprocess.run(["cosmic-ray", "exec", str(config), str(db_path)], cwd=ROOT, env=environ, check=True)
                executing += time.monotonic() - began
                ran += left
            killed, survived, pending, survivors = _results(db_path, scope)
            total_killed += killed
            total_survived += survived
            total_left += pending
            all_survivors += survivors
            tried = killed + survived
            share = f"{100.0 * killed / tried:.1f} %" if tried else "-"
            print(f"{target.path}: {killed} killed, {survived} survived of {tried} run ({share}), {pending} not yet run", flush=True)
    run = total_killed + total_survived
    score = 100.0 * total_killed / run if run else 100.0
    pace = f", {executing / ran:.1f} s per mutant" if ran else ""
    print(f"mutation score {score:.1f} % ({total_killed} killed of {run}; {total_left} not yet run) "
          f"in {time.monotonic() - started:.0f} s, {ran} run now{pace}")
    for line in all_survivors:
        print(f"  survived {line}")
    return 0 if score >= args.min_score else 1


if __name__ == "__main__":
    sys.exit(main())
