"""Interaction columns read through pyarrow's C++ CSV and Parquet readers, as key vocabularies and per-row codes.

Rows become (user code, item code, weight): each code indexes a vocabulary of the file's
distinct keys, so no per-row string survives the read. The CSV reader here only parses; the
caller validates, and re-reads a file with the exact reader when this one declines it.
"""

import ctypes
import ctypes.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

# Keys that are exactly the decimal text of an int64 (no sign, no leading zero) are held as
# integers: 8 bytes each instead of 4 per character, sorted and searched as numbers.
_CANONICAL_INTEGER = r"^(0|[1-9][0-9]{0,17})$"
# Python's str.strip() whitespace (the exact reader's rule), spelt for RE2.
_EDGE_SPACE = r"^[\s\x1c-\x1f\x85\xa0\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}]|" \
              r"[\s\x1c-\x1f\x85\xa0\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}]$"
_SCAN_BLOCK = 1 << 24
_STREAM_BLOCK = 1 << 20
_CODE_BLOCK = 1 << 20
# pyarrow's allocator (mimalloc) keeps the parse buffers the reader threads freed, a block's
# worth each time, until asked: handing them back every few blocks keeps ~60 MB off the peak
_RELEASE_EVERY = 8


def _glibc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None off glibc."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _glibc_trim()


def return_free_memory() -> None:
    """Hand memory that pyarrow's pool and the C heap hold free back to the system.

    Both keep freed blocks for reuse: pyarrow's mimalloc the parse buffers of each block, and
    glibc's heap the (raised-threshold, so heap-allocated) numpy temporaries of a few MB each.
    Resident but unused, they would sit under every later step of the load, its peak included.
    """
    pa.default_memory_pool().release_unused()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class Declined(Exception):
    """The fast reader cannot vouch for this file; the exact reader must read it (and name any problem)."""


@dataclass(frozen=True, eq=False)
class KeyColumn:
    """One key column: the distinct keys (int64 or str array) and each row's int32 code into them."""

    keys: np.ndarray
    codes: np.ndarray


@dataclass(frozen=True, eq=False)
class Columns:
    """A file's user and item key columns and its float64 weights (None when the file has none)."""

    users: KeyColumn
    items: KeyColumn
    weights: np.ndarray | None


def has_lone_carriage_return(path: Path) -> bool:
    """Whether the file holds a CR not followed by LF (pyarrow would split a line there, the exact reader not)."""
    previous_cr = False
    with path.open("rb") as stream:
        while block := stream.read(_SCAN_BLOCK):
            if not previous_cr and b"\r" not in block:  # the common case: a memchr-speed scan
                continue
            if previous_cr and not block.startswith(b"\n"):
                return True
            if block.count(b"\r") != block.count(b"\r\n") + block.endswith(b"\r"):
                return True
            previous_cr = block.endswith(b"\r")
    return previous_cr


def key_column(column: pa.ChunkedArray | pa.Array, strip: bool) -> KeyColumn:
    """Distinct keys and per-row codes of one column, keys stripped of edge whitespace when `strip`."""
    if pa.types.is_integer(column.type):
        values = (column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column).to_numpy().astype(np.int64)
        if len(values) and values.min() >= 0:
            return integer_key_column(values)
    vocabulary = pc.unique(column)
    codes = np.concatenate([np.asarray(chunk) for chunk in pc.index_in(column, value_set=vocabulary).chunks]) \
        if isinstance(column, pa.ChunkedArray) else np.asarray(pc.index_in(column, value_set=vocabulary))
    codes = codes.astype(np.int32, copy=False)
    if pa.types.is_integer(vocabulary.type):  # negative integers: keys are their text
        return KeyColumn(vocabulary.to_numpy().astype(str), codes)
    if not (pa.types.is_string(vocabulary.type) or pa.types.is_large_string(vocabulary.type)):
        raise TypeError(f"key column of type {vocabulary.type} (expected integers or strings)")
    if strip and bool(pc.any(pc.match_substring_regex(vocabulary, _EDGE_SPACE)).as_py()):
        # rare: padded keys; strip the (small) vocabulary as the exact reader would, then merge equal keys
        stripped = np.strings.strip(np.asarray(vocabulary.to_numpy(zero_copy_only=False), dtype=np.dtypes.StringDType()))
        text, inverse = np.unique(stripped, return_inverse=True)
        return _as_key_column(pa.array(text.astype(object), type=pa.string()), inverse.astype(np.int32)[codes])
    return _as_key_column(vocabulary, codes)


def _as_key_column(vocabulary: pa.Array, codes: np.ndarray) -> KeyColumn:
    """A string vocabulary as int64 keys when every key is a canonical integer, else as a str array."""
    if len(vocabulary) and bool(pc.all(pc.match_substring_regex(vocabulary, _CANONICAL_INTEGER)).as_py()):
        return KeyColumn(pc.cast(vocabulary, pa.int64()).to_numpy(), codes)
    return KeyColumn(np.asarray(vocabulary.to_numpy(zero_copy_only=False), dtype=str), codes)


def _parse_options(delimiter: str) -> pa_csv.ParseOptions:
    """No quoting or escapes and empty lines kept (as rows of empty fields): every byte is a field's, as in the exact reader."""
    return pa_csv.ParseOptions(delimiter=delimiter, quote_char=False, escape_char=False, double_quote=False,
                               newlines_in_values=False, ignore_empty_lines=False)


def _read_table(path: Path, delimiter: str, skip_rows: int, types: dict[str, pa.DataType]) -> pa.Table:
    """pyarrow's parse of a delimited file into the given columns."""
    return pa_csv.read_csv(
        path,
        read_options=pa_csv.ReadOptions(skip_rows=skip_rows, column_names=list(types)),
        parse_options=_parse_options(delimiter),
        convert_options=pa_csv.ConvertOptions(column_types=types, null_values=[], strings_can_be_null=False,
                                              quoted_strings_can_be_null=False),
    )


_POWERS_OF_TEN = np.array([10 ** k for k in range(1, 19)], dtype=np.int64)


def _digits_written(column: KeyColumn) -> int:
    """Total decimal digits of every row's key (keys sorted, non-negative, written without leading zeros).

    Each row has one digit, plus one for each power of ten its key reaches; the keys are sorted,
    so "reaches 10**k" is "code >= the first code whose key does". Counted in blocks: a few
    passes over the int32 codes with 1 MB temporaries, where a per-key bincount would make
    8 MB ones (per million keys) that the heap keeps.
    """
    total = len(column.codes)
    for boundary in np.searchsorted(column.keys, _POWERS_OF_TEN).tolist():
        if boundary >= len(column.keys):
            break
        for start in range(0, len(column.codes), _CODE_BLOCK):
            total += int(np.count_nonzero(column.codes[start:start + _CODE_BLOCK] >= boundary))
    return total


def freeze(array: np.ndarray) -> np.ndarray:
    """The array made read-only, with every numpy array it is a view of (so no writable alias is left)."""
    base: object = array
    while isinstance(base, np.ndarray):
        base.flags.writeable = False
        base = base.base
    return array


def is_frozen(array: np.ndarray) -> bool:
    """Whether no writable numpy array shares this one's data (it and its bases are read-only and end in numpy's own memory)."""
    base: object = array
    while isinstance(base, np.ndarray):
        if base.flags.writeable:
            return False
        if base.base is None:
            return True
        base = base.base
    return False


def integer_key_column(values: np.ndarray, overwrite: bool = False) -> KeyColumn:
    """Distinct sorted keys and int32 codes of non-negative integer keys (a dense table when the ids are compact).

    With `overwrite`, an int32 `values` array becomes the codes in place: the load never holds
    a row's key and its code at once (20 MB per 5M rows saved at the load's peak).
    """
    if len(values) and int(values.max()) < 4 * len(values) + (1 << 20):
        present = np.zeros(int(values.max()) + 1, dtype=bool)
        present[values] = True
        keys = freeze(np.flatnonzero(present))  # already int64: no copy; frozen, so an IdMap can hold this very array
        # int32 ranks (the table is below 2**31 entries here): codes come out int32 with no int64 pass
        rank = np.cumsum(present, dtype=np.int32) - 1
        del present
        if overwrite and values.dtype == np.int32:
            for start in range(0, len(values), _CODE_BLOCK):  # blocks, not rows: a 4 MB temporary each
                block = values[start:start + _CODE_BLOCK]
                block[:] = rank[block]
            return KeyColumn(keys, values)
        return KeyColumn(keys, rank[values])
    keys, codes = np.unique(values, return_inverse=True)
    return KeyColumn(keys.astype(np.int64, copy=False), codes.astype(np.int32, copy=False))


def _integer_columns(path: Path, delimiter: str, header_bytes: int, n_fields: int) -> Columns | None:
    """Columns of a file whose keys all parse as integers, or None unless every key is written canonically.

    Streamed in blocks, each block's keys kept as int32 at once, so no full int64 or text
    column is ever held. Integer parsing would merge "007" with "7" (distinct keys): the file's
    size tells. With only canonical keys (no sign, no leading zero, no padding) and one-byte
    line ends, the file is exactly the digits plus delimiters plus newlines (plus the header and
    the weights' text).
    """
    names = ["user", "item", "weight"][:n_fields]
    # keys parsed straight to int32 (what they are kept as): a key beyond int32 fails the parse,
    # and the caller reads the file as text instead
    types = {name: pa.int32() if name != "weight" else pa.string() for name in names}
    # a plain file stream (not a memory map, whose pages would count as ours) in small blocks
    with pa.OSFile(str(path)) as stream:
        return _stream_integer_columns(path, stream, delimiter, header_bytes, names, types)


def _stream_integer_columns(path: Path, stream: pa.NativeFile, delimiter: str, header_bytes: int, names: list[str],
                            types: dict[str, pa.DataType]) -> Columns | None:
    """The body of `_integer_columns` over an open stream."""
    n_fields = len(names)
    reader = pa_csv.open_csv(
        stream,
        read_options=pa_csv.ReadOptions(skip_rows=int(header_bytes > 0), column_names=names, block_size=_STREAM_BLOCK),
        parse_options=_parse_options(delimiter),
        convert_options=pa_csv.ConvertOptions(column_types=types, null_values=[], strings_can_be_null=False,
                                              quoted_strings_can_be_null=False),
    )
    # a line is at least 4 bytes ("0\t0\n"): room for every row, reserved but resident only as it fills
    most_rows = path.stat().st_size // 4 + 1
    users, items = _Growing(np.int32, most_rows), _Growing(np.int32, most_rows)
    weights: list[np.ndarray] = []
    expected = header_bytes
    pool = pa.default_memory_pool()
    for count, batch in enumerate(reader, 1):
        if count % _RELEASE_EVERY == 0:
            pool.release_unused()
        block_users, block_items = batch.column(0).to_numpy(), batch.column(1).to_numpy()
        if len(block_users) == 0:
            continue
        if min(int(block_users.min()), int(block_items.min())) < 0:
            return None
        users.append(block_users)
        items.append(block_items)
        expected += len(block_users) * n_fields
        if n_fields == 3:
            text = batch.column(2)
            expected += int(pc.sum(pc.binary_length(text)).as_py())
            weights.append(pc.cast(text, pa.float64()).to_numpy().astype(np.float32))
    # pyarrow's allocator keeps the freed parse buffers of every block (tens of MiB) for reuse:
    # hand them back before the key columns are built, the load's largest step
    return_free_memory()
    if not users.size:
        return None
    # the codes overwrite the keys in the reserved buffers (which stay the codes' storage)
    user_column = integer_key_column(users.result(), overwrite=True)
    del users
    item_column = integer_key_column(items.result(), overwrite=True)
    del items
    expected += _digits_written(user_column) + _digits_written(item_column)
    if path.stat().st_size not in (expected, expected - 1):  # the last newline is optional
        return None
    return_free_memory()  # the key columns' temporaries, before the caller's CSR build (the load's peak)
    return Columns(user_column, item_column, _concatenate(weights) if weights else None)


class _Growing:
    """An array appended to block by block in one buffer (doubled if ever full).

    One large allocation instead of one per block: a freed large buffer goes back to the system,
    where thousands of block-sized ones fragment the heap and stay resident. Pages of the
    buffer that are never written are never resident either, so a generous capacity is free.
    """

    def __init__(self, dtype: type[np.generic], capacity: int = 1 << 20) -> None:
        self.buffer = np.empty(capacity, dtype=dtype)
        self.size = 0

    def append(self, block: np.ndarray) -> None:
        """Copy a block (cast to the buffer's type) to the end."""
        end = self.size + len(block)
        if end > len(self.buffer):
            grown = np.empty(max(2 * len(self.buffer), end), dtype=self.buffer.dtype)
            grown[: self.size] = self.buffer[: self.size]
            self.buffer = grown
        self.buffer[self.size : end] = block
        self.size = end

    def result(self) -> np.ndarray:
        """The values appended so far (a view: the buffer's unused tail is never touched, so never resident)."""
        return self.buffer[: self.size]


def _concatenate(blocks: list[np.ndarray]) -> np.ndarray:
    """One array of blocks, freeing each block as soon as it is copied (peak: the result plus one block)."""
    out = np.empty(sum(len(block) for block in blocks), dtype=blocks[0].dtype)
    start = 0
    while blocks:
        block = blocks.pop(0)
        out[start:start + len(block)] = block
        start += len(block)
    return out


def read_delimited(path: Path, delimiter: str, header_bytes: int, n_fields: int) -> Columns:
    """A CSV/TSV file's columns (user, item[, weight]) after a header of `header_bytes`; Declined when pyarrow refuses it."""
    names = ["user", "item", "weight"][:n_fields]
    skip_rows = int(header_bytes > 0)
    try:
        # integer keys first (the common, large case): parsed as numbers, never hashed as text
        columns = _integer_columns(path, delimiter, header_bytes, n_fields)
        if columns is not None:
            return columns
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    types = {"user": pa.string(), "item": pa.string(), "weight": pa.float64()}
    try:
        table = _read_table(path, delimiter, skip_rows, {name: types[name] for name in names})
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError) as error:
        raise Declined(str(error)) from None
    if table.num_rows == 0:
        raise Declined("no rows")
    users = key_column(table.column("user"), strip=True)
    items = key_column(table.column("item"), strip=True)
    weights = table.column("weight").to_numpy() if n_fields == 3 else None
    return Columns(users, items, weights)


def read_parquet_columns(path: Path) -> tuple[Columns, list[str]]:
    """A Parquet file's first two columns as user and item keys and an optional third as weights, with the column names."""
    table = pq.read_table(path)
    if table.num_columns not in (2, 3):
        raise ValueError(f"expected 2 or 3 columns (user, item[, weight]), got {table.num_columns}: {table.column_names}")
    for index in range(table.num_columns):
        column = table.column(index)
        if column.null_count:
            first = int(np.argmax(np.asarray(pc.is_null(column).combine_chunks()).astype(bool)))
            raise NullCell(table.column_names[index], first)
    users = key_column(table.column(0), strip=True)
    items = key_column(table.column(1), strip=True)
    weights = None
    if table.num_columns == 3:
        weight = table.column(2)
        if not (pa.types.is_integer(weight.type) or pa.types.is_floating(weight.type)):
            raise ValueError(f"weight column {table.column_names[2]!r} has type {weight.type}, expected a number")
        weights = pc.cast(weight, pa.float64()).to_numpy()
    return Columns(users, items, weights), list(table.column_names)


class NullCell(ValueError):
    """A missing value in a Parquet column, at a 0-based row."""

    def __init__(self, column: str, row: int) -> None:
        self.column = column
        self.row = row
        super().__init__(f"column {column!r} has a missing value")
