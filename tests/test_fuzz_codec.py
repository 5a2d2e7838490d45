"""Property-based fuzzing of the chunk codec: arbitrary input is refused with ChunkError only, valid matrices round-trip exactly.

Example counts are small for CI; FUZZ_EXAMPLES raises them (scripts/fuzz_soak.py does).
"""

import os

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cdimf.common.wire.chunks import (
    PSEUDONYM_BYTES,
    ChunkError,
    MatrixAssembler,
    MembershipAssembler,
    RegistrationAssembler,
    decode_matrix,
    encode_matrix,
    encode_matrix_serialized,
    encode_membership,
    encode_registration,
    split_matrix_chunk,
)
from cdimf.protos.v1 import federation_pb2 as pb
from tests.fuzz_tally import count
from tests.proto_strategies import messages, near

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))
# CI draws the same examples every run (derandomize); a budget set by FUZZ_EXAMPLES draws fresh ones
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize="FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow])
# the assemblers allocate the announced shape: a fuzzed announcement must not ask for gigabytes
MAX_ELEMENTS = 1 << 16
HEADER = pb.Header(run_id="run-1", domain="sport", round=3)

matrices = st.integers(1, 24).flatmap(
    lambda cols: hnp.arrays(np.float32, st.tuples(st.integers(0, 60), st.just(cols)),
                            elements=st.floats(width=32, allow_nan=False, allow_infinity=False)))
chunk_sizes = st.integers(1, 2000)


def _only_chunk_errors(feed: list[object], add, result, kind: str) -> None:  # type: ignore[no-untyped-def]
    """Feed every item; anything but ChunkError escapes and fails the property."""
    try:
        for item in feed:
            add(item)
        result()
    except ChunkError:
        count(kind, "refused")
        return
    count(kind, "accepted")


@FUZZ
@given(st.binary(max_size=400))
def test_split_matrix_chunk_of_arbitrary_bytes_raises_only_chunk_error(raw: bytes) -> None:
    """The zero-copy parser of a MatrixChunk's wire bytes: parsed, or ChunkError."""
    try:
        fields, payload = split_matrix_chunk(raw)
    except ChunkError:
        count("codec: one chunk of raw bytes", "refused")
        return
    count("codec: one chunk of raw bytes", "accepted")
    # what it did parse is what protobuf parses (the payload is the last data field's bytes)
    whole = pb.MatrixChunk.FromString(raw)
    assert bytes(payload) == whole.data and fields.total_rows == whole.total_rows and fields.header == whole.header


@FUZZ
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=4), st.sampled_from([None, 3]), st.sampled_from([None, 2]))
def test_a_stream_of_arbitrary_bytes_raises_only_chunk_error(stream: list[bytes], rows: int | None, cols: int | None) -> None:
    """MatrixAssembler.add_serialized, as the aggregator runs it on every push."""
    assembler = MatrixAssembler("fuzz", expected_rows=rows, expected_cols=cols, max_elements=MAX_ELEMENTS)
    _only_chunk_errors(stream, assembler.add_serialized, assembler.result, "codec: matrix stream of raw bytes")  # type: ignore[arg-type]


@FUZZ
@given(st.lists(messages(pb.MatrixChunk), min_size=1, max_size=3))
def test_arbitrary_matrix_chunk_fields_raise_only_chunk_error(chunks: list[pb.MatrixChunk]) -> None:
    """Every field of MatrixChunk drawn over its whole range (both assembler entries)."""
    parsed = MatrixAssembler("fuzz", max_elements=MAX_ELEMENTS)
    _only_chunk_errors(chunks, parsed.add, parsed.result, "codec: matrix chunks, any fields")  # type: ignore[arg-type]
    serialized = MatrixAssembler("fuzz", max_elements=MAX_ELEMENTS)
    _only_chunk_errors([chunk.SerializeToString() for chunk in chunks], serialized.add_serialized, serialized.result,
                       "codec: matrix chunks, any fields, as wire bytes")  # type: ignore[arg-type]


@FUZZ
@given(st.data())
def test_a_valid_stream_with_fields_changed_is_refused_or_still_exact(data: st.DataObject) -> None:
    """A real 2-chunk stream with up to three fields of one chunk replaced: ChunkError, or the decoded
    matrix is the original (a change the codec accepts must not change a value)."""
    matrix = np.arange(12, dtype=np.float32).reshape(4, 3) / 7
    chunks = list(encode_matrix(matrix, HEADER, chunk_bytes=24))
    assert len(chunks) == 2
    at = data.draw(st.integers(0, 1))
    chunks[at] = data.draw(near(chunks[at]))
    try:
        decoded, header = decode_matrix(chunks, expected_rows=4, expected_cols=3)
    except ChunkError:
        count("codec: valid stream, fields replaced", "refused")
        return
    count("codec: valid stream, fields replaced", "accepted")
    np.testing.assert_array_equal(decoded, matrix)
    assert header == chunks[0].header


@FUZZ
@given(matrices, chunk_sizes, st.booleans())
def test_every_valid_float32_matrix_round_trips_exactly(matrix: np.ndarray, chunk_bytes: int, with_index: bool) -> None:
    """Both encoders, both decoder entries: the same bits back (0 rows, one column, -0.0, subnormals included)."""
    index = np.arange(len(matrix))[::-1].copy() if with_index else None
    expected = matrix if index is None else matrix[index]
    chunks = list(encode_matrix(matrix, HEADER, chunk_bytes=chunk_bytes, row_index=index))
    wire = list(encode_matrix_serialized(matrix, HEADER, chunk_bytes=chunk_bytes, row_index=index))
    assert [bytes(part) for part in wire] == [chunk.SerializeToString() for chunk in chunks]
    decoded, header = decode_matrix(chunks, expected_rows=len(expected), expected_cols=matrix.shape[1])
    assert header == HEADER and decoded.dtype == np.float32
    assert decoded.tobytes() == expected.tobytes()
    assembler = MatrixAssembler("wire", expected_rows=len(expected), expected_cols=matrix.shape[1])
    for part in wire:
        assembler.add_serialized(bytes(part))
    assert assembler.result()[0].tobytes() == expected.tobytes()


@FUZZ
@given(matrices, chunk_sizes)
def test_float16_round_trips_as_numpy_rounds_or_is_refused_beyond_its_range(matrix: np.ndarray, chunk_bytes: int) -> None:
    """float16 on the wire: the decoded matrix is numpy's float16 rounding; values that overflow to inf are refused."""
    with np.errstate(over="ignore"):  # values beyond float16's range become inf on purpose
        rounded = matrix.astype(np.float16)
        chunks = list(encode_matrix(matrix, HEADER, dtype="float16", chunk_bytes=chunk_bytes))
    if not np.isfinite(rounded).all():
        try:
            decode_matrix(chunks)
        except ChunkError as error:
            assert "NaN or Inf" in str(error)
            return
        raise AssertionError("an overflowing float16 stream was accepted")
    decoded, _ = decode_matrix(chunks)
    assert decoded.tobytes() == rounded.astype(np.float32).tobytes()


@FUZZ
@given(st.lists(messages(pb.PseudonymChunk), min_size=1, max_size=3))
def test_arbitrary_registration_chunks_raise_only_chunk_error(chunks: list[pb.PseudonymChunk]) -> None:
    """The registration assembler on every field drawn."""
    assembler = RegistrationAssembler(max_rows=MAX_ELEMENTS)
    _only_chunk_errors(chunks, assembler.add, assembler.result, "codec: registration chunks, any fields")  # type: ignore[arg-type]


@FUZZ
@given(st.lists(messages(pb.MembershipChunk), min_size=1, max_size=3))
def test_arbitrary_membership_chunks_raise_only_chunk_error(chunks: list[pb.MembershipChunk]) -> None:
    """The membership assembler (what a node decodes from the aggregator) on every field drawn."""
    assembler = MembershipAssembler()
    _only_chunk_errors(chunks, assembler.add, assembler.result, "codec: membership chunks, any fields")  # type: ignore[arg-type]


@FUZZ
@given(st.integers(0, 80).flatmap(lambda n: st.tuples(
    hnp.arrays(np.uint8, (n, PSEUDONYM_BYTES)), hnp.arrays(np.bool_, (n,)),
    hnp.arrays(np.uint8, (n,), elements=st.sampled_from([1, 2, 3])), hnp.arrays(np.uint64, (n,)))), chunk_sizes)
def test_registrations_and_memberships_round_trip(values: tuple[np.ndarray, ...], chunk_bytes: int) -> None:
    """Pseudonyms with holder flags, and roles with holder masks: the same arrays back."""
    pseudonyms, holder, roles, masks = values
    registration = RegistrationAssembler()
    for chunk in encode_registration(pseudonyms, holder, HEADER, chunk_bytes=chunk_bytes):
        registration.add(chunk)
    got_pseudonyms, got_holder, header = registration.result()
    assert header == HEADER
    np.testing.assert_array_equal(got_pseudonyms, pseudonyms)
    np.testing.assert_array_equal(got_holder, holder)
    membership = MembershipAssembler(expected_rows=len(roles))
    for chunk in encode_membership(roles, masks, ["sport", "cloth"], HEADER, chunk_bytes=chunk_bytes):
        membership.add(chunk)
    got_roles, got_masks, domains = membership.result()
    np.testing.assert_array_equal(got_roles, roles)
    np.testing.assert_array_equal(got_masks, masks)
    assert domains == ["sport", "cloth"]
