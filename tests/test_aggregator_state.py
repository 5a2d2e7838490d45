"""The aggregator's round and membership bookkeeping, without gRPC: rules and rejections (persistence: test_run_store.py)."""

from pathlib import Path

import numpy as np
import pytest

from cdimf.aggregator.rounds import StateError
from cdimf.aggregator.state import AggregatorState, sortable_keys
from cdimf.common.config import RunParams
from cdimf.common.core.admm import block_plan, blockwise_consensus, consensus
from cdimf.common.core.membership import ROLE_LOCAL, ROLE_RECEIVER, ROLE_SHARED, align_memberships, sorted_unique
from cdimf.common.core.params import ADMMParams
from cdimf.common.security.pseudonyms import pseudonymize
from tests.aggregator_helpers import DOMAINS, RANK, SECRET, FakeClock, consensus_for, contribution_of, expect, registered


def _snapshot(state: AggregatorState) -> tuple:
    run = state.run
    assert run is not None
    z = None if run.consensus is None else run.consensus.tobytes()
    tags = {d: (tag, values.tobytes()) for d, (tag, values) in run.contributions.items()}
    return run.state, run.current_round, run.consensus_round, z, tags, list(run.reported), len(run.events)


def test_membership_matches_the_engine_alignment_on_raw_keys() -> None:
    state = registered()
    sport, frozen = state.membership_for("sport")
    assert not frozen and sport.domains == ("books", "cloth", "sport")
    names = list(sport.domains)
    expected, _ = align_memberships(
        [np.array(DOMAINS[n][0]) for n in names], [np.array(DOMAINS[n][1], bool) for n in names]
    )
    for name, membership in zip(names, expected):
        mine = state.membership_for(name)[0]
        np.testing.assert_array_equal(mine.shared_rows, membership.shared_rows)
        np.testing.assert_array_equal(mine.receiver_rows, membership.receiver_rows)
    np.testing.assert_array_equal(sport.roles, [ROLE_LOCAL, ROLE_LOCAL, ROLE_SHARED, ROLE_SHARED, ROLE_RECEIVER])
    bit = {name: 1 << i for i, name in enumerate(names)}
    np.testing.assert_array_equal(
        sport.holder_masks,
        [bit["sport"], bit["sport"], bit["sport"] | bit["cloth"], bit["sport"] | bit["cloth"] | bit["books"], bit["books"]],
    )


def test_registration_is_idempotent_and_checked() -> None:
    state = registered()
    again = state.register("sport", pseudonymize(DOMAINS["sport"][0], SECRET), np.array(DOMAINS["sport"][1], bool))
    assert again is state.registrations["sport"]
    with pytest.raises(StateError) as error:
        state.register("dup", pseudonymize(["a", "a"], SECRET), np.ones(2, bool))
    assert error.value.status == "INVALID_ARGUMENT" and "twice" in error.value.message
    assert "dup" not in state.registrations
    state.start_run(RunParams(rounds=2, rank=RANK))
    with pytest.raises(StateError) as error:
        state.register("sport", pseudonymize(["x"], SECRET), np.ones(1, bool))
    assert error.value.status == "FAILED_PRECONDITION"
    assert len(state.registrations["sport"].holder) == 5


def test_synchronous_round_is_prox_of_the_mean_over_holders_like_the_engine() -> None:
    state = registered()
    admm = ADMMParams(rho=2.0, prox="l2", lambda_z=0.5)
    run = state.start_run(RunParams(rounds=2, rank=RANK, admm=admm))
    names = list(run.admitted)
    pushed = {name: contribution_of(state, name, seed) for seed, name in enumerate(names)}
    for name in names[:-1]:
        assert state.accept_contribution(run.run_id, name, 1, pushed[name]).closed_round is None
        assert consensus_for(state, run.run_id, name, 1) is None
    assert state.accept_contribution(run.run_id, names[-1], 1, pushed[names[-1]]).closed_round == 1
    # the engine's way: consensus over all global rows, rows keyed by raw user id
    memberships, global_keys = align_memberships(
        [np.array(DOMAINS[n][0]) for n in names], [np.array(DOMAINS[n][1], bool) for n in names]
    )
    engine_z, _ = consensus(
        [(m.shared_global, pushed[n]) for n, m in zip(names, memberships)], len(global_keys), RANK, admm
    )
    for name, membership in zip(names, memberships):
        round_index, rows = consensus_for(state, run.run_id, name, 1)
        assert round_index == 1
        want = np.concatenate([engine_z[membership.shared_global], engine_z[membership.receiver_global]])
        np.testing.assert_array_equal(rows, want)
    # sport's receiver row (u9) gets books' contribution through the prox, not zeros
    books = run.memberships["books"]
    u9_books = int(np.flatnonzero(books.shared_rows == 2)[0])
    _, sport_rows = consensus_for(state, run.run_id, "sport", 1)
    np.testing.assert_allclose(sport_rows[-1], pushed["books"][u9_books] * (2.0 / 2.5), rtol=1e-6)
    assert run.current_round == 2 and run.events[-1].kind == "round_closed"
    assert run.events[-1].contributors == names and run.events[-1].missing == []


def test_rejected_contributions_change_nothing() -> None:
    state = registered()
    run = state.start_run(RunParams(rounds=3, rank=RANK))
    good = contribution_of(state, "sport", 1)
    state.accept_contribution(run.run_id, "sport", 1, good)
    before = _snapshot(state)
    cloth = contribution_of(state, "cloth", 2)
    bad_shape = np.zeros((cloth.shape[0] + 1, RANK), np.float32)
    nan = cloth.copy()
    nan[1, 2] = np.nan
    cases = [
        ("ALREADY_EXISTS", lambda: state.accept_contribution(run.run_id, "sport", 1, good)),
        ("FAILED_PRECONDITION", lambda: state.accept_contribution(run.run_id, "cloth", 2, cloth)),
        ("NOT_FOUND", lambda: state.accept_contribution("other-run", "cloth", 1, cloth)),
        ("NOT_FOUND", lambda: state.accept_contribution("", "cloth", 1, cloth)),
        ("NOT_FOUND", lambda: state.accept_contribution(run.run_id, "music", 1, good)),
        ("INVALID_ARGUMENT", lambda: state.accept_contribution(run.run_id, "cloth", 1, bad_shape)),
        ("INVALID_ARGUMENT", lambda: state.accept_contribution(run.run_id, "cloth", 1, nan)),
        ("INVALID_ARGUMENT", lambda: state.accept_contribution(run.run_id, "cloth", 0, cloth)),
        ("NOT_FOUND", lambda: state.report_metrics(run.run_id, "music", 0, {"hr": 0.1})),
        ("FAILED_PRECONDITION", lambda: state.report_metrics(run.run_id, "sport", 1, {"hr": 0.1})),
    ]
    for status, action in cases:
        expect(status, action)
        assert _snapshot(state) == before


def test_out_of_order_round_after_a_newer_one_is_refused() -> None:
    clock = FakeClock()
    state = registered(clock=clock)
    run = state.start_run(RunParams(rounds=5, rank=RANK, round_deadline_s=1.0, min_domains=1, max_staleness=2))
    state.accept_contribution(run.run_id, "sport", 1, contribution_of(state, "sport", 0))
    clock.now += 1.5
    assert state.poll() == 1
    state.accept_contribution(run.run_id, "sport", 2, contribution_of(state, "sport", 1))
    before = _snapshot(state)
    expect("FAILED_PRECONDITION", lambda: state.accept_contribution(run.run_id, "sport", 1, contribution_of(state, "sport", 2)))
    assert _snapshot(state) == before


def test_deadline_closes_with_min_domains_and_late_contributions_count_within_staleness() -> None:
    clock = FakeClock()
    state = registered(clock=clock)
    run = state.start_run(RunParams(rounds=6, rank=RANK, round_deadline_s=10.0, min_domains=2, max_staleness=1))
    state.accept_contribution(run.run_id, "sport", 1, contribution_of(state, "sport", 0))
    clock.now += 11
    assert state.poll() is None, "one domain is below min_domains: the round stays open"
    assert state.accept_contribution(run.run_id, "cloth", 1, contribution_of(state, "cloth", 0)).closed_round == 1
    assert run.events[-1].contributors == ["cloth", "sport"] and run.events[-1].missing == ["books"]
    # books is late: its round-1 contribution counts in round 2 (staleness 1)
    assert state.accept_contribution(run.run_id, "books", 1, contribution_of(state, "books", 0)).accepted_round == 2
    state.accept_contribution(run.run_id, "sport", 2, contribution_of(state, "sport", 1))
    assert state.accept_contribution(run.run_id, "cloth", 2, contribution_of(state, "cloth", 1)).closed_round == 2
    # round 3 closes at its deadline without books; in round 4 a round-2 push from books is
    # 2 rounds stale (refused), a round-3 push is 1 stale (counted)
    state.accept_contribution(run.run_id, "sport", 3, contribution_of(state, "sport", 2))
    state.accept_contribution(run.run_id, "cloth", 3, contribution_of(state, "cloth", 2))
    assert run.consensus_round == 2
    clock.now += 11
    assert state.poll() == 3
    before = _snapshot(state)
    expect("FAILED_PRECONDITION", lambda: state.accept_contribution(run.run_id, "books", 2, contribution_of(state, "books", 3)))
    assert _snapshot(state) == before
    assert state.accept_contribution(run.run_id, "books", 3, contribution_of(state, "books", 3)).accepted_round == 4


def test_z_uses_each_domains_latest_accepted_contribution() -> None:
    clock = FakeClock()
    state = registered(clock=clock)
    run = state.start_run(RunParams(rounds=3, rank=RANK, round_deadline_s=1.0, min_domains=1))
    first = {name: contribution_of(state, name, 10 + i) for i, name in enumerate(run.admitted)}
    for name in run.admitted:
        state.accept_contribution(run.run_id, name, 1, first[name])
    newer_sport = contribution_of(state, "sport", 99)
    state.accept_contribution(run.run_id, "sport", 2, newer_sport)
    clock.now += 2
    assert state.poll() == 2
    _, sport_rows = consensus_for(state, run.run_id, "sport", 2)
    mine = run.memberships["sport"]
    # u3 is held by sport and cloth: mean of sport's newest and cloth's round-1 rows
    u3_sport = int(np.flatnonzero(mine.shared_rows == 2)[0])
    u3_cloth = int(np.flatnonzero(run.memberships["cloth"].shared_rows == 1)[0])
    np.testing.assert_allclose(sport_rows[u3_sport], (newer_sport[u3_sport] + first["cloth"][u3_cloth]) / 2, rtol=1e-6)


def test_pull_refusals_and_push_again_hint() -> None:
    state = registered()
    run = state.start_run(RunParams(rounds=1, rank=RANK))
    expect("FAILED_PRECONDITION", lambda: consensus_for(state, run.run_id, "sport", 1))  # never pushed round 1
    expect("FAILED_PRECONDITION", lambda: consensus_for(state, run.run_id, "sport", 2))  # not open yet
    state.accept_contribution(run.run_id, "sport", 1, contribution_of(state, "sport", 0))
    assert consensus_for(state, run.run_id, "sport", 1) is None
    state.accept_contribution(run.run_id, "cloth", 1, contribution_of(state, "cloth", 0))
    state.accept_contribution(run.run_id, "books", 1, contribution_of(state, "books", 0))
    assert run.state == "finished" and run.events[-1].kind == "run_finished"
    assert consensus_for(state, run.run_id, "books", 1)[0] == 1
    expect("FAILED_PRECONDITION", lambda: consensus_for(state, run.run_id, "books", 2))
    expect("FAILED_PRECONDITION", lambda: state.accept_contribution(run.run_id, "sport", 2, contribution_of(state, "sport", 0)))


def test_runs_start_and_stop_with_the_right_statuses() -> None:
    state = registered()
    expect("FAILED_PRECONDITION", lambda: state.start_run(RunParams(rounds=1, rank=RANK, min_domains=4)))
    expect("INVALID_ARGUMENT", lambda: state.start_run(RunParams(rounds=1, rank=RANK, domain_aggregation_period={"music": 2})))
    assert state.run is None
    run = state.start_run(RunParams(run_id="r1", rounds=2, rank=RANK))
    expect("ALREADY_EXISTS", lambda: state.start_run(RunParams(run_id="r1", rounds=2, rank=RANK)))
    expect("FAILED_PRECONDITION", lambda: state.start_run(RunParams(run_id="r2", rounds=2, rank=RANK)))
    expect("NOT_FOUND", lambda: state.stop_run("r9"))
    state.stop_run("r1", "operator said so")
    assert run.state == "stopped"
    expect("FAILED_PRECONDITION", lambda: state.stop_run("r1"))
    expect("FAILED_PRECONDITION", lambda: state.check_contribution("r1", "sport", 1))
    expect("ALREADY_EXISTS", lambda: state.start_run(RunParams(run_id="r1", rounds=2, rank=RANK)))
    assert state.start_run(RunParams(run_id="r2", rounds=2, rank=RANK)).run_id == "r2"


def _close_first_round(state: AggregatorState, run_id: str) -> None:
    """Every admitted domain pushes round 1, which closes it."""
    for name in DOMAINS:
        state.accept_contribution(run_id, name, 1, contribution_of(state, name, 1))
    assert state.run is not None and state.run.consensus_round == 1


def test_metrics_once_per_domain_and_round() -> None:
    state = registered()
    run = state.start_run(RunParams(rounds=2, rank=RANK))
    expect("FAILED_PRECONDITION", lambda: state.report_metrics(run.run_id, "sport", 1, {"hr@10": 0.1}))
    _close_first_round(state, run.run_id)
    state.report_metrics(run.run_id, "sport", 1, {"hr@10": 0.1})
    expect("ALREADY_EXISTS", lambda: state.report_metrics(run.run_id, "sport", 1, {"hr@10": 0.2}))
    expect("INVALID_ARGUMENT", lambda: state.report_metrics(run.run_id, "cloth", 1, {"hr@10": float("nan")}))
    assert run.metrics == {"sport": {1: {"hr@10": 0.1}}}


def test_metrics_reports_are_bounded_and_refused_before_round_one() -> None:
    """Round 0, too many values or overlong names are INVALID_ARGUMENT and record nothing."""
    state = registered()
    run = state.start_run(RunParams(rounds=2, rank=RANK))
    _close_first_round(state, run.run_id)
    events = len(run.events)
    expect("INVALID_ARGUMENT", lambda: state.report_metrics(run.run_id, "sport", 0, {"hr@10": 0.1}))
    expect("INVALID_ARGUMENT", lambda: state.report_metrics(run.run_id, "sport", 1, {f"m{i}": 0.5 for i in range(17)}))
    expect("INVALID_ARGUMENT", lambda: state.report_metrics(run.run_id, "sport", 1, {"x" * 33: 0.5}))
    expect("INVALID_ARGUMENT", lambda: state.report_metrics(run.run_id, "sport", 1, {"hr\x00": 0.5}))
    assert run.metrics == {} and len(run.events) == events
    state.report_metrics(run.run_id, "sport", 1, {f"m{i}": 0.5 for i in range(16)})


def test_domain_names_follow_the_party_name_rule_without_tls() -> None:
    """A NUL, a path, spaces, capitals or 64+ characters are refused (the rule of configs and certificates), echoed cut short."""
    state = registered()
    before = dict(state.registrations)
    keys = pseudonymize(np.array([1, 2, 3], dtype=np.int64), SECRET)
    for name in ("sport\x00", "Sport/../x y", "a" * 64, "x" * 100_000):
        with pytest.raises(StateError) as refused:
            state.register(name, keys, np.ones(3, dtype=bool))
        assert refused.value.status == "INVALID_ARGUMENT" and len(refused.value.message) < 300
    assert state.registrations == before


@pytest.mark.parametrize("admm", [ADMMParams(), ADMMParams(rho=2.0, prox="l2", lambda_z=0.7)])
def test_blockwise_consensus_equals_the_one_shot_consensus_bit_for_bit(admm: ADMMParams) -> None:
    rng = np.random.default_rng(0)
    n_rows, rank = 10_000, 5
    parts = []
    for _ in range(3):
        index = rng.choice(n_rows, 6000, replace=False)  # unsorted, overlapping, some rows unheld
        parts.append((index, rng.standard_normal((6000, rank)).astype(np.float32)))
    expected, _ = consensus(parts, n_rows, rank, admm)
    np.testing.assert_array_equal(blockwise_consensus(parts, n_rows, rank, admm, block_rows=333), expected)
    # the plans a run keeps (sorted once per domain) give the same bits as plans derived per call
    plans = [block_plan(index, n_rows, 333) for index, _ in parts]
    np.testing.assert_array_equal(blockwise_consensus(parts, n_rows, rank, admm, block_rows=333, plans=plans), expected)
    for plan, (index, _) in zip(plans, parts):
        assert plan.order is not None and plan.order.dtype == np.int32
        np.testing.assert_array_equal(plan.sorted_index, np.sort(index))
    with pytest.raises(ValueError, match="does not fit"):
        blockwise_consensus(parts, n_rows, rank, admm, block_rows=334, plans=plans)


def test_a_run_sorts_each_domains_rows_once_and_reuses_the_plan_at_later_closes() -> None:
    state = registered()
    run = state.start_run(RunParams(rounds=3, rank=RANK))
    for round_index in (1, 2):
        pushed = {domain: contribution_of(state, domain, 10 * round_index + i) for i, domain in enumerate(run.admitted)}
        for domain, values in pushed.items():
            state.accept_contribution(run.run_id, domain, round_index, values)
        # the one-shot consensus (no blocks, no plans) over the same pushes, in domain-name order
        expected, _ = consensus([(run.memberships[d].shared_index, pushed[d]) for d in run.admitted], run.exchanged_rows, RANK, run.params.admm)
        assert run.consensus is not None
        np.testing.assert_array_equal(run.consensus, expected)
        if round_index == 1:
            kept = dict(run.block_plans)
            assert sorted(domain for domain, _ in kept) == sorted(run.admitted)
    assert run.consensus_round == 2
    # the same objects: nothing was sorted again
    assert all(run.block_plans[key] is plan for key, plan in kept.items()) and len(run.block_plans) == len(kept)


def test_pseudonyms_sharing_a_prefix_are_still_told_apart() -> None:
    """Keys use the first 8 bytes only when they are unambiguous; a shared prefix falls back."""
    base = pseudonymize(["a", "b", "c"], SECRET)
    twin = base[:1].copy()
    twin[0, 20] ^= 0xFF  # same first 8 bytes as "a", another pseudonym
    keys = sortable_keys([base, twin])
    assert keys[0].dtype.kind == "S" and len(np.unique(np.concatenate(keys))) == 4
    fast = sortable_keys([base, base[1:]])
    assert fast[0].dtype == np.uint64
    np.testing.assert_array_equal(fast[1], fast[0][1:])
    state = AggregatorState()
    state.register("x", np.concatenate([base, twin]), np.ones(4, bool))  # not a duplicate
    state.register("y", twin, np.ones(1, bool))
    x, _ = state.membership_for("x")
    np.testing.assert_array_equal(x.shared_rows, [3])


def test_sorted_unique_matches_numpy() -> None:
    values = np.random.default_rng(2).integers(0, 50, 400)
    np.testing.assert_array_equal(sorted_unique(values), np.unique(values))
    assert len(sorted_unique(np.zeros(0, np.int64))) == 0


def test_the_previous_z_is_let_go_before_the_next_one_is_computed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """While round 2's consensus runs, nothing holds round 1's Z any more (one Z less alive at the close).

    On a directory store, as deployed: the in-memory store keeps its saved runs' arrays by design.
    """
    import gc
    import weakref

    from cdimf.aggregator import rounds

    state = registered(tmp_path)
    run = state.start_run(RunParams(rounds=3, rank=RANK))
    for domain in run.admitted:
        state.accept_contribution(run.run_id, domain, 1, contribution_of(state, domain, 1))
    assert run.consensus is not None
    first = weakref.ref(run.consensus)
    seen: list[bool] = []
    computing = rounds.blockwise_consensus

    def watched(*args: object, **kwargs: object) -> np.ndarray:
        gc.collect()
        seen.append(run.consensus is None and first() is None)
        return computing(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(rounds, "blockwise_consensus", watched)
    for domain in run.admitted:
        state.accept_contribution(run.run_id, domain, 2, contribution_of(state, domain, 2))
    assert seen == [True] and run.consensus_round == 2 and run.consensus is not None
