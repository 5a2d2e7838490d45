"""The one naming rule of the federation's parties: domains, the aggregator and operators."""

import re

# Names end up in file names, URIs, certificate identities and proto headers, so keep them to a
# portable alphabet.
PARTY_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
# File names `cdimf certs` writes beside the domain files; a domain with one of these names
# would overwrite them.
RESERVED_DOMAIN_NAMES = frozenset({"ca", "aggregator", "operator"})


# how much of a caller's string an error message repeats: long inputs are never echoed whole
# (a megabyte name in a status detail overflows gRPC's metadata limit)
ECHO_CHARS = 64


def shown(text: str | bytes, limit: int = ECHO_CHARS) -> str:
    """`text` as an error message quotes it: its repr, cut to `limit` characters with the full length noted."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} {'bytes' if isinstance(text, bytes) else 'characters'})"


def is_party_name(name: str) -> bool:
    """Whether `name` follows the party-name rule."""
    return PARTY_NAME_PATTERN.fullmatch(name) is not None


def validate_party_name(name: str, what: str = "party name") -> str:
    """Return `name` if it is a valid party name, else raise ValueError naming `what`."""
    if not is_party_name(name):
        raise ValueError(f"{what} {shown(name)} is invalid: use 1-63 of a-z 0-9 _ - starting with a letter or digit")
    return name


def validate_domain_name(name: str) -> str:
    """Return `name` if it can name a domain whose certificate files are written (not a reserved file name)."""
    validate_party_name(name, "domain name")
    if name in RESERVED_DOMAIN_NAMES:
        raise ValueError(f"domain name {shown(name)} is reserved (one of {sorted(RESERVED_DOMAIN_NAMES)})")
    return name
