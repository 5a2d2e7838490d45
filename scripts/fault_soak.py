"""Many seeded fault-injection trials on real processes, then the tally: faults tried / survived, crashes, data lost.

    python scripts/fault_soak.py                      # 20 trials, 3 faults each, seed 12
    python scripts/fault_soak.py --trials 60 --faults 4 --seed 7 --max-minutes 30

Trials alternate synchronous (must end bit-identical to the uninterrupted run of this
invocation) and round-deadline runs (must finish). Every trial is bounded
(tests.fault_injection.TRIAL_TIMEOUT_S) and the whole soak stops itself after --max-minutes.
A fault survived when its trial finished, no process exited by itself, no round is missing from
the stored run and, for synchronous trials, every array equals the reference's byte for byte.
Exit status 1 when any fault was not survived.
"""

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fault_injection import draw_faults, run_trial  # noqa: E402

DEADLINE_S = 0.3


def main(argv: list[str] | None = None) -> int:
    """Run the soak and print its tally (JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="trials to run (half synchronous, half with a round deadline)")
    parser.add_argument("--faults", type=int, default=3, help="faults drawn per trial")
    parser.add_argument("--rounds", type=int, default=24, help="rounds per run")
    parser.add_argument("--seed", type=int, default=12, help="seed of the fault draw")
    parser.add_argument("--max-hold-s", type=float, default=1.5, help="longest outage of a killed process or pause of a stopped one")
    parser.add_argument("--max-minutes", type=float, default=20.0, help="stop starting trials after this long")
    parser.add_argument("--json", action="store_true", help="print the tally as JSON")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    stop_at = time.monotonic() + 60 * args.max_minutes
    tally = {"trials": 0, "faults_tried": 0, "faults_survived": 0, "faults_skipped": 0, "crashes": 0,
             "data_lost_trials": 0, "not_identical_trials": 0, "stalled_trials": 0, "tracebacks_logged": 0,
             "deadline_trials_a_node_missed_the_end": 0,
             "by_fault": {}}
    failures: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="cdimf-soak-"))
    try:
        reference = run_trial(folder / "reference", [], args.rounds)
        if not reference.finished:
            failures.append("the uninterrupted reference run did not finish")
            return 1
        for index in range(args.trials):
            if time.monotonic() > stop_at:
                break
            synchronous = index % 2 == 0
            faults = draw_faults(rng, args.faults, reference.duration_s, args.max_hold_s)
            outcome = run_trial(folder / f"trial-{index}", faults, args.rounds, 0.0 if synchronous else DEADLINE_S)
            different = outcome.differences(reference) if synchronous and outcome.finished else []
            missed = bool(outcome.missed_the_end)
            good = outcome.finished and not outcome.crashed and not outcome.missing_rounds and not different and not (synchronous and missed)
            tally["trials"] += 1
            tally["faults_tried"] += len(outcome.applied)
            tally["faults_skipped"] += len(outcome.skipped)
            tally["faults_survived"] += len(outcome.applied) if good else 0
            tally["crashes"] += len(outcome.crashed)
            tally["data_lost_trials"] += bool(outcome.missing_rounds)
            tally["not_identical_trials"] += bool(different)
            tally["stalled_trials"] += not outcome.finished
            tally["tracebacks_logged"] += outcome.tracebacks
            tally["deadline_trials_a_node_missed_the_end"] += missed and not synchronous
            for fault in outcome.applied:
                key = f"{fault.kind} {'aggregator' if fault.role == 'aggregator' else 'node'}"
                tally["by_fault"][key] = tally["by_fault"].get(key, 0) + 1
            line = (f"trial {index} {'sync' if synchronous else 'deadline'}: {len(outcome.applied)} faults "
                    f"({', '.join(f'{f.kind} {f.role} @{f.at_s:.2f}s/{f.hold_s:.2f}s' for f in outcome.applied)}) -> "
                    f"{'ok' if good else 'FAILED'} in {outcome.duration_s:.1f} s")
            print(line, file=sys.stderr, flush=True)
            if not good:
                failures.append(f"{line}: crashed={outcome.crashed} missing={outcome.missing_rounds} different={different} "
                                f"missed the end={outcome.missed_the_end} folder={folder / f'trial-{index}'}")
    finally:
        if not failures:  # a failed trial's logs and state stay for a look
            shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        print(json.dumps({**tally, "failures": failures}, indent=2))
    else:
        print(f"trials {tally['trials']} (seed {args.seed}, {args.faults} faults each, {args.rounds} rounds)")
        print(f"faults tried {tally['faults_tried']}, survived {tally['faults_survived']} "
              f"(drawn after the run ended: {tally['faults_skipped']}); by kind {tally['by_fault']}")
        print(f"crashes {tally['crashes']}, trials with data lost {tally['data_lost_trials']}, "
              f"synchronous trials not bit-identical {tally['not_identical_trials']}, stalled {tally['stalled_trials']}, "
              f"tracebacks logged {tally['tracebacks_logged']}")
        print(f"deadline trials that ended while a node was down (it came back idle, without the last round): "
              f"{tally['deadline_trials_a_node_missed_the_end']}")
        for failure in failures:
            print("  " + failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
