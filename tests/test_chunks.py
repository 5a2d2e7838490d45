"""The chunked matrix / registration / membership codec: round trips, limits and every rejection."""

import numpy as np
import pytest

from cdimf.common.wire.chunks import (
    CHUNK_BYTES,
    ChunkError,
    MembershipAssembler,
    RegistrationAssembler,
    decode_matrix,
    encode_matrix,
    encode_membership,
    encode_registration,
    matrix_checksum,
)
from cdimf.protos.v1 import federation_pb2 as pb

GRPC_DEFAULT_LIMIT = 4 * 1024 * 1024
HEADER = pb.Header(run_id="run-1", domain="sport", round=3)


def _matrix(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


def test_round_trip_float32_is_exact_and_keeps_the_header() -> None:
    matrix = _matrix(1000, 33)
    chunks = list(encode_matrix(matrix, HEADER, chunk_bytes=10_000))
    assert len(chunks) > 5
    assert all(chunk.header == HEADER for chunk in chunks)
    decoded, header = decode_matrix(chunks, expected_rows=1000, expected_cols=33)
    assert header == HEADER
    np.testing.assert_array_equal(decoded, matrix)
    assert decoded.dtype == np.float32


def test_float16_round_trip_is_close() -> None:
    matrix = _matrix(300, 16)
    decoded, _ = decode_matrix(encode_matrix(matrix, HEADER, dtype="float16"))
    np.testing.assert_allclose(decoded, matrix, rtol=1e-3, atol=1e-3)
    assert decoded.dtype == np.float32


def test_empty_matrix_still_sends_one_chunk() -> None:
    chunks = list(encode_matrix(np.zeros((0, 8), np.float32), HEADER))
    assert len(chunks) == 1
    decoded, _ = decode_matrix(chunks)
    assert decoded.shape == (0, 8)


def test_row_index_streams_a_selection() -> None:
    matrix = _matrix(50, 4)
    index = np.array([7, 3, 49, 0])
    decoded, _ = decode_matrix(encode_matrix(matrix, HEADER, row_index=index, chunk_bytes=20))
    np.testing.assert_array_equal(decoded, matrix[index])


def test_a_1m_by_192_matrix_crosses_in_chunks_below_grpc_default_limit() -> None:
    """Checked on the chunk sizes without materialising the 768 MB matrix: a broadcast view."""
    matrix = np.broadcast_to(np.float32(0.5), (1_000_000, 192))
    chunks = encode_matrix(matrix, HEADER)
    first = next(chunks)
    assert first.ByteSize() < GRPC_DEFAULT_LIMIT and len(first.data) <= CHUNK_BYTES
    expected_chunks = -(-1_000_000 // first.rows)
    count = 1 + sum(1 for chunk in chunks if chunk.ByteSize() < GRPC_DEFAULT_LIMIT)
    assert count == expected_chunks


def _chunks(rows: int = 40, cols: int = 5) -> list[pb.MatrixChunk]:
    return list(encode_matrix(_matrix(rows, cols), HEADER, chunk_bytes=cols * 4 * 10))


def _reencode(chunk: pb.MatrixChunk, values: np.ndarray) -> pb.MatrixChunk:
    data = values.astype("<f4").tobytes()
    changed = pb.MatrixChunk()
    changed.CopyFrom(chunk)
    changed.data = data
    changed.checksum = matrix_checksum(data)
    return changed


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c[:2] + c[3:], "out of order or rows 20..29 are missing"),
        (lambda c: [*c[:2], c[1], *c[2:]], "overlaps"),
        (lambda c: [c[1], c[0], *c[2:]], "overlaps|out of order"),
        (lambda c: c[:-1], "ended after 30 of 40 rows"),
        (lambda c: [], "empty stream"),
    ],
)
def test_missing_duplicate_and_reordered_chunks_are_rejected(mutate, message) -> None:
    with pytest.raises(ChunkError, match=message):
        decode_matrix(mutate(_chunks()))


def test_corrupted_payload_fails_the_checksum() -> None:
    chunks = _chunks()
    chunks[1].data = bytes([chunks[1].data[0] ^ 1]) + chunks[1].data[1:]
    with pytest.raises(ChunkError, match="chunk 1 checksum mismatch"):
        decode_matrix(chunks)


def test_payload_length_dtype_and_shape_are_checked() -> None:
    chunks = _chunks()
    chunks[0].data = chunks[0].data[:-4]
    chunks[0].checksum = matrix_checksum(chunks[0].data)
    with pytest.raises(ChunkError, match="holds 196 bytes"):
        decode_matrix(chunks)
    chunks = _chunks()
    chunks[0].dtype = 7
    with pytest.raises(ChunkError, match="unknown dtype"):
        decode_matrix(chunks)
    with pytest.raises(ChunkError, match="40 rows announced, expected 41"):
        decode_matrix(_chunks(), expected_rows=41)
    with pytest.raises(ChunkError, match="5 columns announced, expected 6"):
        decode_matrix(_chunks(), expected_cols=6)
    chunks = _chunks()
    chunks[2].total_rows = 50
    with pytest.raises(ChunkError, match="announces 50 rows"):
        decode_matrix(chunks)
    chunks = _chunks()
    chunks[3].rows = 20
    with pytest.raises(ChunkError, match="exceed the 40 announced"):
        decode_matrix(chunks)


def test_header_must_stay_the_same_across_chunks() -> None:
    chunks = _chunks()
    chunks[2].header.round = 4
    with pytest.raises(ChunkError, match="chunk 2 has header"):
        decode_matrix(chunks)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected_with_their_row(bad: float) -> None:
    chunks = _chunks()
    values = np.frombuffer(chunks[2].data, "<f4").reshape(10, 5).copy()
    values[4, 1] = bad
    chunks[2] = _reencode(chunks[2], values)
    with pytest.raises(ChunkError, match="NaN or Inf \\(first at row 24\\)"):
        decode_matrix(chunks)


def test_large_finite_values_whose_sum_overflows_are_accepted() -> None:
    matrix = np.full((4, 4), 3e38, dtype=np.float32)
    decoded, _ = decode_matrix(encode_matrix(matrix, HEADER))
    np.testing.assert_array_equal(decoded, matrix)


def test_registration_round_trip_and_rejections() -> None:
    rng = np.random.default_rng(1)
    digests = rng.integers(0, 256, (1000, 32), dtype=np.uint8)
    holder = rng.random(1000) < 0.7
    chunks = list(encode_registration(digests, holder, HEADER, chunk_bytes=33 * 100))
    assert len(chunks) == 10
    assembler = RegistrationAssembler()
    for chunk in chunks:
        assembler.add(chunk)
    got_digests, got_holder, header = assembler.result()
    np.testing.assert_array_equal(got_digests, digests)
    np.testing.assert_array_equal(got_holder, holder)
    assert header == HEADER
    chunks[3].holder_flags = b"\x02" + chunks[3].holder_flags[1:]
    bad = RegistrationAssembler()
    with pytest.raises(ChunkError, match="chunk 3 checksum"):
        for chunk in chunks:
            bad.add(chunk)
    with pytest.raises(ChunkError, match="shape"):
        list(encode_registration(digests[:, :16], holder))


def test_membership_round_trip() -> None:
    roles = np.array([1, 2, 3, 2, 1], dtype=np.uint8)
    masks = np.array([1, 3, 2, 3, 1], dtype=np.uint64)
    assembler = MembershipAssembler(expected_rows=5)
    for chunk in encode_membership(roles, masks, ["a", "b"], HEADER, chunk_bytes=18):
        assembler.add(chunk)
    got_roles, got_masks, domains = assembler.result()
    np.testing.assert_array_equal(got_roles, roles)
    np.testing.assert_array_equal(got_masks, masks)
    assert domains == ["a", "b"]


def test_checksum_detects_changed_swapped_and_shifted_words() -> None:
    data = _matrix(64, 3).tobytes()  # 768 bytes: 96 words
    base = matrix_checksum(data)
    words = np.frombuffer(data, "<u8").copy()
    flipped = words.copy()
    flipped[17] ^= np.uint64(1 << 40)
    swapped = words.copy()
    swapped[[3, 50]] = swapped[[50, 3]]
    shifted = np.roll(words, 1)
    for changed in (flipped, swapped, shifted):
        assert matrix_checksum(changed.tobytes()) != base
    odd = data[:-4]  # not a multiple of 8 bytes: the tail word counts too
    assert matrix_checksum(odd) != matrix_checksum(odd[:-4] + bytes([odd[-4] ^ 1]) + odd[-3:])
    # the definition, spelled out with Python integers on a short input
    sample = bytes(range(20))
    keys = []
    for i in range(3):
        x = ((i + 1) * 0x9E3779B97F4A7C15) & (2**64 - 1)
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
        keys.append((x ^ (x >> 31)) | 1)
    padded = sample + bytes(4)
    expected = sum(k * int.from_bytes(padded[8 * i : 8 * i + 8], "little") for i, k in enumerate(keys)) % 2**64
    assert matrix_checksum(sample) == expected
