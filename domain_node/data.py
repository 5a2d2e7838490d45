"""Interaction files, id maps and the leave-one-out / cold-start splits of one training matrix.

File formats read by `read_interactions` (UTF-8, one interaction per line, LF or CRLF):

- ``paper``: the UniCDR/DisenCDR/CDRIB text format, ``user \\t item [\\t weight]``, no header,
  user and item ids are non-negative decimal integers.
- ``csv`` / ``tsv``: a generic ``user,item[,weight]`` file (comma or tab). Keys are any
  non-empty strings (surrounding spaces are stripped). The first line is a header, and skipped,
  exactly when its first field starts with ``user`` and its second with ``item``
  (case-insensitive), e.g. ``user,item,weight`` or ``user_id\\titem_id``.
- ``auto``: ``.csv`` means csv, ``.tsv`` means tsv, anything else is sniffed from the first
  line (a tab means tsv, else a comma means csv).

Every line has the same number of fields, 2 or 3; a missing weight is 1. A weight must be a
finite number > 0. Empty lines are rejected except at the very end of the file. A repeated
(user, item) pair is rejected by default (``duplicates="sum"`` adds the weights instead).
Ids are at most `MAX_KEY_CHARS` (256) characters.
Every problem raises `DataError` naming the file and the 1-based line.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from cdimf.common.core.sparse import canonical_csr, pairs_to_csr

FLOAT = np.float32
FORMATS = ("auto", "paper", "csv", "tsv")
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


@dataclass(frozen=True, eq=False)
class IdMap:
    """Frozen bijection between original keys (strings) and contiguous indices 0..n-1."""

    keys: np.ndarray
    _lexical_keys: np.ndarray = field(repr=False)
    _lexical_positions: np.ndarray = field(repr=False)

    @classmethod
    def from_keys(cls, keys: np.ndarray) -> "IdMap":
        """Map the unique keys to 0..n-1 in sorted order (numeric order when all keys are integers)."""
        lexical_keys = np.unique(_as_str(keys))
        order = _numeric_order(lexical_keys)
        ordered = lexical_keys[order]
        positions = np.empty(len(order), dtype=np.int64)
        positions[order] = np.arange(len(order), dtype=np.int64)
        for array in (ordered, lexical_keys, positions):
            array.flags.writeable = False
        return cls(ordered, lexical_keys, positions)

    def __len__(self) -> int:
        """Number of keys."""
        return len(self.keys)

    def index_of(self, keys: np.ndarray, missing: int | None = None) -> np.ndarray:
        """Indices of the given keys; unknown keys raise KeyError, or map to `missing` when it is given."""
        query = _as_str(keys)
        if len(self) == 0:
            found = np.zeros(query.shape, dtype=bool)
            slots = np.zeros(query.shape, dtype=np.int64)
        else:
            slots = np.searchsorted(self._lexical_keys, query).clip(max=len(self) - 1)
            found = self._lexical_keys[slots] == query
        indices = np.where(found, self._lexical_positions[slots], -1 if missing is None else missing)
        if missing is None and not bool(found.all()):
            first = query.reshape(-1)[int(np.argmin(found.reshape(-1)))]
            raise KeyError(f"unknown key {_shown(str(first))}")
        return indices.astype(np.int64, copy=False)

    def key_of(self, indices: np.ndarray) -> np.ndarray:
        """Original keys of the given indices."""
        return self.keys[np.asarray(indices, dtype=np.int64)]


@dataclass(frozen=True, eq=False)
class RawInteractions:
    """Interactions as read from one file: original keys, weights and their source lines."""

    path: Path
    users: np.ndarray
    items: np.ndarray
    weights: np.ndarray
    lines: np.ndarray

    def __len__(self) -> int:
        """Number of interactions."""
        return len(self.users)


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


def _merge_duplicates(path: Path, users: np.ndarray, items: np.ndarray, weights: np.ndarray, lines: np.ndarray,
                      policy: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reject repeated (user, item) pairs, or sum their weights keeping the first line."""
    _, user_codes = np.unique(users, return_inverse=True)
    item_codes_unique, item_codes = np.unique(items, return_inverse=True)
    pair_codes = user_codes.astype(np.int64) * len(item_codes_unique) + item_codes
    order = np.argsort(pair_codes, kind="stable")
    repeated = pair_codes[order][1:] == pair_codes[order][:-1]
    if not repeated.any():
        return users, items, weights, lines
    if policy == "reject":
        later = order[1:][repeated]
        earlier = order[:-1][repeated]
        first = int(np.argmin(lines[later]))
        raise DataError(
            path,
            f"duplicate pair user {_shown(str(users[later[first]]))}, item {_shown(str(items[later[first]]))} "
            f"(first on line {int(lines[earlier[first]])})",
            int(lines[later[first]]),
        )
    starts = np.flatnonzero(np.concatenate(([True], ~repeated)))
    keep = np.sort(order[starts])  # first occurrence of each pair, in file order
    group_of_row = np.cumsum(np.concatenate(([True], ~repeated))) - 1
    summed = np.zeros(len(starts), dtype=np.float64)
    np.add.at(summed, group_of_row, weights[order])
    summed_by_first_row = np.empty(len(users), dtype=np.float64)
    summed_by_first_row[order[starts]] = summed
    return users[keep], items[keep], summed_by_first_row[keep].astype(FLOAT), lines[keep]


def read_interactions(path: str | Path, fmt: str = "auto", duplicates: str = "reject") -> RawInteractions:
    """Read one interaction file (see the module docstring for formats); DataError names file and line."""
    path = Path(path)
    if duplicates not in DUPLICATE_POLICIES:
        raise ValueError(f"unknown duplicates policy {duplicates!r}; expected one of {DUPLICATE_POLICIES}")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(path, f"cannot read: {error.strerror or error}") from None
    text = _decode(path, raw).rstrip("\n")
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
    keys_by_role = {}
    for column, role in enumerate(("user", "item")):
        keys = fields[:, column]
        key_lengths = np.strings.str_len(keys)
        if (key_lengths == 0).any():
            raise DataError(path, f"empty {role} id", int(line_numbers[np.argmax(key_lengths == 0)]))
        if (key_lengths > MAX_KEY_CHARS).any():
            raise DataError(path, f"{role} id longer than {MAX_KEY_CHARS} characters",
                            int(line_numbers[np.argmax(key_lengths > MAX_KEY_CHARS)]))
        # Fixed-width keys (now of bounded width) sort and search several times faster.
        keys_by_role[role] = keys = _as_str(keys)
        if fmt == "paper":
            not_integer = ~np.strings.isdecimal(keys)
            if not_integer.any():
                first = int(np.argmax(not_integer))
                raise DataError(path, f"{role} id {_shown(str(keys[first]))} is not a non-negative integer",
                                int(line_numbers[first]))
    weights = _parse_weights(path, fields[:, 2], line_numbers) if expected == 3 else np.ones(len(texts), dtype=FLOAT)
    users, items, weights, line_numbers = _merge_duplicates(path, keys_by_role["user"], keys_by_role["item"], weights,
                                                            line_numbers, duplicates)
    return RawInteractions(path, users, items, weights, line_numbers)


def indices_or_error(raw: RawInteractions, keys: np.ndarray, ids: IdMap, role: str, hint: str) -> np.ndarray:
    """Indices of keys in an IdMap, or DataError at the line of the first unknown key."""
    indices = ids.index_of(keys, missing=-1)
    unknown = indices < 0
    if unknown.any():
        first = int(np.argmax(unknown))
        raise DataError(raw.path, f"{role} {_shown(str(keys[first]))} {hint}", int(raw.lines[first]))
    return indices


def to_csr(raw: RawInteractions, users: IdMap, items: IdMap) -> sp.csr_matrix:
    """Users x items float32 CSR of raw interactions; DataError at the line of an unknown key."""
    rows = indices_or_error(raw, raw.users, users, "user", "is not in the user id map")
    cols = indices_or_error(raw, raw.items, items, "item", "is not in the item id map")
    return pairs_to_csr(rows, cols, (len(users), len(items)), raw.weights)


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
