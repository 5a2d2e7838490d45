"""PRF masks of secure aggregation: the AES-CTR keystream, key separation, unmasking, the check column, uniformity."""

import math

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from cdimf.common.core.ring import encode_fixed, ring_sums
from cdimf.common.security.masks import (
    MaskedSumMismatch,
    check_coefficients,
    holders_of,
    mask_contribution,
    mask_key,
    row_masks,
    unmask_sum,
)
from cdimf.common.security.pseudonyms import pseudonymize

SECRET = b"federation-secret-of-this-test-32"
RUN = "run-7"
TWO_64 = 2**64


def reference_masks(key: bytes, row_ids: np.ndarray, cols: int) -> list[list[int]]:
    """Per row: AES-256-CTR keystream with the initial block first 14 pseudonym bytes || 0x0000, read as little-endian words."""
    rows = []
    for row_id in row_ids:
        nonce = bytes(row_id[:14]) + b"\x00\x00"
        stream = Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor().update(b"\x00" * (8 * cols))
        rows.append([int.from_bytes(stream[8 * j : 8 * j + 8], "little") for j in range(cols)])
    return rows


def test_row_masks_equal_aes_ctr_per_row() -> None:
    """The batched ECB-over-counters keystream is each row's AES-CTR keystream (odd and even widths)."""
    ids = pseudonymize(["alice", "bob", 17, "carol"], SECRET)
    key = mask_key(SECRET, RUN, "books", 3)
    for cols in (1, 6, 65):
        masks = row_masks(key, ids, cols)
        assert masks.dtype == np.uint64
        assert [[int(x) for x in row] for row in masks] == reference_masks(key, ids, cols)


def test_row_masks_batches_agree_with_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows cut into batches get the same words as in one batch."""
    from cdimf.common.security import masks as masks_module

    ids = pseudonymize(range(50), SECRET)
    key = mask_key(SECRET, RUN, "books", 0)
    whole = row_masks(key, ids, 5)
    monkeypatch.setattr(masks_module, "MASK_BATCH_ROWS", 7)
    np.testing.assert_array_equal(row_masks(key, ids, 5), whole)


def test_mask_keys_differ_per_domain_round_run_and_secret() -> None:
    """Every field of the tuple changes the key; length prefixes keep ('ab', 'c') apart from ('a', 'bc')."""
    keys = {
        mask_key(SECRET, RUN, "books", 1),
        mask_key(SECRET, RUN, "books", 2),
        mask_key(SECRET, RUN, "movies", 1),
        mask_key(SECRET, "run-8", "books", 1),
        mask_key(SECRET + b"x", RUN, "books", 1),
        mask_key(SECRET, "ab", "c", 0),
        mask_key(SECRET, "a", "bc", 0),
    }
    assert len(keys) == 7
    assert all(len(key) == 32 for key in keys)
    assert mask_key(SECRET, RUN, "books", 1) == mask_key(SECRET, RUN, "books", 1)
    with pytest.raises(ValueError, match="round"):
        mask_key(SECRET, RUN, "books", -1)
    with pytest.raises(ValueError, match="at least 16"):
        mask_key(b"short", RUN, "books", 0)


def test_masked_contribution_minus_masks_is_encoding_and_check() -> None:
    """A masked row minus its mask words is the fixed-point row, then sum_j r_j q_j mod 2^64 (Python ints)."""
    rng = np.random.default_rng(1)
    values = rng.standard_normal((6, 4)).astype(np.float32)
    ids = pseudonymize(range(6), SECRET)
    masked = mask_contribution(values, ids, SECRET, RUN, "books", 2)
    masks = reference_masks(mask_key(SECRET, RUN, "books", 2), ids, 5)
    coefficients = [int(x) for x in check_coefficients(SECRET, RUN, 4)]
    for row in range(6):
        plain = [(int(masked[row, col]) - masks[row][col]) % TWO_64 for col in range(5)]
        fixed = [round(float(v) * 2**32) % TWO_64 for v in values[row]]
        assert plain[:4] == fixed
        assert plain[4] == sum(r * q for r, q in zip(coefficients, fixed)) % TWO_64


def three_domains() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Three domains' contributions over 12 global users with partial overlap: (global rows, float32 values)."""
    rng = np.random.default_rng(3)
    rows = {"books": np.array([0, 1, 2, 3, 4, 5, 6]), "movies": np.array([2, 3, 4, 7, 8]), "music": np.array([4, 5, 8, 9, 10])}
    return {name: (held, rng.standard_normal((len(held), 3)).astype(np.float32)) for name, held in rows.items()}


def masked_sum_for(domains: dict[str, tuple[np.ndarray, np.ndarray]], ids: np.ndarray, rounds: dict[str, int]) -> np.ndarray:
    """What the aggregator computes: masked contributions ring-summed per global row (no secret used)."""
    masked = [(held, mask_contribution(values, ids[held], SECRET, RUN, name, rounds[name])) for name, (held, values) in domains.items()]
    return ring_sums(masked, len(ids), 4)


def test_unmask_sum_round_trip_over_three_domains() -> None:
    """A node pulling shared and receiver rows recovers each row's exact ring sum and its holder count."""
    domains = three_domains()
    ids = pseudonymize(range(12), SECRET)
    total = masked_sum_for(domains, ids, dict.fromkeys(domains, 5))
    # the movies node pulls its shared rows 2, 3, 4, 7, 8 and the receiver rows 0 and 9; row 11 nobody holds
    pulled = np.array([2, 3, 4, 7, 8, 0, 9, 11])
    names = ("books", "movies", "music")
    holder_masks = np.zeros(12, dtype=np.uint64)
    for bit, name in enumerate(names):
        holder_masks[domains[name][0]] |= np.uint64(1 << bit)
    contributors = [(name, 5) for name in names]
    holds = holders_of(holder_masks[pulled], names, contributors)
    sums, holders = unmask_sum(total[pulled], ids[pulled], contributors, holds, SECRET, RUN)
    expected = np.zeros((12, 3), dtype=object)
    count = np.zeros(12, dtype=int)
    for held, values in domains.values():
        for position, row in enumerate(held):
            expected[row] += [round(float(v) * 2**32) for v in values[position]]
            count[row] += 1
    assert [[int(x) for x in row] for row in sums] == [[int(v) % TWO_64 for v in expected[row]] for row in pulled]
    assert holders.tolist() == count[pulled].tolist() == [2, 2, 3, 1, 2, 1, 1, 0]
    # the callable form gives the same
    by_name = dict(zip(names, holds))
    sums_again, _ = unmask_sum(total[pulled], ids[pulled], contributors, lambda name: by_name[name], SECRET, RUN)
    np.testing.assert_array_equal(sums_again, sums)


@pytest.mark.parametrize(
    ("case", "contributors"),
    [
        ("wrong round", [("books", 5), ("movies", 4), ("music", 5)]),
        ("missing domain", [("books", 5), ("music", 5)]),
        ("extra domain", [("books", 5), ("movies", 5), ("music", 5), ("games", 5)]),
    ],
)
def test_wrong_contributor_list_is_refused(case: str, contributors: list[tuple[str, int]]) -> None:
    """Unmasking with a list that is not what was summed fails the check column on the affected rows."""
    domains = three_domains()
    domains_of_games = {"games": (np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]), np.zeros((10, 3), dtype=np.float32))}
    ids = pseudonymize(range(12), SECRET)
    total = masked_sum_for(domains, ids, dict.fromkeys(domains, 5))
    holds = {name: np.isin(np.arange(12), held) for name, (held, _) in {**domains, **domains_of_games}.items()}
    before = total.copy()
    with pytest.raises(MaskedSumMismatch, match=r"rows fail the integrity check; contributors") as error:
        unmask_sum(total, ids, contributors, lambda name: holds[name], SECRET, RUN)
    # every row the wrong entry touches fails: movies holds 5 rows, books 7, games 10
    affected = {"wrong round": 5, "missing domain": 5, "extra domain": 10}[case]
    assert str(error.value).startswith(f"{affected} of 12 rows")
    np.testing.assert_array_equal(total, before)


def test_flipped_value_or_check_is_refused() -> None:
    """One flipped bit in a value word or the check word of one row: that row fails."""
    domains = three_domains()
    ids = pseudonymize(range(12), SECRET)
    total = masked_sum_for(domains, ids, dict.fromkeys(domains, 5))
    holds = {name: np.isin(np.arange(12), held) for name, (held, _) in domains.items()}
    contributors = [(name, 5) for name in domains]
    for row, col, bit in [(4, 0, 0), (0, 2, 40), (8, 3, 63), (11, 1, 5)]:
        tampered = total.copy()
        tampered[row, col] ^= np.uint64(1 << bit)
        with pytest.raises(MaskedSumMismatch, match=r"^1 of 12 rows"):
            unmask_sum(tampered, ids, contributors, lambda name: holds[name], SECRET, RUN)


def test_adding_2_63_to_a_value_and_the_check_is_refused() -> None:
    """The one change a linear check mod 2^64 cannot see for odd coefficients (+2^63 to a value and to the check) is refused."""
    domains = three_domains()
    ids = pseudonymize(range(12), SECRET)
    total = masked_sum_for(domains, ids, dict.fromkeys(domains, 5))
    holds = {name: np.isin(np.arange(12), held) for name, (held, _) in domains.items()}
    coefficient = int(check_coefficients(SECRET, RUN, 3)[0])
    tampered = total.copy()
    tampered[2, 0] += np.uint64(2**63)
    # the forger's best guess; with an even coefficient the check would need no change
    tampered[2, 3] += np.uint64((coefficient * 2**63) % TWO_64)
    with pytest.raises(MaskedSumMismatch, match=r"^1 of 12 rows"):
        unmask_sum(tampered, ids, [(name, 5) for name in domains], lambda name: holds[name], SECRET, RUN)


def test_duplicate_domain_and_unexpected_round_are_refused() -> None:
    """A domain listed twice (even with the right content) and, when asked, another round's contribution are refused."""
    ids = pseudonymize(range(3), SECRET)
    values = np.ones((3, 2), dtype=np.float32)
    once = mask_contribution(values, ids, SECRET, RUN, "books", 1)
    twice = ring_sums([(np.arange(3), once), (np.arange(3), mask_contribution(values, ids, SECRET, RUN, "books", 0))], 3, 3)
    both = np.ones((2, 3), dtype=bool)
    with pytest.raises(MaskedSumMismatch, match="twice"):
        unmask_sum(twice, ids, [("books", 1), ("books", 0)], both, SECRET, RUN)
    with pytest.raises(MaskedSumMismatch, match="not of round 2"):
        unmask_sum(once, ids, [("books", 1)], both[:1], SECRET, RUN, expected_round=2)
    sums, _ = unmask_sum(once, ids, [("books", 1)], both[:1], SECRET, RUN, expected_round=1)
    np.testing.assert_array_equal(sums, encode_fixed(values))


def test_holders_of_reads_bits_and_refuses_unknown_domains() -> None:
    """Bit i of a holder mask is domains[i]; a contributor outside the federation is refused."""
    masks = np.array([0b101, 0b010, 0b111, 0], dtype=np.uint64)
    holds = holders_of(masks, ("a", "b", "c"), [("c", 0), ("a", 0)])
    assert holds.tolist() == [[True, False, True, False], [True, False, True, False]]
    assert holders_of(masks, ("a", "b", "c"), [("b", 3)]).tolist() == [[False, True, True, False]]
    with pytest.raises(MaskedSumMismatch, match="'z' is not a domain"):
        holders_of(masks, ("a", "b", "c"), [("z", 0)])


def chi_square_p(counts: np.ndarray) -> float:
    """Upper tail p-value of Pearson's chi-square for uniform counts (Wilson-Hilferty normal approximation)."""
    expected = counts.sum() / len(counts)
    statistic = float(((counts - expected) ** 2 / expected).sum())
    dof = len(counts) - 1
    z = ((statistic / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_masked_words_look_uniform_and_uncorrelated() -> None:
    """Masked bytes of a very non-uniform input (constant columns, small values) are uniform; words do not track values."""
    rng = np.random.default_rng(12345)
    n, rank = 4000, 8
    values = np.zeros((n, rank), dtype=np.float32)
    values[:, 0] = 1.0
    values[:, 1:] = rng.standard_normal((n, rank - 1)).astype(np.float32) * 0.01
    masked = mask_contribution(values, pseudonymize(range(n), SECRET), SECRET, RUN, "books", 0)
    counts = np.bincount(masked.view(np.uint8).reshape(-1), minlength=256)
    assert chi_square_p(counts) > 1e-4
    # the plaintext bytes themselves are far from uniform: the test could fail
    assert chi_square_p(np.bincount(encode_fixed(values).view(np.uint8).reshape(-1), minlength=256)) < 1e-10
    for col in range(1, rank):
        words = masked[:, col].view(np.int64).astype(np.float64)
        assert abs(np.corrcoef(words, values[:, col])[0, 1]) < 0.1


def test_sum_range_check_edges() -> None:
    """|sum| < h * 2^57 is accepted and 2^57 * h refused, at h = 1 and h = 64; a row nobody holds must sum to 0."""
    from cdimf.common.security.masks import _sum_bounds, _within_bound

    words = [2**57 - 1, 2**57, TWO_64 - (2**57 - 1), TWO_64 - 2**57, 2**63 - 1, 2**63, TWO_64 - (2**63 - 1), 0, 1]
    holders = np.array([1, 1, 1, 1, 64, 64, 64, 0, 0])
    sums = np.array(words, dtype=np.uint64)[:, None]
    assert _within_bound(sums, _sum_bounds(holders)).tolist() == [True, False, True, False, True, False, True, True, False]


def test_mask_contribution_names_the_row_of_a_bad_value_in_a_later_batch() -> None:
    """A NaN past the first batch of rows is reported at its row in the whole matrix."""
    values = np.zeros((9000, 2), dtype=np.float32)
    values[8500, 1] = np.nan
    with pytest.raises(ValueError, match=r"row 8500, col 1"):
        mask_contribution(values, pseudonymize(range(9000), SECRET), SECRET, RUN, "books", 0)


def test_no_contributor_accepts_only_zero_sums() -> None:
    """An empty contributor list: an all-zero sum decodes to zero sums and zero holders; anything else is refused."""
    ids = pseudonymize(range(4), SECRET)
    zero = np.zeros((4, 3), dtype=np.uint64)
    sums, holders = unmask_sum(zero, ids, [], lambda name: np.ones(4, dtype=bool), SECRET, RUN)
    assert sums.tolist() == [[0, 0]] * 4 and holders.tolist() == [0] * 4
    nonzero = zero.copy()
    nonzero[1, 0] = 7
    with pytest.raises(MaskedSumMismatch, match=r"^1 of 4 rows"):
        unmask_sum(nonzero, ids, [], np.zeros((0, 4), dtype=bool), SECRET, RUN)
