"""Codec between numpy arrays and the chunked streams of the federation protocol.

A matrix travels as MatrixChunk messages, each a slice of whole rows of raw little-endian
float32 (or float16; or uint64 ring elements in a secure run, DTYPE_RING64) with the total shape, its row offset, its row count, dtype and a 64-bit
checksum of its bytes (matrix_checksum: a multilinear hash, 4-5x cheaper than zlib's crc32, which
cost a third of the exchange throughput on both ends). Registrations (pseudonyms + holder flags) and memberships (roles + holder masks)
travel the same way. Decoders check every chunk as it arrives and raise ChunkError with a
message that says what was wrong; servers map it to INVALID_ARGUMENT.
"""

import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
from google.protobuf.message import DecodeError

from cdimf.common.security.names import shown
from cdimf.protos.v1 import federation_pb2 as pb

# Payload per chunk: far below gRPC's 4 MB default message limit, large enough that the
# per-message overhead is amortised.
CHUNK_BYTES = 1 << 20
PSEUDONYM_BYTES = 32
# Refuse to allocate more than this many matrix elements for a stream nobody announced.
DEFAULT_MAX_ELEMENTS = 1 << 31

_DTYPES: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_RING64: np.dtype("<u8"),
}
_DTYPE_BY_NAME = {"float32": pb.DTYPE_FLOAT32, "float16": pb.DTYPE_FLOAT16, "ring64": pb.DTYPE_RING64}


_MASK64 = (1 << 64) - 1
_checksum_keys = np.zeros(0, dtype=np.uint64)


def _keys(count: int) -> np.ndarray:
    """K_i = splitmix64(i + 1) | 1 for i < count (odd, so every word position is invertible)."""
    global _checksum_keys
    if len(_checksum_keys) < count:
        grown = max(count, 2 * len(_checksum_keys), 1 << 17)
        x = (np.arange(grown, dtype=np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        _checksum_keys = (x ^ (x >> np.uint64(31))) | np.uint64(1)
    return _checksum_keys[:count]


def matrix_checksum(data: bytes | memoryview | np.ndarray) -> int:
    """sum_i K_i * w_i mod 2^64 over the little-endian uint64 words w of data (last one zero-padded).

    Any change of one word changes it (K_i is odd); swapped or shifted words change it except
    with negligible probability. `data` is any C-contiguous buffer (bytes, a memoryview into a
    received message, an array), read in place.
    """
    raw = data.reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    words = len(raw) // 8
    keys = _keys(words + 1)
    # a uint64 dot wraps modulo 2^64, which is the definition; unlike multiply-then-sum it makes
    # no temporary product array (one pass instead of three over the chunk)
    total = int(np.dot(raw[: 8 * words].view("<u8"), keys[:words]))
    tail = raw[8 * words :]
    if len(tail):
        total += int(keys[words]) * int.from_bytes(tail.tobytes().ljust(8, b"\0"), "little")
    return total & _MASK64


class ChunkError(ValueError):
    """A chunked stream is malformed: missing, overlapping or out-of-order chunks, bad shape or values."""


def wire_dtype(name: str | int) -> pb.DType.ValueType:
    """The proto DType for 'float32'/'float16'/'ring64' (or a DType value, DTYPE_UNSPECIFIED = float32)."""
    if isinstance(name, int):
        if name == pb.DTYPE_UNSPECIFIED:
            return pb.DTYPE_FLOAT32
        if name not in _DTYPES:
            raise ChunkError(f"unknown dtype value {name}")
        return pb.DType.ValueType(name)
    if name not in _DTYPE_BY_NAME:
        raise ChunkError(f"unknown dtype {name!r}, expected one of {sorted(_DTYPE_BY_NAME)}")
    return _DTYPE_BY_NAME[name]


def rows_per_chunk(row_bytes: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Whole rows that fit one chunk's payload (at least one)."""
    return max(1, chunk_bytes // max(1, row_bytes))


def _slices(total: int, step: int) -> Iterator[tuple[int, int]]:
    """(offset, rows) of consecutive slices covering `total` rows; one empty slice when total is 0."""
    if total == 0:
        yield 0, 0
        return
    for offset in range(0, total, step):
        yield offset, min(step, total - offset)


def _copy_header(header: pb.Header | None) -> pb.Header | None:
    return None if header is None else pb.Header(run_id=header.run_id, domain=header.domain, round=header.round)


def _matrix_blocks(
    matrix: np.ndarray, header: pb.Header | None, dtype: str | int, chunk_bytes: int, row_index: np.ndarray | None
) -> Iterator[tuple[pb.MatrixChunk, np.ndarray]]:
    """Per chunk: its message without data, and its rows as a C-contiguous little-endian array of the wire dtype.

    A gathered block lives in a buffer reused by the next chunk: use it before advancing.
    """
    if matrix.ndim != 2:
        raise ChunkError(f"expected a 2-D matrix, got shape {matrix.shape}")
    code = wire_dtype(dtype)
    item = _DTYPES[code]
    if (code == pb.DTYPE_RING64) != (matrix.dtype == np.uint64):
        # a float cast to ring elements (or back) would be silent garbage on the other side
        raise ChunkError(f"a {matrix.dtype} matrix cannot be sent as {pb.DType.Name(code)}: ring64 is for uint64 matrices only")
    total_rows, cols = matrix.shape
    if row_index is not None:
        total_rows = len(row_index)
    if cols < 1:
        raise ChunkError(f"a matrix needs >= 1 column, got shape {matrix.shape}")
    step = rows_per_chunk(cols * item.itemsize, chunk_bytes)
    # gathering into one reused buffer is ~4x faster than fancy indexing, which page-faults a
    # fresh array for every chunk
    gathered = None if row_index is None else np.empty((min(step, total_rows), cols), dtype=matrix.dtype)
    if row_index is not None and len(row_index) and (row_index.min() < 0 or row_index.max() >= len(matrix)):
        raise ChunkError(f"row_index selects rows {row_index.min()}..{row_index.max()} of a {len(matrix)}-row matrix")
    for offset, rows in _slices(total_rows, step):
        if gathered is None or row_index is None:
            block = matrix[offset : offset + rows]
        else:
            # bounds were checked once above; take's default mode="raise" would gather into a
            # temporary and copy it back into `out` (two extra passes over every chunk)
            block = np.take(matrix, row_index[offset : offset + rows], axis=0, out=gathered[:rows], mode="clip")
        block = np.ascontiguousarray(block, dtype=item)
        fields = pb.MatrixChunk(
            header=_copy_header(header),
            total_rows=total_rows,
            cols=cols,
            row_offset=offset,
            rows=rows,
            dtype=code,
            checksum=matrix_checksum(block),
        )
        yield fields, block


def encode_matrix(
    matrix: np.ndarray,
    header: pb.Header | None = None,
    dtype: str | int = "float32",
    chunk_bytes: int = CHUNK_BYTES,
    row_index: np.ndarray | None = None,
    contributors: Sequence[tuple[str, int]] = (),
) -> Iterator[pb.MatrixChunk]:
    """Yield the chunks of a 2-D float matrix (at least one chunk, even for 0 rows).

    Every chunk carries `header`. Values are sent as little-endian float32, or float16 when
    asked (lossy; values beyond float16's range become inf and are refused by the decoder).
    With `row_index`, the streamed matrix is matrix[row_index], gathered chunk by chunk so the
    whole selection is never copied at once. The aggregator and the node send
    `encode_matrix_serialized` instead (the same bytes, fewer copies); this form is the reference
    it is checked against and what callers that edit messages (tests of bad input) start from.
    `contributors` go on the first chunk.
    """
    for fields, block in _matrix_blocks(matrix, header, dtype, chunk_bytes, row_index):
        fields.data = block.tobytes()
        if fields.row_offset == 0:
            fields.contributors.extend(pb.Contributor(domain=domain, round=tag) for domain, tag in contributors)
        yield fields


# key of field `data` (number 8, length-delimited): the last field of a serialised MatrixChunk
_DATA_KEY = bytes([pb.MatrixChunk.DESCRIPTOR.fields_by_name["data"].number << 3 | 2])


def _varint_bytes(value: int) -> bytes:
    """The base-128 varint encoding of a non-negative integer."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_matrix_serialized(
    matrix: np.ndarray, header: pb.Header | None = None, *, dtype: str | int = "float32", row_index: np.ndarray | None = None,
    chunk_bytes: int = CHUNK_BYTES, contributors: Sequence[tuple[str, int]] = (),
) -> Iterator[bytes]:
    """encode_matrix's chunks already serialised, byte for byte what SerializeToString would give.

    For a stream registered without a response serializer: the payload is copied once, from
    the rows into the message, where a MatrixChunk copies it into the message, into the
    encoder's buffer and out again (three copies of every megabyte). `contributors` go on the
    first chunk (a pulled consensus: the contributions its round used).
    """
    for fields, block in _matrix_blocks(matrix, header, dtype, chunk_bytes, row_index):
        # protobuf writes fields in number order: the small fields before data (8), then data's
        # key, length and bytes, then the contributors (9) of the first chunk, is the whole
        # message's encoding (proto3 leaves an empty data field out)
        tail = contributors_serialized(contributors) if fields.row_offset == 0 else b""
        if block.nbytes == 0:
            yield fields.SerializeToString() + tail
        else:
            yield b"".join((fields.SerializeToString(), _DATA_KEY, _varint_bytes(block.nbytes), block.reshape(-1).view(np.uint8).data, tail))


def contributors_serialized(contributors: Sequence[tuple[str, int]]) -> bytes:
    """The encoding of a MatrixChunk's contributors field alone (appended to a chunk, it sets the field)."""
    if not contributors:
        return b""
    return pb.MatrixChunk(contributors=[pb.Contributor(domain=domain, round=tag) for domain, tag in contributors]).SerializeToString()


class _RowStream:
    """Checks the row bookkeeping of a chunked stream: same totals, contiguous in-order slices."""

    def __init__(self, what: str, expected_rows: int | None) -> None:
        self.what = what
        self.expected_rows = expected_rows
        self.total_rows: int | None = None
        self.next_row = 0
        self.chunks = 0
        self.header: pb.Header | None = None

    def admit(self, header: pb.Header, total_rows: int, row_offset: int, rows: int) -> None:
        """Validate one chunk's place in the stream, before its payload is looked at."""
        index = self.chunks
        if self.total_rows is None:
            if self.expected_rows is not None and total_rows != self.expected_rows:
                raise ChunkError(f"{self.what}: {total_rows} rows announced, expected {self.expected_rows}")
            self.total_rows = total_rows
            self.header = _copy_header(header)
        elif total_rows != self.total_rows:
            raise ChunkError(f"{self.what}: chunk {index} announces {total_rows} rows, earlier chunks {self.total_rows}")
        elif header != self.header:
            raise ChunkError(f"{self.what}: chunk {index} has header {_show(header)}, earlier chunks {_show(self.header)}")
        if row_offset < self.next_row:
            raise ChunkError(f"{self.what}: chunk {index} at row {row_offset} overlaps rows already received (< {self.next_row})")
        if row_offset > self.next_row:
            raise ChunkError(f"{self.what}: chunk {index} at row {row_offset} is out of order or rows {self.next_row}..{row_offset - 1} are missing")
        if rows == 0 and total_rows > 0:
            raise ChunkError(f"{self.what}: chunk {index} is empty")
        if row_offset + rows > total_rows:
            raise ChunkError(f"{self.what}: chunk {index} rows {row_offset}..{row_offset + rows - 1} exceed the {total_rows} announced")
        self.next_row = row_offset + rows
        self.chunks += 1

    def finish(self) -> pb.Header:
        """Check that the stream was complete; returns its header."""
        if self.total_rows is None or self.header is None:
            raise ChunkError(f"{self.what}: empty stream, no chunk received")
        if self.next_row != self.total_rows:
            raise ChunkError(f"{self.what}: stream ended after {self.next_row} of {self.total_rows} rows")
        return self.header


def _show(header: pb.Header | None) -> str:
    if header is None:
        return "none"
    return f"(run_id={shown(header.run_id)}, domain={shown(header.domain)}, round={header.round})"


def _check_sum(what: str, index: int, actual: int, expected: int) -> None:
    if actual != expected:
        raise ChunkError(f"{what}: chunk {index} checksum mismatch (computed {actual:#x}, announced {expected:#x})")


_WIRE_VARINT, _WIRE_FIXED64, _WIRE_LEN, _WIRE_FIXED32 = 0, 1, 2, 5
_DATA_FIELD = pb.MatrixChunk.DESCRIPTOR.fields_by_name["data"].number


def _varint(message: bytes, position: int, what: str) -> tuple[int, int]:
    """(value, position after it) of the base-128 varint at `position`."""
    value = shift = 0
    while shift < 70:
        if position >= len(message):
            raise ChunkError(f"{what}: message truncated inside a varint")
        byte = message[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
    raise ChunkError(f"{what}: varint longer than 10 bytes")


def split_matrix_chunk(message: bytes, what: str = "matrix chunk") -> tuple[pb.MatrixChunk, memoryview]:
    """Parse a serialised MatrixChunk without copying its payload: (every field but data, a view of data).

    Walks the top-level fields (about ten per chunk) to find the last `data` field, as protobuf
    would keep it, and parses the rest, the small fields, with protobuf itself. Parsing the whole
    message and reading `.data` copies the megabyte payload twice (into the message, then out).
    """
    position, span = 0, None
    while position < len(message):
        start = position
        key, position = _varint(message, position, what)
        wire_type = key & 7
        if wire_type == _WIRE_VARINT:
            _, position = _varint(message, position, what)
        elif wire_type == _WIRE_FIXED64:
            position += 8
        elif wire_type == _WIRE_FIXED32:
            position += 4
        elif wire_type == _WIRE_LEN:
            length, position = _varint(message, position, what)
            if key >> 3 == _DATA_FIELD:
                span = (start, position, position + length)
            position += length
        else:
            raise ChunkError(f"{what}: unsupported protobuf wire type {wire_type} at byte {start}")
        if position > len(message):
            raise ChunkError(f"{what}: message truncated (a field ends at byte {position} of {len(message)})")
    view = memoryview(message)
    if span is None:
        rest, payload = message, view[:0]
    else:
        rest, payload = message[: span[0]] + message[span[2] :], view[span[1] : span[2]]
    try:
        fields = pb.MatrixChunk.FromString(rest)
    except DecodeError as error:
        raise ChunkError(f"{what}: not a MatrixChunk ({error})") from error
    return fields, payload


class MatrixAssembler:
    """Assembles MatrixChunk messages into one float32 matrix, checking each chunk on arrival.

    expected_rows/expected_cols (when given) must match the announced shape; the output array is
    allocated once from the first chunk, so memory stays at one matrix plus one chunk. Chunks
    come as parsed messages (`add`) or as their wire bytes (`add_serialized`, which reads the
    payload in place instead of copying it out of a parsed message twice).
    """

    def __init__(
        self,
        what: str = "matrix",
        expected_rows: int | None = None,
        expected_cols: int | None = None,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
    ) -> None:
        self.stream = _RowStream(what, expected_rows)
        self.what = what
        self.expected_cols = expected_cols
        self.max_elements = max_elements
        self.matrix: np.ndarray | None = None
        self.dtype: int | None = None
        # the first chunk's contributors (a pulled consensus): (domain, round tag) in its order
        self.contributors: tuple[tuple[str, int], ...] = ()
        # set by the first refused chunk: the matrix may hold its rows, so no result is given
        self.refused = False

    def add(self, chunk: pb.MatrixChunk) -> None:
        """Check one chunk and copy its rows into place; after a refusal the stream is over."""
        try:
            # every read of a bytes field copies it out of the message (upb): read it once
            self._check_and_copy(chunk, chunk.data)
        except ChunkError:
            self.refused = True
            raise

    def add_serialized(self, message: bytes) -> None:
        """Check one chunk given as its serialised MatrixChunk and copy its rows into place (as add)."""
        try:
            fields, payload = split_matrix_chunk(message, f"{self.what}: chunk {self.stream.chunks}")
            self._check_and_copy(fields, payload)
        except ChunkError:
            self.refused = True
            raise

    def _check_and_copy(self, chunk: pb.MatrixChunk, data: bytes | memoryview) -> None:
        """Check a chunk's fields and its payload `data` (never read from chunk.data), copying its rows into place."""
        what, index = self.what, self.stream.chunks
        if chunk.dtype not in _DTYPES:
            raise ChunkError(f"{what}: chunk {index} has unknown dtype {chunk.dtype}")
        if self.matrix is None:
            if chunk.cols < 1:
                raise ChunkError(f"{what}: chunk 0 announces {chunk.cols} columns, need >= 1")
            if self.expected_cols is not None and chunk.cols != self.expected_cols:
                raise ChunkError(f"{what}: {chunk.cols} columns announced, expected {self.expected_cols}")
            if chunk.total_rows * chunk.cols > self.max_elements:
                raise ChunkError(f"{what}: shape ({chunk.total_rows}, {chunk.cols}) exceeds {self.max_elements} elements")
        elif chunk.cols != self.matrix.shape[1] or chunk.dtype != self.dtype:
            raise ChunkError(f"{what}: chunk {index} changes columns or dtype mid-stream")
        self.stream.admit(chunk.header, chunk.total_rows, chunk.row_offset, chunk.rows)
        item = _DTYPES[chunk.dtype]
        expected_bytes = chunk.rows * chunk.cols * item.itemsize
        if len(data) != expected_bytes:
            raise ChunkError(f"{what}: chunk {index} holds {len(data)} bytes, {chunk.rows} x {chunk.cols} {item.name} need {expected_bytes}")
        if self.matrix is None:
            # floats decode to float32; ring elements stay uint64 (nothing to check but the sum)
            self.matrix = np.empty((chunk.total_rows, chunk.cols), dtype=np.uint64 if chunk.dtype == pb.DTYPE_RING64 else np.float32)
            self.dtype = chunk.dtype
            self.contributors = tuple((entry.domain, entry.round) for entry in chunk.contributors)
        elif len(chunk.contributors):
            raise ChunkError(f"{what}: chunk {index} carries contributors; only the first chunk may")
        block = np.frombuffer(data, dtype=item).reshape(chunk.rows, chunk.cols)
        target = self.matrix[chunk.row_offset : chunk.row_offset + chunk.rows]
        if item == target.dtype:
            # float32 is checked after it is copied into place: a payload inside a received
            # message is seldom 8-byte aligned, and numpy copies unaligned input into buffers
            # for the dot and isfinite; the rows in place are aligned and still in cache. A
            # refused chunk leaves its rows in a matrix that result() never returns.
            target[...] = block
            checked: np.ndarray | bytes | memoryview = target
            values = target
        else:
            checked, values = data, block
        _check_sum(what, index, matrix_checksum(checked), chunk.checksum)
        # isfinite + all on a chunk still in cache is ~2x cheaper than a float32 sum, and cannot
        # be fooled by finite values whose sum overflows
        if chunk.dtype != pb.DTYPE_RING64 and not np.isfinite(values).all():
            bad = int(np.flatnonzero(~np.isfinite(values).all(axis=1))[0]) + chunk.row_offset
            raise ChunkError(f"{what}: chunk {index} holds NaN or Inf (first at row {bad})")
        if values is block:
            target[...] = block

    def result(self) -> tuple[np.ndarray, pb.Header]:
        """The complete matrix and the stream's header; raises if rows are missing or a chunk was refused."""
        if self.refused:
            raise ChunkError(f"{self.what}: a chunk of the stream was refused, no matrix")
        header = self.stream.finish()
        assert self.matrix is not None
        return self.matrix, header


def decode_matrix(
    chunks: Iterable[pb.MatrixChunk],
    what: str = "matrix",
    expected_rows: int | None = None,
    expected_cols: int | None = None,
) -> tuple[np.ndarray, pb.Header]:
    """Assemble a whole chunk stream (see MatrixAssembler)."""
    assembler = MatrixAssembler(what, expected_rows, expected_cols)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.result()


def encode_registration(
    pseudonyms: np.ndarray, holder: np.ndarray, header: pb.Header | None = None, chunk_bytes: int = CHUNK_BYTES,
    cold_start: pb.ColdStartPolicy | None = None,
) -> Iterator[pb.PseudonymChunk]:
    """Yield PseudonymChunk messages for a domain's rows: (n, 32) uint8 digests and n holder flags (the policy on the first)."""
    pseudonyms = np.ascontiguousarray(pseudonyms, dtype=np.uint8)
    holder = np.asarray(holder, dtype=bool)
    if pseudonyms.ndim != 2 or pseudonyms.shape[1] != PSEUDONYM_BYTES:
        raise ChunkError(f"pseudonyms must have shape (n, {PSEUDONYM_BYTES}), got {pseudonyms.shape}")
    if holder.shape != (len(pseudonyms),):
        raise ChunkError(f"holder flags have shape {holder.shape}, expected ({len(pseudonyms)},)")
    total = len(pseudonyms)
    step = rows_per_chunk(PSEUDONYM_BYTES + 1, chunk_bytes)
    for offset, rows in _slices(total, step):
        digests = pseudonyms[offset : offset + rows].tobytes()
        flags = holder[offset : offset + rows].astype(np.uint8).tobytes()
        yield pb.PseudonymChunk(
            header=_copy_header(header),
            total_rows=total,
            row_offset=offset,
            rows=rows,
            pseudonyms=digests,
            holder_flags=flags,
            crc32=zlib.crc32(flags, zlib.crc32(digests)),
            cold_start=cold_start if offset == 0 else None,
        )


class RegistrationAssembler:
    """Assembles PseudonymChunk messages into (pseudonyms (n, 32) uint8, holder flags (n,) bool)."""

    def __init__(self, max_rows: int = 1 << 28) -> None:
        self.stream = _RowStream("registration", None)
        self.max_rows = max_rows
        self.digests: list[bytes] = []
        self.flags: list[bytes] = []
        # the first chunk's cold-start policy (None: it carried none, the defaults apply)
        self.cold_start: pb.ColdStartPolicy | None = None

    def add(self, chunk: pb.PseudonymChunk) -> None:
        """Check one chunk and keep its payload (and, from the first, the cold-start policy)."""
        index = self.stream.chunks
        if chunk.HasField("cold_start"):
            if index:
                raise ChunkError(f"registration: chunk {index} carries a cold_start policy; only the first chunk may")
            self.cold_start = chunk.cold_start
        if chunk.total_rows > self.max_rows:
            raise ChunkError(f"registration: {chunk.total_rows} rows exceed the limit of {self.max_rows}")
        self.stream.admit(chunk.header, chunk.total_rows, chunk.row_offset, chunk.rows)
        digests, holder_flags = chunk.pseudonyms, chunk.holder_flags
        if len(digests) != chunk.rows * PSEUDONYM_BYTES:
            raise ChunkError(f"registration: chunk {index} holds {len(digests)} pseudonym bytes, {chunk.rows} rows need {chunk.rows * PSEUDONYM_BYTES}")
        if len(holder_flags) != chunk.rows:
            raise ChunkError(f"registration: chunk {index} holds {len(holder_flags)} holder flags for {chunk.rows} rows")
        _check_sum("registration", index, zlib.crc32(holder_flags, zlib.crc32(digests)), chunk.crc32)
        flags = np.frombuffer(holder_flags, dtype=np.uint8)
        if flags.size and flags.max() > 1:
            raise ChunkError(f"registration: chunk {index} has holder flags other than 0 and 1")
        self.digests.append(digests)
        self.flags.append(holder_flags)

    def result(self) -> tuple[np.ndarray, np.ndarray, pb.Header]:
        """(pseudonyms, holder flags, header) of the complete stream."""
        header = self.stream.finish()
        digests = np.frombuffer(b"".join(self.digests), dtype=np.uint8).reshape(-1, PSEUDONYM_BYTES)
        flags = np.frombuffer(b"".join(self.flags), dtype=np.uint8).astype(bool)
        return digests, flags, header


def encode_membership(
    roles: np.ndarray,
    holder_masks: np.ndarray,
    domains: list[str],
    header: pb.Header | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    served_to: Mapping[str, int] | None = None,
    received_from: Mapping[str, int] | None = None,
) -> Iterator[pb.MembershipChunk]:
    """Yield MembershipChunk messages: one RowRole byte and one uint64 holder mask per row (the cold-start counts on the first)."""
    roles = np.asarray(roles, dtype=np.uint8)
    holder_masks = np.asarray(holder_masks, dtype="<u8")
    if roles.shape != holder_masks.shape or roles.ndim != 1:
        raise ChunkError(f"roles {roles.shape} and holder masks {holder_masks.shape} must be equal 1-D shapes")
    total = len(roles)
    step = rows_per_chunk(9, chunk_bytes)
    for offset, rows in _slices(total, step):
        yield pb.MembershipChunk(
            header=_copy_header(header),
            domains=domains if offset == 0 else [],
            total_rows=total,
            row_offset=offset,
            rows=rows,
            roles=roles[offset : offset + rows].tobytes(),
            holder_masks=holder_masks[offset : offset + rows].tobytes(),
            served_to=served_to if offset == 0 and served_to else None,
            received_from=received_from if offset == 0 and received_from else None,
        )


class MembershipAssembler:
    """Assembles MembershipChunk messages into (roles uint8 (n,), holder masks uint64 (n,), domains)."""

    def __init__(self, expected_rows: int | None = None) -> None:
        self.stream = _RowStream("membership", expected_rows)
        self.roles: list[bytes] = []
        self.masks: list[bytes] = []
        self.domains: list[str] = []
        self.served_to: dict[str, int] = {}
        self.received_from: dict[str, int] = {}

    def add(self, chunk: pb.MembershipChunk) -> None:
        """Check one chunk and keep its payload."""
        index = self.stream.chunks
        self.stream.admit(chunk.header, chunk.total_rows, chunk.row_offset, chunk.rows)
        if index == 0:
            self.domains = list(chunk.domains)
            self.served_to, self.received_from = dict(chunk.served_to), dict(chunk.received_from)
        roles, masks = chunk.roles, chunk.holder_masks
        if len(roles) != chunk.rows or len(masks) != 8 * chunk.rows:
            raise ChunkError(f"membership: chunk {index} payload does not match its {chunk.rows} rows")
        self.roles.append(roles)
        self.masks.append(masks)

    def result(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(roles, holder masks, domain names) of the complete stream."""
        self.stream.finish()
        roles = np.frombuffer(b"".join(self.roles), dtype=np.uint8).copy()
        masks = np.frombuffer(b"".join(self.masks), dtype="<u8").astype(np.uint64)
        valid = (pb.ROW_ROLE_LOCAL, pb.ROW_ROLE_SHARED, pb.ROW_ROLE_RECEIVER)
        if roles.size and not np.isin(roles, valid).all():
            raise ChunkError("membership: unknown row role")
        return roles, masks, self.domains
