"""Fixed point in the ring Z/2^64: what secure aggregation sums, and the consensus computed from it.

A contribution V (float32) is encoded as round(V * 2^RING_FRACTION_BITS), an int64 in two's
complement viewed as uint64. Ring addition (uint64 with wraparound) is exact, associative and
commutative, so the sum of encoded rows is the same whoever adds them in whatever order: the
aggregator adds masked rows, a node removes the masks and decodes, and the engine's quantized mode
runs the very same functions (ring_consensus), so both get the same Z bit for bit.
"""

from collections.abc import Sequence
from itertools import pairwise

import numpy as np

from cdimf.common.core.admm import FLOAT, apply_prox
from cdimf.common.core.membership import sorted_unique
from cdimf.common.core.params import ADMMParams

RING = np.uint64
# 32 fraction bits: a float32 with |v| >= 2^-9 has an ulp of at least 2^-9 * 2^-23 = 2^-32, so it
# is a multiple of 2^-32 and encodes exactly; smaller values round to the nearest 2^-32 (error
# <= 2^-33, far below the iALS solve's own error).
RING_FRACTION_BITS = 32
# |v| < 2^25 gives |round(v * 2^32)| < 2^57, so a sum over up to 64 holders (MAX_DOMAINS) stays
# below 2^63 and never wraps as an int64: the decoded sum is the true sum.
RING_LIMIT = float(2**25)
RING_SCALE = float(2**RING_FRACTION_BITS)
# one contribution's encoded |value| is below this (2^57), a sum over h holders below h times it
RING_VALUE_BOUND = 2 ** (RING_FRACTION_BITS + 25)
# encode/decode and the consensus work through blocks of this many rows: float temporaries of a
# block (0.5 MB at rank 64), never of the whole matrix; small enough to stay in cache and to be
# reused by the allocator (benchmarks/secure_aggregation.py ran faster with these than with 16384)
RING_BLOCK_ROWS = 2048


def encode_fixed(values: np.ndarray, *, first_row: int = 0) -> np.ndarray:
    """float32 (n, c) -> uint64 (n, c): round(v * 2^32) as int64 two's complement viewed as uint64.

    ValueError naming the first row/col that is not finite or has |v| >= RING_LIMIT (rows
    numbered from first_row: a caller encoding a batch names the row of the whole matrix).
    """
    values = np.asarray(values)
    out = np.empty(values.shape, dtype=RING)
    encode_fixed_into(values, out, first_row=first_row)
    return out


def encode_fixed_into(values: np.ndarray, out: np.ndarray, *, first_row: int = 0) -> None:
    """encode_fixed written into `out` (uint64, same shape, may be a strided view): no temporary of the whole matrix."""
    if values.dtype != FLOAT:
        raise ValueError(f"encode_fixed takes float32 values, got {values.dtype}")
    if values.ndim != 2:
        raise ValueError(f"encode_fixed takes a 2-d array (rows, cols), got shape {values.shape}")
    _check_ring(out, "the encoding's output")
    if out.shape != values.shape:
        raise ValueError(f"output has shape {out.shape}, expected {values.shape}")
    signed = out.view(np.int64)
    scale = FLOAT(RING_SCALE)
    for start in range(0, len(values), RING_BLOCK_ROWS):
        block = values[start : start + RING_BLOCK_ROWS]
        # NaN fails `<`, so one comparison refuses NaN, inf and out-of-range values
        bad = ~(np.abs(block) < FLOAT(RING_LIMIT))
        if bad.any():
            row, col = np.unravel_index(int(np.argmax(bad)), bad.shape)
            raise ValueError(
                f"row {first_row + start + int(row)}, col {int(col)}: value {float(block[row, col])} cannot be encoded "
                f"(secure aggregation needs finite values with |v| < 2^25 = {int(RING_LIMIT)})"
            )
        # all in float32 and exact: scaling by a power of two is exact, rint of a float32 is exact
        # (any float32 >= 2^23 is already an integer), and an integer float32 < 2^57 converts to
        # int64 exactly; so no float64 temporary is needed
        scaled = block * scale
        np.rint(scaled, out=scaled)
        signed[start : start + len(block)] = scaled


def _check_ring(array: np.ndarray, what: str) -> None:
    """ValueError unless the array is uint64 (a float would turn ring sums into rounded ones)."""
    if array.dtype != RING:
        raise ValueError(f"{what} must be uint64 ring elements, got {array.dtype}")


def ring_sum_into(total: np.ndarray, rows: np.ndarray | None, values: np.ndarray) -> None:
    """total[rows] += values in Z/2^64 (rows None: every row of total, in order).

    Rows must be unique within one contribution (fancy-index += adds each row once).
    """
    _check_ring(total, "the ring total")
    _check_ring(values, "a ring contribution")
    if rows is None:
        if values.shape != total.shape:
            raise ValueError(f"contribution has shape {values.shape}, expected {total.shape}")
        # uint64 + uint64 stays uint64 and wraps modulo 2^64
        np.add(total, values, out=total)
        return
    if values.shape != (len(rows), total.shape[1]):
        raise ValueError(f"contribution has shape {values.shape}, expected ({len(rows)}, {total.shape[1]})")
    total[rows] += values


def _check_rows(rows: np.ndarray, n_rows: int) -> None:
    """ValueError when a contribution names a row twice or one outside [0, n_rows)."""
    if len(rows) == 0:
        return
    if rows.dtype.kind not in "iu":
        raise ValueError(f"row ids must be integers, got {rows.dtype}")
    if int(rows.min()) < 0 or int(rows.max()) >= n_rows:
        raise ValueError(f"contribution names rows outside [0, {n_rows}): {int(rows.min())}..{int(rows.max())}")
    if len(sorted_unique(rows)) != len(rows):
        raise ValueError("contribution names a row twice")


def _is_every_row(rows: np.ndarray, n_rows: int) -> bool:
    """Whether rows is 0, 1, ..., n_rows - 1 (a fully shared block: add without gather and scatter)."""
    return len(rows) == n_rows and (n_rows == 0 or bool(np.all(rows == np.arange(n_rows))))


# ring_sums adds block by block, each block of the total about this many bytes: the total is
# written once while in cache instead of zeroed and then re-read once per contribution
RING_SUM_BLOCK_BYTES = 512 * 1024


def ring_sums(contributions: Sequence[tuple[np.ndarray, np.ndarray]], n_rows: int, cols: int) -> np.ndarray:
    """Per row the ring sum (uint64 (n_rows, cols)) over the contributions (rows, values) naming it.

    The aggregator's whole job in secure mode. Same contract as admm.consensus_mean: row ids unique
    within one contribution (a duplicate -> ValueError); rows nobody sent are 0. Summed in place
    into one uint64 matrix in cache-sized blocks of rows, no float temporaries.
    """
    parts: list[tuple[np.ndarray, np.ndarray | None, np.ndarray]] = []
    scattered: list[tuple[np.ndarray, np.ndarray]] = []
    block_rows = max(64, RING_SUM_BLOCK_BYTES // (8 * max(cols, 1)))
    starts = np.arange(0, n_rows + block_rows, block_rows).clip(max=n_rows)
    for rows, values in contributions:
        rows = np.asarray(rows)
        _check_ring(values, "a ring contribution")
        if values.shape != (len(rows), cols):
            raise ValueError(f"contribution has shape {values.shape}, expected ({len(rows)}, {cols})")
        _check_rows(rows, n_rows)
        if _is_every_row(rows, n_rows):
            parts.append((values, None, starts))
            continue
        if len(rows) < 2 or bool(np.all(rows[1:] > rows[:-1])):
            # rows in order are cut into views block by block
            parts.append((values, rows, np.searchsorted(rows, starts)))
        else:
            # rows out of order: one scatter over the whole total after the blocks (gathering them
            # block by block through a sort reads the values out of order, which was slower)
            scattered.append((rows, values))
    total = np.empty((n_rows, cols), dtype=RING)
    # a loop over blocks of rows (n_rows / block_rows iterations), each one vectorised
    for block, (start, stop) in enumerate(pairwise(starts)):
        part_total = total[start:stop]
        part_total[...] = 0
        for values, ordered, cuts in parts:
            if ordered is None:
                np.add(part_total, values[start:stop], out=part_total)
                continue
            first, last = cuts[block], cuts[block + 1]
            if first < last:
                # rows are unique within one contribution, so fancy-index += adds each once
                part_total[ordered[first:last] - start] += values[first:last]
    for rows, values in scattered:
        total[rows] += values
    return total


def ring_holders(row_sets: Sequence[np.ndarray], n_rows: int) -> np.ndarray:
    """Per row how many of the row sets name it (int64 (n_rows,)): the holder count of ring_sums."""
    holders = np.zeros(n_rows, dtype=np.int64)
    for rows in row_sets:
        # rows are unique within one contribution (ring_sums checks), so += counts each once
        holders[np.asarray(rows)] += 1
    return holders


def decode_mean(sums: np.ndarray, holders: np.ndarray) -> np.ndarray:
    """float64 (n, c) mean: the int64 view of the ring sums / 2^32 / holders (rows with 0 holders -> 0)."""
    _check_ring(sums, "the ring sums")
    holders = np.asarray(holders)
    if sums.ndim != 2 or holders.shape != (len(sums),):
        raise ValueError(f"sums {sums.shape} and holders {holders.shape} must be (n, c) and (n,)")
    mean = sums.view(np.int64).astype(np.float64)
    held = holders > 0
    # one correctly rounded division by h * 2^32 (exact in float64): the same value as dividing
    # by 2^32 (exact) then by h
    divisor = np.where(held, holders * RING_SCALE, 1.0)
    mean /= divisor[:, None]
    mean[~held] = 0.0
    return mean


def consensus_from_ring(sums: np.ndarray, holders: np.ndarray, params: ADMMParams) -> np.ndarray:
    """Z float32 (n, c) = prox(decode_mean(sums, holders)) by admm.apply_prox, in blocks of rows.

    Decoding and the prox are per row, so any block gives the same row values: a node (its pulled
    rows) and the engine (every row) get the same Z bit for bit.
    """
    _check_ring(sums, "the ring sums")
    z = np.empty(sums.shape, dtype=FLOAT)
    for start in range(0, len(sums), RING_BLOCK_ROWS):
        stop = start + RING_BLOCK_ROWS
        block_holders = np.asarray(holders[start:stop])
        z[start:stop] = apply_prox(decode_mean(sums[start:stop], block_holders), block_holders, params)
    return z


def ring_consensus(
    contributions: Sequence[tuple[np.ndarray, np.ndarray]], n_rows: int, rank: int, params: ADMMParams
) -> tuple[np.ndarray, np.ndarray]:
    """The engine's quantized consensus: encode each contribution, ring-sum, decode and prox.

    contributions: (row ids, float32 values) per domain. Returns (Z float32 (n_rows, rank), holders
    int64 (n_rows,)); the same functions a node runs after unmasking, so the same Z bit for bit.
    """
    encoded = [(np.asarray(rows), encode_fixed(values)) for rows, values in contributions]
    sums = ring_sums(encoded, n_rows, rank)
    holders = ring_holders([rows for rows, _ in encoded], n_rows)
    return consensus_from_ring(sums, holders, params), holders
