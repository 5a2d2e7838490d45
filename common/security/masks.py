"""Pseudorandom masks of secure aggregation: AES keystreams per (domain, round, row) and the check column.

A holder sends mask_contribution(V): its fixed-point rows (common/core/ring.py) plus one check
column, each word plus a mask word expanded with AES-256 from a key that HKDF derives from the
federation secret, the run, the domain and the round. The aggregator, which never holds the
secret, sees uniformly random words; it adds them in Z/2^64 and returns the masked sum with the
(domain, round) contributions it used. A node subtracts exactly those contributions' masks
(unmask_sum) and checks the check column: a wrong contributor list leaves a pseudorandom residue
that fails the check except with probability 2^-64 per row.
"""

from collections.abc import Callable, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cdimf.common.core.ring import RING, RING_VALUE_BOUND, encode_fixed
from cdimf.common.security.pseudonyms import PSEUDONYM_BYTES, check_secret

# Domain separation: a mask key of this protocol is never a key HKDF derived for another purpose.
MASK_VERSION = b"cdimf.v1.secagg-mask"
CHECK_VERSION = b"cdimf.v1.secagg-check"
KEY_BYTES = 32  # AES-256
# A counter block is the first NONCE_BYTES of a row's pseudonym then a big-endian uint16 block
# index: 112 bits of an HMAC output make two rows' nonces collide with probability ~n^2 / 2^113.
NONCE_BYTES = 14
MAX_BLOCKS = 1 << 16  # the uint16 block index: up to 2^17 columns
# rows of one AES call: about 32k rows x (rank + 1) words keeps a batch's buffers to a few MB per column pair
MASK_BATCH_ROWS = 32768


class MaskedSumMismatch(ValueError):
    """A masked sum whose contributor list (or content) is not what was summed: refused."""


def _fields(*parts: bytes) -> bytes:
    """Length-prefixed concatenation: no two tuples of fields give the same bytes."""
    return b"".join(len(part).to_bytes(4, "big") + part for part in parts)


def _round_bytes(round_index: int) -> bytes:
    """A round index as 8 big-endian bytes (ValueError when negative)."""
    if round_index < 0:
        raise ValueError(f"round index must be >= 0, got {round_index}")
    return int(round_index).to_bytes(8, "big")


def _hkdf(secret: bytes, salt: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    """HKDF-SHA256 of the federation secret (checked) with this salt and info."""
    check_secret(secret)
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


def mask_key(secret: bytes, run_id: str, domain: str, round_index: int) -> bytes:
    """The 32-byte AES key of one domain's masks in one round of one run (HKDF-SHA256)."""
    run, name = run_id.encode("utf-8"), domain.encode("utf-8")
    return _hkdf(secret, _fields(MASK_VERSION, run), _fields(MASK_VERSION, run, name, _round_bytes(round_index)))


def _keystream_words(key: bytes, nonces: np.ndarray, cols: int) -> np.ndarray:
    """uint64 (n, cols): AES-256 of counter blocks nonce_r || uint16 j, two little-endian words per block.

    One AES call over all counter blocks of the batch: ECB over counters is CTR's keystream
    with a per-row nonce, so no loop over rows.
    """
    n = len(nonces)
    blocks = (cols + 1) // 2
    if blocks > MAX_BLOCKS:
        raise ValueError(f"at most {2 * MAX_BLOCKS} mask columns, got {cols}")
    counters = np.empty((n, blocks, 16), dtype=np.uint8)
    counters[:, :, :NONCE_BYTES] = nonces[:, None, :]
    counters[:, :, NONCE_BYTES:] = np.arange(blocks, dtype=">u2").view(np.uint8).reshape(blocks, 2)
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    stream = encryptor.update(counters.tobytes()) + encryptor.finalize()
    words = np.frombuffer(stream, dtype="<u8").reshape(n, 2 * blocks)
    return words[:, :cols].astype(RING)


def _check_row_ids(row_ids: np.ndarray) -> np.ndarray:
    """The row ids as a contiguous (n, 32) uint8 array (ValueError otherwise)."""
    row_ids = np.asarray(row_ids)
    if row_ids.dtype != np.uint8 or row_ids.ndim != 2 or row_ids.shape[1] != PSEUDONYM_BYTES:
        raise ValueError(f"row ids must be (n, {PSEUDONYM_BYTES}) uint8 pseudonyms, got {row_ids.dtype} {row_ids.shape}")
    return row_ids


def row_masks(key: bytes, row_ids: np.ndarray, cols: int) -> np.ndarray:
    """uint64 (n, cols) mask words of the rows named by (n, 32) uint8 pseudonyms, under one mask key."""
    row_ids = _check_row_ids(row_ids)
    if len(key) != KEY_BYTES:
        raise ValueError(f"a mask key has {KEY_BYTES} bytes, got {len(key)}")
    masks = np.empty((len(row_ids), cols), dtype=RING)
    # batches bound the counter and keystream buffers (a loop over batches of rows, not rows)
    for start in range(0, len(row_ids), MASK_BATCH_ROWS):
        nonces = row_ids[start : start + MASK_BATCH_ROWS, :NONCE_BYTES]
        masks[start : start + len(nonces)] = _keystream_words(key, nonces, cols)
    return masks


def check_coefficients(secret: bytes, run_id: str, rank: int) -> np.ndarray:
    """uint64 (rank,) coefficients r of the check column sum_j r_j q_j (mod 2^64), secret to the aggregator.

    Uniform words, not forced odd: an odd r_j makes r_j * 2^63 = 2^63 known, so adding 2^63 to one
    column and to the check would pass for sure; with uniform r a change divisible by exactly 2^t
    passes with probability 2^-(64 - t) (the changes with large t are refused by unmask_sum's range check).
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    key = _hkdf(secret, _fields(CHECK_VERSION, run_id.encode("utf-8")), _fields(CHECK_VERSION, run_id.encode("utf-8"), b"coefficients"))
    # a single all-zero nonce: the coefficients are one keystream of `rank` words
    return _keystream_words(key, np.zeros((1, NONCE_BYTES), dtype=np.uint8), rank)[0]


def check_column(values: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    """uint64 (n,) sum_j r_j * values[:, j] in Z/2^64 (linear: the check of a sum is the sum of the checks)."""
    check = np.zeros(len(values), dtype=RING)
    # a loop over the rank's columns (each a vectorised multiply-add over every row) keeps the
    # temporaries to one column; uint64 products and sums wrap modulo 2^64
    for col, coefficient in enumerate(coefficients):
        check += values[:, col] * coefficient
    return check


def mask_contribution(
    values: np.ndarray, row_ids: np.ndarray, secret: bytes, run_id: str, domain: str, round_index: int
) -> np.ndarray:
    """uint64 (n, rank + 1): encode_fixed(values) then the check column, each word plus its mask.

    values float32 (n, rank) for the rows named by the (n, 32) pseudonyms. A domain must never send
    two different contributions under one (run, round): the same masks would hide both.
    """
    row_ids = _check_row_ids(row_ids)
    if values.ndim != 2 or len(values) != len(row_ids):
        raise ValueError(f"values {values.shape} do not match {len(row_ids)} row ids")
    rank = values.shape[1]
    masked = np.empty((len(values), rank + 1), dtype=RING)
    masked[:, :rank] = encode_fixed(values)
    masked[:, rank] = check_column(masked[:, :rank], check_coefficients(secret, run_id, rank))
    masked += row_masks(mask_key(secret, run_id, domain, round_index), row_ids, rank + 1)
    return masked


def holders_of(holder_masks: np.ndarray, domains: Sequence[str], contributors: Sequence[tuple[str, int]]) -> np.ndarray:
    """bool (k, n): whether contributor k's domain holds row n, from a Membership's holder masks (bit i: domains[i])."""
    holder_masks = np.asarray(holder_masks, dtype=RING)
    holds = np.zeros((len(contributors), len(holder_masks)), dtype=bool)
    for index, (domain, _) in enumerate(contributors):
        if domain not in domains:
            raise MaskedSumMismatch(f"contributor {domain!r} is not a domain of this federation ({', '.join(domains)})")
        bit = RING(domains.index(domain))
        holds[index] = (holder_masks >> bit) & RING(1) == RING(1)
    return holds


def _holds_matrix(
    holds: Callable[[str], np.ndarray] | np.ndarray, contributors: Sequence[tuple[str, int]], n: int
) -> np.ndarray:
    """holds as a bool (k, n) matrix (a callable gives one domain's row flags)."""
    matrix = np.stack([np.asarray(holds(domain), dtype=bool) for domain, _ in contributors]) if callable(holds) else np.asarray(holds, dtype=bool)
    if len(contributors) == 0:
        matrix = np.zeros((0, n), dtype=bool)
    if matrix.shape != (len(contributors), n):
        raise ValueError(f"holds has shape {matrix.shape}, expected ({len(contributors)}, {n})")
    return matrix


def unmask_sum(
    masked_sum: np.ndarray,
    row_ids: np.ndarray,
    contributors: Sequence[tuple[str, int]],
    holds: Callable[[str], np.ndarray] | np.ndarray,
    secret: bytes,
    run_id: str,
    *,
    expected_round: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(ring sums uint64 (n, rank), holders int64 (n,)) of a masked sum (n, rank + 1) over these contributors.

    Subtracts each contributor's masks on the rows it holds (holds: bool (k, n), or a callable
    domain -> bool (n,)), then verifies every row's check column and that each sum is within what
    that many holders can send. MaskedSumMismatch names the failing rows' count and the
    contributors. A domain listed twice, or (expected_round given) a contribution of another round,
    is refused before any mask is computed. masked_sum is not modified.
    """
    row_ids = _check_row_ids(row_ids)
    _check_ring_matrix(masked_sum, len(row_ids))
    domains = [domain for domain, _ in contributors]
    if len(set(domains)) != len(domains):
        raise MaskedSumMismatch(f"a domain contributes twice to one sum: {list(contributors)}")
    if expected_round is not None and any(round_index != expected_round for _, round_index in contributors):
        raise MaskedSumMismatch(f"contributions not of round {expected_round}: {list(contributors)}")
    holding = _holds_matrix(holds, contributors, len(row_ids))
    rank = masked_sum.shape[1] - 1
    plain = masked_sum.copy()
    # one pass per contributor (a handful of domains), each vectorised over its rows
    for (domain, round_index), held in zip(contributors, holding):
        rows = np.flatnonzero(held)
        plain[rows] -= row_masks(mask_key(secret, run_id, domain, round_index), row_ids[rows], rank + 1)
    sums = plain[:, :rank]
    holders = holding.sum(axis=0, dtype=np.int64)
    wrong = check_column(sums, check_coefficients(secret, run_id, rank)) != plain[:, rank]
    wrong |= ~_within_bound(sums, holders)
    failed = int(wrong.sum())
    if failed:
        raise MaskedSumMismatch(f"{failed} of {len(row_ids)} rows fail the integrity check; contributors {list(contributors)}")
    return np.ascontiguousarray(sums), holders


def _check_ring_matrix(masked_sum: np.ndarray, n: int) -> None:
    """ValueError unless the masked sum is uint64 (n, rank + 1) with rank >= 1."""
    if masked_sum.dtype != RING or masked_sum.ndim != 2 or len(masked_sum) != n or masked_sum.shape[1] < 2:
        raise ValueError(f"masked sum must be uint64 ({n}, rank + 1), got {masked_sum.dtype} {masked_sum.shape}")


def _within_bound(sums: np.ndarray, holders: np.ndarray) -> np.ndarray:
    """bool (n,): every |int64 sum| of the row below holders * RING_VALUE_BOUND (0 holders: the sum is 0)."""
    signed = sums.view(np.int64)
    # negating -2^63 wraps to itself, whose uint64 view is 2^63: the right magnitude
    magnitude = np.where(signed < 0, -signed, signed).view(RING)
    bound = holders.astype(RING) * RING(RING_VALUE_BOUND)
    return np.all(magnitude < bound[:, None], axis=1) | ((holders == 0) & np.all(sums == 0, axis=1))
