"""Secure rounds in the aggregator's state and the node's unmasking: deadlines and stale contributions decode, a wrong list is refused.

The aggregator state runs on a hand-moved clock with real masks (the federation secret is the
test's, never the state's); each pull is unmasked by the node's own function
(cdimf.domain_node.secure_exchange.unmasked_consensus). The expected Z is computed here with
Python integers: per row, the sum over the listed contributors holding it of round(v * 2^32),
divided by 2^32 and the holder count.
"""

from pathlib import Path

import numpy as np
import pytest

from cdimf.aggregator.state import AggregatorState
from cdimf.common.config import RunParams
from cdimf.common.security.masks import MaskedSumMismatch, mask_contribution
from cdimf.common.security.pseudonyms import pseudonymize
from cdimf.common.wire.serde import Consensus, run_info_to_json, status_to_proto
from cdimf.domain_node.secure_exchange import unmasked_consensus
from tests.aggregator_helpers import DOMAINS, RANK, SECRET, FakeClock, expect, registered

DEADLINE_S = 5.0
PSEUDONYMS = {name: pseudonymize(keys, SECRET) for name, (keys, _) in DOMAINS.items()}


def secure_run(state: AggregatorState) -> str:
    """Start a secure run with a deadline (min_domains 2, max_staleness 1) and return its id."""
    params = RunParams(rounds=4, rank=RANK, secure_aggregation=True, round_deadline_s=DEADLINE_S, min_domains=2, max_staleness=1)
    return state.start_run(params).run_id


def plain_values(state: AggregatorState, domain: str, tag: int) -> np.ndarray:
    """The X + U a domain sends as round `tag` (seeded by both)."""
    assert state.run is not None
    rows = len(state.run.memberships[domain].shared_rows)
    return (np.random.default_rng(100 * tag + len(domain)).standard_normal((rows, RANK)) * 0.5).astype(np.float32)


def push(state: AggregatorState, run_id: str, domain: str, tag: int, sent: dict[tuple[str, int], np.ndarray]) -> None:
    """Mask and push a domain's contribution of round `tag`, remembering its plain values."""
    assert state.run is not None
    values = plain_values(state, domain, tag)
    sent[(domain, tag)] = values
    shared = PSEUDONYMS[domain][state.run.memberships[domain].shared_rows]
    state.take_contribution(run_id, domain, tag, mask_contribution(values, shared, SECRET, run_id, domain, tag))


def pulled(state: AggregatorState, run_id: str, domain: str, min_round: int) -> Consensus:
    """What the domain's pull streams, as the node's client hands it over (shared rows, receiver rows, contributors)."""
    found = state.pull(run_id, domain, min_round)
    assert found is not None
    rows = found.z[found.rows]
    shared = len(state.membership_for(domain)[0].shared_rows)
    return Consensus(found.round, rows[:shared], rows[shared:], found.contributors)


def expected_z(state: AggregatorState, domain: str, contributors: list[tuple[str, int]], sent: dict[tuple[str, int], np.ndarray]) -> np.ndarray:
    """Z (identity prox) of the domain's pulled rows over the listed contributions, by Python integers keyed on pseudonyms."""
    assert state.run is not None
    totals: dict[bytes, list[int]] = {}
    holders: dict[bytes, int] = {}
    for name, tag in contributors:
        mine = state.run.memberships[name]
        for row, values in zip(mine.shared_rows, sent[(name, tag)]):
            key = PSEUDONYMS[name][row].tobytes()
            fixed = [round(float(value) * 2**32) for value in values]
            totals[key] = [a + b for a, b in zip(totals.get(key, [0] * RANK), fixed)]
            holders[key] = holders.get(key, 0) + 1
    view = state.run.memberships[domain]
    order = np.concatenate([view.shared_rows, view.receiver_rows])
    return np.array([[total / 2**32 / holders[PSEUDONYMS[domain][row].tobytes()] for total in totals[PSEUDONYMS[domain][row].tobytes()]]
                     for row in order], dtype=np.float64).astype(np.float32)


def decoded(state: AggregatorState, run_id: str, domain: str, min_round: int) -> tuple[Consensus, np.ndarray]:
    """The pull as it came and the node's unmasked Z of it (shared then receivers)."""
    assert state.run is not None
    masked = pulled(state, run_id, domain, min_round)
    z = unmasked_consensus(masked, state.membership_for(domain)[0], PSEUDONYMS[domain], SECRET, run_id, state.run.params)
    return masked, np.concatenate([z.shared, z.receivers])


def test_rounds_closed_by_the_deadline_with_a_missing_and_a_stale_domain_decode_to_the_listed_contributions() -> None:
    """Round 1 closes with all three; round 2 at its deadline without books (its round-1 contribution is reused); round 3 takes
    books' stale round-2 push and cloth's round-2 one. Every domain's unmasked Z equals the consensus over exactly the listed
    contributions, computed here; the aggregator never held a plain value."""
    clock = FakeClock()
    state = registered(clock=clock)
    run_id = secure_run(state)
    sent: dict[tuple[str, int], np.ndarray] = {}

    def decodes(round_index: int, contributors: list[tuple[str, int]]) -> None:
        """Every domain's pull of the round lists these contributions and unmasks to their consensus."""
        for name in DOMAINS:
            masked, z = decoded(state, run_id, name, round_index)
            assert masked.round == round_index and list(masked.contributors) == contributors
            np.testing.assert_array_equal(z, expected_z(state, name, contributors, sent))

    for name in DOMAINS:
        push(state, run_id, name, 1, sent)
    assert state.poll() == 1
    decodes(1, [("books", 1), ("cloth", 1), ("sport", 1)])
    push(state, run_id, "sport", 2, sent)
    push(state, run_id, "cloth", 2, sent)
    assert state.poll() is None  # books is missing and the deadline has not passed
    clock.now += DEADLINE_S + 0.1
    assert state.poll() == 2
    decodes(2, [("books", 1), ("cloth", 2), ("sport", 2)])
    # and GetStatus / `cdimf status --json` show the list
    shown = run_info_to_json(status_to_proto(state.status()).run)["consensus_contributors"]
    assert shown == [{"domain": "books", "round": 1}, {"domain": "cloth", "round": 2}, {"domain": "sport", "round": 2}]
    push(state, run_id, "books", 2, sent)  # one round stale (max_staleness 1)
    push(state, run_id, "sport", 3, sent)
    clock.now += DEADLINE_S + 0.1
    assert state.poll() == 3
    decodes(3, [("books", 2), ("cloth", 2), ("sport", 3)])
    assert state.run is not None
    # sport's receiver row (u9, held by books alone) decodes through its one holder
    assert len(state.run.memberships["sport"].receiver_rows) == 1
    closed = [event for event in state.run.events if event.kind == "round_closed"]
    assert [event.missing for event in closed] == [[], ["books"], ["cloth"]]


def test_a_wrong_contributor_list_or_a_tampered_sum_is_refused() -> None:
    """Dropping, adding or re-tagging one contribution of the list, a domain listed twice, one flipped bit of the sum:
    each raises MaskedSumMismatch; the true list decodes."""
    state = registered()
    run_id = secure_run(state)
    sent: dict[tuple[str, int], np.ndarray] = {}
    for name in DOMAINS:
        push(state, run_id, name, 1, sent)
    assert state.poll() == 1 and state.run is not None
    masked = pulled(state, run_id, "cloth", 1)
    view = state.membership_for("cloth")[0]
    truth = list(masked.contributors)
    assert truth == [("books", 1), ("cloth", 1), ("sport", 1)]
    z = unmasked_consensus(masked, view, PSEUDONYMS["cloth"], SECRET, run_id, state.run.params)
    np.testing.assert_array_equal(np.concatenate([z.shared, z.receivers]), expected_z(state, "cloth", truth, sent))
    wrong_lists = [truth[1:], [*truth[:2], ("sport", 2)], [*truth, ("books", 1)], [("books", 1), ("cloth", 1)]]
    for contributors in wrong_lists:
        with pytest.raises(MaskedSumMismatch):
            unmasked_consensus(Consensus(1, masked.shared, masked.receivers, tuple(contributors)), view, PSEUDONYMS["cloth"], SECRET,
                               run_id, state.run.params)
    tampered = masked.shared.copy()
    tampered[0, 0] ^= np.uint64(1 << 40)
    with pytest.raises(MaskedSumMismatch):
        unmasked_consensus(Consensus(1, tampered, masked.receivers, masked.contributors), view, PSEUDONYMS["cloth"], SECRET,
                           run_id, state.run.params)
    with pytest.raises(MaskedSumMismatch):  # the right list under another secret: the masks do not cancel
        unmasked_consensus(masked, view, PSEUDONYMS["cloth"], b"another-federation-secret-000000", run_id, state.run.params)


def test_a_secure_run_refuses_plain_contributions_and_a_plain_run_refuses_ring_ones() -> None:
    """A float32 push to a secure run and a ring push to a plain one are refused INVALID_ARGUMENT naming the mode; nothing changes."""
    state = registered()
    run_id = secure_run(state)
    assert state.run is not None
    plain = plain_values(state, "sport", 1)
    expect("INVALID_ARGUMENT", lambda: state.accept_contribution(run_id, "sport", 1, plain))
    expect("INVALID_ARGUMENT", lambda: state.check_contribution(run_id, "sport", 1, ring=False))
    assert state.check_contribution(run_id, "sport", 1, ring=True) == (len(state.run.memberships["sport"].shared_rows), RANK + 1)
    assert state.run.tags == {} and state.run.contributions == {}
    state.stop_run(run_id)
    plain_run = state.start_run(RunParams(rounds=2, rank=RANK)).run_id
    ring = mask_contribution(plain, PSEUDONYMS["sport"][state.run.memberships["sport"].shared_rows], SECRET, plain_run, "sport", 1)
    expect("INVALID_ARGUMENT", lambda: state.accept_contribution(plain_run, "sport", 1, ring))
    expect("INVALID_ARGUMENT", lambda: state.pull_encoding(plain_run, True))
    assert state.pull_encoding(plain_run, None) is False and state.run.tags == {}


def test_a_restarted_aggregator_serves_the_same_masked_sum_and_list_and_refuses_a_float_one_on_disk(tmp_path: Path) -> None:
    """A secure run saved at a round boundary comes back from its folder with the uint64 sum and its contributor list (it decodes
    as before); a float32 matrix stored as a secure run's sum is refused naming the file."""
    from cdimf.aggregator.store import CONSENSUS_DIR
    from cdimf.common.atomic_files import StateFileError, read_arrays, write_arrays_atomically

    state = registered(tmp_path)
    run_id = secure_run(state)
    sent: dict[tuple[str, int], np.ndarray] = {}
    for name in DOMAINS:
        push(state, run_id, name, 1, sent)
    assert state.poll() == 1
    before = pulled(state, run_id, "sport", 1)
    again = registered(tmp_path)
    after = pulled(again, run_id, "sport", 1)
    assert after.contributors == before.contributors == (("books", 1), ("cloth", 1), ("sport", 1))
    np.testing.assert_array_equal(after.shared, before.shared)
    assert after.shared.dtype == np.uint64
    _, z = decoded(again, run_id, "sport", 1)
    np.testing.assert_array_equal(z, expected_z(again, "sport", list(after.contributors), sent))
    z_file = tmp_path / CONSENSUS_DIR / "1.arrays"
    saved = dict(read_arrays(z_file))
    saved["consensus"] = saved["consensus"].astype(np.float32)
    write_arrays_atomically(z_file, saved, False)
    with pytest.raises(StateFileError, match="masked sum of a secure run is not a uint64 matrix"):
        registered(tmp_path)
