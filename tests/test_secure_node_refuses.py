"""A node of a secure run refuses a masked sum whose contributor list is wrong, says so, and stops after bounded retries.

The aggregator is a real gRPC server in this process whose pulls for sport are tampered with
(the list names cloth's contribution under the wrong round); both nodes are real processes.
"""

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest

from cdimf.aggregator.rounds import Pulled
from cdimf.aggregator.service import start_aggregator
from cdimf.common.config import AggregatorConfig, RunParams, TLSConfig
from cdimf.common.rpc.aggregator_client import AggregatorClient
from cdimf.domain_node.checkpoint import load_checkpoint
from cdimf.domain_node.runner import MAX_REFUSED_SUMS
from cdimf.protos.v1 import federation_pb2 as pb
from cdimf.protos.v1 import federation_pb2_grpc as pb_grpc
from tests.federation_harness import RANK, Processes, wait_for_domains, write_domains

pytestmark = pytest.mark.timeout(90)


def test_a_node_refuses_a_sum_with_a_wrong_contributor_list_and_says_so(tmp_path: Path, processes: Processes) -> None:
    """sport is served its rows of round 1 with cloth listed as round 2: it applies nothing, shows the refusal in its status and log,
    pulls again, and after MAX_REFUSED_SUMS refusals stops (a non-zero exit); cloth, served honestly, applies round 1."""
    files = write_domains(tmp_path / "data")

    async def scenario() -> tuple[str, int | None]:
        """Run until sport gave up; returns the error its status showed and its exit status."""
        aggregator = await start_aggregator(AggregatorConfig(listen="127.0.0.1:0", state_dir=tmp_path / "aggregator", tls=TLSConfig(insecure=True)))
        state = aggregator.service.state
        honest_pull = state.pull

        def tampered_pull(run_id: str, domain: str, min_round: int) -> Pulled | None:
            """The state's answer, with sport's contributor list naming cloth's contribution under another round."""
            found = honest_pull(run_id, domain, min_round)
            if found is None or domain != "sport":
                return found
            return replace(found, contributors=tuple((name, tag + 1 if name == "cloth" else tag) for name, tag in found.contributors))

        state.pull = tampered_pull  # type: ignore[method-assign]
        try:
            nodes = await asyncio.to_thread(processes.nodes, files, aggregator.address)
            sport, sport_address = nodes["sport"]
            async with AggregatorClient(aggregator.address, rpc_timeout_s=10, retry_for_s=30) as control, \
                    grpc.aio.insecure_channel(sport_address) as channel:
                await wait_for_domains(control, 2)
                await control.start_run(RunParams(rounds=3, rank=RANK, min_domains=2, secure_aggregation=True))
                stub = pb_grpc.DomainNodeStub(channel)
                error = ""
                give_up = time.monotonic() + 40
                while not error:
                    assert time.monotonic() < give_up, "sport never reported a refused sum"
                    status = await stub.GetStatus(pb.StatusRequest(), timeout=10)
                    error = status.error
                    await asyncio.sleep(0.05)
                assert status.phase == "refusing-masked-sum" and status.round == 0
                await wait_for_checkpoints_of(tmp_path, "cloth", 1)
                exited = await asyncio.to_thread(sport.wait, 40)
            return error, exited
        finally:
            await aggregator.stop(0.5)

    error, exited = asyncio.run(scenario())
    assert "refused the masked sum of round 1" in error and "integrity check" in error, error
    assert exited not in (None, 0)
    log = (tmp_path / "node-sport.log").read_text()
    assert log.count("ERROR") >= MAX_REFUSED_SUMS and f"{MAX_REFUSED_SUMS} masked sums in a row did not unmask" in log
    sport_state = load_checkpoint(tmp_path / "sport")
    assert sport_state is None or sport_state.round == 0, "sport applied nothing"


async def wait_for_checkpoints_of(folder: Path, domain: str, round_index: int, timeout_s: float = 30.0) -> None:
    """Until `domain` checkpointed `round_index` (it applied that round's Z)."""
    give_up = time.monotonic() + timeout_s
    while True:
        found = load_checkpoint(folder / domain)
        if found is not None and found.round >= round_index:
            return
        assert time.monotonic() < give_up, f"{domain} did not apply round {round_index}"
        await asyncio.sleep(0.05)



def test_a_secure_aggregator_refuses_a_float_push_over_grpc_and_keeps_its_state(tmp_path: Path) -> None:
    """A float32 PushContribution to a secure run is INVALID_ARGUMENT saying the run is secure; a float32 pull asks for what it
    cannot get and is refused the same way; the run holds no contribution after either."""
    from cdimf.common.rpc.aggregator_client import AggregatorError
    from cdimf.common.security.pseudonyms import pseudonymize

    async def scenario() -> tuple[AggregatorError, AggregatorError, int]:
        aggregator = await start_aggregator(AggregatorConfig(listen="127.0.0.1:0", state_dir=tmp_path / "aggregator", tls=TLSConfig(insecure=True)))
        try:
            keys = [f"user-{index}" for index in range(5)]
            async with AggregatorClient(aggregator.address, "sport", rpc_timeout_s=10, retry_for_s=5) as sport, \
                    AggregatorClient(aggregator.address, "cloth", rpc_timeout_s=10, retry_for_s=5) as cloth:
                for client in (sport, cloth):
                    await client.register(pseudonymize(keys, b"a-federation-secret-for-tests"), np.ones(5, bool))
                run = await sport.start_run(RunParams(rounds=2, rank=RANK, min_domains=2, secure_aggregation=True))
                with pytest.raises(AggregatorError) as pushed:
                    await sport.push_contribution(run.run_id, 1, np.zeros((5, RANK), np.float32))
                with pytest.raises(AggregatorError) as pulled:
                    await sport.pull_consensus(run.run_id, 1, 0.0, 5, 0, dtype="float32")
                status = await sport.get_status()
            return pushed.value, pulled.value, sum(domain.contributions for domain in status.domains)
        finally:
            await aggregator.stop(0.5)

    pushed, pulled, contributions = asyncio.run(scenario())
    assert pushed.code == grpc.StatusCode.INVALID_ARGUMENT and "is secure (secure_aggregation = true)" in pushed.details, pushed
    assert pulled.code == grpc.StatusCode.INVALID_ARGUMENT and "is secure" in pulled.details, pulled
    assert contributions == 0
