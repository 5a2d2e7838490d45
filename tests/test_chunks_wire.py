"""MatrixChunk straight from wire bytes (the pull path): same checks as parsed messages, payload read in place."""

import numpy as np
import pytest

from cdimf.common.wire.chunks import (
    ChunkError,
    MatrixAssembler,
    decode_matrix,
    encode_matrix,
    encode_matrix_serialized,
    matrix_checksum,
    split_matrix_chunk,
)
from cdimf.protos.v1 import federation_pb2 as pb

HEADER = pb.Header(run_id="run-1", domain="sport", round=3)


def _matrix(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


def _wire(rows: int = 40, cols: int = 5, dtype: str = "float32") -> list[bytes]:
    return [chunk.SerializeToString() for chunk in encode_matrix(_matrix(rows, cols), HEADER, dtype=dtype, chunk_bytes=cols * 4 * 10)]


def _assemble(messages: list[bytes], expected_rows: int | None = None) -> np.ndarray:
    assembler = MatrixAssembler("consensus", expected_rows=expected_rows)
    for message in messages:
        assembler.add_serialized(message)
    matrix, header = assembler.result()
    assert header == HEADER
    return matrix


def test_wire_bytes_assemble_exactly_like_parsed_messages() -> None:
    for dtype in ("float32", "float16"):
        messages = _wire(dtype=dtype)
        expected, _ = decode_matrix(pb.MatrixChunk.FromString(m) for m in messages)
        np.testing.assert_array_equal(_assemble(messages, expected_rows=40), expected)


def test_split_reads_the_payload_in_place_and_parses_the_other_fields() -> None:
    chunk = next(encode_matrix(_matrix(10, 3), HEADER, row_index=np.array([9, 0, 4])))
    message = chunk.SerializeToString()
    fields, payload = split_matrix_chunk(message)
    assert payload.obj is message  # a view into the received bytes, not a copy
    assert bytes(payload) == chunk.data
    assert fields.data == b""
    chunk.ClearField("data")
    assert fields == chunk


def test_fields_in_any_order_and_a_repeated_data_field_follow_protobuf() -> None:
    """Protobuf accepts fields in any order and keeps the last of a repeated bytes field."""
    chunk = next(encode_matrix(_matrix(4, 2), HEADER))
    data_only = pb.MatrixChunk(data=chunk.data).SerializeToString()
    rest = pb.MatrixChunk()
    rest.CopyFrom(chunk)
    rest.ClearField("data")
    decoy = pb.MatrixChunk(data=bytes(len(chunk.data))).SerializeToString()
    for message in (data_only + rest.SerializeToString(), decoy + rest.SerializeToString() + data_only):
        assert pb.MatrixChunk.FromString(message) == chunk
        np.testing.assert_array_equal(_assemble([message]), _matrix(4, 2))


def test_corrupted_payload_fails_the_checksum() -> None:
    messages = _wire()
    flipped = bytearray(messages[1])
    flipped[-3] ^= 0x10  # inside the payload, the message's last field
    messages[1] = bytes(flipped)
    with pytest.raises(ChunkError, match="chunk 1 checksum mismatch"):
        _assemble(messages)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_are_refused_with_their_row(bad: float) -> None:
    values = _matrix(40, 5)
    values[23, 2] = bad
    messages = [chunk.SerializeToString() for chunk in encode_matrix(values, HEADER, chunk_bytes=200)]
    with pytest.raises(ChunkError, match="chunk 2 holds NaN or Inf \\(first at row 23\\)"):
        _assemble(messages)


def test_bookkeeping_checks_apply_to_wire_bytes() -> None:
    messages = _wire()
    with pytest.raises(ChunkError, match="out of order or rows 10..19 are missing"):
        _assemble([messages[0], *messages[2:]])
    with pytest.raises(ChunkError, match="40 rows announced, expected 41"):
        _assemble(messages, expected_rows=41)
    short = pb.MatrixChunk.FromString(messages[0])
    short.data = short.data[:-4]
    short.checksum = matrix_checksum(short.data)
    with pytest.raises(ChunkError, match="chunk 0 holds 196 bytes"):
        _assemble([short.SerializeToString()])


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda m: m[:-5], "truncated"),
        (lambda m: m + b"\x0b", "wire type 3"),  # a group start: never in a MatrixChunk
        (lambda m: m + b"\x80" * 11, "varint"),
        (lambda m: b"\x0a\x03abc" + m, "not a MatrixChunk"),  # header field holding garbage
    ],
)
def test_malformed_wire_bytes_are_a_chunk_error(mangle, message: str) -> None:
    with pytest.raises(ChunkError, match=message):
        _assemble([mangle(_wire()[0])])


def test_row_index_out_of_range_is_refused_before_streaming() -> None:
    with pytest.raises(ChunkError, match="row_index selects rows 0..10 of a 10-row matrix"):
        next(encode_matrix(_matrix(10, 3), HEADER, row_index=np.array([0, 10])))
    with pytest.raises(ChunkError, match="row_index selects rows -1..2"):
        next(encode_matrix(_matrix(10, 3), HEADER, row_index=np.array([2, -1])))


def test_a_refused_last_chunk_leaves_no_result() -> None:
    """Float32 rows are copied in before their checks: a refused chunk must never surface in a result."""
    values = _matrix(20, 5)
    values[15, 0] = np.nan
    messages = [chunk.SerializeToString() for chunk in encode_matrix(values, HEADER, chunk_bytes=200)]
    assembler = MatrixAssembler("consensus", expected_rows=20)
    assembler.add_serialized(messages[0])
    with pytest.raises(ChunkError, match="NaN or Inf"):
        assembler.add_serialized(messages[1])
    with pytest.raises(ChunkError, match="refused, no matrix"):
        assembler.result()


@pytest.mark.parametrize(
    ("rows", "cols", "dtype", "row_index"),
    [
        (1000, 33, "float32", None),
        (0, 8, "float32", None),
        (300, 16, "float16", None),
        (50, 7, "float32", np.array([7, 3, 49, 0, 7])),
        (50, 7, "float16", np.arange(50)[::-1].copy()),
    ],
)
def test_serialised_encoding_is_byte_for_byte_the_messages_encoding(rows: int, cols: int, dtype: str, row_index: np.ndarray | None) -> None:
    matrix = _matrix(rows, cols)
    serialised = list(encode_matrix_serialized(matrix, HEADER, dtype=dtype, chunk_bytes=cols * 4 * 2, row_index=row_index))
    messages = [chunk.SerializeToString() for chunk in encode_matrix(matrix, HEADER, dtype=dtype, chunk_bytes=cols * 4 * 2, row_index=row_index)]
    assert serialised == messages
    assert len(messages) >= (1 if rows == 0 else 2)
    expected = matrix if row_index is None else matrix[row_index]
    np.testing.assert_allclose(_assemble(serialised), expected, rtol=1e-3 if dtype == "float16" else 0)


def test_a_1m_by_192_serialised_stream_stays_below_grpc_default_limit() -> None:
    """Each serialised chunk of a 768 MB matrix is below 4 MB (checked on a broadcast view, first chunks only)."""
    matrix = np.broadcast_to(np.float32(0.5), (1_000_000, 192))
    chunks = encode_matrix_serialized(matrix, HEADER)
    sizes = [len(next(chunks)) for _ in range(3)]
    assert max(sizes) < 4 * 1024 * 1024
    fields, payload = split_matrix_chunk(encode_matrix_serialized(matrix, HEADER).__next__())
    assert fields.total_rows == 1_000_000 and fields.cols == 192 and len(payload) == fields.rows * 192 * 4
