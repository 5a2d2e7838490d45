"""Loaders against the shipped files' known counts, malformed inputs, id maps and splits."""

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from cdimf.domain_node.data import (
    DataError,
    IdMap,
    cold_start_holdout,
    leave_one_out,
    read_interactions,
    to_csr,
)
from cdimf.pairs import load_cold_pair, load_pair, load_warm_pair

DATA = Path(__file__).resolve().parents[1] / "data" / "amazon-cdr"
WARM = DATA / "warm-start_sport_cloth"
COLD = DATA / "cold-start_sport_cloth"


def _pairs(matrix: sp.csr_matrix) -> set[tuple[int, int]]:
    """Stored (row, column) pairs of a sparse matrix."""
    coo = matrix.tocoo()
    return set(zip(coo.row.tolist(), coo.col.tolist()))


@pytest.fixture(scope="module")
def warm() -> tuple:
    """The shipped warm pair, loaded once."""
    return load_warm_pair(WARM)


@pytest.fixture(scope="module")
def cold() -> tuple:
    """The shipped cold pair, loaded once."""
    return load_cold_pair(COLD)


@pytest.mark.parametrize("path, rows, users, items", [
    (WARM / "sport_cloth" / "train.txt", 92612, 9928, 30796),
    (WARM / "sport_cloth" / "test.txt", 8326, 8326, 5734),
    (WARM / "cloth_sport" / "train.txt", 87829, 9928, 39008),
    (WARM / "cloth_sport" / "test.txt", 7540, 7540, 5495),
    (COLD / "sport_cloth" / "train.txt", 163291, 26346, 12655),
    (COLD / "sport_cloth" / "valid.txt", 3589, 912, 2749),
    (COLD / "sport_cloth" / "test.txt", 3546, 897, 2698),
    (COLD / "cloth_sport" / "train.txt", 187880, 40839, 17943),
    (COLD / "cloth_sport" / "valid.txt", 3156, 915, 2544),
    (COLD / "cloth_sport" / "test.txt", 3085, 907, 2519),
])
def test_shipped_file_counts(path: Path, rows: int, users: int, items: int) -> None:
    """Each shipped file has the rows, users and items of the dataset README's table."""
    raw = read_interactions(path, fmt="paper")
    assert (len(raw), len(np.unique(raw.users)), len(np.unique(raw.items))) == (rows, users, items)
    assert raw.weights.dtype == np.float32 and bool(np.all(raw.weights == 1))


def test_warm_pair(warm: tuple) -> None:
    """Warm pair: one shared user map, validation carved from train, held-out pairs disjoint from train."""
    sport, cloth = warm
    assert (sport.name, cloth.name) == ("sport", "cloth")
    assert sport.users is cloth.users and len(sport.users) == 9928
    assert sport.train.shape == (9928, 30796) and cloth.train.shape == (9928, 39008)
    assert sport.train.dtype == np.float32 and sport.train.has_canonical_format
    # Validation is carved out of train: together they are the whole train file.
    assert sport.train.nnz + len(sport.valid_users) == 92612
    assert cloth.train.nnz + len(cloth.valid_users) == 87829
    assert (len(sport.test_users), len(cloth.test_users)) == (8326, 7540)
    for domain in warm:
        assert np.unique(domain.valid_users).size == domain.valid_users.size
        assert not _pairs(domain.train) & set(zip(domain.valid_users.tolist(), domain.valid_items.tolist()))
        assert not _pairs(domain.train) & set(zip(domain.test_users.tolist(), domain.test_items.tolist()))
        # Every held-out item keeps a training entry, as in the paper's test files.
        assert domain.catalog().size == domain.n_items
    # Ids round-trip: the first line of sport train is "0 \t 23761 \t 1" (moved to valid or kept).
    user, item = sport.users.index_of(np.array(["0"]))[0], sport.items.index_of(np.array(["23761"]))[0]
    in_train = sport.train[user, item] == 1
    in_valid = bool(np.any((sport.valid_users == user) & (sport.valid_items == item)))
    assert in_train != in_valid


def test_warm_validation_is_seeded(warm: tuple) -> None:
    """The carved validation depends on valid_seed only."""
    again, _ = load_warm_pair(WARM, valid_seed=0)
    other, _ = load_warm_pair(WARM, valid_seed=1)
    assert np.array_equal(warm[0].valid_items, again.valid_items)
    assert not np.array_equal(warm[0].valid_items, other.valid_items)


def test_cold_pair(cold: tuple) -> None:
    """Cold pair: union user map, shared-user count, and valid/test users cold in their domain only."""
    sport, cloth = cold
    assert sport.users is cloth.users and len(sport.users) == 41829
    sport_rows, cloth_rows = np.diff(sport.train.indptr), np.diff(cloth.train.indptr)
    assert (sport.train.nnz, int((sport_rows > 0).sum()), sport.n_items) == (163291, 26346, 12655)
    assert (cloth.train.nnz, int((cloth_rows > 0).sum()), cloth.n_items) == (187880, 40839, 17943)
    assert int(((sport_rows > 0) & (cloth_rows > 0)).sum()) == 25356
    assert (len(sport.valid_users), len(sport.test_users)) == (3589, 3546)
    assert (len(cloth.valid_users), len(cloth.test_users)) == (3156, 3085)
    # Cold users: no training rows in the scored domain, some in the other one.
    for scored, other_rows, own_rows in ((sport, cloth_rows, sport_rows), (cloth, sport_rows, cloth_rows)):
        for users in (scored.valid_users, scored.test_users):
            assert np.all(own_rows[users] == 0) and np.all(other_rows[users] > 0)
    assert set(sport.users.key_of(np.unique(sport.test_users)).astype(int).tolist()) <= set(range(7856, 8838))


def test_id_map_numeric_order_and_round_trip() -> None:
    """Integer keys sort numerically, map back to themselves, and unknown keys fail or map to `missing`."""
    ids = IdMap.from_keys(np.array(["10", "9", "100", "9", "007", "7"]))
    # Numeric order; equal numbers ("007", "7") stay distinct keys, ordered by their text.
    assert ids.keys.tolist() == ["007", "7", "9", "10", "100"]
    assert len(ids) == 5
    query = np.array(["100", "7", "9", "007"])
    assert ids.index_of(query).tolist() == [4, 1, 2, 0]
    assert ids.key_of(ids.index_of(query)).tolist() == query.tolist()
    assert ids.index_of(np.array([10, 9])).tolist() == [3, 2]
    with pytest.raises(KeyError, match="'8'"):
        ids.index_of(np.array(["9", "8"]))
    assert ids.index_of(np.array(["9", "8"]), missing=-1).tolist() == [2, -1]
    with pytest.raises(ValueError):
        ids.keys[0] = "x"


def test_id_map_string_keys_sort_lexically() -> None:
    """A map with non-integer keys sorts all keys as text."""
    ids = IdMap.from_keys(np.array(["bob", "alice", "10", "2"]))
    assert ids.keys.tolist() == ["10", "2", "alice", "bob"]
    assert ids.index_of(np.array(["alice"])).tolist() == [2]


def _write(tmp_path: Path, name: str, text: str) -> Path:
    """A file with the given text (bytes as written, no newline translation)."""
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


@pytest.mark.parametrize("text, line, message", [
    ("1\t2\t1\n1\t3\t1\n4\t5\n", 3, "got 2"),
    ("1\t2\n1\t3\t1\n", 2, "got 3"),
    ("1\t2\t1\n3\t4\tabc\n", 2, "'abc' is not a number"),
    ("1\t2\t1\n3\t4\tnan\n", 2, "finite number > 0"),
    ("1\t2\t1\n3\t4\t-1\n", 2, "finite number > 0"),
    ("1\t2\t0\n", 1, "finite number > 0"),
    ("1\t2\n\t4\n", 2, "empty user id"),
    ("1\t2\n3\t \n", 2, "empty item id"),
    ("1\t2\n\n3\t4\n", 2, "empty line"),
    ("1\t2\n3\t4\n1\t2\n", 3, "first on line 1"),
    ("1\t2\nx\t4\n", 2, "user id 'x' is not a non-negative integer"),
    ("1\t2\t1\t1\n", 1, "got 4"),
    ("12\n", 1, "got 1"),
    ("1\t2\n3\t" + "9" * 300 + "\n", 2, "item id longer than 256"),
])
def test_malformed_paper_files_name_file_and_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    """Each kind of malformed line raises DataError naming the file and that line."""
    path = _write(tmp_path, "bad.txt", text)
    with pytest.raises(DataError, match=message) as caught:
        read_interactions(path, fmt="paper")
    assert caught.value.line == line
    assert str(caught.value).startswith(f"{path}:{line}: ")


def test_missing_file_is_named(tmp_path: Path) -> None:
    """A file that cannot be read raises DataError naming it."""
    with pytest.raises(DataError, match="cannot read") as caught:
        read_interactions(tmp_path / "absent.txt")
    assert caught.value.path == tmp_path / "absent.txt"


@pytest.mark.parametrize("text", ["", "\n\n", "   \n"])
def test_empty_file_is_rejected(tmp_path: Path, text: str) -> None:
    """Empty or blank files raise DataError naming the file."""
    path = _write(tmp_path, "empty.csv", text)
    with pytest.raises(DataError, match="empty") as caught:
        read_interactions(path)
    assert str(path) in str(caught.value)


def test_undecodable_bytes_name_the_line(tmp_path: Path) -> None:
    """Non-UTF-8 bytes raise DataError at their line."""
    path = tmp_path / "bad.tsv"
    path.write_bytes(b"1\t2\n3\t\xff\n")
    with pytest.raises(DataError, match="UTF-8") as caught:
        read_interactions(path)
    assert caught.value.line == 2


def test_generic_csv_with_header_crlf_and_string_keys(tmp_path: Path) -> None:
    """A CSV with a header, CRLF, spaces and string ids reads into the right matrix."""
    path = _write(tmp_path, "events.csv", "user_id,item_id,weight\r\n alice , book,2.5\r\nbob,book,1\r\nbob,pen,3\r\n")
    raw = read_interactions(path)
    assert raw.users.tolist() == ["alice", "bob", "bob"]
    assert raw.items.tolist() == ["book", "book", "pen"]
    assert raw.weights.tolist() == [2.5, 1.0, 3.0]
    assert raw.lines.tolist() == [2, 3, 4]
    users, items = IdMap.from_keys(raw.users), IdMap.from_keys(raw.items)
    matrix = to_csr(raw, users, items)
    assert matrix.dtype == np.float32 and matrix.shape == (2, 2)
    assert matrix.toarray().tolist() == [[2.5, 0.0], [1.0, 3.0]]


def test_errors_after_a_header_count_the_header_line(tmp_path: Path) -> None:
    """Line numbers count the header line."""
    path = _write(tmp_path, "events.csv", "user,item\na,b\nc,\n")
    with pytest.raises(DataError, match="empty item id") as caught:
        read_interactions(path)
    assert caught.value.line == 3


def test_sniffed_delimiter_and_duplicate_sum(tmp_path: Path) -> None:
    """An unknown extension sniffs the delimiter; duplicates are rejected or summed on request."""
    path = _write(tmp_path, "events.dat", "u1,i1,1\nu1,i2,2\nu1,i1,4\n")
    with pytest.raises(DataError, match="duplicate") as caught:
        read_interactions(path)
    assert caught.value.line == 3
    raw = read_interactions(path, duplicates="sum")
    assert list(zip(raw.users.tolist(), raw.items.tolist(), raw.weights.tolist(), raw.lines.tolist())) == [
        ("u1", "i1", 5.0, 1), ("u1", "i2", 2.0, 2)]


def test_to_csr_names_the_line_of_an_unknown_key(tmp_path: Path) -> None:
    """to_csr reports the source line of a key missing from the id map."""
    raw = read_interactions(_write(tmp_path, "t.tsv", "a\tx\nb\ty\n"))
    with pytest.raises(DataError, match="user 'b'") as caught:
        to_csr(raw, IdMap.from_keys(np.array(["a"])), IdMap.from_keys(np.array(["x", "y"])))
    assert caught.value.line == 2


def test_load_pair_rejects_test_item_unknown_in_train(tmp_path: Path) -> None:
    """Held-out rows with an unknown item or user raise DataError at their file and line."""
    train_a = _write(tmp_path, "train_a.txt", "1\t10\n1\t11\n2\t10\n")
    train_b = _write(tmp_path, "train_b.txt", "1\t20\n3\t21\n")
    good_test = _write(tmp_path, "test_b.txt", "2\t21\n")
    bad_test = _write(tmp_path, "test_a.txt", "2\t11\n3\t99\n")
    with pytest.raises(DataError, match="item '99' does not occur") as caught:
        load_pair(train_a, train_b, bad_test, good_test)
    assert caught.value.path == bad_test and caught.value.line == 2
    stranger = _write(tmp_path, "stranger.txt", "5\t10\n")
    with pytest.raises(DataError, match="user '5' has no training") as caught:
        load_pair(train_a, train_b, stranger, good_test)
    assert caught.value.line == 1


def test_load_pair_generic_files(tmp_path: Path) -> None:
    """load_pair reads any pair of CSV files by path on one shared user map."""
    train_a = _write(tmp_path, "a.csv", "user,item\nu1,x\nu1,y\nu2,x\nu2,y\n")
    train_b = _write(tmp_path, "b.csv", "user,item\nu2,p\nu3,q\n")
    test_a = _write(tmp_path, "ta.csv", "u3,x\n")
    test_b = _write(tmp_path, "tb.csv", "u1,q\n")
    a, b = load_pair(train_a, train_b, test_a, test_b, names=("left", "right"))
    assert a.users.keys.tolist() == ["u1", "u2", "u3"] and a.users is b.users
    assert a.items.keys.tolist() == ["x", "y"] and b.items.keys.tolist() == ["p", "q"]
    assert (a.test_users.tolist(), a.test_items.tolist()) == ([2], [0])
    assert (b.test_users.tolist(), b.test_items.tolist()) == ([0], [1])
    # Leave-one-out keeps every item in train: a's users each hold one of x, y out at most.
    assert a.train.nnz + len(a.valid_users) == 4 and a.catalog().tolist() == [0, 1]


def _random_train(seed: int, n_users: int = 60, n_items: int = 40) -> sp.csr_matrix:
    """A random binary users x items CSR with some empty and some one-entry rows."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 8, size=n_users)
    rows = np.repeat(np.arange(n_users), counts)
    cols = np.concatenate([rng.choice(n_items, size=c, replace=False) for c in counts])
    return sp.csr_matrix((np.ones(rows.size, dtype=np.float32), (rows, cols)), shape=(n_users, n_items))


def test_leave_one_out_properties() -> None:
    """Leave-one-out holds one entry per eligible user, disjoint from train, deterministic per seed."""
    train = _random_train(0)
    reduced, users, items = leave_one_out(train, seed=5, min_rows=2, keep_items=False)
    counts = np.diff(train.indptr)
    assert users.tolist() == np.flatnonzero(counts >= 2).tolist()
    held = set(zip(users.tolist(), items.tolist()))
    assert held <= _pairs(train) and not held & _pairs(reduced)
    assert _pairs(reduced) | held == _pairs(train)
    assert reduced.has_canonical_format and reduced.dtype == np.float32
    again = leave_one_out(train, seed=5, min_rows=2, keep_items=False)
    assert np.array_equal(again[2], items) and (again[0] != reduced).nnz == 0
    assert not np.array_equal(leave_one_out(train, seed=6, min_rows=2, keep_items=False)[2], items)


def test_leave_one_out_keeps_items_in_train() -> None:
    """With keep_items no item loses its last training entry."""
    train = _random_train(1, n_items=200)  # sparse columns: many items have a single entry
    reduced, users, items = leave_one_out(train, seed=0)
    remaining = np.bincount(reduced.indices, minlength=train.shape[1])
    assert np.all(remaining[items] > 0)
    assert np.array_equal(np.bincount(train.indices, minlength=200) > 0, remaining > 0)
    assert _pairs(reduced) | set(zip(users.tolist(), items.tolist())) == _pairs(train)


def test_cold_start_holdout_properties() -> None:
    """Cold holdout removes whole histories of a sample of shared users, deterministically."""
    target, other = _random_train(2), _random_train(3)
    reduced, users, items = cold_start_holdout(target, other, fraction=0.3, seed=4, keep_items=False)
    shared = np.flatnonzero((np.diff(target.indptr) > 0) & (np.diff(other.indptr) > 0))
    cold = np.unique(users)
    assert cold.size == round(0.3 * shared.size) and set(cold.tolist()) <= set(shared.tolist())
    assert np.all(np.diff(reduced.indptr)[cold] == 0)
    held = set(zip(users.tolist(), items.tolist()))
    assert held == {(u, i) for u, i in _pairs(target) if u in set(cold.tolist())}
    assert _pairs(reduced) | held == _pairs(target)
    again = cold_start_holdout(target, other, fraction=0.3, seed=4, keep_items=False)
    assert np.array_equal(again[1], users) and np.array_equal(again[2], items)
    kept_reduced, kept_users, kept_items = cold_start_holdout(target, other, fraction=0.3, seed=4)
    assert (kept_reduced != reduced).nnz == 0  # the users are cold either way
    remaining = np.bincount(reduced.indices, minlength=target.shape[1])
    assert np.all(remaining[kept_items] > 0) and set(zip(kept_users.tolist(), kept_items.tolist())) <= held


def test_cold_start_holdout_needs_one_user_index() -> None:
    """Matrices with different row counts are rejected."""
    with pytest.raises(ValueError, match="share one user index"):
        cold_start_holdout(_random_train(0, n_users=5), _random_train(0, n_users=6), 0.5, seed=0)
