"""A secure run with a round deadline: the last round closes without cloth, on its stale contribution, and both nodes decode it.

In-process aggregator (real gRPC server, the test's clock) and both NodeRunners over loopback:
cloth's push of the last round is held back until the round closed on sport's push and the run
finished, so the final masked sum holds sport's round-3 contribution and cloth's stale round-2
one. The test unmasks each stored contribution on its own (it holds the federation secret, the
aggregator does not) and builds Z with integers; both nodes' final Z must equal it.
"""

import asyncio
from pathlib import Path

import numpy as np
import pytest

from cdimf.common.config import RunParams
from cdimf.common.security.masks import mask_key, row_masks
from cdimf.common.security.pseudonyms import pseudonymize
from cdimf.domain_node.checkpoint import load_checkpoint
from tests.aggregator_helpers import FakeClock
from tests.federation_harness import (
    DOMAINS,
    RANK,
    SECRET,
    node_data,
    run_with_cloth_late_for_the_last_round,
    write_domains,
)

pytestmark = pytest.mark.timeout(90)
DEADLINE_S = 0.3
ROUNDS = 3


def test_a_late_domain_s_stale_masked_contribution_decodes_in_the_last_round(tmp_path: Path) -> None:
    """The final sum lists (cloth, 2) and (sport, 3); sport's and cloth's final Z equal the integer consensus of those two."""
    files = write_domains(tmp_path / "data")
    params = RunParams(rounds=ROUNDS, rank=RANK, round_deadline_s=DEADLINE_S, min_domains=1, max_staleness=2, secure_aggregation=True)
    clock = FakeClock()

    state, _ = asyncio.run(run_with_cloth_late_for_the_last_round(tmp_path, files, params, clock))
    run = state.run
    assert run is not None and run.state == "finished" and run.consensus is not None
    assert run.consensus_contributors == (("cloth", ROUNDS - 1), ("sport", ROUNDS))
    assert run.consensus.dtype == np.uint64

    # the test's own decode: each stored contribution unmasked alone, summed as integers per row of Z
    secret = SECRET.encode()
    pseudonyms = {domain: pseudonymize(node_data(files, domain).users.keys, secret) for domain in DOMAINS}
    exchanged = run.consensus.shape[0]
    totals = np.zeros((exchanged, RANK), dtype=np.int64)
    holders = np.zeros(exchanged, dtype=np.int64)
    for domain, (tag, masked) in run.contributions.items():
        mine = run.memberships[domain]
        plain = masked - row_masks(mask_key(secret, run.run_id, domain, tag), pseudonyms[domain][mine.shared_rows], RANK + 1)
        totals[mine.shared_index] += plain[:, :RANK].view(np.int64)
        holders[mine.shared_index] += 1
    held = holders > 0
    expected = np.zeros((exchanged, RANK), dtype=np.float64)
    expected[held] = totals[held].astype(np.float64) / 2.0**32 / holders[held, None]
    expected32 = expected.astype(np.float32)
    for domain in DOMAINS:
        checkpoint = load_checkpoint(tmp_path / domain)
        assert checkpoint is not None and checkpoint.round == ROUNDS and checkpoint.trainer.consensus is not None
        mine = run.memberships[domain]
        np.testing.assert_array_equal(checkpoint.trainer.consensus, expected32[mine.shared_index])
    assert np.abs(expected32).max() > 1e-3
