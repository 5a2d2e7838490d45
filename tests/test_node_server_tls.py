"""The node's own server under mutual TLS: who may query it, and its health service."""

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from cdimf.aggregator.service import start_aggregator
from cdimf.common.config import AggregatorConfig, NodeConfig
from cdimf.common.rpc.channels import open_channel
from cdimf.domain_node.service import start_node
from cdimf.protos.v1 import federation_pb2 as pb
from cdimf.protos.v1 import federation_pb2_grpc as pb_grpc
from cdimf.runtime_cli import check_health
from cdimf.simulate import write_throwaway_certificates
from tests.federation_harness import SECRET, ials, write_domains

pytestmark = pytest.mark.timeout(60)


def test_only_the_operator_and_the_domain_itself_may_query_a_node(tmp_path: Path) -> None:
    """operator and sport's own certificate: answered; cloth's certificate: PERMISSION_DENIED; health: SERVING."""
    files = write_domains(tmp_path / "data")
    certificates = write_throwaway_certificates(tmp_path / "certs", ["sport", "cloth"])

    async def scenario() -> dict[str, grpc.StatusCode]:
        """Call the node as each party; the status code each got."""
        aggregator = await start_aggregator(AggregatorConfig(listen="127.0.0.1:0", state_dir=tmp_path / "agg", tls=certificates["aggregator"]))
        config = NodeConfig(domain="sport", train_path=files["sport"]["train"], data_format="csv", aggregator=aggregator.address,
                            state_dir=tmp_path / "sport", secret=SecretStr(SECRET), ials=ials(1), tls=certificates["sport"])
        node = await start_node(config)
        codes = {}
        try:
            for party in ("operator", "sport", "cloth"):
                async with open_channel(node.address, certificates[party]) as channel:
                    try:
                        reply = await pb_grpc.DomainNodeStub(channel).GetStatus(pb.StatusRequest(), timeout=10)
                        assert reply.domain == "sport"
                        codes[party] = grpc.StatusCode.OK
                    except grpc.aio.AioRpcError as error:
                        codes[party] = error.code()
                    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                    assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert await check_health(node.address, certificates["sport"], "cdimf.v1.DomainNode", 5) == (True, "SERVING")
        finally:
            await node.stop()
            await aggregator.stop(0.2)
        return codes

    assert asyncio.run(scenario()) == {"operator": grpc.StatusCode.OK, "sport": grpc.StatusCode.OK,
                                       "cloth": grpc.StatusCode.PERMISSION_DENIED}
