"""Shared fixtures of the aggregator state tests: three domains, a hand-moved clock, pushes and pulls."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cdimf.aggregator.rounds import StateError
from cdimf.aggregator.state import AggregatorState
from cdimf.aggregator.store import RunStore
from cdimf.common.security.pseudonyms import pseudonymize

SECRET = b"a-federation-secret-for-tests"
RANK = 4
# sport holds u1..u4 and registers u9 (no interactions) as a receiver; cloth holds u3..u6;
# books holds u4, u6, u9. Shared: u3 (sport, cloth), u4 (all three), u6 (cloth, books), and
# u9: held by books alone but wanted by sport, so books pushes it and sport receives its Z.
DOMAINS = {
    "sport": (["u1", "u2", "u3", "u4", "u9"], [1, 1, 1, 1, 0]),
    "cloth": (["u5", "u3", "u4", "u6"], [1, 1, 1, 1]),
    "books": (["u4", "u6", "u9", "u7"], [1, 1, 1, 0]),
}


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        """The time the test set."""
        return self.now


def registered(state_dir: Path | None = None, clock: FakeClock | None = None, store: RunStore | None = None) -> AggregatorState:
    """A state with DOMAINS registered (in memory, in state_dir, or on `store`)."""
    state = AggregatorState(state_dir, clock=clock or FakeClock(), store=store)
    for name, (keys, holds) in DOMAINS.items():
        state.register(name, pseudonymize(keys, SECRET), np.array(holds, dtype=bool))
    return state


def contribution_of(state: AggregatorState, domain: str, seed: int) -> np.ndarray:
    """A random contribution of the right shape for a domain of the current run."""
    assert state.run is not None
    rows = len(state.run.memberships[domain].shared_rows)
    return np.random.default_rng(seed).standard_normal((rows, RANK)).astype(np.float32)


def consensus_for(state: AggregatorState, run_id: str, domain: str, min_round: int) -> tuple[int, np.ndarray] | None:
    """What a pull streams: the newest Z's round and the domain's rows of it (shared then receivers), or None to wait."""
    pulled = state.pull(run_id, domain, min_round)
    return None if pulled is None else (pulled.round, pulled.z[pulled.rows])


def expect(status: str, action: Callable[[], object]) -> None:
    """The action is refused with this status."""
    with pytest.raises(StateError) as error:
        action()
    assert error.value.status == status, error.value.message
