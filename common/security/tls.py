"""Mutual authentication for the federation: a CA, per-party certificates, gRPC credentials, peer checks.

Every party holds a certificate issued by one federation CA. The party's identity travels in a
URI subject alternative name (`cdimf://domain/<name>`, `cdimf://aggregator/<name>`,
`cdimf://operator/<name>`) and, for readability, in the subject common name. Channels are TLS
with the server's certificate checked against the federation CA; the client's certificate is
checked on every call by common/call_auth.py (a signed proof in the call's metadata, verified by
a server interceptor before any handler runs), so that a client without a certificate from the
federation CA, or with an expired one, gets UNAUTHENTICATED. A handler then calls
`require_domain(context, claimed_domain)` so that a domain can only speak for itself
(PERMISSION_DENIED otherwise).

Plaintext is never a default: `require_domain(..., insecure=True)` is the explicit opt-out and
is the only way a request without a certificate is let through.
"""

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cdimf.common.config import TLSConfig
from cdimf.common.security.call_proof import CallAuthenticator, CertificateProofInterceptor, proof_call_credentials, verified_certificate

URI_SCHEME = "cdimf"
PartyKind = Literal["domain", "aggregator", "operator"]
PARTY_KINDS: tuple[PartyKind, ...] = ("domain", "aggregator", "operator")

# Names end up in file names, URIs and proto headers, so keep them to a portable alphabet.
PARTY_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
# File names `cdimf certs` writes beside the domain files; a domain with one of these names
# would overwrite them.
RESERVED_DOMAIN_NAMES = frozenset({"ca", "aggregator", "operator"})
# Always in a server certificate so that a process can probe its own port (health checks).
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
# Issued certificates start a little in the past to tolerate clock skew between hosts.
CLOCK_SKEW = datetime.timedelta(minutes=5)


class TLSMaterialError(ValueError):
    """A certificate or key file is missing, malformed or does not fit the other files."""


class CertificateIdentityError(ValueError):
    """A certificate does not carry exactly one well-formed cdimf party identity."""


@dataclass(frozen=True)
class PartyIdentity:
    """Who a certificate speaks for: a kind (domain, aggregator, operator) and a name."""

    kind: PartyKind
    name: str

    def uri(self) -> str:
        """The URI SAN that carries this identity, e.g. `cdimf://domain/sport`."""
        return f"{URI_SCHEME}://{self.kind}/{self.name}"


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate together with its private key."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    def certificate_pem(self) -> bytes:
        """The certificate in PEM form."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def private_key_pem(self) -> bytes:
        """The private key in unencrypted PKCS#8 PEM form."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, certificate_path: Path, key_path: Path) -> None:
        """Write the certificate (mode 0644) and the private key (mode 0600) as PEM files."""
        write_private_file(key_path, self.private_key_pem())
        write_public_file(certificate_path, self.certificate_pem())


def validate_party_name(name: str, what: str = "party name") -> str:
    """Return `name` if it is a valid party name, else raise ValueError naming `what`."""
    if not PARTY_NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"{what} {name!r} is invalid: use 1-63 characters of a-z, 0-9, '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def validate_domain_name(name: str) -> str:
    """Return `name` if it can name a domain (valid party name, not a reserved file name)."""
    validate_party_name(name, "domain name")
    if name in RESERVED_DOMAIN_NAMES:
        raise ValueError(f"domain name {name!r} is reserved (one of {sorted(RESERVED_DOMAIN_NAMES)})")
    return name


def _validity(days: float, not_before: datetime.datetime | None) -> tuple[datetime.datetime, datetime.datetime]:
    """The (not_before, not_after) window of a certificate valid `days` from `not_before`."""
    if days <= 0:
        raise ValueError(f"validity must be positive, got {days} days")
    start = not_before if not_before is not None else datetime.datetime.now(datetime.UTC) - CLOCK_SKEW
    if start.tzinfo is None:
        raise ValueError("not_before must be timezone-aware")
    return start, start + datetime.timedelta(days=days)


def _new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 key: fast to make and accepted by every gRPC TLS stack."""
    return ec.generate_private_key(ec.SECP256R1())


def _key_usage(signs_certificates: bool) -> x509.KeyUsage:
    """Key usage of an ECDSA key: signatures, plus certificate and CRL signing for the CA."""
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=signs_certificates,
        crl_sign=signs_certificates, encipher_only=False, decipher_only=False,
    )


def create_ca(
    common_name: str = "cdimf federation CA", *, days: float = 3650, not_before: datetime.datetime | None = None
) -> IssuedCertificate:
    """Create a self-signed federation CA that may sign party certificates only."""
    start, end = _validity(days, not_before)
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        # path_length=0: the CA signs leaves directly, never a sub-CA
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return IssuedCertificate(certificate, key)


def _host_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """DNS or IP SAN entries for `hosts` plus the loopback names, without duplicates."""
    entries: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in [*hosts, *LOOPBACK_HOSTS]:
        host = host.strip()
        if not host:
            raise ValueError("empty host name in the certificate's host list")
        if host in seen:
            continue
        seen.add(host)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", host):
                raise ValueError(f"host {host!r} is neither an IP address nor a DNS name") from None
            entries.append(x509.DNSName(host))
    return entries


def issue_party_certificate(
    ca: IssuedCertificate,
    identity: PartyIdentity,
    *,
    hosts: Sequence[str] = (),
    server: bool = False,
    client: bool = True,
    days: float = 365,
    not_before: datetime.datetime | None = None,
) -> IssuedCertificate:
    """Issue a certificate for `identity` signed by `ca`.

    `server` adds the serverAuth usage and host SANs (`hosts` plus loopback names); `client`
    adds clientAuth. A validity window in the past (`not_before`, `days`) gives an expired
    certificate, which tests use to check that the server refuses it.
    """
    validate_party_name(identity.name)
    if identity.kind not in PARTY_KINDS:
        raise ValueError(f"unknown party kind {identity.kind!r}")
    if not (server or client):
        raise ValueError("a certificate must allow server or client authentication")
    start, end = _validity(days, not_before)
    key = _new_key()
    alt_names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri())]
    if server:
        alt_names += _host_names(hosts)
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    )
    ca_key_id = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"cdimf {identity.kind}"),
            x509.NameAttribute(NameOID.COMMON_NAME, identity.name),
        ]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_id), critical=False)
        .sign(ca.private_key, hashes.SHA256())
    )
    return IssuedCertificate(certificate, key)


def issue_aggregator_certificate(
    ca: IssuedCertificate,
    hosts: Sequence[str],
    *,
    name: str = "aggregator",
    days: float = 365,
    not_before: datetime.datetime | None = None,
) -> IssuedCertificate:
    """Server certificate of the aggregator for `hosts` (DNS names or IPs; loopback added).

    It also allows client authentication so that the aggregator host can probe its own
    health endpoint with it.
    """
    return issue_party_certificate(
        ca, PartyIdentity("aggregator", name), hosts=hosts, server=True, client=True,
        days=days, not_before=not_before,
    )


def issue_domain_certificate(
    ca: IssuedCertificate,
    domain: str,
    *,
    hosts: Sequence[str] = (),
    days: float = 365,
    not_before: datetime.datetime | None = None,
) -> IssuedCertificate:
    """Certificate of one domain's node: CN and URI SAN `cdimf://domain/<domain>` name it.

    It authenticates the node as a client of the aggregator and serves the node's own gRPC
    server, reachable under `hosts` (DNS names or IPs; loopback added).
    """
    validate_domain_name(domain)
    return issue_party_certificate(
        ca, PartyIdentity("domain", domain), hosts=hosts, server=True, client=True,
        days=days, not_before=not_before,
    )


def issue_operator_certificate(
    ca: IssuedCertificate, name: str = "operator", *, days: float = 365, not_before: datetime.datetime | None = None
) -> IssuedCertificate:
    """Client-only certificate for the person or job that starts, follows and stops runs."""
    return issue_party_certificate(
        ca, PartyIdentity("operator", name), server=False, client=True, days=days, not_before=not_before,
    )


def party_identity(certificate: x509.Certificate) -> PartyIdentity:
    """The cdimf identity a certificate carries in its URI SAN (which must agree with its CN)."""
    try:
        alt_names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CertificateIdentityError("certificate has no subject alternative name") from None
    prefix = f"{URI_SCHEME}://"
    uris = [uri for uri in alt_names.get_values_for_type(x509.UniformResourceIdentifier) if uri.startswith(prefix)]
    if len(uris) != 1:
        raise CertificateIdentityError(f"certificate carries {len(uris)} {prefix} URIs, expected exactly 1")
    kind, _, name = uris[0][len(prefix):].partition("/")
    if kind not in PARTY_KINDS or not PARTY_NAME_PATTERN.fullmatch(name):
        raise CertificateIdentityError(f"certificate URI {uris[0]!r} is not a cdimf party identity")
    common_names = [str(attr.value) for attr in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if common_names != [name]:
        raise CertificateIdentityError(f"certificate common name {common_names} disagrees with its URI {uris[0]!r}")
    return PartyIdentity(kind, name)  # type: ignore[arg-type]  # kind checked against PARTY_KINDS above


def write_private_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically with mode 0600 (never readable by others, even briefly)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        # O_CREAT's mode is filtered by the umask and ignored for an existing file
        os.fchmod(descriptor, 0o600)
        os.write(descriptor, data)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, path)


def write_public_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically with mode 0644."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    temporary.chmod(0o644)
    os.replace(temporary, path)


def _read(path: Path | str, what: str) -> bytes:
    """Read a TLS file, turning a missing or unreadable file into TLSMaterialError."""
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise TLSMaterialError(f"cannot read {what} {path}: {error.strerror}") from None


def load_certificate(path: Path | str) -> x509.Certificate:
    """Load one PEM certificate from `path`, with an error that names the file."""
    data = _read(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as error:
        raise TLSMaterialError(f"{path} is not a PEM certificate: {error}") from None


def load_private_key(path: Path | str) -> ec.EllipticCurvePrivateKey:
    """Load an unencrypted PEM private key from `path`, with an error that names the file."""
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise TLSMaterialError(f"{path} is not an unencrypted PEM private key: {error}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TLSMaterialError(f"{path} holds a {type(key).__name__}, expected an elliptic-curve key")
    return key


def load_issued(certificate_path: Path | str, key_path: Path | str) -> IssuedCertificate:
    """Load a certificate and its key, checking that the key belongs to the certificate."""
    certificate = load_certificate(certificate_path)
    key = load_private_key(key_path)
    public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if certificate.public_key().public_bytes(*public) != key.public_key().public_bytes(*public):
        raise TLSMaterialError(f"private key {key_path} does not belong to certificate {certificate_path}")
    return IssuedCertificate(certificate, key)


def _checked_pair(
    certificate_path: Path | str, key_path: Path | str, ca_path: Path | str
) -> tuple[IssuedCertificate, bytes]:
    """This party's certificate and key, and the CA's PEM, after checking that they fit together."""
    issued = load_issued(certificate_path, key_path)
    ca = load_certificate(ca_path)
    try:
        issued.certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as error:
        raise TLSMaterialError(f"certificate {certificate_path} is not issued by the CA in {ca_path}: {error}") from None
    return issued, ca.public_bytes(serialization.Encoding.PEM)


def server_credentials(
    certificate_path: Path | str, key_path: Path | str, ca_path: Path | str
) -> grpc.ServerCredentials:
    """TLS server credentials presenting this party's certificate (checked against the CA in
    `ca_path`). Clients prove their certificates per call (`server_interceptors`), not here."""
    issued, _ = _checked_pair(certificate_path, key_path, ca_path)
    return grpc.ssl_server_credentials([(issued.private_key_pem(), issued.certificate_pem())], require_client_auth=False)


def call_authenticator(ca_path: Path | str) -> CallAuthenticator:
    """The per-call certificate check trusting the federation CA in `ca_path`."""
    return CallAuthenticator(load_certificate(ca_path))


def channel_credentials(
    ca_path: Path | str, certificate_path: Path | str | None = None, key_path: Path | str | None = None
) -> grpc.ChannelCredentials:
    """Channel credentials that trust only the federation CA and prove this party's
    certificate on every call (omit certificate and key only to test a client without one)."""
    if (certificate_path is None) != (key_path is None):
        raise TLSMaterialError("give both a client certificate and its key, or neither")
    if certificate_path is None or key_path is None:
        return grpc.ssl_channel_credentials(root_certificates=_read(ca_path, "CA certificate"))
    issued, ca_pem = _checked_pair(certificate_path, key_path, ca_path)
    return grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(root_certificates=ca_pem),
        proof_call_credentials(issued.certificate, issued.private_key),
    )


def peer_identity(context: grpc.aio.ServicerContext) -> PartyIdentity | None:
    """The identity in the client certificate this call proved, or None without a proved one.

    Only certificates the server's CertificateProofInterceptor verified for this very call count
    (CA signature, validity, proof of the key); parsing the URI SAN here checks nothing more.
    Raises CertificateIdentityError for a certificate without a well-formed cdimf identity.
    """
    certificate = verified_certificate(context.invocation_metadata())
    return None if certificate is None else party_identity(certificate)


Refusal = tuple[grpc.StatusCode, str]


def _verified_identity(context: grpc.aio.ServicerContext) -> PartyIdentity | Refusal:
    """The caller's certificate identity, or the refusal for a call without a usable one."""
    try:
        identity = peer_identity(context)
    except CertificateIdentityError as error:
        return grpc.StatusCode.PERMISSION_DENIED, f"client certificate has no usable identity: {error}"
    if identity is None:
        return grpc.StatusCode.UNAUTHENTICATED, "a client certificate from the federation CA is required"
    return identity


def domain_check(
    context: grpc.aio.ServicerContext, claimed_domain: str, *, insecure: bool = False
) -> Refusal | None:
    """None when the caller may speak for `claimed_domain`, else the (status, detail) to abort with."""
    if insecure:
        return None
    identity = _verified_identity(context)
    if not isinstance(identity, PartyIdentity):
        return identity
    if identity.kind != "domain":
        return grpc.StatusCode.PERMISSION_DENIED, f"certificate of {identity.uri()} cannot speak for a domain"
    if identity.name != claimed_domain:
        return (
            grpc.StatusCode.PERMISSION_DENIED,
            f"certificate of domain {identity.name!r} cannot speak for domain {claimed_domain!r}",
        )
    return None


def operator_check(context: grpc.aio.ServicerContext, *, insecure: bool = False) -> Refusal | None:
    """None when the caller may use the control API (an operator or aggregator certificate),
    else the (status, detail) to abort with."""
    if insecure:
        return None
    identity = _verified_identity(context)
    if not isinstance(identity, PartyIdentity):
        return identity
    if identity.kind == "domain":
        return grpc.StatusCode.PERMISSION_DENIED, f"certificate of {identity.uri()} cannot control runs"
    return None


async def require_domain(context: grpc.aio.ServicerContext, claimed_domain: str, *, insecure: bool = False) -> str:
    """Abort the call unless its client certificate belongs to `claimed_domain`; return the domain.

    UNAUTHENTICATED without a client certificate, PERMISSION_DENIED for a certificate of another
    domain or party. `insecure=True` (plaintext deployments only) skips the check.
    """
    refusal = domain_check(context, claimed_domain, insecure=insecure)
    if refusal is not None:
        await context.abort(*refusal)
    return claimed_domain


async def require_operator(context: grpc.aio.ServicerContext, *, insecure: bool = False) -> None:
    """Abort the call unless the caller holds an operator (or aggregator) certificate.

    For the control API (start, status, follow, stop); `insecure=True` skips the check.
    """
    refusal = operator_check(context, insecure=insecure)
    if refusal is not None:
        await context.abort(*refusal)


def _tls_files(settings: TLSConfig) -> tuple[Path, Path, Path]:
    """(CA, certificate, key) paths of a TLS config that is not insecure."""
    if settings.ca_file is None or settings.cert_file is None or settings.key_file is None:
        raise TLSMaterialError("mutual TLS needs ca_file, cert_file and key_file (or insecure = true)")
    return settings.ca_file, settings.cert_file, settings.key_file


def server_interceptors(settings: TLSConfig) -> list[grpc.aio.ServerInterceptor]:
    """Interceptors a server built for `settings` must have: the per-call certificate check
    (none when `settings.insecure`). Pass them to grpc.aio.server(interceptors=...)."""
    if settings.insecure:
        return []
    ca_file, _, _ = _tls_files(settings)
    return [CertificateProofInterceptor(call_authenticator(ca_file))]


def bind_port(server: grpc.aio.Server, address: str, settings: TLSConfig) -> int:
    """Bind `address` on `server` with TLS from `settings` (the server also needs
    `server_interceptors(settings)`), or plaintext when `settings.insecure`; return the bound port."""
    if settings.insecure:
        port = server.add_insecure_port(address)
    else:
        ca_file, cert_file, key_file = _tls_files(settings)
        port = server.add_secure_port(address, server_credentials(cert_file, key_file, ca_file))
    if port == 0:
        raise OSError(f"cannot bind {address}")
    return port


def open_channel(
    target: str, settings: TLSConfig, options: Sequence[tuple[str, str | int]] = ()
) -> grpc.aio.Channel:
    """A grpc.aio channel to `target` presenting this party's certificate from `settings`, or a
    plaintext one when `settings.insecure`."""
    if settings.insecure:
        return grpc.aio.insecure_channel(target, options=list(options))
    credentials = channel_credentials(*_tls_files(settings))
    return grpc.aio.secure_channel(target, credentials, options=list(options))
