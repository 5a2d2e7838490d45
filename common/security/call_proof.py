"""Client certificates checked per call: the client signs each call, the server verifies it before any handler runs.

Why not in the TLS handshake: grpcio's Python server can either require and verify a client
certificate during the handshake or not ask for one at all. When the handshake refuses a
client, the client only sees the connection fail (UNAVAILABLE) and the server never sees a
request, so it cannot answer UNAUTHENTICATED. The channel is therefore TLS with the server
authenticated by the federation CA (encrypted, the client checks who it talks to), and the
client proves its own identity on every call, in the call's metadata:

    cdimf-cert-bin          the client's certificate (DER)
    cdimf-proof-target      the identity URI of the server the call is meant for
                            (`cdimf://domain/cloth`, `cdimf://aggregator/aggregator`)
    cdimf-proof-time        the signing time, integer milliseconds since the Unix epoch
    cdimf-proof-nonce-bin   16 random bytes
    cdimf-proof-bin         ECDSA-SHA256 signature with the certificate's key over
                            PROOF_CONTEXT | method path | target | time | nonce | request digest

The request digest is SHA-256 of the serialized request message as it travels on the wire; for
a request stream, of its first message (the one that carries the header: run, domain, round).
The server computes it itself from the bytes it received, so it is never sent.

The server checks, before the handler: a certificate is present, issued by the federation CA,
inside its validity window, allowed for client authentication; the target is this server's own
identity (the URI SAN of its certificate); the time is within PROOF_WINDOW_S of the server's
clock; the signature verifies with the certificate's key over this method, this target and this
request (so a copied certificate without its key is useless, and a captured proof serves neither
another server nor another request); and the (certificate, nonce) pair was never seen before (a
proof cannot be replayed to the same server, even with a re-encoded signature). Any failure is
UNAUTHENTICATED and the handler never runs. A handler then reads the verified certificate of its
own call with `verified_certificate(metadata)` to check who may do what (PERMISSION_DENIED is
its business). docs/security.md says what this covers and what it does not.
"""

import hashlib
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from cdimf.common.security.names import shown

CERTIFICATE_KEY = "cdimf-cert-bin"
TIME_KEY = "cdimf-proof-time"
NONCE_KEY = "cdimf-proof-nonce-bin"
PROOF_KEY = "cdimf-proof-bin"
TARGET_KEY = "cdimf-proof-target"
PROOF_CONTEXT = b"cdimf call proof v2\x00"
DIGEST_BYTES = 32
NONCE_BYTES = 16
# How far a proof's time may be from the server's clock: hosts of different organisations
# disagree by seconds, not minutes; the same tolerance as certificates' back-dated start.
PROOF_WINDOW_S = 300.0
# Verified certificates are kept (by DER digest) so a steady caller costs one signature check per call.
CERTIFICATE_CACHE_SIZE = 256
# Bound of the replay cache: (certificate, nonce) pairs are remembered for 2 * PROOF_WINDOW_S, at
# most this many (about 60 MB, 290 bytes each). Past the bound the oldest entry is forgotten and every proof
# signed at or before its time is refused from then on, so a flood can never reopen a replay.
REPLAY_CACHE_SIZE = 200_000


class CallRefused(Exception):
    """A call's certificate proof is missing or invalid: refuse it with `code` and `detail`."""

    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
        """Remember the status and the message the caller will see."""
        super().__init__(detail)
        self.code = code
        self.detail = detail


def request_digest(serialized: bytes | memoryview) -> bytes:
    """The digest a proof binds: SHA-256 of the serialized request (a stream's first message)."""
    return hashlib.sha256(serialized).digest()


def _signed_bytes(method: str, target: str, millis: str, nonce: bytes, digest: bytes) -> bytes:
    """The exact bytes a proof signs: context, method path, target, time, nonce and request digest.

    Method, target and time are NUL-separated text without NULs; nonce and digest have fixed lengths.
    """
    return (PROOF_CONTEXT + method.encode() + b"\x00" + target.encode() + b"\x00" + millis.encode() + b"\x00"
            + nonce + digest)


def proof_metadata(
    certificate_der: bytes, private_key: ec.EllipticCurvePrivateKey, method: str, *, target: str, digest: bytes,
    now: float | None = None,
) -> tuple[tuple[str, str | bytes], ...]:
    """The metadata proving that the holder of `private_key` makes this call of `method`, to the
    server `target` (its identity URI), with the request whose digest is `digest`, now."""
    if len(digest) != DIGEST_BYTES:
        raise ValueError(f"a request digest is {DIGEST_BYTES} bytes, got {len(digest)}")
    millis = str(int((time.time() if now is None else now) * 1000))
    nonce = os.urandom(NONCE_BYTES)
    signature = private_key.sign(_signed_bytes(method, target, millis, nonce, digest), ec.ECDSA(hashes.SHA256()))
    return (
        (CERTIFICATE_KEY, certificate_der), (TARGET_KEY, target), (TIME_KEY, millis), (NONCE_KEY, nonce), (PROOF_KEY, signature),
    )


class _SeenNonces:
    """(certificate digest, nonce) pairs seen within the proof window, forgotten once too old to
    replay, at most `capacity` of them."""

    def __init__(self, capacity: int = REPLAY_CACHE_SIZE) -> None:
        """Start empty."""
        self._capacity = capacity
        self._by_key: OrderedDict[bytes, tuple[float, float]] = OrderedDict()  # key -> (expiry, proof time)
        # proofs signed at or before this time are refused: the entries that could tell their
        # replays apart were evicted by the size bound (-inf until that ever happens)
        self.remembers_after = -math.inf

    def add_new(self, key: bytes, now: float, proof_time: float) -> bool:
        """Record `key`; False when it was already recorded (a replay) or may have been (evicted)."""
        while self._by_key:
            oldest, (expiry, _) = next(iter(self._by_key.items()))
            if expiry > now:
                break
            del self._by_key[oldest]
        if key in self._by_key or proof_time <= self.remembers_after:
            return False
        # a proof is acceptable until PROOF_WINDOW_S after its time, so remember it twice that long
        self._by_key[key] = (now + 2 * PROOF_WINDOW_S, proof_time)
        if len(self._by_key) > self._capacity:
            _, (_, evicted_time) = self._by_key.popitem(last=False)
            self.remembers_after = max(self.remembers_after, evicted_time)
        return True

    def __len__(self) -> int:
        """How many pairs are remembered now."""
        return len(self._by_key)


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
    """Verifies the certificate proof of a call to this server (`identity`) against the federation CA."""

    def __init__(self, ca_certificate: x509.Certificate, identity: str, clock: Callable[[], float] = time.time,
                 replay_cache_size: int = REPLAY_CACHE_SIZE) -> None:
        """Trust certificates issued directly by `ca_certificate` for calls to the server whose
        identity URI is `identity`; `clock` gives Unix seconds."""
        self._ca = ca_certificate
        self.identity = identity
        self._clock = clock
        self._lock = threading.Lock()
        self._certificates: OrderedDict[bytes, x509.Certificate] = OrderedDict()
        self._nonces = _SeenNonces(replay_cache_size)

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
            raise CallRefused(refused, f"the client certificate cannot be parsed: {str(error)[:200]}") from None
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

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None, method: str, digest: bytes) -> x509.Certificate:
        """The verified certificate of a call of `method` with `metadata` whose request (a stream's
        first message) has digest `digest`; CallRefused (UNAUTHENTICATED) otherwise."""
        refused = grpc.StatusCode.UNAUTHENTICATED
        der = _metadata_value(metadata, CERTIFICATE_KEY)
        if not der:
            raise CallRefused(refused, "a client certificate from the federation CA is required")
        target, millis, nonce, signature = (_metadata_value(metadata, key) for key in (TARGET_KEY, TIME_KEY, NONCE_KEY, PROOF_KEY))
        if not isinstance(der, bytes) or not isinstance(nonce, bytes) or not isinstance(signature, bytes) \
                or not isinstance(millis, str) or not isinstance(target, str):
            raise CallRefused(refused, "the call carries a client certificate without a complete proof")
        certificate = self._issued_certificate(der)
        now = self._clock()
        if not certificate.not_valid_before_utc.timestamp() <= now <= certificate.not_valid_after_utc.timestamp():
            raise CallRefused(refused, f"the client certificate is not valid now (valid {certificate.not_valid_before_utc:%Y-%m-%d %H:%M} "
                                       f"to {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)")
        if target != self.identity:
            raise CallRefused(refused, f"the call's proof is meant for {shown(target)}, not for this server "
                                       f"({self.identity})")
        if not millis.isdigit() or len(millis) > 16 or abs(int(millis) / 1000 - now) > PROOF_WINDOW_S:
            raise CallRefused(refused, f"the call's proof time is not within {PROOF_WINDOW_S:.0f} s of the server's clock")
        if len(nonce) != NONCE_BYTES:
            raise CallRefused(refused, f"the call's proof nonce must be {NONCE_BYTES} bytes")
        public_key = certificate.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)  # checked in _issued_certificate
        try:
            public_key.verify(signature, _signed_bytes(method, target, millis, nonce, digest), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise CallRefused(refused, "the call's proof does not verify with the client certificate's key "
                                       "(another method or request, or a key that is not the certificate's)") from None
        with self._lock:
            proof_time = int(millis) / 1000
            if proof_time <= self._nonces.remembers_after:
                raise CallRefused(refused, "the call's proof is older than this server's replay cache still covers "
                                           "(it is full: sign a fresh proof)")
            fresh = self._nonces.add_new(hashlib.sha256(der).digest() + nonce, now, proof_time)
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
