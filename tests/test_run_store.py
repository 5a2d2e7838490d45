"""One suite for both RunStores: what a restarted aggregator resumes from, and what it refuses.

`reopen` gives the store as a restarted aggregator finds it: the same MemoryRunStore, or a new
DirectoryRunStore over the same directory (read back from its files).
"""

import json
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from cdimf.aggregator.rounds import SavedRun
from cdimf.aggregator.state import AggregatorState
from cdimf.aggregator.store import LEGACY_RUN_FILE, RUN_FILE, DirectoryRunStore, MemoryRunStore, RunStore
from cdimf.common.atomic_files import read_arrays, write_arrays_atomically
from cdimf.common.config import ConfigError, RunParams
from cdimf.common.core.params import ADMMParams
from cdimf.common.security.pseudonyms import membership_fingerprint, pseudonymize
from tests.aggregator_helpers import RANK, SECRET, FakeClock, consensus_for, contribution_of, expect, registered

FILE_SECRET = b"a-federation-secret-for-file-tests"
FILE_RANK = 3
FILE_DOMAINS = {"sport": ["u1", "u2", "u3"], "cloth": ["u2", "u3", "u4"]}


@pytest.fixture(params=["memory", "directory"])
def reopen(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], RunStore]:
    """The store as found after a restart (each call is a restart)."""
    if request.param == "memory":
        store = MemoryRunStore()
        return lambda: store
    return lambda: DirectoryRunStore(tmp_path / "state")


def _same_saved_run(loaded: SavedRun, saved: SavedRun) -> None:
    """Two saved runs are equal field by field (arrays by value)."""
    for field in fields(SavedRun):
        mine, theirs = getattr(loaded, field.name), getattr(saved, field.name)
        if field.name == "consensus":
            np.testing.assert_array_equal(mine, theirs)
        elif field.name == "contributions":
            assert sorted(mine) == sorted(theirs)
            for name in mine:
                np.testing.assert_array_equal(mine[name], theirs[name])
        else:
            assert mine == theirs, field.name


def test_an_empty_store_holds_nothing(reopen: Callable[[], RunStore]) -> None:
    store = reopen()
    assert store.load_registrations() == {} and store.load_run() is None
    state = AggregatorState(store=reopen())
    assert state.registrations == {} and state.run is None


def test_registrations_and_the_run_round_trip(reopen: Callable[[], RunStore]) -> None:
    """What a state saved is what the store gives back: registrations, and the run with its kept contributions."""
    clock = FakeClock()
    state = registered(store=reopen(), clock=clock)
    run = state.start_run(RunParams(run_id="t", rounds=3, rank=RANK, round_deadline_s=5.0, min_domains=1))
    for i, name in enumerate(run.admitted):
        state.accept_contribution("t", name, 1, contribution_of(state, name, i))
    state.report_metrics("t", "sport", 1, {"hr@10": 0.25})
    state.accept_contribution("t", "sport", 2, contribution_of(state, "sport", 9))
    clock.now += 6
    assert state.poll() == 2
    store = reopen()
    loaded = store.load_registrations()
    assert sorted(loaded) == sorted(state.registrations)
    for name, registration in state.registrations.items():
        np.testing.assert_array_equal(loaded[name].pseudonyms, registration.pseudonyms)
        np.testing.assert_array_equal(loaded[name].holder, registration.holder)
        assert loaded[name].fingerprint == registration.fingerprint
    saved = store.load_run()
    assert saved is not None
    _same_saved_run(saved, run.saved({d: r.fingerprint for d, r in state.registrations.items()}))
    assert saved.metrics == {"sport": {1: {"hr@10": 0.25}}} and saved.events[-1].kind == "round_closed"


def test_a_running_run_whose_registrations_changed_is_refused(reopen: Callable[[], RunStore]) -> None:
    state = registered(store=reopen())
    state.start_run(RunParams(run_id="r", rounds=2, rank=RANK))
    store = reopen()
    changed = dict(store.load_registrations())
    other = pseudonymize(["z1", "z2"], SECRET)
    changed["cloth"] = type(changed["cloth"])("cloth", other, np.ones(2, bool), membership_fingerprint(other, np.ones(2, bool)))
    store.save_registrations(changed)
    with pytest.raises(ValueError, match="cloth"):
        AggregatorState(store=reopen())


def test_an_ended_run_whose_domains_re_registered_is_not_resumed(reopen: Callable[[], RunStore]) -> None:
    state = registered(store=reopen())
    state.start_run(RunParams(run_id="r", rounds=2, rank=RANK))
    state.stop_run("r")
    other = pseudonymize(["z1", "z2"], SECRET)
    state.register("cloth", other, np.ones(2, bool))  # allowed: the run is over
    restarted = AggregatorState(store=reopen())
    assert restarted.run is None and len(restarted.registrations["cloth"].holder) == 2


def test_restart_resumes_from_the_last_round_and_equals_the_uninterrupted_run(tmp_path: Path, reopen: Callable[[], RunStore]) -> None:
    uninterrupted = registered()
    saved = registered(store=reopen())
    pushes = {}
    for state in (uninterrupted, saved):
        run = state.start_run(RunParams(run_id="r", rounds=2, rank=RANK, admm=ADMMParams(rho=1.0, prox="l2", lambda_z=1.0)))
        for i, name in enumerate(run.admitted):
            pushes[name, 1] = contribution_of(state, name, i)
            state.accept_contribution("r", name, 1, pushes[name, 1])
    # a push into round 2 that is not yet saved (rounds are saved when they close) is lost
    saved.accept_contribution("r", "sport", 2, contribution_of(saved, "sport", 7))
    restarted = AggregatorState(store=reopen(), clock=FakeClock())
    assert [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")] == []
    run = restarted.run
    assert run is not None and run.run_id == "r" and run.current_round == 2 and run.consensus_round == 1
    np.testing.assert_array_equal(run.consensus, uninterrupted.run.consensus)
    assert run.tags == {"books": 1, "cloth": 1, "sport": 1}
    assert run.contributions == {}, "a synchronous run does not save contributions: the next round replaces them all"
    expect("FAILED_PRECONDITION", lambda: consensus_for(restarted, "r", "sport", 2))  # push it again
    for state in (uninterrupted, restarted):
        for i, name in enumerate(state.run.admitted):
            state.accept_contribution("r", name, 2, contribution_of(state, name, 20 + i))
    assert restarted.run.state == uninterrupted.run.state == "finished"
    np.testing.assert_array_equal(restarted.run.consensus, uninterrupted.run.consensus)
    again = AggregatorState(store=reopen())
    assert again.run.state == "finished" and again.run.consensus_round == 2
    assert sorted(again.registrations) == ["books", "cloth", "sport"]


def test_asynchronous_restart_keeps_the_contributions_that_later_rounds_reuse(tmp_path: Path, reopen: Callable[[], RunStore]) -> None:
    """With a deadline, a silent domain's older contribution feeds later rounds, so it is saved."""
    params = RunParams(run_id="a", rounds=3, rank=RANK, round_deadline_s=5.0, min_domains=1, max_staleness=1)
    clocks = {"uninterrupted": FakeClock(), "saved": FakeClock()}
    uninterrupted = registered(clock=clocks["uninterrupted"])
    saved = registered(store=reopen(), clock=clocks["saved"])
    for name, state in (("uninterrupted", uninterrupted), ("saved", saved)):
        state.start_run(params)
        for i, domain in enumerate(state.run.admitted):
            state.accept_contribution("a", domain, 1, contribution_of(state, domain, i))
        state.accept_contribution("a", "sport", 2, contribution_of(state, "sport", 10))
        clocks[name].now += 6
        assert state.poll() == 2  # books and cloth silent: their round-1 rows stay in Z
    clock = FakeClock()
    restarted = AggregatorState(store=reopen(), clock=clock)
    run = restarted.run
    assert run.tags == {"books": 1, "cloth": 1, "sport": 2}
    assert sorted(run.contributions) == ["books", "cloth", "sport"]
    for state, state_clock in ((uninterrupted, clocks["uninterrupted"]), (restarted, clock)):
        state.accept_contribution("a", "sport", 3, contribution_of(state, "sport", 11))
        state_clock.now += 6
        assert state.poll() == 3
    assert restarted.run.state == "finished"
    np.testing.assert_array_equal(restarted.run.consensus, uninterrupted.run.consensus)


def _file_registered(state_dir: Path) -> AggregatorState:
    """A saved aggregator with both domains registered (every row held)."""
    state = AggregatorState(state_dir)
    for name, keys in FILE_DOMAINS.items():
        state.register(name, pseudonymize(keys, FILE_SECRET), np.ones(len(keys), dtype=bool))
    return state


def _close_round(state: AggregatorState, round_index: int) -> None:
    """Both domains push for `round_index`, which closes it."""
    assert state.run is not None
    for seed, name in enumerate(state.run.admitted):
        rows = len(state.run.memberships[name].shared_rows)
        values = np.random.default_rng(10 * round_index + seed).standard_normal((rows, FILE_RANK)).astype(np.float32)
        state.accept_contribution(state.run.run_id, name, round_index, values)


def test_a_run_saved_as_npz_by_an_earlier_version_resumes_and_is_then_replaced(tmp_path: Path) -> None:
    """run.npz alone (the old format) restores the same round and Z; the next save leaves only the container."""
    state = _file_registered(tmp_path)
    state.start_run(RunParams(run_id="r", rounds=3, rank=FILE_RANK))
    _close_round(state, 1)
    assert state.run is not None and state.run.consensus is not None
    np.savez(tmp_path / LEGACY_RUN_FILE, **read_arrays(tmp_path / RUN_FILE))
    (tmp_path / RUN_FILE).unlink()
    restarted = AggregatorState(tmp_path)
    assert restarted.run is not None and (restarted.run.current_round, restarted.run.consensus_round) == (2, 1)
    np.testing.assert_array_equal(restarted.run.consensus, state.run.consensus)
    _close_round(restarted, 2)
    assert not (tmp_path / LEGACY_RUN_FILE).exists()
    again = AggregatorState(tmp_path)
    assert again.run is not None and again.run.consensus_round == 2
    np.testing.assert_array_equal(again.run.consensus, restarted.run.consensus)


def test_stored_run_parameters_that_no_longer_validate_are_a_config_error(tmp_path: Path) -> None:
    """A run file whose parameters this version rejects names the file instead of resuming something else."""
    state = _file_registered(tmp_path)
    state.start_run(RunParams(run_id="r", rounds=3, rank=FILE_RANK))
    arrays = read_arrays(tmp_path / RUN_FILE)
    meta = json.loads(arrays["meta"].tobytes())
    meta["params"]["rounds"] = -1
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    write_arrays_atomically(tmp_path / RUN_FILE, arrays)
    with pytest.raises(ConfigError, match=RUN_FILE):
        AggregatorState(tmp_path)
