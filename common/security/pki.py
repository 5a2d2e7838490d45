"""The federation's PKI: a CA, per-party certificates carrying the party's identity, and loading them.

Every party holds a certificate issued by one federation CA. The party's identity travels in a
URI subject alternative name (`cdimf://domain/<name>`, `cdimf://aggregator/<name>`,
`cdimf://operator/<name>`) and, for readability, in the subject common name. How channels and
servers use these files is cdimf.common.rpc.channels' business; who may call what, given a
verified identity, is cdimf.common.rpc.auth's.
"""

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cdimf.common.security.names import is_party_name, validate_domain_name, validate_party_name

URI_SCHEME = "cdimf"
PartyKind = Literal["domain", "aggregator", "operator"]
PARTY_KINDS: tuple[PartyKind, ...] = ("domain", "aggregator", "operator")

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
    if kind not in PARTY_KINDS or not is_party_name(name):
        raise CertificateIdentityError(f"certificate URI {uris[0]!r} is not a cdimf party identity")
    common_names = [str(attr.value) for attr in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if common_names != [name]:
        raise CertificateIdentityError(f"certificate common name {common_names} disagrees with its URI {uris[0]!r}")
    return PartyIdentity(kind, name)


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


def checked_pair(
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


def read_ca_pem(ca_path: Path | str) -> bytes:
    """The federation CA's certificate file as it is (PEM), with an error that names the file."""
    return _read(ca_path, "CA certificate")
