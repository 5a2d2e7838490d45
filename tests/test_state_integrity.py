"""The aggregator's state folder under damage and disk faults: a damaged file is named and refused, an unsaved round is never served."""

from pathlib import Path

import numpy as np
import pytest

from cdimf.aggregator.state import SAVE_RETRY_S, AggregatorState
from cdimf.aggregator.store import CONSENSUS_DIR, LEGACY_REGISTRATIONS_FILE, REGISTRATIONS_FILE, RUN_FILE
from cdimf.common.atomic_files import StateFileError, StateWriteError, read_arrays, write_arrays_atomically
from cdimf.common.config import RunParams
from tests.aggregator_helpers import DOMAINS, RANK, FakeClock, consensus_for, contribution_of, expect, registered


def _run_with_one_round(state_dir: Path, rounds: int = 3) -> tuple[AggregatorState, FakeClock]:
    """A saved aggregator whose run closed round 1."""
    clock = FakeClock()
    state = registered(state_dir, clock)
    state.start_run(RunParams(run_id="r", rounds=rounds, rank=RANK))
    for seed, name in enumerate(DOMAINS):
        state.accept_contribution("r", name, 1, contribution_of(state, name, seed))
    assert state.run is not None and state.run.consensus_round == 1
    return state, clock


def _flip_byte_in_consensus(path: Path) -> None:
    """Flip one byte inside the stored Z's payload (the file's size and structure stay intact)."""
    arrays = read_arrays(path)
    payload = arrays["consensus"].tobytes()
    whole = bytearray(path.read_bytes())
    at = bytes(whole).index(payload) + len(payload) // 2
    whole[at] ^= 0x10
    path.write_bytes(bytes(whole))


@pytest.mark.parametrize("damage", ["flipped byte in Z", "truncated", "empty", "trailing bytes"])
def test_a_damaged_run_file_is_refused_naming_it(tmp_path: Path, damage: str) -> None:
    """Never a silently different Z: the restart fails with the file's path and what is wrong with it."""
    _run_with_one_round(tmp_path)
    # Z has its own file, named by the run file (the commit record) written after it
    path = tmp_path / CONSENSUS_DIR / "1.arrays" if damage == "flipped byte in Z" else tmp_path / RUN_FILE
    whole = path.read_bytes()
    if damage == "flipped byte in Z":
        _flip_byte_in_consensus(path)
    else:
        path.write_bytes({"truncated": whole[: len(whole) * 2 // 3], "empty": b"", "trailing bytes": whole + b"\x00"}[damage])
    reason = {"flipped byte in Z": "checksum mismatch: the file is damaged", "truncated": "array 'meta' is cut short",
              "empty": "not a readable state file (empty", "trailing bytes": "1 bytes after its end"}[damage]
    with pytest.raises(StateFileError) as refused:
        AggregatorState(tmp_path)
    assert str(refused.value).startswith(f"{path}: {reason}"), str(refused.value)


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "empty"])
def test_a_damaged_registrations_file_is_refused_naming_it(tmp_path: Path, damage: str) -> None:
    """The registrations file carries the same checksum."""
    _run_with_one_round(tmp_path)
    path = tmp_path / REGISTRATIONS_FILE
    whole = bytearray(path.read_bytes())
    if damage == "flipped byte":
        whole[len(whole) // 2] ^= 0x01
        path.write_bytes(bytes(whole))
    else:
        path.write_bytes(bytes(whole[: len(whole) // 2]) if damage == "truncated" else b"")
    with pytest.raises(StateFileError, match=str(path)):
        AggregatorState(tmp_path)


def test_a_stored_nan_consensus_is_refused_before_it_is_served(tmp_path: Path) -> None:
    """A Z that is not finite (written with a valid checksum) never reaches a pull."""
    _run_with_one_round(tmp_path)
    path = tmp_path / CONSENSUS_DIR / "1.arrays"
    arrays = read_arrays(path)
    arrays["consensus"] = arrays["consensus"].copy()
    arrays["consensus"][0, 0] = np.nan
    write_arrays_atomically(path, arrays)
    with pytest.raises(StateFileError, match="not a finite float32"):
        AggregatorState(tmp_path)


def test_a_finished_run_without_its_registrations_is_refused_not_dropped(tmp_path: Path) -> None:
    """A deleted registrations file is named instead of silently forgetting the run."""
    state, _ = _run_with_one_round(tmp_path, rounds=1)
    assert state.run is not None and state.run.state == "finished"
    (tmp_path / REGISTRATIONS_FILE).unlink()
    with pytest.raises(StateFileError, match="registrations of"):
        AggregatorState(tmp_path)


def test_long_domain_names_come_back_whole_and_npz_registrations_still_load(tmp_path: Path) -> None:
    """A 63-character name (the longest the rule allows) survives a restart; an earlier version's .npz is read."""
    name = "d" * 63
    state = registered(tmp_path)
    state.register(name, np.arange(32, dtype=np.uint8).reshape(1, 32), np.ones(1, dtype=bool))
    assert name in AggregatorState(tmp_path).registrations
    arrays = read_arrays(tmp_path / REGISTRATIONS_FILE)
    import json

    names = json.loads(arrays.pop("meta").tobytes())["domains"]
    np.savez(tmp_path / LEGACY_REGISTRATIONS_FILE, domains=np.array(names), **arrays)
    (tmp_path / REGISTRATIONS_FILE).unlink()
    assert sorted(AggregatorState(tmp_path).registrations) == sorted([*DOMAINS, name])


def test_an_unsaved_round_is_held_back_reported_and_saved_once_the_disk_is_back(tmp_path: Path) -> None:
    """The run file cannot be replaced (a directory stands in its way: EISDIR, like a full or read-only disk).

    The closing push still succeeds, but Z is not served, pushes are UNAVAILABLE, the error is in
    the status and the events; once the obstacle is gone the retry saves round 2 and a restart
    resumes it with the same Z.
    """
    state, clock = _run_with_one_round(tmp_path)
    path = tmp_path / RUN_FILE
    path.unlink()
    path.mkdir()
    (path / "blocker").write_bytes(b"x")
    for seed, name in enumerate(DOMAINS):
        state.accept_contribution("r", name, 2, contribution_of(state, name, 10 + seed))
    assert state.run is not None and state.run.consensus_round == 2
    held = state.run.consensus.copy()
    assert state.persist_error is not None and str(path) in state.persist_error
    assert consensus_for(state, "r", "sport", 2) is None and consensus_for(state, "r", "sport", 1) is None
    expect("UNAVAILABLE", lambda: state.check_contribution("r", "sport", 3))
    assert str(path) in state.status().persistence_error
    assert [event.kind for event in state.run.events][-1] == "persist_failed"
    assert list(tmp_path.glob(".run.arrays.*.tmp")) == []
    clock.now += SAVE_RETRY_S
    assert state.poll() is None and state.persist_error is not None  # still blocked: still held back
    (path / "blocker").unlink()
    path.rmdir()
    assert state.poll() is None  # not yet time to retry
    clock.now += SAVE_RETRY_S
    state.poll()
    assert state.persist_error is None and state.status().persistence_error == ""
    pulled = consensus_for(state, "r", "sport", 2)
    assert pulled is not None and pulled[0] == 2
    restarted = AggregatorState(tmp_path)
    assert restarted.run is not None and restarted.run.consensus_round == 2
    np.testing.assert_array_equal(restarted.run.consensus, held)
    assert [event.kind for event in restarted.run.events][-2:] == ["persist_failed", "persist_recovered"]


def test_a_registration_that_cannot_be_saved_is_unavailable_and_changes_nothing(tmp_path: Path) -> None:
    """Registrations are saved before they count."""
    state = registered(tmp_path)
    path = tmp_path / REGISTRATIONS_FILE
    path.unlink()
    path.mkdir()
    (path / "blocker").write_bytes(b"x")
    before = dict(state.registrations)
    expect("UNAVAILABLE", lambda: state.register("newcomer", np.arange(32, dtype=np.uint8).reshape(1, 32), np.ones(1, dtype=bool)))
    assert state.registrations == before


def test_final_metrics_are_saved(tmp_path: Path) -> None:
    """Metrics of the last round arrive after the last save of a round: they are saved when reported."""
    state, _ = _run_with_one_round(tmp_path, rounds=1)
    state.report_metrics("r", "sport", 1, {"hr@10": 0.25})
    restarted = AggregatorState(tmp_path)
    assert restarted.run is not None and restarted.run.metrics == {"sport": {1: {"hr@10": 0.25}}}


def test_write_errors_name_the_file_and_errno(tmp_path: Path) -> None:
    """A failed replacement names the file and the errno symbol, and leaves no temp file."""
    target = tmp_path / "x.arrays"
    target.mkdir()
    (target / "blocker").write_bytes(b"x")
    with pytest.raises(StateWriteError, match=r"x\.arrays.*EISDIR"):
        write_arrays_atomically(target, {"a": np.ones(3)})
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["x.arrays"]


@pytest.mark.parametrize("field", ["rho", "lambda_z", "round_deadline_s"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_infinite_or_nan_run_parameters_are_refused(field: str, value: float) -> None:
    """rho = inf broke every solve and a deadline of inf never closes a round: both are configuration errors."""
    from pydantic import ValidationError

    from cdimf.common.core.params import ADMMParams

    with pytest.raises(ValidationError, match="finite"):
        if field == "round_deadline_s":
            RunParams(rounds=2, rank=RANK, round_deadline_s=value)
        else:
            RunParams(rounds=2, rank=RANK, admm=ADMMParams(**{field: value}))
