"""The per-call certificate proof as plain functions: what the interceptor accepts and refuses, and when."""

import datetime
import hashlib

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cdimf.common.security import call_proof as call_auth
from cdimf.common.security import pki

METHOD = "/cdimf.v1.Aggregator/PushContribution"
TARGET = "cdimf://aggregator/aggregator"
DIGEST = hashlib.sha256(b"the serialized first chunk").digest()


class Clock:
    """A settable Unix clock for CallAuthenticator."""

    def __init__(self, now: float) -> None:
        """Start at `now` seconds."""
        self.now = now

    def __call__(self) -> float:
        """The current time."""
        return self.now


def _der(issued: pki.IssuedCertificate) -> bytes:
    """The certificate in DER form, as the client sends it."""
    return issued.certificate.public_bytes(serialization.Encoding.DER)


def _refusal(authenticator: call_auth.CallAuthenticator, metadata: tuple[tuple[str, str | bytes], ...]) -> str:
    """The detail of the UNAUTHENTICATED refusal `metadata` gets (fails when accepted)."""
    with pytest.raises(call_auth.CallRefused) as refused:
        authenticator.authenticate(metadata, METHOD, DIGEST)
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    return refused.value.detail


def test_validity_is_checked_on_every_call_even_for_a_known_certificate() -> None:
    """A certificate accepted once (and cached) is refused once its window has closed."""
    ca = pki.create_ca()
    start = datetime.datetime.now(datetime.UTC)
    sport = pki.issue_domain_certificate(ca, "sport", not_before=start, days=1)
    clock = Clock(start.timestamp() + 60)
    authenticator = call_auth.CallAuthenticator(ca.certificate, TARGET, clock=clock)
    first = call_auth.proof_metadata(_der(sport), sport.private_key, METHOD, target=TARGET, digest=DIGEST, now=clock.now)
    proved = authenticator.authenticate(first, METHOD, DIGEST)
    assert pki.party_identity(proved) == pki.PartyIdentity("domain", "sport")
    clock.now = start.timestamp() + 2 * 86400
    late = call_auth.proof_metadata(_der(sport), sport.private_key, METHOD, target=TARGET, digest=DIGEST, now=clock.now)
    assert "not valid now" in _refusal(authenticator, late)


def test_proofs_are_single_use_and_bound_to_time_method_and_key() -> None:
    """Replays (also with the signature re-encoded), clock skew beyond the window, another
    method, another key, duplicated or missing fields are refused; handlers only see proved calls."""
    ca = pki.create_ca()
    sport = pki.issue_domain_certificate(ca, "sport")
    cloth = pki.issue_domain_certificate(ca, "cloth")
    clock = Clock(datetime.datetime.now(datetime.UTC).timestamp())
    authenticator = call_auth.CallAuthenticator(ca.certificate, TARGET, clock=clock)
    proof = call_auth.proof_metadata(_der(sport), sport.private_key, METHOD, target=TARGET, digest=DIGEST, now=clock.now)
    assert call_auth.verified_certificate(proof) is None  # not proved yet
    authenticator.authenticate(proof, METHOD, DIGEST)
    assert call_auth.verified_certificate(proof) == sport.certificate
    assert "already used" in _refusal(authenticator, proof)

    # the same (certificate, nonce) with another valid signature of the same bytes is still a replay
    fields = dict(proof)
    millis, nonce = fields[call_auth.TIME_KEY], fields[call_auth.NONCE_KEY]
    assert isinstance(millis, str) and isinstance(nonce, bytes)
    signature = sport.private_key.sign(call_auth._signed_bytes(METHOD, TARGET, millis, nonce, DIGEST), ec.ECDSA(hashes.SHA256()))
    resigned = tuple((key, signature if key == call_auth.PROOF_KEY else value) for key, value in proof)
    assert signature != fields[call_auth.PROOF_KEY]
    assert "already used" in _refusal(authenticator, resigned)

    window = call_auth.PROOF_WINDOW_S
    for skew in (-window - 5, window + 5):
        skewed = call_auth.proof_metadata(_der(sport), sport.private_key, METHOD, target=TARGET, digest=DIGEST, now=clock.now + skew)
        assert "proof time" in _refusal(authenticator, skewed)
    inside = call_auth.proof_metadata(_der(sport), sport.private_key, METHOD, target=TARGET, digest=DIGEST, now=clock.now + window - 5)
    authenticator.authenticate(inside, METHOD, DIGEST)

    other_method = call_auth.proof_metadata(_der(sport), sport.private_key, "/cdimf.v1.Aggregator/StartRun", target=TARGET, digest=DIGEST, now=clock.now)
    assert "does not verify" in _refusal(authenticator, other_method)
    borrowed = call_auth.proof_metadata(_der(sport), cloth.private_key, METHOD, target=TARGET, digest=DIGEST, now=clock.now)
    assert "does not verify" in _refusal(authenticator, borrowed)
    fresh = call_auth.proof_metadata(_der(sport), sport.private_key, METHOD, target=TARGET, digest=DIGEST, now=clock.now)
    assert "given 2 times" in _refusal(authenticator, fresh + fresh[:1])
    assert "without a complete proof" in _refusal(authenticator, fresh[:3])
    assert "is required" in _refusal(authenticator, ())
    assert "cannot be parsed" in _refusal(authenticator, ((call_auth.CERTIFICATE_KEY, b"not a certificate"), *fresh[1:]))
    # none of the refused attempts left a proved call behind
    assert call_auth.verified_certificate(borrowed) is None and call_auth.verified_certificate(other_method) is None


def test_a_server_only_certificate_cannot_authenticate_a_client() -> None:
    """A certificate whose extended key usage lacks clientAuth is refused."""
    ca = pki.create_ca()
    server_only = pki.issue_party_certificate(ca, pki.PartyIdentity("domain", "sport"), server=True, client=False)
    authenticator = call_auth.CallAuthenticator(ca.certificate, TARGET)
    metadata = call_auth.proof_metadata(_der(server_only), server_only.private_key, METHOD, target=TARGET, digest=DIGEST)
    assert "client authentication" in _refusal(authenticator, metadata)


def test_a_proof_serves_only_its_server_and_its_request() -> None:
    """A proof for one server is refused by another (named in the clear or only in the signature),
    and a proof for one request is refused with any other request, even on first use."""
    ca = pki.create_ca()
    sport = pki.issue_domain_certificate(ca, "sport")
    now = datetime.datetime.now(datetime.UTC).timestamp()
    cloth_node = call_auth.CallAuthenticator(ca.certificate, "cdimf://domain/cloth", clock=lambda: now)
    sport_node = call_auth.CallAuthenticator(ca.certificate, "cdimf://domain/sport", clock=lambda: now)
    request = b"\n\x08user-007\x10\n"  # any bytes: the digest is SHA-256 of what travelled
    digest = hashlib.sha256(request).digest()
    for_sport = call_auth.proof_metadata(_der(sport), sport.private_key, METHOD, target="cdimf://domain/sport", digest=digest, now=now)
    with pytest.raises(call_auth.CallRefused, match="meant for 'cdimf://domain/sport', not for this server"):
        cloth_node.authenticate(for_sport, METHOD, digest)
    relabelled = tuple((key, "cdimf://domain/cloth" if key == call_auth.TARGET_KEY else value) for key, value in for_sport)
    with pytest.raises(call_auth.CallRefused, match="does not verify"):
        cloth_node.authenticate(relabelled, METHOD, digest)
    with pytest.raises(call_auth.CallRefused, match="does not verify"):
        sport_node.authenticate(for_sport, METHOD, hashlib.sha256(request + b"\x18\x01").digest())
    # the genuine call still passes once: the refusals above left no nonce behind
    assert sport_node.authenticate(for_sport, METHOD, digest) == sport.certificate


def test_the_replay_cache_is_bounded_and_refuses_what_it_forgot() -> None:
    """Past its size bound the cache forgets its oldest entry and refuses every proof signed at or
    before that one's time, so a flood of proofs cannot reopen a replay."""
    ca = pki.create_ca()
    sport = pki.issue_domain_certificate(ca, "sport")
    clock = Clock(datetime.datetime.now(datetime.UTC).timestamp())
    authenticator = call_auth.CallAuthenticator(ca.certificate, TARGET, clock=clock, replay_cache_size=3)

    def proof_at(offset: float) -> tuple[tuple[str, str | bytes], ...]:
        return call_auth.proof_metadata(_der(sport), sport.private_key, METHOD, target=TARGET, digest=DIGEST, now=clock.now + offset)

    first, second, third, fourth = proof_at(-4), proof_at(-3), proof_at(-2), proof_at(-1)
    for proof in (first, second, third):
        authenticator.authenticate(proof, METHOD, DIGEST)
    assert len(authenticator._nonces) == 3
    authenticator.authenticate(fourth, METHOD, DIGEST)  # evicts `first`
    assert len(authenticator._nonces) == 3
    assert "replay cache" in _refusal(authenticator, first)  # forgotten, yet still refused
    assert "replay cache" in _refusal(authenticator, proof_at(-4))  # as old as the forgotten one: refused though fresh
    assert "already used" in _refusal(authenticator, second)  # still remembered
    authenticator.authenticate(proof_at(0), METHOD, DIGEST)  # newer than anything forgotten: accepted
    # entries older than twice the window are dropped by time, not by the bound
    clock.now += 2 * call_auth.PROOF_WINDOW_S + 1
    authenticator.authenticate(proof_at(0), METHOD, DIGEST)
    assert len(authenticator._nonces) == 1


def test_the_signature_covers_exactly_the_bytes_docs_security_md_names() -> None:
    """The proof's signature verifies over the layout written in docs/security.md, built here by hand."""
    ca = pki.create_ca()
    sport = pki.issue_domain_certificate(ca, "sport")
    request = b"\x0a\x03abc"
    proof = dict(call_auth.proof_metadata(_der(sport), sport.private_key, METHOD, target=TARGET, digest=hashlib.sha256(request).digest()))
    millis, nonce, signature = proof[call_auth.TIME_KEY], proof[call_auth.NONCE_KEY], proof[call_auth.PROOF_KEY]
    assert isinstance(millis, str) and isinstance(nonce, bytes) and isinstance(signature, bytes) and len(nonce) == 16
    assert proof[call_auth.TARGET_KEY] == TARGET and proof[call_auth.CERTIFICATE_KEY] == _der(sport)
    signed = (b"cdimf call proof v2\x00" + METHOD.encode() + b"\x00" + TARGET.encode() + b"\x00" + millis.encode() + b"\x00"
              + nonce + hashlib.sha256(request).digest())
    sport.certificate.public_key().verify(signature, signed, ec.ECDSA(hashes.SHA256()))  # type: ignore[union-attr,call-arg]
