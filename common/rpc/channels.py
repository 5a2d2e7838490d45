"""Where every gRPC channel and server of cdimf is made: keepalive options, TLS from a TLSConfig, uvloop, serving until signalled.

Channels are TLS with the server's certificate checked against the federation CA, and the
client proves its own certificate on every call (cdimf.common.security.call_proof: a proof in
the call's metadata for that server and that request, signed by cdimf.common.rpc.client_proof
and verified by the server's gate, cdimf.common.rpc.gate, before any handler runs, so a client
without a certificate from the federation CA, or with an expired one, gets UNAUTHENTICATED).
Every server decodes its requests in that gate, plaintext ones too. Who may call what is cdimf.common.rpc.auth's business. Plaintext is never a
default: `insecure = true` in the TLS section is the explicit opt-out.
"""

import asyncio
import inspect
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc

from cdimf.common.config import TLSConfig
from cdimf.common.rpc.client_proof import ProvingCredentials
from cdimf.common.rpc.gate import RequestGate
from cdimf.common.security.call_proof import CallAuthenticator
from cdimf.common.security.pki import TLSMaterialError, checked_pair, load_certificate, party_identity, read_ca_pem

log = logging.getLogger("cdimf.rpc")

# Keepalive on every channel and server: dead peers (a killed node, a dropped NAT mapping) are
# noticed within ~30 s instead of hanging a stream forever.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    # a server owns its port: gRPC's default SO_REUSEPORT let a second aggregator bind the same
    # address and take half the connections
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
)
Option = tuple[str, str | int]


# ----- TLS material -----


def tls_files(settings: TLSConfig) -> tuple[Path, Path, Path]:
    """(CA, certificate, key) paths of a TLS config that is not insecure."""
    if settings.ca_file is None or settings.cert_file is None or settings.key_file is None:
        raise TLSMaterialError("mutual TLS needs ca_file, cert_file and key_file (or insecure = true)")
    return settings.ca_file, settings.cert_file, settings.key_file


def server_credentials(
    certificate_path: Path | str, key_path: Path | str, ca_path: Path | str
) -> grpc.ServerCredentials:
    """TLS server credentials presenting this party's certificate (checked against the CA in
    `ca_path`). Clients prove their certificates per call (create_server's interceptor), not here."""
    issued, _ = checked_pair(certificate_path, key_path, ca_path)
    return grpc.ssl_server_credentials([(issued.private_key_pem(), issued.certificate_pem())], require_client_auth=False)


def channel_credentials(
    ca_path: Path | str, certificate_path: Path | str | None = None, key_path: Path | str | None = None
) -> grpc.ChannelCredentials:
    """Channel credentials that trust only the federation CA and prove this party's
    certificate on every call (omit certificate and key only to test a client without one)."""
    if (certificate_path is None) != (key_path is None):
        raise TLSMaterialError("give both a client certificate and its key, or neither")
    if certificate_path is None or key_path is None:
        return grpc.ssl_channel_credentials(root_certificates=read_ca_pem(ca_path))
    issued, ca_pem = checked_pair(certificate_path, key_path, ca_path)
    return ProvingCredentials(grpc.ssl_channel_credentials(root_certificates=ca_pem), ca_pem, issued.certificate, issued.private_key)


def credentials_for(settings: TLSConfig) -> grpc.ChannelCredentials | None:
    """The channel credentials of a TLS section (None: plaintext, only with insecure = true)."""
    if settings.insecure:
        return None
    ca_file, cert_file, key_file = tls_files(settings)
    return channel_credentials(ca_file, cert_file, key_file)


# ----- channels -----


def create_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
) -> grpc.aio.Channel:
    """A grpc.aio channel to `target` with keepalive, TLS with `credentials` or plaintext without;
    credentials from channel_credentials also prove every call (after `interceptors`)."""
    options = list(CHANNEL_OPTIONS)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    if isinstance(credentials, ProvingCredentials):
        interceptors = [*(interceptors or ()), *credentials.interceptors(target)]
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)


def open_channel(target: str, settings: TLSConfig) -> grpc.aio.Channel:
    """A channel to `target` presenting this party's certificate from `settings`, or a plaintext
    one when `settings.insecure`."""
    return create_channel(target, credentials_for(settings))


# ----- servers -----


def create_server(
    settings: TLSConfig,
    options: Sequence[Option] = (),
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    request_limits: Mapping[str, int] | None = None,
) -> grpc.aio.Server:
    """An unstarted grpc.aio server with keepalive (plus `options`) and the request gate in front of
    `interceptors`: requests decoded there and, unless `settings.insecure`, every call's proof
    checked for this server (the identity in its certificate), unary requests bounded by
    `request_limits` (bytes by full method path); bind it with bind_port."""
    authenticator = None
    if not settings.insecure:
        ca_file, cert_file, _ = tls_files(settings)
        identity = party_identity(load_certificate(cert_file)).uri()
        authenticator = CallAuthenticator(load_certificate(ca_file), identity)
    return grpc.aio.server(options=[*SERVER_OPTIONS, *options], interceptors=[RequestGate(authenticator, request_limits), *interceptors])


def bind_port(server: grpc.aio.Server, address: str, settings: TLSConfig, what: str = "server") -> int:
    """Bind `address` on `server` with TLS from `settings`, or plaintext when `settings.insecure`;
    return the bound port (`what` names the server in the error)."""
    refused = f"cannot listen on {address} for the {what}: the port is taken or the address is not this host's"
    try:
        if settings.insecure:
            port = server.add_insecure_port(address)
        else:
            ca_file, cert_file, key_file = tls_files(settings)
            port = server.add_secure_port(address, server_credentials(cert_file, key_file, ca_file))
    except RuntimeError as error:  # grpcio's "Failed to bind": one line for the operator, no traceback
        raise OSError(refused) from error
    if port == 0:
        raise OSError(refused)
    return port


# ----- running servers -----


class Stoppable(Protocol):
    """A started server that can stop gracefully."""

    async def stop(self) -> None:
        """Stop serving."""
        ...


Running = TypeVar("Running", bound=Stoppable)


def run_on_uvloop(main: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine to completion on uvloop where available (Linux/macOS), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # Windows: the default loop works, just slower
        asyncio.run(main)
        return
    uvloop.run(main)


def serve_until_signalled(
    start: Callable[[], Awaitable[Running]],
    on_ready: Callable[[Running], Awaitable[None] | None] | None = None,
    ends_early: Callable[[Running], "asyncio.Future[None]"] | None = None,
    what: str = "server",
) -> None:
    """Start a server on uvloop, report it ready, serve until SIGINT or SIGTERM, then stop gracefully.

    `ends_early(running)` is work whose end also stops the server (a node's training loop); when
    it failed, its exception is raised after the stop so the process exits with an error.
    """

    async def main() -> None:
        """Start, report ready, wait for a signal (or the early end), then stop."""
        loop = asyncio.get_running_loop()
        signalled: asyncio.Future[None] = loop.create_future()

        def stop_soon() -> None:
            """Note the first signal; later ones change nothing."""
            if not signalled.done():
                signalled.set_result(None)

        # installed before starting, so a signal during a slow start stops the server once it is up
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop_soon)
        # a write over the file-size limit must fail (EFBIG, handled like a full disk), not kill the server
        if hasattr(signal, "SIGXFSZ"):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        running = await start()
        if on_ready is not None:
            maybe = on_ready(running)
            if inspect.isawaitable(maybe):
                await maybe
        early = ends_early(running) if ends_early is not None else None
        await asyncio.wait([signalled] if early is None else [signalled, early], return_when=asyncio.FIRST_COMPLETED)
        failure = early.exception() if early is not None and early.done() and not early.cancelled() else None
        log.info("stopping the %s", what)
        await running.stop()
        if failure is not None:
            raise failure

    run_on_uvloop(main())
