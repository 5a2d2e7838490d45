"""Fixed point in Z/2^64: known encodings, wraparound sums, decoding, and ring_consensus against a float64 brute force."""

from fractions import Fraction

import numpy as np
import pytest

from cdimf.common.core.params import ADMMParams
from cdimf.common.core.ring import (
    RING_LIMIT,
    consensus_from_ring,
    decode_mean,
    encode_fixed,
    ring_consensus,
    ring_holders,
    ring_sum_into,
    ring_sums,
)

TWO_64 = 2**64


def f32(*values: float) -> np.ndarray:
    """One row of float32 literals."""
    return np.array([values], dtype=np.float32)


def test_encode_known_literals() -> None:
    """0.5 -> 2^31, -1 -> 2^64 - 2^32, 0 -> 0, 2^24 -> 2^56, and the smallest step 2^-32 -> 1."""
    encoded = encode_fixed(f32(0.5, -1.0, 0.0, 2.0**24, 2.0**-32, -(2.0**-32)))
    assert encoded.dtype == np.uint64
    assert [int(x) for x in encoded[0]] == [2**31, TWO_64 - 2**32, 0, 2**56, 1, TWO_64 - 1]


def test_encode_rounds_to_nearest_step() -> None:
    """Values below 2^-9 are not multiples of 2^-32: they round to the nearest (exact rational arithmetic)."""
    values = f32(1.0 / 3.0 * 2.0**-10, -1e-4, 3e-7, 1.0 / 3.0)
    encoded = encode_fixed(values)[0]
    for value, word in zip(values[0], encoded):
        exact = Fraction(float(value)) * 2**32  # float32 -> float64 is exact, Fraction is exact
        nearest = round(exact)  # Python rounds half to even, as np.rint does
        assert abs(exact - nearest) <= Fraction(1, 2)
        assert int(word) == nearest % TWO_64
    # 1/3 in float32 is 11184811 * 2^-25: a multiple of 2^-32, so it encodes exactly
    assert int(encoded[3]) == 11184811 * 2**7


@pytest.mark.parametrize(
    ("value", "col"),
    [(float("nan"), 1), (float("inf"), 2), (-float("inf"), 0), (RING_LIMIT, 1), (-RING_LIMIT, 2)],
)
def test_encode_refuses_and_names_row_and_col(value: float, col: int) -> None:
    """A non-finite or too large value is refused with its row, column and the limit."""
    values = np.zeros((3, 3), dtype=np.float32)
    values[2, col] = value
    with pytest.raises(ValueError, match=rf"row 2, col {col}: .*33554432"):
        encode_fixed(values)


def test_encode_accepts_just_below_the_limit_and_refuses_float64() -> None:
    """The largest float32 below 2^25 encodes to (2^25 - 2) * 2^32; float64 input is refused."""
    below = np.nextafter(np.float32(RING_LIMIT), np.float32(0))
    assert int(encode_fixed(f32(float(below)))[0, 0]) == (2**25 - 2) * 2**32
    with pytest.raises(ValueError, match="float32"):
        encode_fixed(np.zeros((1, 1)))


def test_ring_sum_wraps_modulo_2_64() -> None:
    """(2^64 - 1) + 2 = 1 and 2^63 + 2^63 = 0 in the ring, in place, through both paths."""
    total = np.array([[TWO_64 - 1, 2**63]], dtype=np.uint64)
    ring_sum_into(total, None, np.array([[2, 2**63]], dtype=np.uint64))
    assert [int(x) for x in total[0]] == [1, 0]
    total = np.zeros((3, 1), dtype=np.uint64)
    ring_sum_into(total, np.array([2, 0]), np.array([[TWO_64 - 5], [7]], dtype=np.uint64))
    ring_sum_into(total, np.array([2]), np.array([[9]], dtype=np.uint64))
    assert [int(x) for x in total[:, 0]] == [7, 0, 4]


def test_ring_sum_into_refuses_floats() -> None:
    """A float contribution would round: refused."""
    with pytest.raises(ValueError, match="uint64"):
        ring_sum_into(np.zeros((1, 1), dtype=np.uint64), None, np.ones((1, 1)))


def test_ring_sums_partial_overlap_and_errors() -> None:
    """Each row sums exactly the contributions naming it (Python ints mod 2^64 as reference)."""
    rng = np.random.default_rng(5)
    parts = [
        (np.array([0, 1, 2, 3]), rng.integers(0, TWO_64, (4, 2), dtype=np.uint64)),  # every row, in order
        (np.array([3, 1]), rng.integers(0, TWO_64, (2, 2), dtype=np.uint64)),
        (np.array([], dtype=np.int64), np.zeros((0, 2), dtype=np.uint64)),
    ]
    sums = ring_sums(parts, 4, 2)
    expected = [[0, 0] for _ in range(4)]
    for rows, values in parts:
        for position, row in enumerate(rows):
            for col in range(2):
                expected[row][col] = (expected[row][col] + int(values[position, col])) % TWO_64
    assert [[int(x) for x in row] for row in sums] == expected
    assert ring_holders([rows for rows, _ in parts], 4).tolist() == [1, 2, 1, 2]
    with pytest.raises(ValueError, match="twice"):
        ring_sums([(np.array([1, 1]), np.zeros((2, 2), dtype=np.uint64))], 4, 2)
    with pytest.raises(ValueError, match="outside"):
        ring_sums([(np.array([4]), np.zeros((1, 2), dtype=np.uint64))], 4, 2)
    with pytest.raises(ValueError, match="shape"):
        ring_sums([(np.array([1]), np.zeros((1, 3), dtype=np.uint64))], 4, 2)


def test_decode_mean_of_mixed_signs() -> None:
    """(-1.5) + 0.25 over two holders is -0.625; 3 over one holder is 3; no holder gives 0."""
    words = encode_fixed(np.array([[-1.5], [0.25], [3.0], [0.0]], dtype=np.float32))
    sums = ring_sums([(np.array([0, 2]), words[[0, 2]]), (np.array([0]), words[[1]])], 3, 1)
    mean = decode_mean(sums, np.array([2, 1, 0]))
    assert mean.dtype == np.float64
    assert mean[:, 0].tolist() == [-0.625, 0.0, 0.0]
    mean = decode_mean(ring_sums([(np.array([1]), words[[2]])], 3, 1), np.array([0, 1, 0]))
    assert mean[:, 0].tolist() == [0.0, 3.0, 0.0]


def brute_force_mean(contributions: list[tuple[np.ndarray, np.ndarray]], n_rows: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact mean per row over the contributions naming it, in float64 with a loop."""
    total = np.zeros((n_rows, rank))
    count = np.zeros(n_rows)
    for rows, values in contributions:
        for position, row in enumerate(rows):
            total[row] += values[position].astype(np.float64)
            count[row] += 1
    return np.where(count[:, None] > 0, total / np.maximum(count, 1)[:, None], 0.0), count


@pytest.mark.parametrize("params", [ADMMParams(rho=1.0), ADMMParams(rho=2.0, prox="l2", lambda_z=0.7)])
def test_ring_consensus_matches_float64_brute_force(params: ADMMParams) -> None:
    """Z_ring is the exact prox(mean) within 2^-32 (fixed point) plus float32 rounding; unheld rows are 0."""
    rng = np.random.default_rng(11)
    n_rows, rank = 40, 5
    contributions = []
    for domain in range(3):
        rows = rng.choice(n_rows - 4, size=20 + domain * 5, replace=False)  # the last 4 rows: nobody
        values = (rng.standard_normal((len(rows), rank)) * 10.0 ** rng.integers(-6, 3, (len(rows), 1))).astype(np.float32)
        contributions.append((rows, values))
    z, holders = ring_consensus(contributions, n_rows, rank, params)
    mean, count = brute_force_mean(contributions, n_rows, rank)
    scale = count * params.rho / (count * params.rho + params.lambda_z) if params.prox == "l2" else (count > 0).astype(float)
    exact = mean * np.where(count > 0, scale, 0.0)[:, None]
    assert z.dtype == np.float32
    assert holders.tolist() == count.astype(int).tolist()
    assert np.all(z[-4:] == 0.0)
    tolerance = 2.0**-32 + np.abs(exact) * 2.0**-23
    assert np.all(np.abs(z.astype(np.float64) - exact) <= tolerance)


def test_consensus_from_ring_is_blockwise_invariant() -> None:
    """A node decoding a subset of rows gets exactly the engine's rows (per-row functions, bit for bit)."""
    rng = np.random.default_rng(2)
    values = rng.standard_normal((50000, 3)).astype(np.float32)
    sums = ring_sums([(np.arange(50000), encode_fixed(values))], 50000, 3)
    holders = np.ones(50000, dtype=np.int64)
    params = ADMMParams(rho=1.0, prox="l2", lambda_z=0.3)
    whole = consensus_from_ring(sums, holders, params)
    picked = rng.choice(50000, size=777, replace=False)
    np.testing.assert_array_equal(consensus_from_ring(sums[picked], holders[picked], params), whole[picked])


def test_ring_sums_over_many_blocks_equal_a_row_by_row_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    """Full, sorted partial, unsorted and empty contributions over many small blocks: each row's sum as Python ints mod 2^64."""
    import cdimf.common.core.ring as ring

    monkeypatch.setattr(ring, "RING_SUM_BLOCK_BYTES", 1)  # blocks of 64 rows
    rng = np.random.default_rng(9)
    n_rows, cols = 300, 3
    sorted_rows = np.sort(rng.choice(n_rows, 120, replace=False))
    parts = [
        (np.arange(n_rows), rng.integers(0, TWO_64, (n_rows, cols), dtype=np.uint64)),
        (sorted_rows, rng.integers(0, TWO_64, (120, cols), dtype=np.uint64)),
        (rng.permutation(n_rows)[:200], rng.integers(0, TWO_64, (200, cols), dtype=np.uint64)),
        (np.array([], dtype=np.int64), np.zeros((0, cols), dtype=np.uint64)),
        (np.array([299]), np.full((1, cols), TWO_64 - 1, dtype=np.uint64)),
    ]
    expected = [[0] * cols for _ in range(n_rows)]
    for rows, values in parts:
        for position, row in enumerate(rows.tolist()):
            for col in range(cols):
                expected[row][col] = (expected[row][col] + int(values[position, col])) % TWO_64
    assert ring_sums(parts, n_rows, cols).tolist() == expected
