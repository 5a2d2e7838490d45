"""A captured call proof is good for its own server and its own request only: replayed with real `cdimf` processes over mutual TLS."""

import asyncio
import sys
from pathlib import Path

import grpc
import pytest

from cdimf.common.config import TLSConfig
from cdimf.common.rpc.channels import server_credentials
from cdimf.common.security import call_proof
from cdimf.protos.v1 import federation_pb2 as pb
from cdimf.protos.v1 import federation_pb2_grpc as pb_grpc
from cdimf.simulate import write_throwaway_certificates
from tests.federation_harness import DOMAINS, RANK, REPO_ROOT, SECRET, Processes, seeds, user_key, write_domains

pytestmark = pytest.mark.timeout(180)
RECOMMEND = "/cdimf.v1.DomainNode/Recommend"
PROOF_KEYS = {call_proof.CERTIFICATE_KEY, call_proof.TARGET_KEY, call_proof.TIME_KEY, call_proof.NONCE_KEY, call_proof.PROOF_KEY}



def _tls_flags(settings: TLSConfig) -> list[str]:
    """The --ca-file/--cert-file/--key-file flags of one party."""
    return ["--ca-file", str(settings.ca_file), "--cert-file", str(settings.cert_file), "--key-file", str(settings.key_file)]


def _node_arguments(domain: str, files: dict[str, dict[str, Path]], aggregator: str, folder: Path, tls: TLSConfig) -> list[str]:
    """`cdimf serve-node` of one test domain over mutual TLS."""
    return ["serve-node", "--domain", domain, "--train-path", str(files[domain]["train"]), "--data-format", "csv",
            "--listen", "127.0.0.1:0", "--aggregator", aggregator, "--state-dir", str(folder / domain), *_tls_flags(tls),
            "--ials-rank", str(RANK), "--ials-alpha", "0.1", "--ials-lam", "0.5", "--ials-seed", str(seeds()[domain]),
            "--ials-threads", "1", "--rpc-timeout-s", "10"]


class FakeNode(pb_grpc.DomainNodeServicer):
    """A DomainNode server run by whoever holds sport's certificate: it records what the operator sends."""

    def __init__(self) -> None:
        """Nothing captured yet."""
        self.metadata: list[tuple[str, str | bytes]] = []
        self.request = b""

    async def Recommend(self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext) -> pb.RecommendReply:
        """Keep the call's metadata and request, answer something plausible."""
        self.metadata = [(key, value) for key, value in context.invocation_metadata() if key in PROOF_KEYS]
        self.request = request.SerializeToString()
        return pb.RecommendReply(user_key=request.user_key, items=["sport-sku-00001"], scores=[1.0])


async def _cdimf(*arguments: str) -> tuple[int, str, str]:
    """Run `cdimf ARGUMENTS` as a process without blocking the loop (the fake node serves meanwhile)."""
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "cdimf", *arguments, cwd=REPO_ROOT,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def _replay(address: str, ca: Path, metadata: list[tuple[str, str | bytes]], request: bytes) -> tuple[grpc.StatusCode, str]:
    """Send `request` (wire bytes) to Recommend at `address` with the captured proof as the only credentials."""
    transport = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    async with grpc.aio.secure_channel(address, transport) as channel:
        call = channel.unary_unary(RECOMMEND, request_serializer=None, response_deserializer=pb.RecommendReply.FromString)
        try:
            reply = await call(request, metadata=metadata, timeout=10)
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details() or ""
    return grpc.StatusCode.OK, f"{len(reply.items)} items"


def test_a_captured_operator_proof_serves_neither_another_node_nor_another_request(tmp_path: Path, processes: Processes) -> None:
    """A fake node holding sport's own certificate records the operator's proof from a real
    `cdimf recommend`; replayed to cloth's node (with the captured request or one of its choosing)
    and to sport's node with another request: UNAUTHENTICATED each time. The operator's genuine
    call to cloth's node still gets its recommendations."""
    files = write_domains(tmp_path / "data")
    certificates = write_throwaway_certificates(tmp_path / "pki", list(DOMAINS))
    ca = Path(str(certificates["operator"].ca_file))
    _, aggregator = processes.spawn("aggregator", ["serve-aggregator", "--listen", "127.0.0.1:0", "--state-dir",
                                                   str(tmp_path / "aggregator"), *_tls_flags(certificates["aggregator"])])
    launched = {domain: processes.launch(f"node-{domain}", _node_arguments(domain, files, aggregator, tmp_path, certificates[domain]),
                                         {"CDIMF_SECRET": SECRET}) for domain in DOMAINS}
    nodes = {domain: processes.listening(f"node-{domain}", process) for domain, process in launched.items()}
    operator = _tls_flags(certificates["operator"])
    cloth_user = user_key(70)  # cloth holds users 35..99, sport 0..59 (and 90, 91 as receivers)

    async def scenario() -> None:
        code, _, err = await _cdimf("train", "--aggregator", aggregator, *operator, "--rounds", "1", "--rank", str(RANK),
                                    "--min-domains", "2", "--follow")
        assert code == 0, err

        fake = FakeNode()
        server = grpc.aio.server()
        pb_grpc.add_DomainNodeServicer_to_server(fake, server)
        sport_tls = certificates["sport"]
        port = server.add_secure_port("127.0.0.1:0", server_credentials(str(sport_tls.cert_file), str(sport_tls.key_file), str(ca)))
        await server.start()
        try:
            code, out, err = await _cdimf("recommend", "--node", f"127.0.0.1:{port}", "--user", cloth_user, *operator)
            assert code == 0, err
        finally:
            await server.stop(None)
        captured = dict(fake.metadata)
        assert set(captured) == PROOF_KEYS and captured[call_proof.TARGET_KEY] == "cdimf://domain/sport"
        assert pb.RecommendRequest.FromString(fake.request).user_key == cloth_user

        chosen = pb.RecommendRequest(user_key=cloth_user, k=10, include_seen=True).SerializeToString()
        other_request = pb.RecommendRequest(user_key=user_key(3), k=50).SerializeToString()
        outcomes = {
            "to cloth, the captured request": await _replay(nodes["cloth"], ca, fake.metadata, fake.request),
            "to cloth, a request of its choosing": await _replay(nodes["cloth"], ca, fake.metadata, chosen),
            "to sport, another request": await _replay(nodes["sport"], ca, fake.metadata, other_request),
        }
        for case, (status, detail) in outcomes.items():
            assert status == grpc.StatusCode.UNAUTHENTICATED, (case, status, detail)
        assert "meant for 'cdimf://domain/sport', not for this server (cdimf://domain/cloth)" in outcomes["to cloth, the captured request"][1]
        assert "does not verify" in outcomes["to sport, another request"][1]

        code, out, err = await _cdimf("recommend", "--node", nodes["cloth"], "--user", cloth_user, *operator)
        assert code == 0, err
        assert out.startswith(f"user {cloth_user}") and len(out.strip().splitlines()) == 11, out

    asyncio.run(scenario())
