"""Mutual authentication against a real grpc.aio server on 127.0.0.1: who gets in, who is refused, and how."""

import asyncio
import datetime
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cdimf import certs
from cdimf.aggregator.service import RunningAggregator, start_aggregator
from cdimf.common.config import AggregatorConfig, RunParams, TLSConfig
from cdimf.common.rpc import auth, channels, client_proof, gate
from cdimf.common.rpc.aggregator_client import AggregatorClient
from cdimf.common.security import call_proof as call_auth
from cdimf.common.security import pki as pkilib
from cdimf.common.security.pseudonyms import load_secret, pseudonymize
from cdimf.common.wire.chunks import encode_matrix
from cdimf.protos.v1 import federation_pb2 as pb
from cdimf.protos.v1 import federation_pb2_grpc as pb_grpc

PROBE_METHOD = "/cdimf.test.Probe/Speak"
# the probe server presents the aggregator's certificate: the identity proofs must name
AGGREGATOR = "cdimf://aggregator/aggregator"
EMPTY_REQUEST = call_auth.request_digest(b"")
DOMAIN_HEADER = "x-cdimf-domain"
CALL_TIMEOUT_S = 5.0
FEDERATION_SECRET = b"test federation secret, 32 bytes"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A federation CA with aggregator, domain and operator certificates, plus hostile ones."""
    folder = tmp_path_factory.mktemp("pki")
    ca = pkilib.create_ca()
    ca.write(folder / "ca.pem", folder / "ca.key")
    pkilib.issue_aggregator_certificate(ca, ["127.0.0.1"]).write(folder / "aggregator.pem", folder / "aggregator.key")
    for domain in ("sport", "cloth"):
        pkilib.issue_domain_certificate(ca, domain).write(folder / f"{domain}.pem", folder / f"{domain}.key")
    pkilib.issue_operator_certificate(ca).write(folder / "operator.pem", folder / "operator.key")
    # the same identity, correctly signed, but its window closed nine days ago
    ten_days_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    pkilib.issue_domain_certificate(ca, "sport", not_before=ten_days_ago, days=1).write(
        folder / "sport-expired.pem", folder / "sport-expired.key"
    )
    # the same identity from a CA the federation does not trust
    rogue = pkilib.create_ca("rogue CA")
    rogue.write(folder / "rogue-ca.pem", folder / "rogue-ca.key")
    pkilib.issue_domain_certificate(rogue, "sport").write(folder / "sport-rogue.pem", folder / "sport-rogue.key")
    pkilib.issue_aggregator_certificate(rogue, ["127.0.0.1"]).write(
        folder / "aggregator-rogue.pem", folder / "aggregator-rogue.key"
    )
    return folder


class ProbeServer:
    """A grpc.aio server with one test method guarded by the Authorizer's require_domain."""

    def __init__(self, insecure: bool, interceptors: list[grpc.aio.ServerInterceptor]) -> None:
        """Prepare an unstarted server; `insecure` is passed to the Authorizer."""
        self.insecure = insecure
        self.entered = 0  # handler invocations: a call refused by the interceptor never gets here
        self.accepted: list[str] = []  # the "state" a refused call must not change
        self.port = 0
        self.server = grpc.aio.server(interceptors=interceptors)
        handler = grpc.unary_unary_rpc_method_handler(self.speak)
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("cdimf.test.Probe", {"Speak": handler})]
        )

    async def speak(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Accept the call only for the domain its certificate names, recording who got in."""
        self.entered += 1
        claimed = dict(context.invocation_metadata()).get(DOMAIN_HEADER, "")
        domain = await auth.Authorizer(self.insecure).require_domain(context, claimed)
        self.accepted.append(domain)
        return domain.encode()


@asynccontextmanager
async def probe_server(pki: Path | None) -> AsyncIterator[ProbeServer]:
    """Run a ProbeServer on 127.0.0.1 with mutual authentication from `pki`, or plaintext when None."""
    interceptors = [] if pki is None else [gate.RequestGate(call_auth.CallAuthenticator(pkilib.load_certificate(pki / "ca.pem"), AGGREGATOR))]
    probe = ProbeServer(insecure=pki is None, interceptors=interceptors)
    if pki is None:
        probe.port = probe.server.add_insecure_port("127.0.0.1:0")
    else:
        credentials = channels.server_credentials(pki / "aggregator.pem", pki / "aggregator.key", pki / "ca.pem")
        probe.port = probe.server.add_secure_port("127.0.0.1:0", credentials)
    await probe.server.start()
    try:
        yield probe
    finally:
        await probe.server.stop(None)


def raw_credentials(ca: Path, certificate: Path | None, key: Path | None) -> grpc.ChannelCredentials:
    """Channel credentials built straight from files, without channels.py's consistency checks,
    so that a hostile client can prove any certificate with any key (or present none)."""
    transport = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    if certificate is None or key is None:
        return transport
    return client_proof.ProvingCredentials(transport, ca.read_bytes(), pkilib.load_certificate(certificate), pkilib.load_private_key(key))


async def speak(
    port: int, credentials: grpc.ChannelCredentials | None, claimed: str, extra_metadata: tuple[tuple[str, str | bytes], ...] = ()
) -> tuple[grpc.StatusCode, str]:
    """Call the probe method claiming `claimed`; return (status code, reply or error detail)."""
    target = f"127.0.0.1:{port}"
    channel = channels.create_channel(target, credentials)
    async with channel:
        try:
            reply = await channel.unary_unary(PROBE_METHOD)(
                b"", metadata=[(DOMAIN_HEADER, claimed), *extra_metadata], timeout=CALL_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details() or ""
        return grpc.StatusCode.OK, reply.decode()


def test_certificates_carry_identity_and_validity(pki: Path) -> None:
    """Each certificate names its party in CN and URI SAN, is issued by the CA, and keys are 0600."""
    ca = pkilib.load_certificate(pki / "ca.pem")
    sport = pkilib.load_issued(pki / "sport.pem", pki / "sport.key")
    sport.certificate.verify_directly_issued_by(ca)
    assert pkilib.party_identity(sport.certificate) == pkilib.PartyIdentity("domain", "sport")
    assert pkilib.party_identity(pkilib.load_certificate(pki / "aggregator.pem")).kind == "aggregator"
    assert pkilib.party_identity(pkilib.load_certificate(pki / "operator.pem")).kind == "operator"
    expired = pkilib.load_certificate(pki / "sport-expired.pem")
    assert expired.not_valid_after_utc < datetime.datetime.now(datetime.UTC)
    for key in pki.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    with pytest.raises(pkilib.TLSMaterialError, match="does not belong to certificate"):
        pkilib.load_issued(pki / "sport.pem", pki / "cloth.key")
    with pytest.raises(pkilib.TLSMaterialError, match="is not issued by the CA"):
        channels.server_credentials(pki / "sport-rogue.pem", pki / "sport-rogue.key", pki / "ca.pem")
    with pytest.raises(ValueError, match="reserved"):
        pkilib.issue_domain_certificate(pkilib.create_ca(), "aggregator")


def test_mutual_tls_admits_only_a_domain_speaking_for_itself(pki: Path) -> None:
    """Valid certificate passes; no certificate, another CA's, an expired one, a certificate
    proved with another key, a replayed, stale or misdirected proof get UNAUTHENTICATED before
    the handler runs; another domain's certificate and a non-domain certificate get
    PERMISSION_DENIED; nothing refused reaches the state."""

    async def scenario() -> None:
        async with probe_server(pki) as probe:
            ca = pki / "ca.pem"
            valid = channels.channel_credentials(ca, pki / "sport.pem", pki / "sport.key")
            assert await speak(probe.port, valid, "sport") == (grpc.StatusCode.OK, "sport")
            assert probe.accepted == ["sport"]

            # Refused by the interceptor before the handler runs. Each hostile credential differs
            # from an accepted one in exactly the property under test.
            entered = probe.entered
            unauthenticated = {
                "no certificate": (raw_credentials(ca, None, None), "client certificate from the federation CA is required"),
                "certificate from another CA": (raw_credentials(ca, pki / "sport-rogue.pem", pki / "sport-rogue.key"),
                                                "not issued by the federation CA"),
                "expired certificate": (raw_credentials(ca, pki / "sport-expired.pem", pki / "sport-expired.key"), "not valid now"),
                "certificate without its key": (raw_credentials(ca, pki / "sport.pem", pki / "cloth.key"),
                                                "does not verify with the client certificate's key"),
            }
            for case, (credentials, reason) in unauthenticated.items():
                code, detail = await speak(probe.port, credentials, "sport")
                assert (code, reason in detail) == (grpc.StatusCode.UNAUTHENTICATED, True), (case, code, detail)

            # Hand-made proofs over a TLS channel without call credentials: a fresh one passes once.
            transport = raw_credentials(ca, None, None)
            sport = pkilib.load_issued(pki / "sport.pem", pki / "sport.key")
            der = sport.certificate.public_bytes(serialization.Encoding.DER)
            def proof_for(method: str = PROBE_METHOD, target: str = AGGREGATOR, digest: bytes = EMPTY_REQUEST,
                          now: float | None = None) -> tuple[tuple[str, str | bytes], ...]:
                return call_auth.proof_metadata(der, sport.private_key, method, target=target, digest=digest, now=now)

            proof = proof_for()
            assert await speak(probe.port, transport, "sport", proof) == (grpc.StatusCode.OK, "sport")
            entered += 1
            # a proof naming the probe's identity in its signature but another one in the clear
            relabelled = tuple((key, "cdimf://domain/cloth" if key == call_auth.TARGET_KEY else value) for key, value in proof_for())
            misused = {
                "replayed proof": (proof, "already used"),
                "stale proof": (proof_for(now=time.time() - 3600), "proof time"),
                "proof for another method": (proof_for(method="/cdimf.test.Probe/Other"), "does not verify"),
                "proof for another server": (proof_for(target="cdimf://domain/cloth"), "meant for 'cdimf://domain/cloth'"),
                "proof for another request": (proof_for(digest=call_auth.request_digest(b"another request")), "does not verify"),
                "target relabelled": (relabelled, "meant for 'cdimf://domain/cloth'"),
                "certificate without proof": (proof[:1], "without a complete proof"),
            }
            for case, (metadata, reason) in misused.items():
                code, detail = await speak(probe.port, transport, "sport", metadata)
                assert (code, reason in detail) == (grpc.StatusCode.UNAUTHENTICATED, True), (case, code, detail)
            assert probe.entered == entered and probe.accepted == ["sport", "sport"]

            # Authenticated, but speaking for someone else: refused by require_domain itself.
            cloth = channels.channel_credentials(ca, pki / "cloth.pem", pki / "cloth.key")
            code, detail = await speak(probe.port, cloth, "sport")
            assert code == grpc.StatusCode.PERMISSION_DENIED
            assert "'cloth' cannot speak for domain 'sport'" in detail
            operator = channels.channel_credentials(ca, pki / "operator.pem", pki / "operator.key")
            code, detail = await speak(probe.port, operator, "sport")
            assert code == grpc.StatusCode.PERMISSION_DENIED
            assert "cdimf://operator/operator" in detail

            # The server is still up and the refused calls left no trace.
            assert await speak(probe.port, cloth, "cloth") == (grpc.StatusCode.OK, "cloth")
            assert probe.accepted == ["sport", "sport", "cloth"]

    asyncio.run(scenario())


def test_client_refuses_an_aggregator_from_another_ca(pki: Path) -> None:
    """A node that trusts the federation CA does not talk to a server with a rogue certificate."""

    async def scenario() -> None:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        credentials = channels.server_credentials(pki / "aggregator-rogue.pem", pki / "aggregator-rogue.key", pki / "rogue-ca.pem")
        port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        try:
            channel_credentials = channels.channel_credentials(pki / "ca.pem", pki / "sport.pem", pki / "sport.key")
            async with channels.create_channel(f"127.0.0.1:{port}", channel_credentials) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(None)

    asyncio.run(scenario())


def test_health_service_answers_over_mutual_tls(pki: Path, tmp_path: Path) -> None:
    """The real aggregator over mutual TLS answers the health check (what a HEALTHCHECK does) to any
    federation certificate, for the server and for its service by name, NOT_FOUND for a service it
    does not run, and nothing to a certificate from another CA."""
    ca = pki / "ca.pem"

    async def check(credentials: grpc.ChannelCredentials, port: int, service: str) -> object:
        async with channels.create_channel(f"localhost:{port}", credentials) as channel:  # signs each call, as `cdimf health` does
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as error:
                return error.code()
            return reply.status

    async def scenario() -> None:
        config = AggregatorConfig(
            listen="127.0.0.1:0", state_dir=tmp_path,
            tls=TLSConfig(ca_file=ca, cert_file=pki / "aggregator.pem", key_file=pki / "aggregator.key"),
        )
        running = await start_aggregator(config)
        try:
            for party in ("aggregator", "operator", "sport", "cloth"):
                credentials = channels.channel_credentials(ca, pki / f"{party}.pem", pki / f"{party}.key")
                for service in ("", "cdimf.v1.Aggregator"):
                    assert await check(credentials, running.port, service) == health_pb2.HealthCheckResponse.SERVING, (party, service)
                assert await check(credentials, running.port, "cdimf.v1.DomainNode") == grpc.StatusCode.NOT_FOUND
            rogue = raw_credentials(ca, pki / "sport-rogue.pem", pki / "sport-rogue.key")
            assert await check(rogue, running.port, "") == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await running.stop()

    asyncio.run(scenario())


def test_plaintext_only_when_explicitly_insecure(pki: Path) -> None:
    """On a plaintext server the check is a no-op only with insecure=True; without it there is
    no certificate and the call is UNAUTHENTICATED."""

    async def scenario() -> None:
        async with probe_server(None) as probe:
            assert await speak(probe.port, None, "sport") == (grpc.StatusCode.OK, "sport")
            probe.insecure = False
            code, detail = await speak(probe.port, None, "sport")
            assert code == grpc.StatusCode.UNAUTHENTICATED, detail
            assert probe.accepted == ["sport"]

    asyncio.run(scenario())


def run_certs(*arguments: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m cdimf.certs` as a real process."""
    return subprocess.run(
        [sys.executable, "-m", "cdimf.certs", *arguments], capture_output=True, text=True, timeout=60, check=False
    )


def test_certs_command_writes_a_working_federation(tmp_path: Path) -> None:
    """`cdimf certs` writes every party's files (keys 0600) and they work for mutual TLS."""
    out = tmp_path / "certs"
    finished = run_certs("--out", str(out), "--domains", "sport,cloth", "--aggregator-host", "agg.example.org",
                         "--domain-host", "sport=10.200.0.2", "--days", "30", "--federation-secret")
    assert finished.returncode == 0, finished.stderr
    expected = {f"{stem}.{suffix}" for stem in ("ca", "aggregator", "sport", "cloth", "operator") for suffix in ("pem", "key")}
    assert {path.name for path in out.iterdir()} == expected | {"federation.secret"}
    for private in [*out.glob("*.key"), out / "federation.secret"]:
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    assert len(load_secret(secret_file=out / "federation.secret")) == 64
    sport = pkilib.load_certificate(out / "sport.pem")
    assert pkilib.party_identity(sport) == pkilib.PartyIdentity("domain", "sport")
    assert sport.not_valid_after_utc - sport.not_valid_before_utc == datetime.timedelta(days=30)
    hosts = [str(name.value) for name in sport.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
             if not isinstance(name, x509.UniformResourceIdentifier)]
    assert "10.200.0.2" in hosts and "agg.example.org" not in hosts
    aggregator_names = pkilib.load_certificate(out / "aggregator.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "agg.example.org" in aggregator_names

    # the written files are exactly what the servers and clients load
    async def scenario() -> None:
        async with probe_server(out) as probe:
            credentials = channels.channel_credentials(out / "ca.pem", out / "cloth.pem", out / "cloth.key")
            assert await speak(probe.port, credentials, "cloth") == (grpc.StatusCode.OK, "cloth")
            code, _ = await speak(probe.port, credentials, "sport")
            assert code == grpc.StatusCode.PERMISSION_DENIED

    asyncio.run(scenario())


def test_certs_command_never_overwrites_and_rejects_bad_input(tmp_path: Path) -> None:
    """A second run refuses to replace the CA; --if-missing keeps what exists and issues only what is
    missing under the existing CA (new domain, renewal); inconsistent folders and bad names write nothing."""
    out = tmp_path / "certs"
    assert run_certs("--out", str(out), "--domains", "sport,cloth").returncode == 0

    def snapshot() -> dict[str, bytes]:
        return {path.name: path.read_bytes() for path in out.iterdir()}

    before = snapshot()
    again = run_certs("--out", str(out), "--domains", "sport,cloth")
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
    assert snapshot() == before
    kept = run_certs("--out", str(out), "--domains", "sport,cloth", "--if-missing")
    assert kept.returncode == 0, kept.stderr
    assert snapshot() == before

    # a new domain joins under the same CA; nothing else changes
    assert certs.main(["--out", str(out), "--domains", "sport,cloth,books", "--if-missing"]) == 0
    grown = snapshot()
    assert {name: grown[name] for name in before} == before
    ca = pkilib.load_certificate(out / "ca.pem")
    pkilib.load_certificate(out / "books.pem").verify_directly_issued_by(ca)

    # renewal: the operator moves the old pair away and reissues it under the same CA
    (out / "sport.pem").rename(tmp_path / "sport.pem.old")
    (out / "sport.key").rename(tmp_path / "sport.key.old")
    assert certs.main(["--out", str(out), "--domains", "sport,cloth", "--if-missing"]) == 0
    renewed = pkilib.load_certificate(out / "sport.pem")
    renewed.verify_directly_issued_by(ca)
    assert renewed.serial_number != pkilib.load_certificate(tmp_path / "sport.pem.old").serial_number

    # inconsistent folders are refused before anything is written
    current = snapshot()
    (out / "cloth.key").rename(tmp_path / "cloth.key.aside")
    half = snapshot()
    assert certs.main(["--out", str(out), "--domains", "sport,cloth", "--if-missing"]) == 2
    assert snapshot() == half
    (tmp_path / "cloth.key.aside").rename(out / "cloth.key")
    (out / "cloth.pem").write_bytes((out / "sport.pem").read_bytes())
    swapped = snapshot()
    assert certs.main(["--out", str(out), "--domains", "sport,cloth", "--if-missing"]) == 2
    assert snapshot() == swapped
    (out / "cloth.pem").write_bytes(current["cloth.pem"])
    ten_days_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    ca_issued = pkilib.load_issued(out / "ca.pem", out / "ca.key")
    pkilib.issue_domain_certificate(ca_issued, "cloth", not_before=ten_days_ago, days=1).write(out / "cloth.pem", out / "cloth.key")
    expired = snapshot()
    assert certs.main(["--out", str(out), "--domains", "sport,cloth,fresh", "--if-missing"]) == 2
    assert snapshot() == expired  # not even the valid new domain was written

    # in-process (argparse exits with status 2): a process per case would only add start-up time
    for bad in (["--domains", "sport,Cloth"], ["--domains", "sport,aggregator"], ["--domains", "sport,sport"],
                ["--domains", "sport", "--domain-host", "cloth=h"], ["--domains", "sport", "--days", "0"]):
        fresh = tmp_path / "fresh"
        try:
            status = certs.main(["--out", str(fresh), *bad])
        except SystemExit as exit_:
            status = exit_.code
        assert status == 2, bad
        assert not fresh.exists(), bad


def test_config_driven_port_and_channel(pki: Path) -> None:
    """create_server/bind_port/open_channel follow a TLSConfig: mutual TLS by default, plaintext only when
    insecure, and a TLS client cannot talk to a plaintext server."""
    node_tls = TLSConfig(ca_file=pki / "ca.pem", cert_file=pki / "sport.pem", key_file=pki / "sport.key")
    server_tls = TLSConfig(ca_file=pki / "ca.pem", cert_file=pki / "aggregator.pem", key_file=pki / "aggregator.key")
    plaintext = TLSConfig(insecure=True)

    async def health_status(port: int, settings: TLSConfig) -> grpc.StatusCode:
        async with channels.open_channel(f"127.0.0.1:{port}", settings) as channel:
            try:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as error:
                return error.code()
            return grpc.StatusCode.OK

    async def scenario() -> None:
        for server_settings, client_settings, expected in (
            (server_tls, node_tls, grpc.StatusCode.OK),
            (plaintext, plaintext, grpc.StatusCode.OK),
            (plaintext, node_tls, grpc.StatusCode.UNAVAILABLE),
            (server_tls, plaintext, grpc.StatusCode.UNAVAILABLE),
        ):
            server = channels.create_server(server_settings)
            health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
            port = channels.bind_port(server, "127.0.0.1:0", server_settings)
            await server.start()
            try:
                assert await health_status(port, client_settings) == expected, (server_settings, client_settings)
            finally:
                await server.stop(None)

    asyncio.run(scenario())


def state_snapshot(running: RunningAggregator, state_dir: Path) -> tuple[object, ...]:
    """What a refused call must not change: registrations, the run's progress, the state files."""
    run = running.state.run
    assert run is not None
    contributions = {domain: values.tobytes() for domain, (_, values) in run.contributions.items()}
    files = {path.relative_to(state_dir): path.read_bytes() for path in sorted(state_dir.rglob("*")) if path.is_file()}
    return sorted(running.state.registrations), run.current_round, contributions, len(run.events), files


def test_real_aggregator_refuses_impostors_and_keeps_its_state(pki: Path, tmp_path: Path) -> None:
    """The aggregator over mutual authentication: no certificate, another CA's, an expired one and a
    certificate proved with another key get UNAUTHENTICATED; a domain speaking for another domain, a domain using the control API and the
    operator speaking for a domain get PERMISSION_DENIED; none of it changes the run."""
    ca = pki / "ca.pem"

    def party(stem: str) -> grpc.ChannelCredentials:
        return channels.channel_credentials(ca, pki / f"{stem}.pem", pki / f"{stem}.key")

    async def scenario() -> None:
        config = AggregatorConfig(
            listen="127.0.0.1:0", state_dir=tmp_path,
            tls=TLSConfig(ca_file=ca, cert_file=pki / "aggregator.pem", key_file=pki / "aggregator.key"),
        )
        running = await start_aggregator(config)
        clients: list[AggregatorClient] = []
        try:
            address = f"127.0.0.1:{running.port}"
            for domain, users in (("sport", range(0, 6)), ("cloth", range(3, 9))):
                client = AggregatorClient(address, domain, credentials=party(domain), retry_for_s=5)
                clients.append(client)
                keys = np.array([f"u{user}" for user in users])
                await client.register(pseudonymize(keys, FEDERATION_SECRET), np.ones(len(keys), bool))
            operator = AggregatorClient(address, credentials=party("operator"), retry_for_s=5)
            clients.append(operator)
            run = await operator.start_run(RunParams(rounds=2, rank=4))
            shared = np.ones((3, 4), np.float32)  # u3..u5 are held by both domains
            before = state_snapshot(running, tmp_path)

            def push_as(domain: str) -> list[pb.MatrixChunk]:
                return list(encode_matrix(shared, pb.Header(run_id=run.run_id, domain=domain, round=1)))

            async def attempt(credentials: grpc.ChannelCredentials, call: str, request: object) -> grpc.StatusCode:
                async with channels.create_channel(address, credentials) as channel:
                    stub = pb_grpc.AggregatorStub(channel)
                    try:
                        method = getattr(stub, call)
                        await method(iter(request) if isinstance(request, list) else request, timeout=CALL_TIMEOUT_S)
                    except grpc.aio.AioRpcError as error:
                        return error.code()
                return grpc.StatusCode.OK

            start = pb.StartRunRequest(params=pb.RunParams(rounds=2, rank=4))
            attacks = [
                ("no certificate", raw_credentials(ca, None, None), "PushContribution", push_as("sport"), grpc.StatusCode.UNAUTHENTICATED),
                ("another CA", raw_credentials(ca, pki / "sport-rogue.pem", pki / "sport-rogue.key"),
                 "PushContribution", push_as("sport"), grpc.StatusCode.UNAUTHENTICATED),
                ("expired", raw_credentials(ca, pki / "sport-expired.pem", pki / "sport-expired.key"),
                 "PushContribution", push_as("sport"), grpc.StatusCode.UNAUTHENTICATED),
                ("sport's certificate, cloth's key", raw_credentials(ca, pki / "sport.pem", pki / "cloth.key"),
                 "PushContribution", push_as("sport"), grpc.StatusCode.UNAUTHENTICATED),
                ("cloth as sport", party("cloth"), "PushContribution", push_as("sport"), grpc.StatusCode.PERMISSION_DENIED),
                ("operator as sport", party("operator"), "PushContribution", push_as("sport"), grpc.StatusCode.PERMISSION_DENIED),
                ("domain starts a run", party("sport"), "StartRun", start, grpc.StatusCode.PERMISSION_DENIED),
                ("no certificate starts a run", raw_credentials(ca, None, None), "StartRun", start, grpc.StatusCode.UNAUTHENTICATED),
            ]
            for label, credentials, call, request, expected in attacks:
                assert await attempt(credentials, call, request) == expected, label
                assert state_snapshot(running, tmp_path) == before, label

            # the rightful domain is still served
            assert await attempt(party("sport"), "PushContribution", push_as("sport")) == grpc.StatusCode.OK
            assert state_snapshot(running, tmp_path) != before
        finally:
            for client in clients:
                await client.close()
            await running.stop(grace=0.5)

    asyncio.run(scenario())
