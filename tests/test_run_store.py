"""One suite for both RunStores: what a restarted aggregator resumes from, and what it refuses.

`reopen` gives the store as a restarted aggregator finds it: the same MemoryRunStore, or a new
DirectoryRunStore over the same directory (read back from its files).
"""

import json
import shutil
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from cdimf.aggregator.rounds import SavedRun, StateError
from cdimf.aggregator.state import SAVE_RETRY_S, AggregatorState
from cdimf.aggregator.store import CONSENSUS_DIR, CONTRIBUTIONS_DIR, LEGACY_RUN_FILE, RUN_FILE, DirectoryRunStore, MemoryRunStore, RunStore
from cdimf.common.atomic_files import StateFileError, read_arrays, write_arrays_atomically
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
    # a push into round 2, acked after round 1's commit: saved on arrival, so the restart keeps it
    pushes["sport", 2] = contribution_of(saved, "sport", 7)
    saved.accept_contribution("r", "sport", 2, pushes["sport", 2])
    restarted = AggregatorState(store=reopen(), clock=FakeClock())
    assert [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")] == []
    run = restarted.run
    assert run is not None and run.run_id == "r" and run.current_round == 2 and run.consensus_round == 1
    np.testing.assert_array_equal(run.consensus, uninterrupted.run.consensus)
    assert run.tags == {"books": 1, "cloth": 1, "sport": 2} and run.reported == ["sport"]
    assert sorted(run.contributions) == ["sport"], "only the open round's: a synchronous run never reuses round 1's"
    np.testing.assert_array_equal(run.contributions["sport"][1], pushes["sport", 2])
    assert consensus_for(restarted, "r", "sport", 2) is None  # acked: it waits for the others, never pushes again
    expect("ALREADY_EXISTS", lambda: restarted.accept_contribution("r", "sport", 2, pushes["sport", 2]))
    uninterrupted.accept_contribution("r", "sport", 2, pushes["sport", 2])
    for state in (uninterrupted, restarted):
        for i, name in enumerate(state.run.admitted):
            if name != "sport":
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
    # the format of earlier versions: Z inside the run file, no consensus or contributions folder
    meta = json.loads(read_arrays(tmp_path / RUN_FILE)["meta"].tobytes())
    del meta["consensus_file"], meta["kept_contributions"]
    np.savez(tmp_path / LEGACY_RUN_FILE, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), consensus=state.run.consensus)
    (tmp_path / RUN_FILE).unlink()
    shutil.rmtree(tmp_path / CONSENSUS_DIR)
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


# ----- contributions saved as they arrive -----


def test_a_restart_holding_every_contribution_of_the_open_round_closes_it_at_once(reopen: Callable[[], RunStore]) -> None:
    """Killed after the last push was acked but before its close: the restart finishes the close, with the Z of the uninterrupted run."""
    params = RunParams(run_id="r", rounds=2, rank=RANK)
    uninterrupted, saved = registered(), registered(store=reopen())
    for state in (uninterrupted, saved):
        state.start_run(params)
    for i, name in enumerate(saved.run.admitted):
        values = contribution_of(saved, name, i)
        uninterrupted.accept_contribution("r", name, 1, values)
        saved.take_contribution("r", name, 1, values)  # taken, not closed: the close runs after the ack
    assert saved.run.consensus_round == 0 and saved.round_due()
    restarted = AggregatorState(store=reopen(), clock=FakeClock())
    assert restarted.run.consensus_round == 1 and restarted.run.current_round == 2
    np.testing.assert_array_equal(restarted.run.consensus, uninterrupted.run.consensus)
    assert restarted.run.consensus_contributors == uninterrupted.run.consensus_contributors
    assert restarted.run.contribution_counts == uninterrupted.run.contribution_counts


def test_a_synchronous_run_lets_go_of_the_contributions_its_close_used(tmp_path: Path, reopen: Callable[[], RunStore]) -> None:
    """One copy of each matrix: after the commit the store holds none of the used contributions (in memory or on disk)."""
    store = reopen()
    state = registered(store=store)
    state.start_run(RunParams(run_id="r", rounds=2, rank=RANK))
    for i, name in enumerate(state.run.admitted):
        state.accept_contribution("r", name, 1, contribution_of(state, name, i))
    assert state.run.consensus_round == 1 and state.run.contributions == {}
    if isinstance(store, MemoryRunStore):
        assert store._contributions == {}
    else:
        assert list((tmp_path / "state" / CONTRIBUTIONS_DIR).iterdir()) == []
    loaded = reopen().load_run()
    assert loaded is not None and loaded.contributions == {} and loaded.arrived == {}


def test_a_contribution_that_cannot_be_saved_is_refused_unavailable_and_changes_nothing(tmp_path: Path) -> None:
    """No ack without the file: a directory where the file goes (like a full disk) refuses the push, leaves the run as it
    was and is reported like a failed save (persist_error, a persist_failed event) until a retried save succeeds."""
    clock = FakeClock()
    state = registered(tmp_path, clock)
    state.start_run(RunParams(run_id="r", rounds=2, rank=RANK))
    blocked = tmp_path / CONTRIBUTIONS_DIR / "sport.arrays"
    blocked.mkdir(parents=True)
    (blocked / "blocker").write_bytes(b"x")
    before = (dict(state.run.tags), list(state.run.reported), dict(state.run.contribution_counts))
    with pytest.raises(StateError) as refused:
        state.take_contribution("r", "sport", 1, contribution_of(state, "sport", 0))
    assert refused.value.status == "UNAVAILABLE" and str(blocked) in refused.value.message
    assert (dict(state.run.tags), list(state.run.reported), dict(state.run.contribution_counts)) == before
    assert state.persist_error is not None and str(blocked) in state.status().persistence_error
    assert state.run.events[-1].kind == "persist_failed" and str(blocked) in state.run.events[-1].message
    expect("UNAVAILABLE", lambda: state.check_contribution("r", "cloth", 1))
    (blocked / "blocker").unlink()
    blocked.rmdir()
    clock.now += SAVE_RETRY_S
    assert state.poll() is None and state.persist_error is None
    assert state.run.events[-1].kind == "persist_recovered"
    assert state.take_contribution("r", "sport", 1, contribution_of(state, "sport", 0)) == 1


def test_a_record_saved_mid_round_keeps_the_acked_contributions_and_who_reported(tmp_path: Path) -> None:
    """The retried save after a refused contribution commits mid-round: killed after it, the restart still holds books'
    acked push (books is not asked again) and the round closes on the others' pushes with the uninterrupted Z."""
    params = RunParams(run_id="r", rounds=2, rank=RANK)
    clock = FakeClock()
    uninterrupted, state = registered(), registered(tmp_path, clock)
    for each in (uninterrupted, state):
        each.start_run(params)
    pushes = {name: contribution_of(state, name, i) for i, name in enumerate(state.run.admitted)}
    uninterrupted.accept_contribution("r", "books", 1, pushes["books"])
    state.take_contribution("r", "books", 1, pushes["books"])
    blocked = tmp_path / CONTRIBUTIONS_DIR / "sport.arrays"
    blocked.mkdir()
    expect("UNAVAILABLE", lambda: state.take_contribution("r", "sport", 1, pushes["sport"]))
    blocked.rmdir()
    clock.now += SAVE_RETRY_S
    state.poll()
    assert state.persist_error is None  # the retry committed the run mid-round
    restarted = AggregatorState(tmp_path, clock=FakeClock())
    assert restarted.run.reported == ["books"] and restarted.run.tags == {"books": 1}
    expect("ALREADY_EXISTS", lambda: restarted.take_contribution("r", "books", 1, pushes["books"]))
    for each in (uninterrupted, restarted):
        for name in ("cloth", "sport"):
            each.accept_contribution("r", name, 1, pushes[name])
    assert restarted.run.consensus_round == 1
    np.testing.assert_array_equal(restarted.run.consensus, uninterrupted.run.consensus)


def test_a_z_file_whose_record_was_never_written_is_replaced_by_the_resumed_close(tmp_path: Path) -> None:
    """Killed between the Z file and the commit record: the record still names round 0, so the restart closes round 1 again."""
    params = RunParams(run_id="r", rounds=2, rank=RANK)
    uninterrupted, saved = registered(), registered(tmp_path)
    for state in (uninterrupted, saved):
        state.start_run(params)
    for i, name in enumerate(saved.run.admitted):
        values = contribution_of(saved, name, i)
        uninterrupted.accept_contribution("r", name, 1, values)
        saved.take_contribution("r", name, 1, values)
    z_file = tmp_path / CONSENSUS_DIR / "1.arrays"
    stale = np.full_like(uninterrupted.run.consensus, 7.0)
    write_arrays_atomically(z_file, {"meta": np.frombuffer(json.dumps({"run_id": "r", "round": 1}).encode(), np.uint8), "consensus": stale})
    restarted = AggregatorState(tmp_path, clock=FakeClock())
    np.testing.assert_array_equal(restarted.run.consensus, uninterrupted.run.consensus)
    np.testing.assert_array_equal(read_arrays(z_file)["consensus"], uninterrupted.run.consensus)
    assert sorted(path.name for path in (tmp_path / CONSENSUS_DIR).iterdir()) == ["1.arrays"]


def test_contribution_files_of_an_earlier_run_are_ignored_then_removed(tmp_path: Path) -> None:
    """A leftover of another run (a kill before its commit removed it) never counts in this run."""
    state = registered(tmp_path)
    state.start_run(RunParams(run_id="new", rounds=2, rank=RANK))
    DirectoryRunStore(tmp_path).save_contribution("old", "sport", 1, contribution_of(state, "sport", 0))
    restarted = AggregatorState(tmp_path, clock=FakeClock())
    assert restarted.run.tags == {} and restarted.run.reported == []
    restarted.take_contribution("new", "cloth", 1, contribution_of(restarted, "cloth", 1))
    restarted.stop_run("new")
    # the other run's file went at the commit; cloth's stays, named by the stopped run's record
    assert sorted(path.name for path in (tmp_path / CONTRIBUTIONS_DIR).iterdir()) == ["cloth.arrays"]


def test_a_kept_contribution_whose_file_is_missing_is_refused_naming_it(tmp_path: Path) -> None:
    """A deadline run's round 2 reuses a silent domain's round-1 values: without their file it cannot resume the same run."""
    clock = FakeClock()
    state = registered(tmp_path, clock)
    state.start_run(RunParams(run_id="a", rounds=3, rank=RANK, round_deadline_s=5.0, min_domains=1))
    for i, name in enumerate(state.run.admitted):
        state.accept_contribution("a", name, 1, contribution_of(state, name, i))
    assert state.run.consensus_round == 1 and sorted(state.run.contributions) == ["books", "cloth", "sport"]
    path = tmp_path / CONTRIBUTIONS_DIR / "books.arrays"
    path.unlink()
    with pytest.raises(StateFileError) as refused:
        AggregatorState(tmp_path)
    assert str(refused.value).startswith(f"{path}: missing"), str(refused.value)


def test_a_deadline_run_saved_by_an_earlier_version_keeps_its_contributions_over_two_restarts(tmp_path: Path) -> None:
    """Contributions held inside an old run file are written to their own files at the first commit, so a second restart still has them."""
    params = RunParams(run_id="a", rounds=3, rank=RANK, round_deadline_s=5.0, min_domains=1)
    clocks = {"uninterrupted": FakeClock(), "saved": FakeClock()}
    uninterrupted, saved = registered(clock=clocks["uninterrupted"]), registered(tmp_path, clocks["saved"])
    for state in (uninterrupted, saved):
        state.start_run(params)
        for i, name in enumerate(state.run.admitted):
            state.accept_contribution("a", name, 1, contribution_of(state, name, i))
    # the format of earlier versions: Z and the kept contributions inside the run file, no folders
    meta = json.loads(read_arrays(tmp_path / RUN_FILE)["meta"].tobytes())
    old = {"consensus": saved.run.consensus, **{f"contribution_{i}": saved.run.contributions[name][1] for i, name in enumerate(meta["domains"])}}
    del meta["consensus_file"], meta["kept_contributions"]
    write_arrays_atomically(tmp_path / RUN_FILE, {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8), **old})
    shutil.rmtree(tmp_path / CONSENSUS_DIR)
    shutil.rmtree(tmp_path / CONTRIBUTIONS_DIR)
    for state, clock in ((uninterrupted, clocks["uninterrupted"]), (AggregatorState(tmp_path, clock=clocks["saved"]), clocks["saved"])):
        state.accept_contribution("a", "sport", 2, contribution_of(state, "sport", 10))
        clock.now += 6
        assert state.poll() == 2  # books and cloth silent: their round-1 rows stay in Z
    again = AggregatorState(tmp_path, clock=clocks["saved"])
    assert sorted(again.run.contributions) == ["books", "cloth", "sport"]
    for state, clock in ((uninterrupted, clocks["uninterrupted"]), (again, clocks["saved"])):
        state.accept_contribution("a", "cloth", 3, contribution_of(state, "cloth", 11))
        clock.now += 6
        assert state.poll() == 3
    np.testing.assert_array_equal(again.run.consensus, uninterrupted.run.consensus)
