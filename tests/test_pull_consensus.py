"""PullConsensus over a real loopback server: the rows each domain receives, and who is refused once Z exists."""

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest

from cdimf.aggregator.service import start_aggregator
from cdimf.common.config import AggregatorConfig, RunParams, TLSConfig
from cdimf.common.rpc.aggregator_client import AggregatorClient, AggregatorError
from cdimf.common.security.pseudonyms import pseudonymize

SECRET = b"test-federation-secret-32-bytes!"
pytestmark = pytest.mark.timeout(60)


def _pseudonyms(ids: range) -> np.ndarray:
    """Pseudonyms of the raw keys u<i>."""
    return pseudonymize(np.array([f"u{i}" for i in ids]), SECRET)


def test_each_domain_gets_its_shared_then_receiver_rows_and_strangers_are_refused(tmp_path: Path) -> None:
    """sport holds u0..u8; cloth holds u3..u5 and has u6..u8 registered without interactions (receivers)."""

    async def scenario() -> None:
        """Close round 1, then pull as each domain, as a wrong run and as a domain outside the run."""
        config = AggregatorConfig(listen="127.0.0.1:0", state_dir=tmp_path, tls=TLSConfig(insecure=True))
        running = await start_aggregator(config)
        sport, cloth = AggregatorClient(running.address, "sport"), AggregatorClient(running.address, "cloth")
        late = AggregatorClient(running.address, "books")
        try:
            await sport.register(_pseudonyms(range(9)), np.ones(9, bool))
            await cloth.register(_pseudonyms(range(3, 9)), np.array([1, 1, 1, 0, 0, 0], bool))
            run = await AggregatorClient(running.address).start_run(RunParams(rounds=2, rank=4))
            await late.register(_pseudonyms(range(2)), np.ones(2, bool))
            views = {client.domain: await client.get_membership(run.run_id) for client in (sport, cloth)}
            assert len(views["cloth"].receiver_rows) == 3
            rng = np.random.default_rng(5)
            for client in (sport, cloth):
                rows = len(views[client.domain].shared_rows)
                await client.push_contribution(run.run_id, 1, rng.standard_normal((rows, 4)).astype(np.float32))
            memberships = running.state.run.memberships
            for client in (sport, cloth):
                view, mine = views[client.domain], memberships[client.domain]
                pulled = await client.pull_consensus(run.run_id, 1, 5.0, len(view.shared_rows), len(view.receiver_rows))
                # the round closes after the closing push's ack; a pull of it returns once it did
                z = running.state.run.consensus
                assert pulled is not None and pulled.round == 1
                np.testing.assert_array_equal(pulled.shared, z[mine.shared_index])
                np.testing.assert_array_equal(pulled.receivers, z[mine.receiver_index])
            with pytest.raises(AggregatorError) as error:
                await sport.pull_consensus("not-the-run", 1, 5.0, len(views["sport"].shared_rows), 0)
            assert error.value.code == grpc.StatusCode.NOT_FOUND
            with pytest.raises(AggregatorError) as error:
                await late.pull_consensus(run.run_id, 1, 5.0, 2, 0)
            assert error.value.code == grpc.StatusCode.NOT_FOUND and "not admitted" in error.value.details
            # round 2 is open and cloth never pushed it: that wait could not end
            with pytest.raises(AggregatorError) as error:
                await cloth.pull_consensus(run.run_id, 2, 5.0, 3, 3)
            assert error.value.code == grpc.StatusCode.FAILED_PRECONDITION
        finally:
            for client in (sport, cloth, late):
                await client.close()
            await running.stop(grace=0.5)

    asyncio.run(scenario())
