"""The one authorisation policy of cdimf's servers: who may call what, from each call's verified client certificate.

The per-call certificate proof (cdimf.common.security.call_proof) is checked by the server's
interceptor before any handler runs: a call without a valid proof never gets here
(UNAUTHENTICATED). A handler then asks this policy whether the proved identity may do what the
call asks, and a refused call gets PERMISSION_DENIED:

- the aggregator's node API: a domain speaks only for itself;
- the aggregator's control API (start, status, follow, stop): an operator or aggregator
  certificate, never a domain's;
- a domain node's own server: an operator or aggregator certificate, or the domain's own;
  recommendations derive from the domain's private interactions, so no other domain may ask.

Plaintext servers (`insecure`, tests and loopback demos only) allow every call and never read
the call's context.
"""

from collections.abc import Callable

import grpc

from cdimf.common.security.call_proof import verified_certificate
from cdimf.common.security.names import shown
from cdimf.common.security.pki import CertificateIdentityError, PartyIdentity, party_identity

Refusal = tuple[grpc.StatusCode, str]
# Given the caller's identity: None when allowed, else why not (the PERMISSION_DENIED detail).
Rule = Callable[[PartyIdentity], str | None]


def peer_identity(context: grpc.aio.ServicerContext) -> PartyIdentity | None:
    """The identity in the client certificate this call proved, or None without a proved one.

    Only certificates the server's CertificateProofInterceptor verified for this very call count
    (CA signature, validity, proof of the key); parsing the URI SAN here checks nothing more.
    Raises CertificateIdentityError for a certificate without a well-formed cdimf identity.
    """
    certificate = verified_certificate(context.invocation_metadata())
    return None if certificate is None else party_identity(certificate)


def _refusal(context: grpc.aio.ServicerContext, rule: Rule) -> Refusal | None:
    """None when the caller's proved identity passes `rule`, else the (status, detail) to abort with."""
    try:
        identity = peer_identity(context)
    except CertificateIdentityError as error:
        return grpc.StatusCode.PERMISSION_DENIED, f"client certificate has no usable identity: {error}"
    if identity is None:
        return grpc.StatusCode.UNAUTHENTICATED, "a client certificate from the federation CA is required"
    denied = rule(identity)
    return None if denied is None else (grpc.StatusCode.PERMISSION_DENIED, denied)


def speaks_for(domain: str) -> Rule:
    """The rule of a call made on behalf of `domain`: only that domain's certificate."""

    def rule(identity: PartyIdentity) -> str | None:
        if identity.kind != "domain":
            return f"certificate of {identity.uri()} cannot speak for a domain"
        if identity.name != domain:
            return f"certificate of domain {identity.name!r} cannot speak for domain {shown(domain)}"
        return None

    return rule


def controls_runs(identity: PartyIdentity) -> str | None:
    """The rule of the aggregator's control API: an operator or aggregator certificate."""
    if identity.kind == "domain":
        return f"certificate of {identity.uri()} cannot control runs"
    return None


def reads_node(domain: str) -> Rule:
    """The rule of a domain node's own server: operator, aggregator or the node's own domain."""

    def rule(identity: PartyIdentity) -> str | None:
        if identity.kind == "domain" and identity.name != domain:
            return f"domain {identity.name!r} may not query domain {shown(domain)}"
        return None

    return rule


class Authorizer:
    """Applies the policy in a handler: aborts a refused call with its status and detail."""

    def __init__(self, insecure: bool) -> None:
        """`insecure`: a plaintext server, where every call is allowed."""
        self.insecure = insecure

    async def require(self, context: grpc.aio.ServicerContext, rule: Rule) -> None:
        """Abort the call unless its proved identity passes `rule` (always passes when insecure)."""
        if self.insecure:
            return
        refused = _refusal(context, rule)
        if refused is not None:
            await context.abort(*refused)

    async def require_domain(self, context: grpc.aio.ServicerContext, domain: str) -> str:
        """Abort unless the caller may speak for `domain`; return the domain."""
        await self.require(context, speaks_for(domain))
        return domain

    async def require_operator(self, context: grpc.aio.ServicerContext) -> None:
        """Abort unless the caller may start, stop and watch runs."""
        await self.require(context, controls_runs)

    async def require_node_reader(self, context: grpc.aio.ServicerContext, domain: str) -> None:
        """Abort unless the caller may query the node of `domain`."""
        await self.require(context, reads_node(domain))
