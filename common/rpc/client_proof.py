"""Client side of the call proof: credentials carrying this party's certificate, interceptors signing each call for its server and request.

gRPC's call credentials see a call's method but not its request, so the proof is made by a
client interceptor instead: it serializes the request (a request stream's first message) as the
channel will, and signs method, target, time, nonce and the request's SHA-256
(cdimf.common.security.call_proof).

The target is the identity of the server the channel reaches: the cdimf URI in the certificate
it presents. The interceptor learns it once per channel with a TLS handshake of its own to the
channel's address, checked exactly as the channel checks it (the federation CA, the host name),
and reads the URI SAN. A server that cannot present that certificate cannot complete the
handshake; and should the channel's own connection reach another server than the probe did, that
server refuses the proof (UNAUTHENTICATED), it is never accepted elsewhere.
"""

import asyncio
import itertools
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cdimf.common.security.call_proof import proof_metadata, request_digest
from cdimf.common.security.pki import CertificateIdentityError, party_identity

# How long the identity probe of a server may take (a TLS handshake on an open port).
PROBE_TIMEOUT_S = 10.0
_END = object()


class ProvingCredentials(grpc.ChannelCredentials):
    """TLS channel credentials that also hold this party's certificate and key: channels made
    with them (cdimf.common.rpc.channels.create_channel) prove every call."""

    def __init__(self, transport: grpc.ChannelCredentials, ca_pem: bytes, certificate: x509.Certificate,
                 private_key: ec.EllipticCurvePrivateKey) -> None:
        """`transport`: TLS trusting the federation CA in `ca_pem`; the proof signs with `private_key`."""
        super().__init__(transport._credentials)
        self.ca_pem = ca_pem
        self.certificate_der = certificate.public_bytes(serialization.Encoding.DER)
        self.private_key = private_key

    def interceptors(self, target: str) -> list[grpc.aio.ClientInterceptor]:
        """The interceptors that prove the calls of a channel to `target` (host:port)."""
        return CallProver(self, target).interceptors()


def _host_and_port(target: str) -> tuple[str, int]:
    """(host, port) of a `host:port` or `[v6]:port` target, with an optional `dns:///` or `ipv4:` scheme."""
    for prefix in ("dns:///", "ipv4:", "ipv6:"):
        if target.startswith(prefix):
            target = target[len(prefix):]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"cannot prove calls to {target!r}: expected host:port")
    return host.strip("[]"), int(port)


async def server_identity(target: str, ca_pem: bytes, timeout_s: float = PROBE_TIMEOUT_S) -> str:
    """The cdimf identity URI in the certificate of the server at `target`, checked as a channel
    checks it (federation CA, host name); OSError or CertificateIdentityError when it cannot be had."""
    host, port = _host_and_port(target)
    context = ssl.create_default_context(cadata=ca_pem.decode())
    context.set_alpn_protocols(["h2"])
    _, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=context, server_hostname=host), timeout_s)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        # no TLS close handshake: the server waits for HTTP/2 and would not answer one for seconds
        writer.transport.abort()
    return party_identity(x509.load_der_x509_certificate(der)).uri()


def _serialized(request: Any) -> bytes:
    """A request as the channel sends it: bytes as they are (methods without serializer), else the
    message's serialization (protobuf serializes one message the same way every time)."""
    return bytes(request) if isinstance(request, bytes | bytearray | memoryview) else request.SerializeToString()


async def _first_of(requests: Iterable[Any] | AsyncIterable[Any]) -> tuple[Any, Iterable[Any] | AsyncIterator[Any]]:
    """(the first request or _END, all requests again), keeping a synchronous iterable synchronous."""
    if isinstance(requests, AsyncIterable):
        iterator = aiter(requests)
        first = await anext(iterator, _END)

        async def again() -> AsyncIterator[Any]:
            if first is _END:
                return
            yield first
            async for request in iterator:
                yield request

        return first, again()
    plain: Iterator[Any] = iter(requests)
    first = next(plain, _END)
    return first, plain if first is _END else itertools.chain([first], plain)


class CallProver:
    """Proves every call of one channel for its server, its method and its request."""

    def __init__(self, credentials: ProvingCredentials, target: str) -> None:
        """Prove with `credentials`' certificate the calls to the server at `target`."""
        self._credentials = credentials
        self._target = target
        self._identity: str | None = None

    async def _identity_of_server(self) -> str:
        """The server's identity, probed on first use (UNAVAILABLE, as the call would be, while it cannot be)."""
        if self._identity is None:
            try:
                self._identity = await server_identity(self._target, self._credentials.ca_pem)
            except (OSError, TimeoutError, ssl.SSLError, ValueError, CertificateIdentityError) as error:
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                    details=f"cannot learn the identity of the server at {self._target}: {error}",
                ) from error
        return self._identity

    async def proved(self, details: grpc.aio.ClientCallDetails, request: Any) -> grpc.aio.ClientCallDetails:
        """`details` with this call's proof added to its metadata (`request`: _END for an empty stream)."""
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        serialized = b"" if request is _END else _serialized(request)
        proof = proof_metadata(self._credentials.certificate_der, self._credentials.private_key, method,
                               target=await self._identity_of_server(), digest=request_digest(serialized))
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *proof)
        return details._replace(metadata=metadata)

    def interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        """One interceptor per call shape (a grpc.aio channel gives each interceptor one shape only)."""
        return [_UnaryUnary(self), _UnaryStream(self), _StreamUnary(self), _StreamStream(self)]


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    """Proves unary calls over their request."""

    def __init__(self, prover: CallProver) -> None:
        self._prover = prover

    async def intercept_unary_unary(self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails,
                                    request: Any) -> Any:
        """Add the proof, then call."""
        return await continuation(await self._prover.proved(client_call_details, request), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    """Proves response-streaming calls over their request."""

    def __init__(self, prover: CallProver) -> None:
        self._prover = prover

    async def intercept_unary_stream(self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails,
                                     request: Any) -> Any:
        """Add the proof, then call."""
        return await continuation(await self._prover.proved(client_call_details, request), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    """Proves request-streaming calls over their first message."""

    def __init__(self, prover: CallProver) -> None:
        self._prover = prover

    async def intercept_stream_unary(self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails,
                                     request_iterator: Any) -> Any:
        """Read the first message, add the proof, then call with every message."""
        first, requests = await _first_of(request_iterator)
        return await continuation(await self._prover.proved(client_call_details, first), requests)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    """Proves bidirectional calls over their first message."""

    def __init__(self, prover: CallProver) -> None:
        self._prover = prover

    async def intercept_stream_stream(self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails,
                                      request_iterator: Any) -> Any:
        """Read the first message, add the proof, then call with every message."""
        first, requests = await _first_of(request_iterator)
        return await continuation(await self._prover.proved(client_call_details, first), requests)
