"""Client certificates checked per call: the client signs each call, the server verifies it before any handler runs.

Why not in the TLS handshake: grpcio's Python server can either require and verify a client
certificate during the handshake or not ask for one at all. When the handshake refuses a
client, the client only sees the connection fail (UNAVAILABLE) and the server never sees a
request, so it cannot answer UNAUTHENTICATED. The channel is therefore TLS with the server
authenticated by the federation CA (encrypted, the client checks who it talks to), and the
client proves its own identity on every call, as gRPC call credentials:

    cdimf-cert-bin          the client's certificate (DER)
    cdimf-proof-time        the signing time, integer milliseconds since the Unix epoch
    cdimf-proof-nonce-bin   16 random bytes
    cdimf-proof-bin         ECDSA-SHA256 signature with the certificate's key over
                            PROOF_CONTEXT | method path | time | nonce

The server's interceptor checks, before the handler: a certificate is present, issued by the
federation CA, inside its validity window, allowed for client authentication; the time is within
PROOF_WINDOW of the server's clock; the signature verifies with the certificate's key (so a copied
certificate without its key is useless); and the (certificate, nonce) pair was never seen before
(a proof cannot be replayed, even with a re-encoded signature). Any failure is UNAUTHENTICATED and
the handler never runs. A handler then reads the verified certificate of its own call with
`verified_certificate(metadata)` to check who may do what (PERMISSION_DENIED is its business).

Signing covers the full method path, so a proof for one method cannot be used for another; it
does not name the server, so within PROOF_WINDOW a server could replay a call it received to
another server of the same method (the aggregator has no such peer, and domain nodes only accept
operators' read calls).
"""

import hashlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urlsplit

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

CERTIFICATE_KEY = "cdimf-cert-bin"
TIME_KEY = "cdimf-proof-time"
NONCE_KEY = "cdimf-proof-nonce-bin"
PROOF_KEY = "cdimf-proof-bin"
PROOF_CONTEXT = b"cdimf call proof v1\x00"
NONCE_BYTES = 16
# How far a proof's time may be from the server's clock: hosts of different organisations
# disagree by seconds, not minutes; the same tolerance as certificates' back-dated start.
PROOF_WINDOW_S = 300.0
# Verified certificates are kept (by DER digest) so a steady caller costs one signature check per call.
CERTIFICATE_CACHE_SIZE = 256


class CallRefused(Exception):
    """A call's certificate proof is missing or invalid: refuse it with `code` and `detail`."""

    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
        """Remember the status and the message the caller will see."""
        super().__init__(detail)
        self.code = code
        self.detail = detail


def _signed_bytes(method: str, millis: str, nonce: bytes) -> bytes:
    """The exact bytes a proof signs: context, method path, time and nonce, NUL-separated."""
    return PROOF_CONTEXT + method.encode() + b"\x00" + millis.encode() + b"\x00" + nonce


def proof_metadata(
    certificate_der: bytes, private_key: ec.EllipticCurvePrivateKey, method: str, *, now: float | None = None
) -> tuple[tuple[str, str | bytes], ...]:
    """The metadata proving that the holder of `private_key` makes this call of `method` now."""
    millis = str(int((time.time() if now is None else now) * 1000))
    nonce = os.urandom(NONCE_BYTES)
    signature = private_key.sign(_signed_bytes(method, millis, nonce), ec.ECDSA(hashes.SHA256()))
    return (
        (CERTIFICATE_KEY, certificate_der), (TIME_KEY, millis), (NONCE_KEY, nonce), (PROOF_KEY, signature),
    )


class CertificateProofPlugin(grpc.AuthMetadataPlugin):
    """gRPC call credentials that attach a fresh certificate proof to every call."""

    def __init__(self, certificate: x509.Certificate, private_key: ec.EllipticCurvePrivateKey) -> None:
        """Sign with `private_key` on behalf of `certificate`."""
        self._certificate_der = certificate.public_bytes(serialization.Encoding.DER)
        self._private_key = private_key

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        """Sign this call's full method path (`/package.Service/Method`)."""
        try:
            method = f"{urlsplit(context.service_url).path.rstrip('/')}/{context.method_name}"
            callback(proof_metadata(self._certificate_der, self._private_key, method), None)
        except Exception as error:  # gRPC wants the error handed back, not raised
            callback((), error)


def proof_call_credentials(certificate: x509.Certificate, private_key: ec.EllipticCurvePrivateKey) -> grpc.CallCredentials:
    """Call credentials that prove each call with `certificate` and `private_key`."""
    return grpc.metadata_call_credentials(CertificateProofPlugin(certificate, private_key), name="cdimf-certificate-proof")


class _SeenNonces:
    """(certificate digest, nonce) pairs seen within the proof window, forgotten once too old to replay."""

    def __init__(self) -> None:
        """Start empty."""
        self._expiry_by_key: OrderedDict[bytes, float] = OrderedDict()

    def add_new(self, key: bytes, now: float) -> bool:
        """Record `key`; False when it was already recorded (a replay)."""
        while self._expiry_by_key:
            oldest, expiry = next(iter(self._expiry_by_key.items()))
            if expiry > now:
                break
            del self._expiry_by_key[oldest]
        if key in self._expiry_by_key:
            return False
        # a proof is acceptable until PROOF_WINDOW_S after its time, so remember it twice that long
        self._expiry_by_key[key] = now + 2 * PROOF_WINDOW_S
        return True


class _VerifiedCalls:
    """Certificates of calls the interceptor verified, by the call's signature, for handlers to read."""

    def __init__(self) -> None:
        """Start empty."""
        self._lock = threading.Lock()
        self._by_signature: OrderedDict[bytes, tuple[float, x509.Certificate]] = OrderedDict()

    def put(self, signature: bytes, certificate: x509.Certificate, now: float) -> None:
        """Remember that the call carrying `signature` was proved with `certificate`."""
        with self._lock:
            while self._by_signature:
                oldest, (expiry, _) = next(iter(self._by_signature.items()))
                if expiry > now:
                    break
                del self._by_signature[oldest]
            self._by_signature[signature] = (now + 2 * PROOF_WINDOW_S, certificate)

    def get(self, signature: bytes) -> x509.Certificate | None:
        """The certificate a verified call with `signature` was proved with, or None."""
        with self._lock:
            entry = self._by_signature.get(signature)
        return None if entry is None else entry[1]


# One table per process: interceptors fill it, handlers of any server in the process read it.
_verified_calls = _VerifiedCalls()


def _metadata_value(metadata: Sequence[tuple[str, str | bytes]] | None, key: str) -> str | bytes | None:
    """The single value of `key` in `metadata`; CallRefused when it is given more than once."""
    values = [value for name, value in (metadata or ()) if name == key]
    if len(values) > 1:
        raise CallRefused(grpc.StatusCode.UNAUTHENTICATED, f"metadata {key} given {len(values)} times")
    return values[0] if values else None


class CallAuthenticator:
    """Verifies the certificate proof of a call against the federation CA."""

    def __init__(self, ca_certificate: x509.Certificate, clock: Callable[[], float] = time.time) -> None:
        """Trust certificates issued directly by `ca_certificate`; `clock` gives Unix seconds."""
        self._ca = ca_certificate
        self._clock = clock
        self._lock = threading.Lock()
        self._certificates: OrderedDict[bytes, x509.Certificate] = OrderedDict()
        self._nonces = _SeenNonces()

    def _issued_certificate(self, der: bytes) -> x509.Certificate:
        """The certificate in `der` after checking it is ours to trust (CA signature, client use)."""
        digest = hashlib.sha256(der).digest()
        with self._lock:
            cached = self._certificates.get(digest)
        if cached is not None:
            return cached
        refused = grpc.StatusCode.UNAUTHENTICATED
        try:
            certificate = x509.load_der_x509_certificate(der)
        except ValueError as error:
            raise CallRefused(refused, f"the client certificate cannot be parsed: {error}") from None
        try:
            certificate.verify_directly_issued_by(self._ca)
        except (ValueError, TypeError, InvalidSignature):
            raise CallRefused(refused, "the client certificate is not issued by the federation CA") from None
        try:
            usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            usages = None
        if usages is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
            raise CallRefused(refused, "the client certificate does not allow client authentication")
        if not isinstance(certificate.public_key(), ec.EllipticCurvePublicKey):
            raise CallRefused(refused, "the client certificate's key is not an elliptic-curve key")
        with self._lock:
            self._certificates[digest] = certificate
            if len(self._certificates) > CERTIFICATE_CACHE_SIZE:
                self._certificates.popitem(last=False)
        return certificate

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None, method: str) -> x509.Certificate:
        """The verified certificate of a call of `method` with `metadata`; CallRefused (UNAUTHENTICATED) otherwise."""
        refused = grpc.StatusCode.UNAUTHENTICATED
        der = _metadata_value(metadata, CERTIFICATE_KEY)
        if not der:
            raise CallRefused(refused, "a client certificate from the federation CA is required")
        millis, nonce, signature = (_metadata_value(metadata, key) for key in (TIME_KEY, NONCE_KEY, PROOF_KEY))
        if not isinstance(der, bytes) or not isinstance(nonce, bytes) or not isinstance(signature, bytes) \
                or not isinstance(millis, str):
            raise CallRefused(refused, "the call carries a client certificate without a complete proof")
        certificate = self._issued_certificate(der)
        now = self._clock()
        if not certificate.not_valid_before_utc.timestamp() <= now <= certificate.not_valid_after_utc.timestamp():
            raise CallRefused(refused, f"the client certificate is not valid now (valid {certificate.not_valid_before_utc:%Y-%m-%d %H:%M} "
                                       f"to {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)")
        if not millis.isdigit() or abs(int(millis) / 1000 - now) > PROOF_WINDOW_S:
            raise CallRefused(refused, f"the call's proof time is not within {PROOF_WINDOW_S:.0f} s of the server's clock")
        if len(nonce) != NONCE_BYTES:
            raise CallRefused(refused, f"the call's proof nonce must be {NONCE_BYTES} bytes")
        public_key = certificate.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)  # checked in _issued_certificate
        try:
            public_key.verify(signature, _signed_bytes(method, millis, nonce), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise CallRefused(refused, "the call's proof does not verify with the client certificate's key") from None
        with self._lock:
            fresh = self._nonces.add_new(hashlib.sha256(der).digest() + nonce, now)
        if not fresh:
            raise CallRefused(refused, "the call's proof was already used (replayed call)")
        _verified_calls.put(signature, certificate, now)
        return certificate


def verified_certificate(metadata: Sequence[tuple[str, str | bytes]] | None) -> x509.Certificate | None:
    """The certificate the interceptor verified for the call carrying `metadata`, or None (no
    proof, or a server without the interceptor, where nothing is trusted)."""
    try:
        signature = _metadata_value(metadata, PROOF_KEY)
    except CallRefused:
        return None
    return _verified_calls.get(signature) if isinstance(signature, bytes) else None


def _refusing_handler(handler: grpc.RpcMethodHandler, refusal: CallRefused) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts with `refusal`."""

    async def refuse(_request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(refusal.code, refusal.detail)

    factories: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    factory = factories[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return factory(refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


class CertificateProofInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, before any handler runs, every call without a valid certificate proof."""

    def __init__(self, authenticator: CallAuthenticator) -> None:
        """Check calls with `authenticator`."""
        self._authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """The method's own handler for a proved call, else one that aborts with UNAUTHENTICATED."""
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED, which reveals nothing
            return handler
        try:
            self._authenticator.authenticate(handler_call_details.invocation_metadata, handler_call_details.method)
        except CallRefused as refusal:
            return _refusing_handler(handler, refusal)
        return handler
