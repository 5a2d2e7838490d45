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

from cdimf.common.core.ring import RING, RING_VALUE_BOUND, encode_fixed_into
from cdimf.common.security.pseudonyms import PSEUDONYM_BYTES, check_secret

# Domain separation: a mask key of this protocol is never a key HKDF derived for another purpose.
MASK_VERSION = b"cdimf.v1.secagg-mask"
CHECK_VERSION = b"cdimf.v1.secagg-check"
KEY_BYTES = 32  # AES-256
# A counter block is the first NONCE_BYTES of a row's pseudonym then a big-endian uint16 block
# index: 112 bits of an HMAC output make two rows' nonces collide with probability ~n^2 / 2^113.
NONCE_BYTES = 14
MAX_BLOCKS = 1 << 16  # the uint16 block index: up to 2^17 columns
# rows of one AES call: 4096 rows x (rank + 1) words keeps a batch's buffers (~2 MB at rank 64) near the cache
MASK_BATCH_ROWS = 4096


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


def _counter_blocks(nonces: np.ndarray, blocks: int, out: np.ndarray | None = None) -> np.ndarray:
    """(n, blocks, 2) little-endian words: counter block j of row r is nonce_r || big-endian uint16 j.

    Written into `out` when it has room (a buffer reused from batch to batch); the same counters
    serve every key, so unmasking builds them once per batch for all contributors.
    """
    n = len(nonces)
    counters = out[:n] if out is not None and len(out) >= n and out.shape[1] == blocks else np.empty((n, blocks, 2), dtype="<u8")
    # bytes 14 and 15 of block j (its big-endian index) are bits 48-63 of the block's second little-endian word
    index = np.arange(blocks, dtype=np.uint64)
    index_words = ((index >> np.uint64(8)) << np.uint64(48)) | ((index & np.uint64(0xFF)) << np.uint64(56))
    # the nonce's 14 bytes as two little-endian words: bytes 0-7, and bytes 8-13 with 14-15 zero
    padded = np.zeros((n, 16), dtype=np.uint8)
    padded[:, :NONCE_BYTES] = nonces
    nonce_words = padded.view("<u8")
    counters[:, :, 0] = nonce_words[:, :1]
    counters[:, :, 1] = nonce_words[:, 1:] | index_words
    return counters


class _Keystream:
    """AES-256 keystream words of rows under one key, two little-endian words per counter block.

    ECB over counter blocks is CTR's keystream with a per-row nonce: one AES call per batch of
    rows, no loop over rows. The output buffer is reused from batch to batch.
    """

    def __init__(self, key: bytes, cols: int) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a mask key has {KEY_BYTES} bytes, got {len(key)}")
        self.cols = cols
        self.blocks = (cols + 1) // 2
        if self.blocks > MAX_BLOCKS:
            raise ValueError(f"at most {2 * MAX_BLOCKS} mask columns, got {cols}")
        # ECB keeps no state between blocks, so one encryptor serves every batch
        self.encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
        self.counters = np.empty((0, self.blocks, 2), dtype="<u8")
        self.stream = np.empty(0, dtype=np.uint8)

    def encrypt(self, counters: np.ndarray) -> np.ndarray:
        """uint64 (n, cols) keystream of (n, blocks, 2) counter blocks (a view, valid until the next call)."""
        n, size = len(counters), counters.nbytes
        if len(self.stream) < size + 16:
            # update_into wants room for one more block than it writes
            self.stream = np.empty(size + 16, dtype=np.uint8)
        counters = np.ascontiguousarray(counters)
        self.encryptor.update_into(counters.reshape(-1).view(np.uint8).data, self.stream[: size + 15].data)
        return self.stream[:size].view("<u8").reshape(n, 2 * self.blocks)[:, : self.cols]

    def words(self, nonces: np.ndarray) -> np.ndarray:
        """uint64 (n, cols) keystream of the rows with these (n, NONCE_BYTES) nonces (a view, valid until the next call)."""
        counters = _counter_blocks(nonces, self.blocks, self.counters)
        if len(counters) > len(self.counters):
            self.counters = counters  # the larger buffer is kept for the next batch
        return self.encrypt(counters)


def _check_row_ids(row_ids: np.ndarray) -> np.ndarray:
    """The row ids as a contiguous (n, 32) uint8 array (ValueError otherwise)."""
    row_ids = np.asarray(row_ids)
    if row_ids.dtype != np.uint8 or row_ids.ndim != 2 or row_ids.shape[1] != PSEUDONYM_BYTES:
        raise ValueError(f"row ids must be (n, {PSEUDONYM_BYTES}) uint8 pseudonyms, got {row_ids.dtype} {row_ids.shape}")
    return row_ids


def row_masks(key: bytes, row_ids: np.ndarray, cols: int) -> np.ndarray:
    """uint64 (n, cols) mask words of the rows named by (n, 32) uint8 pseudonyms, under one mask key."""
    row_ids = _check_row_ids(row_ids)
    stream = _Keystream(key, cols)
    masks = np.empty((len(row_ids), cols), dtype=RING)
    # batches bound the counter and keystream buffers (a loop over batches of rows, not rows)
    for start in range(0, len(row_ids), MASK_BATCH_ROWS):
        nonces = row_ids[start : start + MASK_BATCH_ROWS, :NONCE_BYTES]
        masks[start : start + len(nonces)] = stream.words(nonces)
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
    return _Keystream(key, rank).words(np.zeros((1, NONCE_BYTES), dtype=np.uint8))[0].astype(RING)


def check_column(values: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    """uint64 (n,) sum_j r_j * values[:, j] in Z/2^64 (linear: the check of a sum is the sum of the checks)."""
    check = np.empty(len(values), dtype=RING)
    # in batches of rows; einsum's integer products and sums wrap modulo 2^64 like uint64 arithmetic
    for start in range(0, len(values), MASK_BATCH_ROWS):
        block = values[start : start + MASK_BATCH_ROWS]
        check[start : start + len(block)] = np.einsum("ij,j->i", block, coefficients)
    return check


def mask_contribution(
    values: np.ndarray, row_ids: np.ndarray, secret: bytes, run_id: str, domain: str, round_index: int
) -> np.ndarray:
    """uint64 (n, rank + 1): encode_fixed(values) then the check column, each word plus its mask.

    values float32 (n, rank) for the rows named by the (n, 32) pseudonyms. A domain must never send
    two different contributions under one (run, round): the same masks on both would let the
    aggregator subtract them and read the difference (a retry resends the same bytes).
    """
    row_ids = _check_row_ids(row_ids)
    if values.ndim != 2 or len(values) != len(row_ids):
        raise ValueError(f"values {values.shape} do not match {len(row_ids)} row ids")
    rank = values.shape[1]
    coefficients = check_coefficients(secret, run_id, rank)
    stream = _Keystream(mask_key(secret, run_id, domain, round_index), rank + 1)
    masked = np.empty((len(values), rank + 1), dtype=RING)
    # the one output array is filled batch by batch: encoding, check and mask words of a batch are
    # the only temporaries (a loop over batches of rows, each vectorised)
    for start in range(0, len(values), MASK_BATCH_ROWS):
        stop = min(start + MASK_BATCH_ROWS, len(values))
        block = masked[start:stop]
        encode_fixed_into(values[start:stop], block[:, :rank], first_row=start)
        block[:, rank] = check_column(block[:, :rank], coefficients)
        block += stream.words(row_ids[start:stop, :NONCE_BYTES])
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
    if len(contributors) == 0:
        # no contributor: every row must be an empty sum (0), which unmask_sum's range check verifies
        matrix = np.zeros((0, n), dtype=bool)
    elif callable(holds):
        matrix = np.stack([np.asarray(holds(domain), dtype=bool) for domain, _ in contributors])
    else:
        matrix = np.asarray(holds, dtype=bool)
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
    streams = [_Keystream(mask_key(secret, run_id, domain, round_index), rank + 1) for domain, round_index in contributors]
    blocks = (rank + 2) // 2
    counters: np.ndarray | None = None
    coefficients = check_coefficients(secret, run_id, rank)
    holders = holding.sum(axis=0, dtype=np.int64)
    largest = _sum_bounds(holders)
    sums = np.empty((len(row_ids), rank), dtype=RING)
    wrong = np.zeros(len(row_ids), dtype=bool)
    # batches of rows (bounded temporaries), in each one pass per contributor (a handful of
    # domains), vectorised over the rows it holds; masked_sum itself is only read
    for start in range(0, len(row_ids), MASK_BATCH_ROWS):
        stop = min(start + MASK_BATCH_ROWS, len(row_ids))
        plain = masked_sum[start:stop].copy()
        counters = _counter_blocks(row_ids[start:stop, :NONCE_BYTES], blocks, counters)
        for stream, held in zip(streams, holding[:, start:stop]):
            rows = np.flatnonzero(held)
            if len(rows) == len(plain):
                plain -= stream.encrypt(counters)
            elif len(rows):
                plain[rows] -= stream.encrypt(counters[rows])
        sums[start:stop] = plain[:, :rank]
        wrong[start:stop] = check_column(plain[:, :rank], coefficients) != plain[:, rank]
        wrong[start:stop] |= ~_within_bound(plain[:, :rank], largest[start:stop])
    failed = int(wrong.sum())
    if failed:
        raise MaskedSumMismatch(f"{failed} of {len(row_ids)} rows fail the integrity check; contributors {list(contributors)}")
    return sums, holders


def _check_ring_matrix(masked_sum: np.ndarray, n: int) -> None:
    """ValueError unless the masked sum is uint64 (n, rank + 1) with rank >= 1."""
    if masked_sum.dtype != RING or masked_sum.ndim != 2 or len(masked_sum) != n or masked_sum.shape[1] < 2:
        raise ValueError(f"masked sum must be uint64 ({n}, rank + 1), got {masked_sum.dtype} {masked_sum.shape}")


def _sum_bounds(holders: np.ndarray) -> np.ndarray:
    """int64 (n,) largest |sum| a row's holders can send: h * RING_VALUE_BOUND - 1 (h = 0: 0, the sum must be 0)."""
    # h * 2^57 <= 2^63 fits uint64, and minus one fits int64
    bound = holders.astype(RING) * RING(RING_VALUE_BOUND) - RING(1)
    return np.where(holders > 0, bound.view(np.int64), 0)


def _within_bound(sums: np.ndarray, largest: np.ndarray) -> np.ndarray:
    """bool (n,): every int64 sum of the row in [-largest, largest] (largest from _sum_bounds)."""
    signed = sums.view(np.int64)
    # two reductions per row and no temporary of the block
    return (signed.max(axis=1, initial=np.iinfo(np.int64).min) <= largest) & (signed.min(axis=1, initial=np.iinfo(np.int64).max) >= -largest)
