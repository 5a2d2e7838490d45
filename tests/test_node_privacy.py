"""Privacy of the node runtime: everything a training node sends to the aggregator, captured on the wire."""

import asyncio
from pathlib import Path

import numpy as np
import pytest
from pydantic import SecretStr

from cdimf.aggregator.service import start_aggregator
from cdimf.common.config import AggregatorConfig, NodeConfig, RunParams, TLSConfig
from cdimf.common.rpc.aggregator_client import AggregatorClient, node_client
from cdimf.common.security.pseudonyms import pseudonymize
from cdimf.common.wire.chunks import MatrixAssembler
from cdimf.domain_node.runner import NodeRunner
from cdimf.domain_node.service import start_node
from tests.federation_harness import RANK, SECRET, ials, node_data, seeds, wait_for_checkpoints, wait_for_domains, write_domains
from tests.wire_capture import WireRecorder

pytestmark = pytest.mark.timeout(60)
ALLOWED_METHODS = {"Register", "WaitForRun", "GetMembership", "PushContribution", "PullConsensus", "ReportMetrics"}


def raw_fragments(files: dict[str, dict[str, Path]], domain: str) -> set[bytes]:
    """Every user key and item key of the domain's files (what must never cross the network)."""
    fragments: set[bytes] = set()
    for path in files[domain].values():
        for line in path.read_text().splitlines()[1:]:
            user, item = line.split(",")
            fragments.update((user.encode(), item.encode()))
    return fragments


def leaked(wire: bytes, fragments: set[bytes]) -> list[bytes]:
    """The raw keys found in the captured bytes."""
    return sorted(fragment for fragment in fragments if fragment in wire)


def test_a_training_node_sends_only_headers_pseudonyms_shared_factor_rows_and_metrics(tmp_path: Path) -> None:
    """Two rounds of a real node (loopback gRPC); the sport node's traffic is recorded by a client interceptor."""
    files = write_domains(tmp_path / "data")
    capture = WireRecorder()
    rounds = 2

    async def scenario() -> NodeRunner:
        """Two nodes (sport recorded) train a two-round run; returns sport's runner."""
        aggregator = await start_aggregator(AggregatorConfig(listen="127.0.0.1:0", state_dir=tmp_path / "aggregator", tls=TLSConfig(insecure=True)))
        nodes = []
        try:
            for domain in ("sport", "cloth"):
                config = NodeConfig(domain=domain, train_path=files[domain]["train"], test_path=files[domain].get("test"),
                                    data_format="csv", aggregator=aggregator.address, state_dir=tmp_path / domain,
                                    secret=SecretStr(SECRET), ials=ials(seeds()[domain]), tls=TLSConfig(insecure=True))
                data = node_data(files, domain)
                client = node_client(config, interceptors=capture.interceptors() if domain == "sport" else None)
                runner = NodeRunner(config, data, client=client)
                nodes.append(await start_node(config, data, runner))
            async with AggregatorClient(aggregator.address) as control:
                await wait_for_domains(control, 2)
                run = await control.start_run(RunParams(rounds=rounds, rank=RANK, min_domains=2))
                _ = [event async for event in control.watch_run(run.run_id)]
            await wait_for_checkpoints(tmp_path, rounds)
            return nodes[0].runner
        finally:
            for node in nodes:
                await node.stop()
            await aggregator.stop(0.5)

    sport = asyncio.run(scenario())
    methods = {method.rsplit("/", 1)[1] for method, _ in capture.sent}
    assert methods == ALLOWED_METHODS, methods

    wire = b"".join(message.SerializeToString() for _, message in capture.sent)
    fragments = raw_fragments(files, "sport")
    assert len(fragments) > 100
    assert leaked(wire, fragments) == []
    # the check itself catches a leak: a message carrying one raw key would fail the test
    assert leaked(wire + next(iter(fragments)), fragments) != []

    data = node_data(files, "sport")
    digests = pseudonymize(data.users.keys, SECRET.encode())
    shared = sport.progress.shared_rows
    assert shared > 0
    pushes: dict[int, MatrixAssembler] = {}
    for method, message in capture.sent:
        assert message.header.domain == "sport"
        if method.endswith("Register"):
            rows = slice(message.row_offset, message.row_offset + message.rows)
            assert message.pseudonyms == digests[rows].tobytes()
            np.testing.assert_array_equal(np.frombuffer(message.holder_flags, np.uint8), data.holder[rows])
        elif method.endswith("PushContribution"):
            # factor rows of the shared users only: never the domain's other users, items or interactions
            assert message.total_rows == shared < data.train.shape[0] and message.cols == RANK
            pushes.setdefault(message.header.round, MatrixAssembler("push")).add(message)
        elif method.endswith("ReportMetrics"):
            # the metrics and the number of negatives they were ranked against: no user-level values
            assert set(message.metrics) == {"HR@10", "NDCG@10", "negatives"}
        else:
            assert message.ListFields() and all(field.name in ("header", "wait_s", "after_run_id", "min_round", "dtype")
                                                for field, _ in message.ListFields()), message
    assert sorted(pushes) == [1, 2]
    assert all(assembler.result()[0].shape == (shared, RANK) for assembler in pushes.values())
