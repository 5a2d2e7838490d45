"""`cdimf certs`: create a federation CA and the certificates of the aggregator, each domain and an operator."""

import argparse
import datetime
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature

from common import tls
from common.pseudonyms import load_secret

DEFAULT_DAYS = 365
CA_DAYS_FACTOR = 10  # the CA outlives the party certificates so that they can be renewed under it
SECRET_FILE = "federation.secret"
SECRET_BYTES = 32


@dataclass(frozen=True)
class PlannedFile:
    """One certificate/key pair `cdimf certs` writes, and which party installs it."""

    stem: str
    identity: tls.PartyIdentity | None  # None for the CA

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
            tls.validate_domain_name(domain)
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


def _positive_days(text: str) -> int:
    """Parse `--days N` as a positive whole number of days."""
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--days expects a whole number, got {text!r}") from None
    if days < 1:
        raise argparse.ArgumentTypeError(f"--days must be at least 1, got {days}")
    return days


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
    parser.add_argument("--days", type=_positive_days, default=DEFAULT_DAYS, help="validity of party certificates in days")
    parser.add_argument(
        "--federation-secret", action="store_true",
        help=f"also write {SECRET_FILE} (random, 0600): the pseudonym key shared by the domains, never the aggregator",
    )
    parser.add_argument(
        "--if-missing", action="store_true",
        help="if every file already exists and fits the CA, keep them and succeed (for one-shot container jobs)",
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
    tls.validate_party_name(args.operator, "--operator")
    unknown = sorted({domain for domain, _ in args.domain_host} - set(args.domains))
    if unknown:
        raise ValueError(f"--domain-host names domains not in --domains: {', '.join(unknown)}")
    return [
        PlannedFile("ca", None),
        PlannedFile("aggregator", tls.PartyIdentity("aggregator", "aggregator")),
        *(PlannedFile(domain, tls.PartyIdentity("domain", domain)) for domain in args.domains),
        PlannedFile("operator", tls.PartyIdentity("operator", args.operator)),
    ]


def _check_existing(folder: Path, plan: list[PlannedFile]) -> None:
    """Check that the existing files are a complete, valid set for `plan`, else raise ValueError."""
    ca_certificate = tls.load_certificate(folder / "ca.pem")
    now = datetime.datetime.now(datetime.UTC)
    for planned in plan:
        certificate_path, key_path = planned.paths(folder)
        issued = tls.load_issued(certificate_path, key_path)
        if issued.certificate.not_valid_after_utc <= now:
            raise ValueError(f"{certificate_path} expired on {issued.certificate.not_valid_after_utc:%Y-%m-%d}")
        if planned.identity is None:
            continue
        try:
            issued.certificate.verify_directly_issued_by(ca_certificate)
        except (ValueError, TypeError, InvalidSignature):
            raise ValueError(f"{certificate_path} is not issued by the CA in {folder / 'ca.pem'}") from None
        found = tls.party_identity(issued.certificate)
        if found != planned.identity:
            raise ValueError(f"{certificate_path} is for {found.uri()}, expected {planned.identity.uri()}")


def _issue(args: argparse.Namespace, plan: list[PlannedFile]) -> list[tuple[PlannedFile, tls.IssuedCertificate]]:
    """Create the CA and issue every planned certificate in memory (nothing written yet)."""
    ca = tls.create_ca(days=args.days * CA_DAYS_FACTOR)
    domain_hosts: dict[str, list[str]] = {}
    for domain, host in args.domain_host:
        domain_hosts.setdefault(domain, []).append(host)
    issued: list[tuple[PlannedFile, tls.IssuedCertificate]] = [(plan[0], ca)]
    for planned in plan[1:]:
        assert planned.identity is not None  # only the CA has none, and it is plan[0]
        if planned.identity.kind == "aggregator":
            certificate = tls.issue_aggregator_certificate(ca, args.aggregator_host, days=args.days)
        elif planned.identity.kind == "domain":
            certificate = tls.issue_domain_certificate(
                ca, planned.identity.name, hosts=domain_hosts.get(planned.identity.name, []), days=args.days
            )
        else:
            certificate = tls.issue_operator_certificate(ca, planned.identity.name, days=args.days)
        issued.append((planned, certificate))
    return issued


def run(args: argparse.Namespace) -> int:
    """Write the CA and party certificates into `args.out`; 0 on success, 2 on bad input."""
    folder: Path = args.out
    try:
        plan = _plan(args)
        targets = [path for planned in plan for path in planned.paths(folder)]
        if args.federation_secret:
            targets.append(folder / SECRET_FILE)
        existing = [path for path in targets if path.exists()]
        if existing and args.if_missing and len(existing) == len(targets):
            _check_existing(folder, plan)
            if args.federation_secret:
                load_secret(secret_file=folder / SECRET_FILE)
            print(f"cdimf certs: kept the existing certificates in {folder}")
            return 0
        if existing:
            # never overwrite a CA: parties already trusting it would be locked out
            raise ValueError(
                f"refusing to overwrite existing files in {folder}: {', '.join(path.name for path in existing)}"
            )
        issued = _issue(args, plan)
    except (ValueError, tls.TLSMaterialError) as error:
        print(f"cdimf certs: error: {error}", file=sys.stderr)
        return 2
    folder.mkdir(parents=True, exist_ok=True)
    for planned, certificate in issued:
        certificate.write(*planned.paths(folder))
    if args.federation_secret:
        # hex keeps the file printable and free of the newline bytes load_secret strips
        tls.write_private_file(folder / SECRET_FILE, secrets.token_hex(SECRET_BYTES).encode() + b"\n")
    print(f"cdimf certs: wrote {len(targets)} files to {folder}")
    print("  ca.pem            -> every host (trust anchor); keep ca.key offline, it signs new parties")
    print("  aggregator.pem/.key -> the aggregator host")
    for planned in plan[2:-1]:
        print(f"  {planned.stem}.pem/.key -> the node host of domain {planned.stem!r}")
    print("  operator.pem/.key -> whoever starts and follows runs (cdimf train)")
    if args.federation_secret:
        print(f"  {SECRET_FILE} -> every domain node host, never the aggregator")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m cdimf.certs`."""
    parser = configure_parser(argparse.ArgumentParser(prog="cdimf certs", description=__doc__))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
