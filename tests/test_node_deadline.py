"""A node under a round deadline whose round cannot close: it waits at most the deadline, then keeps training on the last Z."""

import asyncio
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from cdimf.aggregator.service import start_aggregator
from cdimf.common.config import AggregatorConfig, NodeConfig, RunParams, TLSConfig, ValidationParams
from cdimf.common.rpc.aggregator_client import AggregatorClient
from cdimf.domain_node.service import RunningNode, start_node
from cdimf.protos.v1 import federation_pb2 as pb
from tests.federation_harness import RANK, SECRET, ials, seeds, wait_for_domains, write_domains

pytestmark = pytest.mark.timeout(90)
DEADLINE_S = 0.2
MORE_EPOCHS = 3  # local epochs the waiting node must train past the stalled round


def test_a_node_whose_round_cannot_close_keeps_training_on_the_last_consensus(tmp_path: Path) -> None:
    """Two domains, min_domains = 2, a 0.2 s deadline. After round 1 cloth stops, so the next round
    it has not pushed can never close. sport pushed that round and then, deadline after deadline,
    gets no Z: it trains more local epochs (at least 3 past the push) while its applied round stays
    the one before and the model it serves is that round's, the aggregator's last consensus."""
    files = write_domains(tmp_path / "data")

    async def scenario() -> tuple[list[int], list[int], int, int]:
        """Epochs and applied rounds of sport sampled while it waited, and the served model's round."""
        aggregator = await start_aggregator(AggregatorConfig(listen="127.0.0.1:0", state_dir=tmp_path / "aggregator", tls=TLSConfig(insecure=True)))
        nodes: dict[str, RunningNode] = {}
        try:
            for domain in ("sport", "cloth"):
                config = NodeConfig(domain=domain, train_path=files[domain]["train"], test_path=files[domain].get("test"),
                                    data_format="csv", aggregator=aggregator.address, state_dir=tmp_path / domain,
                                    secret=SecretStr(SECRET), ials=ials(seeds()[domain]), tls=TLSConfig(insecure=True),
                                    validation=ValidationParams(every=0))
                nodes[domain] = await start_node(config)
            sport = nodes["sport"].runner.progress
            async with AggregatorClient(aggregator.address) as control:
                await wait_for_domains(control, 2)
                run = await control.start_run(RunParams(rounds=5, rank=RANK, min_domains=2, round_deadline_s=DEADLINE_S))
                async for event in control.watch_run(run.run_id):
                    if event.kind == pb.EVENT_KIND_ROUND_CLOSED and event.round == 1:
                        break
                await nodes.pop("cloth").stop()
                # cloth may have pushed the next round before it stopped, so that one more round
                # closes: the stalled round is the open one once sport has pushed it
                give_up = time.monotonic() + 30

                def stalled() -> int:
                    """The open round once sport pushed it and applied the one before (0 until then)."""
                    state = aggregator.state.run
                    if state is None or state.contributions.get("sport", (0, None))[0] != state.current_round:
                        return 0
                    return state.current_round if sport.round == state.current_round - 1 else 0

                while not (open_round := stalled()):
                    assert time.monotonic() < give_up, "sport never pushed the stalled round"
                    await asyncio.sleep(0.02)
                pushed_at = sport.epochs
                epochs, rounds = [pushed_at], [sport.round]
                while epochs[-1] < pushed_at + MORE_EPOCHS:
                    assert time.monotonic() < give_up, f"sport stopped training while it waited: epochs {epochs[-5:]}"
                    await asyncio.sleep(DEADLINE_S / 4)
                    epochs.append(sport.epochs)
                    rounds.append(sport.round)
                run_state = aggregator.state.run
                assert run_state is not None and run_state.current_round == open_round, "the stalled round must still be open"
                assert run_state.consensus is not None and run_state.consensus_round == open_round - 1
                assert sport.model is not None
                return epochs, rounds, sport.model.round, open_round
        finally:
            for node in nodes.values():
                await node.stop()
            await aggregator.stop(0.5)

    epochs, rounds, served_round, open_round = asyncio.run(scenario())
    assert open_round in (2, 3), "after cloth stopped at most the round it had already pushed can close"
    assert rounds == [open_round - 1] * len(rounds), "no Z came, so no round was applied"
    assert epochs[-1] >= epochs[0] + MORE_EPOCHS and epochs == sorted(epochs)
    assert served_round == open_round - 1, "the served model is still the last consensus's"
