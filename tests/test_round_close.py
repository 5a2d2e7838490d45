"""The push that completes a round is acknowledged before the round closes, and nothing sees the new Z before it is saved.

A real aggregator on 127.0.0.1 whose store's save of the run is held back by an event: the
closing push's ack arrives while the save waits, a pull and a status call wait for it, and once
it is released the pulled Z is the mean of the two pushes (computed here) and the one on disk.
"""

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from cdimf.aggregator.rounds import SavedRun
from cdimf.aggregator.service import start_aggregator
from cdimf.aggregator.store import DirectoryRunStore, stored_run_arrays
from cdimf.common.config import AggregatorConfig, RunParams, TLSConfig
from cdimf.common.rpc.aggregator_client import AggregatorClient
from cdimf.common.security.pseudonyms import pseudonymize

SECRET = b"test-federation-secret-32-bytes!"
pytestmark = pytest.mark.timeout(60)


class HeldStore(DirectoryRunStore):
    """A directory store whose saves of a closed round wait for `release` (registrations and run starts pass)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.release = threading.Event()
        self.waiting = threading.Event()

    def save_run(self, run: SavedRun) -> None:
        """Wait for `release` before saving a run with a consensus."""
        if run.consensus is not None:
            self.waiting.set()
            assert self.release.wait(30), "the test never released the save"
        super().save_run(run)


def test_closing_push_is_acked_before_the_close_and_z_is_served_only_once_saved(tmp_path: Path) -> None:
    async def scenario() -> None:
        running = await start_aggregator(AggregatorConfig(listen="127.0.0.1:0", state_dir=tmp_path, tls=TLSConfig(insecure=True)))
        store = HeldStore(tmp_path)
        running.state.store = store
        keys = pseudonymize(np.array([f"u{i}" for i in range(5)]), SECRET)
        sport, cloth, operator = (AggregatorClient(running.address, name) for name in ("sport", "cloth", ""))
        try:
            await sport.register(keys, np.ones(5, bool))
            await cloth.register(keys, np.ones(5, bool))
            run = await operator.start_run(RunParams(rounds=2, rank=3))
            rng = np.random.default_rng(0)
            pushed = {name: rng.standard_normal((5, 3)).astype(np.float32) for name in ("cloth", "sport")}
            await sport.push_contribution(run.run_id, 1, pushed["sport"])
            ack = await cloth.push_contribution(run.run_id, 1, pushed["cloth"])
            # the ack came while the close's save is still held back
            assert not store.release.is_set()
            assert await asyncio.to_thread(store.waiting.wait, 10)
            pull = asyncio.ensure_future(sport.pull_consensus(run.run_id, 1, 20.0, 5, 0))
            status = asyncio.ensure_future(operator.get_status())
            await asyncio.sleep(0.3)
            assert not pull.done() and not status.done(), "a call saw the state before the closed round was saved"
            store.release.set()
            pulled, reported = await pull, await status
            assert ack.accepted_round == 1 and pulled is not None and pulled.round == 1
            # the identity prox of the mean of the two (float64 sum, as the aggregator sums)
            expected = ((pushed["cloth"].astype(np.float64) + pushed["sport"]) / 2).astype(np.float32)
            np.testing.assert_array_equal(pulled.shared, expected)
            # the saved Z is in the exchanged-row order; sport's rows of it are what it pulled
            on_disk = stored_run_arrays(tmp_path)["consensus"]
            np.testing.assert_array_equal(on_disk[running.state.run.memberships["sport"].shared_index], expected)
            assert reported.run.current_round == 2
        finally:
            store.release.set()
            for client in (sport, cloth, operator):
                await client.close()
            await running.stop(grace=0.5)

    asyncio.run(scenario())
