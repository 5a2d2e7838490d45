"""The aggregator's run file: the plain array container, and runs saved as .npz by earlier versions."""

from pathlib import Path

import numpy as np

from cdimf.aggregator.state import LEGACY_RUN_FILE, RUN_FILE, AggregatorState
from cdimf.common.atomic_files import read_arrays
from cdimf.common.config import RunParams
from cdimf.common.security.pseudonyms import pseudonymize

SECRET = b"a-federation-secret-for-file-tests"
RANK = 3
DOMAINS = {"sport": ["u1", "u2", "u3"], "cloth": ["u2", "u3", "u4"]}


def _registered(state_dir: Path) -> AggregatorState:
    """A saved aggregator with both domains registered (every row held)."""
    state = AggregatorState(state_dir)
    for name, keys in DOMAINS.items():
        state.register(name, pseudonymize(keys, SECRET), np.ones(len(keys), dtype=bool))
    return state


def _close_round(state: AggregatorState, round_index: int) -> None:
    """Both domains push for `round_index`, which closes it."""
    assert state.run is not None
    for seed, name in enumerate(state.run.admitted):
        rows = len(state.run.layout.per_domain[name].shared_rows)
        values = np.random.default_rng(10 * round_index + seed).standard_normal((rows, RANK)).astype(np.float32)
        state.accept_contribution(state.run.run_id, name, round_index, values)


def test_a_run_saved_as_npz_by_an_earlier_version_resumes_and_is_then_replaced(tmp_path: Path) -> None:
    """run.npz alone (the old format) restores the same round and Z; the next save leaves only the container."""
    state = _registered(tmp_path)
    state.start_run(RunParams(run_id="r", rounds=3, rank=RANK))
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
