"""Keyed pseudonyms of user keys: HMAC-SHA256 under the federation secret.

Domains that share the secret map the same user key to the same 32-byte pseudonym, so the
aggregator can align shared users without learning raw ids; it never holds the secret, so it
cannot test a guessed id against a pseudonym.
"""

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

import numpy as np

PSEUDONYM_BYTES = 32
MIN_SECRET_BYTES = 16
# Domain separation: a pseudonym of this protocol is never the MAC of some other message type.
_CONTEXT = b"cdimf.v1.user-pseudonym\x00"
# keys whose digests are joined at once (bounded extra memory, one join per block)
_BLOCK_KEYS = 1 << 16


def _key_bytes(key: object) -> bytes:
    if isinstance(key, bytes):
        return key
    if isinstance(key, np.bytes_):
        return bytes(key)
    # ints and numpy integers become their decimal text, so "42" and 42 name the same user
    return str(key).encode("utf-8")


def pseudonymize(keys: Iterable[object], secret: bytes) -> np.ndarray:
    """Pseudonyms (n, 32) uint8 of user keys (str, int or bytes), row i for keys[i]."""
    check_secret(secret)
    rows = keys if isinstance(keys, np.ndarray | list | tuple) else list(keys)
    out = np.empty((len(rows), PSEUDONYM_BYTES), dtype=np.uint8)
    # No vectorised HMAC exists in numpy/hashlib; hmac.digest is the one-shot C path and this
    # runs once per registration (about 1 s per million keys). Joined a block of keys at a
    # time straight into the result: one list of a million digests and its joined copy were
    # ~200 MiB at once, freed only after the copy into the array.
    for start in range(0, len(rows), _BLOCK_KEYS):
        block = rows[start : start + _BLOCK_KEYS]
        digests = b"".join(hmac.digest(secret, _CONTEXT + _key_bytes(key), "sha256") for key in block)
        out[start : start + len(block)] = np.frombuffer(digests, dtype=np.uint8).reshape(-1, PSEUDONYM_BYTES)
    return out


def check_secret(secret: bytes) -> None:
    """Raise ValueError unless the secret is bytes of at least MIN_SECRET_BYTES."""
    if not isinstance(secret, bytes):
        raise ValueError(f"the federation secret must be bytes, got {type(secret).__name__}")
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the federation secret must hold at least {MIN_SECRET_BYTES} bytes, got {len(secret)}")


def load_secret(secret: str | None = None, secret_file: Path | str | None = None) -> bytes:
    """The federation secret from a literal string or a file (trailing newline stripped); exactly one."""
    if (secret is None) == (secret_file is None):
        raise ValueError("give exactly one of the federation secret or the secret file")
    if secret is not None:
        value = secret.encode("utf-8")
        origin = "the federation secret"
    else:
        path = Path(secret_file)  # type: ignore[arg-type]
        try:
            value = path.read_bytes().rstrip(b"\r\n")
        except OSError as error:
            raise ValueError(f"{path}: cannot read the federation secret file: {error.strerror}") from error
        origin = str(path)
    try:
        check_secret(value)
    except ValueError as error:
        raise ValueError(f"{origin}: {error}") from error
    return value


def membership_fingerprint(pseudonyms: np.ndarray, holder: np.ndarray) -> str:
    """Hex SHA-256 over a registration (pseudonyms and holder flags), equal on node and aggregator."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(pseudonyms, dtype=np.uint8).tobytes())
    digest.update(np.asarray(holder, dtype=bool).astype(np.uint8).tobytes())
    return digest.hexdigest()


def as_keys(pseudonyms: np.ndarray) -> np.ndarray:
    """View (n, 32) uint8 pseudonyms as n fixed-width byte strings (sortable, usable with np.unique)."""
    contiguous = np.ascontiguousarray(pseudonyms, dtype=np.uint8)
    return contiguous.view(f"S{PSEUDONYM_BYTES}").reshape(-1)
