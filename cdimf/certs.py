"""`cdimf certs`: create a federation CA and the certificates of the aggregator, each domain and an operator."""

import argparse
import datetime
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature

from cdimf.arg_types import positive_int
from cdimf.common.security import names, pki
from cdimf.common.security.pseudonyms import load_secret

DEFAULT_DAYS = 365
CA_DAYS_FACTOR = 10  # the CA outlives the party certificates so that they can be renewed under it
SECRET_FILE = "federation.secret"
SECRET_BYTES = 32


@dataclass(frozen=True)
class PlannedFile:
    """One certificate/key pair `cdimf certs` writes, and which party installs it."""

    stem: str
    identity: pki.PartyIdentity | None  # None for the CA

    def paths(self, folder: Path) -> tuple[Path, Path]:
        """(certificate, key) paths of this pair in `folder`."""
        return folder / f"{self.stem}.pem", folder / f"{self.stem}.key"


def _domain_list(text: str) -> list[str]:
    """Parse `--domains sport,cloth` into validated, distinct domain names."""
    domains = [part.strip() for part in text.split(",") if part.strip()]
    if not domains:
        raise argparse.ArgumentTypeError("--domains needs at least one domain name")
    for domain in domains:
        try:
            names.validate_domain_name(domain)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    if len(set(domains)) != len(domains):
        raise argparse.ArgumentTypeError(f"--domains names a domain twice: {text}")
    return domains


def _domain_host(text: str) -> tuple[str, str]:
    """Parse `--domain-host sport=node-sport.example.org` into (domain, host)."""
    domain, separator, host = text.partition("=")
    if not separator or not domain or not host:
        raise argparse.ArgumentTypeError(f"--domain-host expects DOMAIN=HOST, got {text!r}")
    return domain.strip(), host.strip()




def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `cdimf certs` options to `parser`."""
    parser.add_argument("--out", type=Path, required=True, help="folder to write the PEM files into")
    parser.add_argument("--domains", type=_domain_list, required=True, help="comma-separated domain names, e.g. sport,cloth")
    parser.add_argument(
        "--aggregator-host", action="append", default=[], metavar="NAME",
        help="DNS name or IP under which nodes reach the aggregator (repeatable; localhost/127.0.0.1 always added)",
    )
    parser.add_argument(
        "--domain-host", action="append", default=[], type=_domain_host, metavar="DOMAIN=HOST",
        help="DNS name or IP of a domain node's own gRPC server (repeatable)",
    )
    parser.add_argument("--operator", default="operator", help="name in the operator (control API) certificate")
    parser.add_argument("--days", type=positive_int, default=DEFAULT_DAYS, help="validity of party certificates in days")
    parser.add_argument(
        "--federation-secret", action="store_true",
        help=f"also write {SECRET_FILE} (random, 0600): the pseudonym key shared by the domains, never the aggregator",
    )
    parser.add_argument(
        "--if-missing", action="store_true",
        help="write only the missing files: reuse the CA in --out if present, keep valid existing certificates "
        "(to add a domain, renew a moved-away certificate, or rerun a one-shot container job)",
    )
    return parser


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    """Register the `certs` subcommand; its handler is `run`, stored as the `handler` default."""
    parser = subparsers.add_parser(
        "certs", help="create a federation CA and per-party TLS certificates",
        description=__doc__,
    )
    configure_parser(parser)
    parser.set_defaults(handler=run)
    return parser


def _plan(args: argparse.Namespace) -> list[PlannedFile]:
    """Every pair to write, CA first; raises ValueError for inconsistent names."""
    names.validate_party_name(args.operator, "--operator")
    unknown = sorted({domain for domain, _ in args.domain_host} - set(args.domains))
    if unknown:
        raise ValueError(f"--domain-host names domains not in --domains: {', '.join(unknown)}")
    return [
        PlannedFile("ca", None),
        PlannedFile("aggregator", pki.PartyIdentity("aggregator", "aggregator")),
        *(PlannedFile(domain, pki.PartyIdentity("domain", domain)) for domain in args.domains),
        PlannedFile("operator", pki.PartyIdentity("operator", args.operator)),
    ]


def _present(folder: Path, planned: PlannedFile) -> bool:
    """Whether the pair exists in `folder`; a certificate without its key (or the reverse) is an error."""
    certificate_path, key_path = planned.paths(folder)
    if certificate_path.exists() != key_path.exists():
        only, lacking = (certificate_path, key_path) if certificate_path.exists() else (key_path, certificate_path)
        raise ValueError(f"{only} exists without {lacking.name}")
    return certificate_path.exists()


def _check_kept(folder: Path, planned: PlannedFile, ca: pki.IssuedCertificate) -> None:
    """Check that an existing pair is unexpired, issued by `ca` and for the planned identity."""
    certificate_path, key_path = planned.paths(folder)
    issued = pki.load_issued(certificate_path, key_path)
    expiry = issued.certificate.not_valid_after_utc
    if expiry <= datetime.datetime.now(datetime.UTC):
        raise ValueError(f"{certificate_path} expired on {expiry:%Y-%m-%d}: move the pair away to re-issue it")
    if planned.identity is None:
        return
    try:
        issued.certificate.verify_directly_issued_by(ca.certificate)
    except (ValueError, TypeError, InvalidSignature):
        raise ValueError(f"{certificate_path} is not issued by the CA in {folder / 'ca.pem'}") from None
    found = pki.party_identity(issued.certificate)
    if found != planned.identity:
        raise ValueError(f"{certificate_path} is for {found.uri()}, expected {planned.identity.uri()}")


def _issue(args: argparse.Namespace, ca: pki.IssuedCertificate, planned: PlannedFile) -> pki.IssuedCertificate:
    """Issue the certificate of one planned party under `ca`."""
    identity = planned.identity
    if identity is None:
        raise ValueError("the CA is created, not issued")
    if identity.kind == "aggregator":
        return pki.issue_aggregator_certificate(ca, args.aggregator_host, days=args.days)
    if identity.kind == "domain":
        hosts = [host for domain, host in args.domain_host if domain == identity.name]
        return pki.issue_domain_certificate(ca, identity.name, hosts=hosts, days=args.days)
    return pki.issue_operator_certificate(ca, identity.name, days=args.days)


def _prepare(args: argparse.Namespace) -> tuple[list[tuple[PlannedFile, pki.IssuedCertificate]], list[str], bool]:
    """Everything to write (in memory), the names of the files kept, and whether to write the secret.

    Raises ValueError or TLSMaterialError, before anything is written, when the request conflicts
    with what `args.out` already holds.
    """
    folder: Path = args.out
    plan = _plan(args)
    present = {planned.stem: _present(folder, planned) for planned in plan}
    secret_path = folder / SECRET_FILE
    secret_present = args.federation_secret and secret_path.exists()
    existing = [planned.stem for planned in plan if present[planned.stem]] + ([SECRET_FILE] if secret_present else [])
    if existing and not args.if_missing:
        # never overwrite a CA: parties already trusting it would be locked out
        raise ValueError(f"refusing to overwrite existing files in {folder}: {', '.join(existing)} (see --if-missing)")
    ca_plan, party_plans = plan[0], plan[1:]
    if present[ca_plan.stem]:
        ca = pki.load_issued(*ca_plan.paths(folder))
        _check_kept(folder, ca_plan, ca)
        writes: list[tuple[PlannedFile, pki.IssuedCertificate]] = []
    else:
        orphans = [planned.stem for planned in party_plans if present[planned.stem]]
        if orphans:
            raise ValueError(f"{', '.join(orphans)} exist in {folder} without the CA (ca.pem, ca.key) that issued them")
        ca = pki.create_ca(days=args.days * CA_DAYS_FACTOR)
        writes = [(ca_plan, ca)]
    for planned in party_plans:
        if present[planned.stem]:
            _check_kept(folder, planned, ca)
        else:
            writes.append((planned, _issue(args, ca, planned)))
    if secret_present:
        load_secret(secret_file=secret_path)
    return writes, existing, args.federation_secret and not secret_present


def run(args: argparse.Namespace) -> int:
    """Write the CA and party certificates into `args.out`; 0 on success, 2 on bad input."""
    folder: Path = args.out
    try:
        writes, kept, write_secret = _prepare(args)
    except (ValueError, pki.TLSMaterialError) as error:
        print(f"cdimf certs: error: {error}", file=sys.stderr)
        return 2
    folder.mkdir(parents=True, exist_ok=True)
    for planned, certificate in writes:
        certificate.write(*planned.paths(folder))
        print(f"cdimf certs: wrote {planned.stem}.pem, {planned.stem}.key  -> {_destination(planned)}")
    if write_secret:
        # hex keeps the file printable and free of the newline bytes load_secret strips
        pki.write_private_file(folder / SECRET_FILE, secrets.token_hex(SECRET_BYTES).encode() + b"\n")
        print(f"cdimf certs: wrote {SECRET_FILE}  -> every domain node host, never the aggregator")
    if kept:
        print(f"cdimf certs: kept {', '.join(kept)} in {folder}")
    return 0


def _destination(planned: PlannedFile) -> str:
    """Where an operator installs a pair (printed after writing it)."""
    if planned.identity is None:
        return "ca.pem to every host (trust anchor); keep ca.key offline, it signs new parties"
    if planned.identity.kind == "domain":
        return f"the node host of domain {planned.identity.name!r}"
    if planned.identity.kind == "aggregator":
        return "the aggregator host"
    return "whoever starts and follows runs (cdimf train)"


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m cdimf.certs`."""
    parser = configure_parser(argparse.ArgumentParser(prog="cdimf certs", description=__doc__, allow_abbrev=False))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
