"""Keyed pseudonyms: deterministic under one secret, unlinkable across secrets, strict secret loading."""

from pathlib import Path

import numpy as np
import pytest

from cdimf.common.security.pseudonyms import as_keys, load_secret, membership_fingerprint, pseudonymize

SECRET = b"federation-secret-0123456789"


def test_same_key_same_secret_gives_same_pseudonym_and_differs_otherwise() -> None:
    first = pseudonymize(["alice", "bob", 42], SECRET)
    again = pseudonymize(["bob", "42", "alice"], SECRET)
    assert first.shape == (3, 32) and first.dtype == np.uint8
    np.testing.assert_array_equal(first[[1, 2, 0]], again)  # 42 and "42" name the same user
    other = pseudonymize(["alice", "bob", 42], b"another-secret-of-enough-bytes")
    assert not np.any(np.all(first == other, axis=1))
    assert len(np.unique(as_keys(first))) == 3


def test_pseudonym_does_not_contain_the_raw_key() -> None:
    digest = pseudonymize(["user-123456"], SECRET)[0].tobytes()
    assert b"user-123456" not in digest and b"123456" not in digest


def test_short_or_missing_secret_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        pseudonymize(["a"], b"short")
    with pytest.raises(ValueError, match="exactly one"):
        load_secret()
    with pytest.raises(ValueError, match="exactly one"):
        load_secret("x" * 20, tmp_path / "s")
    missing = tmp_path / "absent.secret"
    with pytest.raises(ValueError, match=str(missing)):
        load_secret(secret_file=missing)
    short = tmp_path / "short.secret"
    short.write_bytes(b"tiny\n")
    with pytest.raises(ValueError, match=r"short\.secret.*16 bytes"):
        load_secret(secret_file=short)


def test_secret_file_strips_the_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "federation.secret"
    path.write_bytes(b"ab" * 16 + b"\n")
    assert load_secret(secret_file=path) == b"ab" * 16
    assert load_secret("ab" * 16) == b"ab" * 16


def test_fingerprint_changes_with_pseudonyms_or_flags() -> None:
    digests = pseudonymize(["a", "b"], SECRET)
    base = membership_fingerprint(digests, np.array([True, False]))
    assert base == membership_fingerprint(digests.copy(), np.array([True, False]))
    assert base != membership_fingerprint(digests, np.array([True, True]))
    assert base != membership_fingerprint(digests[::-1], np.array([True, False]))


def test_pseudonyms_past_one_joined_block_are_each_keys_hmac() -> None:
    """More keys than one joined block (and a generator): row i is HMAC-SHA256 of the context and key i."""
    import hmac

    from cdimf.common.security import pseudonyms

    count = pseudonyms._BLOCK_KEYS + 3
    keys = np.arange(count) * 7
    digests = pseudonymize(keys, SECRET)
    assert digests.shape == (count, 32) and digests.flags.owndata
    for row in (0, pseudonyms._BLOCK_KEYS - 1, pseudonyms._BLOCK_KEYS, count - 1):
        expected = hmac.digest(SECRET, b"cdimf.v1.user-pseudonym\x00" + str(int(keys[row])).encode(), "sha256")
        assert digests[row].tobytes() == expected
    np.testing.assert_array_equal(pseudonymize((str(int(k)) for k in keys), SECRET), digests)
    assert pseudonymize([], SECRET).shape == (0, 32)
