"""Interaction files, id maps and the leave-one-out / cold-start splits of one training matrix.

File formats read by `read_interactions` (UTF-8, one interaction per line, LF or CRLF):

- ``paper``: the UniCDR/DisenCDR/CDRIB text format, ``user \\t item [\\t weight]``, no header,
  user and item ids are non-negative decimal integers.
- ``csv`` / ``tsv``: a generic ``user,item[,weight]`` file (comma or tab). Keys are any
  non-empty strings (surrounding spaces are stripped). The first line is a header, and skipped,
  exactly when its first field starts with ``user`` and its second with ``item``
  (case-insensitive), e.g. ``user,item,weight`` or ``user_id\\titem_id``.
- ``parquet``: a Parquet table whose first two columns are the user and item keys (integers or
  strings) and an optional third the weight (a number); no missing values. Its "line" in an
  error is the 1-based row.
- ``auto``: ``.csv`` means csv, ``.tsv`` means tsv, ``.parquet``/``.pq`` parquet, anything else
  is sniffed from the first line (a tab means tsv, else a comma means csv).

Text files are parsed by pyarrow's C++ reader; whenever it refuses a file or a row breaks a
rule below, the file is read again by the exact line-by-line reader, whose message names the
first bad line (so the fast path never changes an error, only the time to a good load).

Every line has the same number of fields, 2 or 3; a missing weight is 1. A weight must be a
finite number > 0. Empty lines are rejected except at the very end of the file. A repeated
(user, item) pair is rejected by default (``duplicates="sum"`` adds the weights instead).
Ids are at most `MAX_KEY_CHARS` (256) characters.
Every problem raises `DataError` naming the file and the 1-based line.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from cdimf.common.core.sparse import canonical_csr, pairs_to_csr, pattern_csr
from cdimf.domain_node import arrow_reader

FLOAT = np.float32
FORMATS = ("auto", "paper", "csv", "tsv", "parquet")
PARQUET_SUFFIXES = (".parquet", ".pq")
DUPLICATE_POLICIES = ("reject", "sum")
# Ids are held as fixed-width strings (fast to sort and search); this bounds their width.
MAX_KEY_CHARS = 256
_MAX_SHOWN_KEY = 60


class DataError(ValueError):
    """Malformed or inconsistent input data; the message names the file and, when known, the line."""

    def __init__(self, path: str | Path, message: str, line: int | None = None) -> None:
        self.path = Path(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else f"{self.path}"
        super().__init__(f"{where}: {message}")


def _shown(key: str) -> str:
    """A key quoted for an error message, cut short when it is long."""
    return repr(key if len(key) <= _MAX_SHOWN_KEY else key[:_MAX_SHOWN_KEY] + "...")


def _numeric_order(keys: np.ndarray) -> np.ndarray:
    """Permutation that sorts unique key strings numerically when all are decimal integers, else lexically."""
    if keys.size and bool(np.all(np.strings.isdecimal(keys))):
        # Compare without int conversion (no overflow for long ids): fewer significant digits
        # first, then the digits; the raw string breaks ties such as "007" vs "7".
        significant = np.strings.lstrip(keys, "0")
        return np.lexsort((keys, significant, np.strings.str_len(significant)))
    return np.argsort(keys, kind="stable")


def _as_str(keys: np.ndarray) -> np.ndarray:
    """Keys (strings of any numpy string type, or integers) as a fixed-width str array."""
    keys = np.asarray(keys)
    if keys.dtype.kind == "T":  # variable-width StringDType needs an explicit width to convert
        return keys.astype(f"<U{max(1, int(np.strings.str_len(keys).max(initial=1)))}")
    return keys.astype(str)


def _canonical_integers(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(flags, values): which str keys are the plain decimal text of an int64 (ASCII digits, no leading 0), and their values."""
    lengths = np.strings.str_len(keys)
    ok = (lengths > 0) & (lengths <= 18) & (np.strings.str_len(np.strings.strip(keys, "0123456789")) == 0)
    ok &= (lengths == 1) | ~np.strings.startswith(keys, "0")
    values = np.zeros(keys.shape, dtype=np.int64)
    values[ok] = keys[ok].astype(np.int64)
    return ok, values


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """Sorted distinct int64 integers as a new array (sort and drop repeats: faster than np.unique's hashing)."""
    if len(values) and bool(np.all(values[1:] > values[:-1])):
        # already a vocabulary (the readers' keys are sorted and distinct): no sort, and no copy
        # of an array nobody can write to (its own data, frozen)
        return values if values.dtype == np.int64 and arrow_reader.is_frozen(values) else np.array(values, dtype=np.int64)
    values = np.sort(values)
    return values[np.concatenate(([True], values[1:] != values[:-1]))] if len(values) else values


def union_keys(*key_arrays: np.ndarray) -> np.ndarray:
    """Keys of several vocabularies in one array (integers stay integers unless some keys are text)."""
    if all(np.asarray(keys).dtype.kind in "iu" for keys in key_arrays):
        return np.concatenate([np.asarray(keys, dtype=np.int64) for keys in key_arrays])
    return np.concatenate([_as_str(keys) for keys in key_arrays])


@dataclass(frozen=True, eq=False)
class IdMap:
    """Frozen bijection between original keys (strings) and contiguous indices 0..n-1.

    Maps whose keys are all plain non-negative integers hold them as a sorted int64 array (the
    key strings are made on demand); other maps hold the ordered strings and a lexical index.
    """

    _numbers: np.ndarray | None = field(repr=False)
    _text: np.ndarray | None = field(repr=False)
    _lexical_keys: np.ndarray | None = field(repr=False)
    _lexical_positions: np.ndarray | None = field(repr=False)

    @classmethod
    def from_keys(cls, keys: np.ndarray) -> "IdMap":
        """Map the unique keys to 0..n-1 in sorted order (numeric order when all keys are integers)."""
        keys = np.asarray(keys)
        if keys.dtype.kind in "iu" and (keys.size == 0 or int(keys.min()) >= 0):
            return cls._of_numbers(_sorted_unique(keys.astype(np.int64, copy=False)))
        lexical_keys = np.unique(_as_str(keys))
        canonical, values = _canonical_integers(lexical_keys)
        if lexical_keys.size and bool(canonical.all()):
            return cls._of_numbers(_sorted_unique(values))
        order = _numeric_order(lexical_keys)
        ordered = lexical_keys[order]
        positions = np.empty(len(order), dtype=np.int64)
        positions[order] = np.arange(len(order), dtype=np.int64)
        for array in (ordered, lexical_keys, positions):
            array.flags.writeable = False
        return cls(None, ordered, lexical_keys, positions)

    @classmethod
    def _of_numbers(cls, numbers: np.ndarray) -> "IdMap":
        """A map of sorted unique non-negative integer keys."""
        numbers.flags.writeable = False
        return cls(numbers, None, None, None)

    @property
    def keys(self) -> np.ndarray:
        """The keys in index order, as a read-only str array (built on each call for integer maps)."""
        if self._text is not None:
            return self._text
        assert self._numbers is not None
        text = self._numbers.astype(str)
        text.flags.writeable = False
        return text

    def __len__(self) -> int:
        """Number of keys."""
        return len(self._numbers if self._numbers is not None else self._text)  # type: ignore[arg-type]

    def _slots(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found flags, index where found) of each query key."""
        query = np.asarray(keys)
        positions: np.ndarray | None
        haystack: np.ndarray | None
        if self._numbers is not None:
            if query.dtype.kind in "iu":
                found, values = np.ones(query.shape, dtype=bool), query.astype(np.int64, copy=False)
            else:
                found, values = _canonical_integers(_as_str(query))
            haystack, positions = self._numbers, None
        else:
            found, values = np.ones(query.shape, dtype=bool), _as_str(query)
            haystack, positions = self._lexical_keys, self._lexical_positions
        assert haystack is not None
        if len(haystack) == 0:
            return np.zeros(query.shape, dtype=bool), np.zeros(query.shape, dtype=np.int64)
        if values.dtype.kind == "U" and haystack.dtype.kind == "U" and values.dtype.itemsize > haystack.dtype.itemsize:
            # a key longer than every known key is unknown; comparing as is would widen the whole
            # haystack to the query's width (a 1 MB key: 4 MB per known key)
            found &= np.strings.str_len(values.astype(str)) <= haystack.dtype.itemsize // 4
            values = values.astype(haystack.dtype)
        slots = np.searchsorted(haystack, values).clip(max=len(haystack) - 1)
        found &= haystack[slots] == values
        return found, (slots if positions is None else positions[slots])

    def index_of(self, keys: np.ndarray, missing: int | None = None) -> np.ndarray:
        """Indices of the given keys; unknown keys raise KeyError, or map to `missing` when it is given."""
        found, slots = self._slots(keys)
        indices = np.where(found, slots, -1 if missing is None else missing)
        if missing is None and not bool(found.all()):
            first = np.asarray(keys).reshape(-1)[int(np.argmin(found.reshape(-1)))]
            raise KeyError(f"unknown key {_shown(str(first))}")
        return indices.astype(np.int64, copy=False)

    def key_of(self, indices: np.ndarray) -> np.ndarray:
        """Original keys of the given indices."""
        indices = np.asarray(indices, dtype=np.int64)
        if self._numbers is not None:
            return self._numbers[indices].astype(str)
        assert self._text is not None
        return self._text[indices]


@dataclass(frozen=True, eq=False)
class RawInteractions:
    """Interactions as read from one file: key vocabularies, each row's codes into them, weights and source lines.

    Rows are held as int32 codes (no per-row strings); `lines` is stored only when rows do not
    follow the file's lines one to one (after duplicates were summed).
    """

    path: Path
    user_keys: np.ndarray
    user_codes: np.ndarray
    item_keys: np.ndarray
    item_codes: np.ndarray
    weights: np.ndarray
    first_line: int = 1
    row_lines: np.ndarray | None = None
    # the users x items CSR over codes (rows = user codes), kept from the duplicate check
    code_matrix: sp.csr_matrix | None = field(default=None, repr=False)

    def __len__(self) -> int:
        """Number of interactions."""
        return len(self.user_codes)

    @property
    def users(self) -> np.ndarray:
        """Each row's user key (a str array, built on each call)."""
        return _as_str(self.user_keys)[self.user_codes]

    @property
    def items(self) -> np.ndarray:
        """Each row's item key (a str array, built on each call)."""
        return _as_str(self.item_keys)[self.item_codes]

    @property
    def lines(self) -> np.ndarray:
        """Each row's 1-based source line (for Parquet files, the 1-based row)."""
        if self.row_lines is not None:
            return self.row_lines
        return np.arange(self.first_line, self.first_line + len(self), dtype=np.int64)

    def line_of(self, row: int) -> int:
        """The source line of one row."""
        return int(self.row_lines[row]) if self.row_lines is not None else self.first_line + row

    def key(self, role: str, row: int) -> str:
        """The user or item key of one row."""
        keys, codes = (self.user_keys, self.user_codes) if role == "user" else (self.item_keys, self.item_codes)
        return str(keys[codes[row]])


def _decode(path: Path, raw: bytes) -> str:
    """UTF-8 text of a file, or DataError at the line of the first undecodable byte."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(path, f"not UTF-8 text ({error.reason})", raw.count(b"\n", 0, error.start) + 1) from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def _delimiter(path: Path, fmt: str, first_line: str) -> str:
    """Field separator for a format, sniffed from the first line under "auto"."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown interaction format {fmt!r}; expected one of {FORMATS}")
    if fmt == "auto":
        suffix = path.suffix.lower()
        fmt = "csv" if suffix == ".csv" else "tsv" if suffix == ".tsv" else ""
        if not fmt:
            if "\t" in first_line:
                return "\t"
            if "," in first_line:
                return ","
            raise DataError(path, "cannot tell the delimiter: the first line has neither a tab nor a comma", 1)
    return "," if fmt == "csv" else "\t"


def _is_header(first_line: str, delimiter: str) -> bool:
    """Whether a first line names the columns (user..., item...[, ...])."""
    fields = [part.strip().lower() for part in first_line.split(delimiter)]
    return len(fields) >= 2 and fields[0].startswith("user") and fields[1].startswith("item")


def _parse_weights(path: Path, texts: np.ndarray, lines: np.ndarray) -> np.ndarray:
    """Weights as float32, or DataError at the first line whose weight is not a finite number > 0."""
    try:
        weights = texts.astype(np.float64)
    except ValueError:
        # Error path only: find which line failed, for the message.
        for text, line in zip(texts.tolist(), lines.tolist()):
            try:
                float(text)
            except ValueError:
                raise DataError(path, f"weight {_shown(text)} is not a number", line) from None
        raise
    bad = ~(np.isfinite(weights) & (weights > 0))
    if bad.any():
        first = int(np.argmax(bad))
        raise DataError(path, f"weight {_shown(str(texts[first]))} must be a finite number > 0", int(lines[first]))
    return weights.astype(FLOAT)


def _first_row(flags_of_key: np.ndarray, codes: np.ndarray) -> int | None:
    """The first row whose key is flagged, or None."""
    if not flags_of_key.any():
        return None
    return int(np.argmax(flags_of_key[codes]))


def _check_keys(raw: RawInteractions, role: str, paper: bool) -> None:
    """DataError at the first row whose `role` key is empty, too long, or (paper format) not an integer."""
    keys, codes = (raw.user_keys, raw.user_codes) if role == "user" else (raw.item_keys, raw.item_codes)
    if keys.dtype.kind in "iu":
        return  # integer vocabularies hold only canonical non-negative integers
    lengths = np.strings.str_len(keys)
    problems = [(lengths == 0, f"empty {role} id"), (lengths > MAX_KEY_CHARS, f"{role} id longer than {MAX_KEY_CHARS} characters")]
    if paper:
        problems.append((~np.strings.isdecimal(keys), ""))
    for flags, message in problems:
        row = _first_row(flags, codes)
        if row is not None:
            raise DataError(raw.path, message or f"{role} id {_shown(raw.key(role, row))} is not a non-negative integer",
                            raw.line_of(row))


def _check_weights(raw: RawInteractions) -> None:
    """DataError at the first row whose weight is not a finite number > 0."""
    weights = raw.weights[:1] if len(raw) and raw.weights.strides[0] == 0 else raw.weights  # one value on every row
    bad = ~(np.isfinite(weights) & (weights > 0))
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(raw.path, f"weight {_shown(str(raw.weights[row]))} must be a finite number > 0", raw.line_of(row))


def _merge_duplicates(raw: RawInteractions, policy: str) -> RawInteractions:
    """Reject repeated (user, item) pairs, or sum their weights keeping the first line."""
    n = len(raw)
    shape = (len(raw.user_keys), len(raw.item_keys))
    probe: sp.csr_matrix | None
    if n and raw.weights.strides[0] == 0:
        # one weight on every row (a file without weights): a sort of pair keys, no weights to carry
        probe = pattern_csr(raw.user_codes, raw.item_codes, shape, float(raw.weights[0]))
    else:
        # cheap existence test: the CSR of the codes sums repeated pairs into one entry
        probe = sp.csr_matrix((raw.weights, (raw.user_codes, raw.item_codes)), shape=shape, dtype=FLOAT)
        if probe.nnz == n:
            probe.sort_indices()
        else:
            probe = None
    if probe is not None:
        return RawInteractions(raw.path, raw.user_keys, raw.user_codes, raw.item_keys, raw.item_codes, raw.weights,
                               raw.first_line, raw.row_lines, probe)
    pair_codes = raw.user_codes.astype(np.int64) * len(raw.item_keys) + raw.item_codes
    order = np.argsort(pair_codes, kind="stable")
    repeated = pair_codes[order][1:] == pair_codes[order][:-1]
    lines = raw.lines
    if policy == "reject":
        later = order[1:][repeated]
        earlier = order[:-1][repeated]
        first = int(np.argmin(lines[later]))
        raise DataError(
            raw.path,
            f"duplicate pair user {_shown(raw.key('user', int(later[first])))}, "
            f"item {_shown(raw.key('item', int(later[first])))} (first on line {int(lines[earlier[first]])})",
            int(lines[later[first]]),
        )
    starts = np.flatnonzero(np.concatenate(([True], ~repeated)))
    keep = np.sort(order[starts])  # first occurrence of each pair, in file order
    group_of_row = np.cumsum(np.concatenate(([True], ~repeated))) - 1
    summed = np.zeros(len(starts), dtype=np.float64)
    np.add.at(summed, group_of_row, raw.weights[order])
    summed_by_first_row = np.empty(n, dtype=np.float64)
    summed_by_first_row[order[starts]] = summed
    return RawInteractions(raw.path, raw.user_keys, raw.user_codes[keep], raw.item_keys, raw.item_codes[keep],
                           summed_by_first_row[keep].astype(FLOAT), raw.first_line, lines[keep])


def _resolve_format(path: Path, fmt: str) -> str:
    """The format of a file: `fmt`, or under "auto" parquet for a .parquet/.pq suffix (text formats are sniffed later)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown interaction format {fmt!r}; expected one of {FORMATS}")
    if fmt == "auto" and path.suffix.lower() in PARQUET_SUFFIXES:
        return "parquet"
    return fmt


def _read_fast(path: Path, fmt: str) -> RawInteractions:
    """A text file through pyarrow, validated; Declined whenever only the exact reader can tell what is wrong."""
    try:
        with path.open("rb") as stream:
            head = stream.readline()
        first_line = head.decode("utf-8").removeprefix("\ufeff").rstrip("\n").removesuffix("\r")
        delimiter = _delimiter(path, fmt, first_line)
    except (OSError, UnicodeDecodeError, DataError):
        raise arrow_reader.Declined("the first line") from None
    n_fields = first_line.count(delimiter) + 1
    if n_fields not in (2, 3) or not first_line.strip() or arrow_reader.has_lone_carriage_return(path):
        raise arrow_reader.Declined("field count or line endings")
    header = fmt != "paper" and _is_header(first_line, delimiter)
    columns = arrow_reader.read_delimited(path, delimiter, len(head) if header else 0, n_fields)
    raw = _raw_of_columns(path, columns, first_line=1 + int(header))
    try:
        # pyarrow keeps empty lines as rows of empty keys: the exact reader names those (and the rest)
        for role in ("user", "item"):
            _check_keys(raw, role, fmt == "paper")
        _check_weights(raw)
    except DataError:
        raise arrow_reader.Declined("invalid rows") from None
    return raw


def _raw_of_columns(path: Path, columns: arrow_reader.Columns, first_line: int) -> RawInteractions:
    """RawInteractions of columns read by pyarrow (weight 1 when the file has none)."""
    n = len(columns.users.codes)
    # weight 1 on every row as a read-only broadcast: no array of n ones (the CSR's data is the one copy)
    weights = np.broadcast_to(FLOAT(1.0), (n,)) if columns.weights is None else columns.weights
    return RawInteractions(path, columns.users.keys, columns.users.codes, columns.items.keys, columns.items.codes,
                           weights, first_line)


def _read_parquet(path: Path) -> RawInteractions:
    """A Parquet file (user, item[, weight] columns), validated; DataError names the file and the 1-based row."""
    try:
        columns, _ = arrow_reader.read_parquet_columns(path)
    except arrow_reader.NullCell as error:
        raise DataError(path, f"missing value in column {error.column!r}", error.row + 1) from None
    except OSError as error:
        raise DataError(path, f"cannot read: {error.strerror or error}") from None
    except (ValueError, TypeError, pa.ArrowException) as error:
        raise DataError(path, f"not a readable interaction table: {error}") from None
    if len(columns.users.codes) == 0:
        raise DataError(path, "file is empty")
    raw = _raw_of_columns(path, columns, first_line=1)
    for role in ("user", "item"):
        _check_keys(raw, role, paper=False)
    bad = ~(np.isfinite(raw.weights) & (raw.weights > 0))
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(path, f"weight {float(raw.weights[row])!r} must be a finite number > 0", row + 1)
    return raw


def read_interactions(path: str | Path, fmt: str = "auto", duplicates: str = "reject") -> RawInteractions:
    """Read one interaction file (see the module docstring for formats); DataError names file and line."""
    path = Path(path)
    if duplicates not in DUPLICATE_POLICIES:
        raise ValueError(f"unknown duplicates policy {duplicates!r}; expected one of {DUPLICATE_POLICIES}")
    fmt = _resolve_format(path, fmt)
    if fmt == "parquet":
        raw = _read_parquet(path)
    else:
        try:
            raw = _read_fast(path, fmt)
        except arrow_reader.Declined:
            raw = _read_exact(path, fmt)
    raw = RawInteractions(raw.path, raw.user_keys, raw.user_codes, raw.item_keys, raw.item_codes,
                          raw.weights.astype(FLOAT, copy=False), raw.first_line, raw.row_lines)
    return _merge_duplicates(raw, duplicates)


def _read_exact(path: Path, fmt: str) -> RawInteractions:
    """The exact (slower) reader of a text file: every rule checked line by line, DataError at the first bad line."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(path, f"cannot read: {error.strerror or error}") from None
    text = _decode(path, raw).rstrip("\n")
    del raw
    if not text.strip():
        raise DataError(path, "file is empty")
    texts = text.split("\n")
    delimiter = _delimiter(path, fmt, texts[0])
    first_data = 1 if fmt != "paper" and _is_header(texts[0], delimiter) else 0
    texts = texts[first_data:]
    if not texts:
        raise DataError(path, "file has a header but no interactions")
    line_numbers = np.arange(first_data + 1, first_data + 1 + len(texts), dtype=np.int64)
    # Variable-width strings: one long line must not widen every row of a fixed-width array.
    line_array = np.array(texts, dtype=np.dtypes.StringDType())
    blank = np.strings.isspace(line_array) | (np.strings.str_len(line_array) == 0)
    if blank.any():
        raise DataError(path, "empty line", int(line_numbers[np.argmax(blank)]))
    field_counts = np.strings.count(line_array, delimiter) + 1
    expected = int(field_counts[0])
    wrong = (field_counts != expected) if expected in (2, 3) else np.ones(len(texts), dtype=bool)
    if wrong.any():
        first = int(np.argmax(wrong))
        name = "tab" if delimiter == "\t" else "comma"
        raise DataError(
            path,
            f"expected 2 or 3 {name}-separated fields, the same on every line, got {int(field_counts[first])}",
            int(line_numbers[first]),
        )
    data_text = text.split("\n", 1)[1] if first_data else text
    fields = np.array(data_text.replace("\n", delimiter).split(delimiter), dtype=np.dtypes.StringDType())
    fields = np.strings.strip(fields.reshape(len(texts), expected))
    vocabularies = {}
    for column, role in enumerate(("user", "item")):
        keys = fields[:, column]
        key_lengths = np.strings.str_len(keys)
        if (key_lengths == 0).any():
            raise DataError(path, f"empty {role} id", int(line_numbers[np.argmax(key_lengths == 0)]))
        if (key_lengths > MAX_KEY_CHARS).any():
            raise DataError(path, f"{role} id longer than {MAX_KEY_CHARS} characters",
                            int(line_numbers[np.argmax(key_lengths > MAX_KEY_CHARS)]))
        # Fixed-width keys (now of bounded width) sort and search several times faster.
        keys = _as_str(keys)
        if fmt == "paper":
            not_integer = ~np.strings.isdecimal(keys)
            if not_integer.any():
                first = int(np.argmax(not_integer))
                raise DataError(path, f"{role} id {_shown(str(keys[first]))} is not a non-negative integer",
                                int(line_numbers[first]))
        vocabulary, codes = np.unique(keys, return_inverse=True)
        vocabularies[role] = (vocabulary, codes.astype(np.int32))
    weights = _parse_weights(path, fields[:, 2], line_numbers) if expected == 3 else np.ones(len(texts), dtype=FLOAT)
    (user_keys, user_codes), (item_keys, item_codes) = vocabularies["user"], vocabularies["item"]
    return RawInteractions(path, user_keys, user_codes, item_keys, item_codes, weights, first_data + 1)


def _is_vocabulary(ids: IdMap, keys: np.ndarray) -> bool:
    """Whether an integer IdMap holds exactly these integer keys in this order (it was made from them: the common case)."""
    numbers = ids._numbers
    return numbers is not None and keys.dtype.kind in "iu" and len(numbers) == len(keys) and bool(np.array_equal(numbers, keys))


def _index_of_keys(raw: RawInteractions, role: str, ids: IdMap, hint: str) -> np.ndarray:
    """Each `role` key's index in an IdMap (one per vocabulary entry), or DataError at the line of the first unknown key."""
    keys, codes = (raw.user_keys, raw.user_codes) if role == "user" else (raw.item_keys, raw.item_codes)
    index_type = np.int32 if len(ids) < np.iinfo(np.int32).max else np.int64
    if _is_vocabulary(ids, keys):  # no search
        return np.arange(len(keys), dtype=index_type)
    of_key = ids.index_of(keys, missing=-1)
    row = _first_row(of_key < 0, codes)
    if row is not None:
        raise DataError(raw.path, f"{role} {_shown(raw.key(role, row))} {hint}", raw.line_of(row))
    return of_key.astype(index_type)


def indices_or_error(raw: RawInteractions, role: str, ids: IdMap, hint: str) -> np.ndarray:
    """Each row's index of its `role` key in an IdMap, or DataError at the line of the first unknown key."""
    return _index_of_keys(raw, role, ids, hint)[raw.user_codes if role == "user" else raw.item_codes]


def to_csr(raw: RawInteractions, users: IdMap, items: IdMap) -> sp.csr_matrix:
    """Users x items float32 CSR of raw interactions; DataError at the line of an unknown key."""
    matrix = raw.code_matrix
    if matrix is not None and _is_vocabulary(users, raw.user_keys) and _is_vocabulary(items, raw.item_keys):
        # the maps are the vocabularies themselves: the code matrix is the answer, with no new array
        return sp.csr_matrix((matrix.data, matrix.indices, matrix.indptr), shape=matrix.shape)
    row_of_code = _index_of_keys(raw, "user", users, "is not in the user id map")
    col_of_code = _index_of_keys(raw, "item", items, "is not in the item id map")
    if matrix is not None and bool(np.all(np.diff(row_of_code) > 0)) and bool(np.all(np.diff(col_of_code) > 0)):
        # both maps keep the vocabularies' order (sorted keys): the code matrix only needs its rows
        # spread out and its columns renamed, with no sort
        index_type = np.int32 if max(matrix.nnz, len(items)) < np.iinfo(np.int32).max else np.int64
        if len(row_of_code) == len(users) and matrix.indptr.dtype == index_type:
            indptr = matrix.indptr  # every user has rows here: the rows stay where they are
        else:
            counts = np.zeros(len(users), dtype=np.int64)
            counts[row_of_code] = np.diff(matrix.indptr)
            indptr = np.zeros(len(users) + 1, dtype=index_type)
            np.cumsum(counts, out=indptr[1:])
        identity = len(col_of_code) == len(items)
        indices = matrix.indices if identity else col_of_code[matrix.indices]
        return sp.csr_matrix((matrix.data, indices.astype(index_type, copy=False), indptr), shape=(len(users), len(items)))
    return pairs_to_csr(row_of_code[raw.user_codes], col_of_code[raw.item_codes], (len(users), len(items)), raw.weights)


def _with_entries_removed(matrix: sp.csr_matrix, removed: np.ndarray) -> sp.csr_matrix:
    """Copy of a canonical CSR without the stored entries flagged in `removed` (one flag per entry)."""
    kept = ~removed
    row_of_entry = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    indptr = np.zeros(matrix.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_of_entry[kept], minlength=matrix.shape[0]), out=indptr[1:])
    return sp.csr_matrix((matrix.data[kept], matrix.indices[kept], indptr), shape=matrix.shape)


def _unheld_orphans(matrix: sp.csr_matrix, held: np.ndarray) -> np.ndarray:
    """Flags of held entries whose item would be left with no training entry."""
    remaining = np.bincount(matrix.indices[~held], minlength=matrix.shape[1])
    return held & (remaining[matrix.indices] == 0)


def leave_one_out(train: sp.csr_matrix, seed: int | tuple[int, ...], min_rows: int = 2,
                  keep_items: bool = True) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Hold out one uniformly random entry of every user with >= min_rows entries.

    Returns (reduced train, held-out user indices, held-out item indices), sorted by user.
    With keep_items (default), a held-out entry whose item would be left without any training
    entry stays in train instead (that user gets no held-out row), as the paper's test.txt drops
    such rows: every held-out item can then be scored and drawn as a negative.
    """
    if min_rows < 1:
        raise ValueError(f"min_rows must be >= 1, got {min_rows}")
    train = canonical_csr(train, "train")
    counts = np.diff(train.indptr)
    eligible = np.flatnonzero(counts >= min_rows)
    rng = np.random.default_rng(seed)
    offsets = np.minimum((rng.random(len(eligible)) * counts[eligible]).astype(np.int64), counts[eligible] - 1)
    held = np.zeros(train.nnz, dtype=bool)
    held[train.indptr[eligible] + offsets] = True
    if keep_items:
        held &= ~_unheld_orphans(train, held)
    entries = np.flatnonzero(held)
    users = np.repeat(np.arange(train.shape[0], dtype=np.int64), counts)[entries]
    return _with_entries_removed(train, held), users, train.indices[entries].astype(np.int64)


def cold_start_holdout(target: sp.csr_matrix, other: sp.csr_matrix, fraction: float, seed: int | tuple[int, ...],
                       keep_items: bool = True) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Make a random fraction of shared users cold in `target`: remove their whole history there.

    `target` and `other` are two domains' matrices on one shared user index (same row count);
    a user is shared when it has entries in both. round(fraction * n_shared) of them are drawn
    without replacement. Returns (reduced target, held-out user indices, held-out item indices),
    sorted by user then item. With keep_items (default), held-out pairs whose item is left with
    no training entry in target are dropped from the held-out pairs (still removed from train:
    the user stays fully cold), as the paper's cold files keep only items seen in train.
    """
    target = canonical_csr(target, "target")
    other = canonical_csr(other, "other")
    if target.shape[0] != other.shape[0]:
        raise ValueError(f"target has {target.shape[0]} user rows but other has {other.shape[0]}; "
                         "they must share one user index")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    target_counts = np.diff(target.indptr)
    shared = np.flatnonzero((target_counts > 0) & (np.diff(other.indptr) > 0))
    rng = np.random.default_rng(seed)
    chosen = rng.choice(shared, size=round(fraction * len(shared)), replace=False)
    row_chosen = np.zeros(target.shape[0], dtype=bool)
    row_chosen[chosen] = True
    held = np.repeat(row_chosen, target_counts)
    entries = held.copy()
    if keep_items:
        entries &= ~_unheld_orphans(target, held)
    entries = np.flatnonzero(entries)
    users = np.repeat(np.arange(target.shape[0], dtype=np.int64), target_counts)[entries]
    return _with_entries_removed(target, held), users, target.indices[entries].astype(np.int64)
