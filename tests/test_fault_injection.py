"""Seeded fault injection on real processes: kill -9 and SIGSTOP/SIGCONT of any process at drawn moments.

Synchronous trials must end bit-identical to the uninterrupted run of the same test session
(every node's X, Y, U and Z, and the aggregator's stored Z); deadline trials must finish. No
process may exit by itself and no round may be missing from the stored run. The faults come
from a fixed seed, so a failure names a trial that fails again; `FAULT_TRIALS` raises the number
of trials (scripts/fault_soak.py runs many more and prints the tally).
"""

import os
import random
from pathlib import Path

import pytest

from tests.fault_injection import Fault, Outcome, draw_faults, run_trial

ROUNDS = 24
FAULTS_PER_TRIAL = 2
SYNCHRONOUS_TRIALS = int(os.environ.get("FAULT_TRIALS", "3"))
DEADLINE_TRIALS = max(1, SYNCHRONOUS_TRIALS // 3)
SEED = 12
DEADLINE_S = 0.3

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    """The uninterrupted synchronous run, in this test session, on the same data and parameters."""
    outcome = run_trial(tmp_path_factory.mktemp("reference"), [], ROUNDS)
    assert outcome.finished and not outcome.crashed and not outcome.missing_rounds, outcome
    assert len(outcome.arrays) == 9, sorted(outcome.arrays)  # 2 x (X, Y, U, Z) and the aggregator's Z
    return outcome


def _trials(seed: int, count: int, span_s: float) -> list[list[Fault]]:
    """`count` fault lists from one seeded generator, their moments spread over `span_s`."""
    rng = random.Random(seed)
    return [draw_faults(rng, FAULTS_PER_TRIAL, span_s) for _ in range(count)]


def _every_kind_is_drawn(trials: list[list[Fault]]) -> None:
    """The seed's draw exercises a kill and a pause, of the aggregator and of a node (else the seed is useless)."""
    drawn = {(fault.role == "aggregator", fault.kind) for faults in trials for fault in faults}
    assert {(True, "kill"), (True, "stop"), (False, "kill"), (False, "stop")} <= drawn, drawn


def test_synchronous_runs_under_kills_and_pauses_end_bit_identical(tmp_path: Path, reference: Outcome) -> None:
    """Each trial: two faults of any process at moments within the reference run's duration."""
    trials = _trials(SEED, SYNCHRONOUS_TRIALS, reference.duration_s)
    if SYNCHRONOUS_TRIALS >= 3:
        _every_kind_is_drawn(trials)
    applied = 0
    for index, faults in enumerate(trials):
        outcome = run_trial(tmp_path / f"trial-{index}", faults, ROUNDS)
        context = f"trial {index} (seed {SEED}): {faults}"
        assert outcome.finished, f"{context}: the run did not finish"
        assert not outcome.crashed, f"{context}: {outcome.crashed}"
        assert not outcome.missing_rounds, f"{context}: rounds {outcome.missing_rounds} lost"
        assert not outcome.missed_the_end, f"{context}: {outcome.missed_the_end} without the last round"
        assert outcome.differences(reference) == [], f"{context}: not bit-identical"
        applied += len(outcome.applied)
    # most faults must land inside the run, or the suite tests nothing (a fault drawn after the
    # end is skipped; the restarts and pauses make runs last longer than the reference, so few are)
    assert applied >= FAULTS_PER_TRIAL * SYNCHRONOUS_TRIALS // 2, applied


def test_deadline_runs_under_kills_and_pauses_finish(tmp_path: Path, reference: Outcome) -> None:
    """With a round deadline and min_domains 1 the result depends on timing: the run must finish, every round closed,
    every node settled (finished on the last round, or idle when it came back after the end)."""
    trials = _trials(SEED + 1, DEADLINE_TRIALS, reference.duration_s)
    for index, faults in enumerate(trials):
        outcome = run_trial(tmp_path / f"trial-{index}", faults, ROUNDS, round_deadline_s=DEADLINE_S)
        context = f"deadline trial {index} (seed {SEED + 1}): {faults}"
        assert outcome.finished, f"{context}: the run did not finish"
        assert not outcome.crashed, f"{context}: {outcome.crashed}"
        assert not outcome.missing_rounds, f"{context}: rounds {outcome.missing_rounds} lost"
        assert outcome.applied, f"{context}: no fault hit the run"
