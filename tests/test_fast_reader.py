"""The pyarrow reader: Parquet inputs, agreement with the exact line reader, and bad rows named by file and line."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cdimf.domain_node.data import DataError, IdMap, _read_exact, read_interactions, to_csr


def _rows(path: Path, fmt: str = "auto") -> list[tuple[str, str, float, int]]:
    """(user, item, weight, line) of every row read by the product's reader."""
    raw = read_interactions(path, fmt)
    return list(zip(raw.users.tolist(), raw.items.tolist(), raw.weights.tolist(), raw.lines.tolist()))


def _dense(path: Path, fmt: str = "auto") -> dict[tuple[str, str], float]:
    """{(user key, item key): weight} of the CSR the reader's rows build."""
    raw = read_interactions(path, fmt)
    users, items = IdMap.from_keys(raw.user_keys), IdMap.from_keys(raw.item_keys)
    coo = to_csr(raw, users, items).tocoo()
    return {(str(users.key_of(np.array([r]))[0]), str(items.key_of(np.array([c]))[0])): float(v)
            for r, c, v in zip(coo.row.tolist(), coo.col.tolist(), coo.data.tolist())}


def test_integer_file_matches_a_hand_built_matrix(tmp_path: Path) -> None:
    """A paper file of integer ids (the fast path) gives exactly the pairs written, on numeric id order."""
    rng = np.random.default_rng(3)
    codes = rng.choice(300 * 50, size=2000, replace=False)
    users, items = codes // 50 + 7, codes % 50
    path = tmp_path / "train.txt"
    path.write_text("".join(f"{u}\t{i}\n" for u, i in zip(users.tolist(), items.tolist())))
    expected = {(str(u), str(i)): 1.0 for u, i in zip(users.tolist(), items.tolist())}
    assert _dense(path, "paper") == expected
    raw = read_interactions(path, "paper")
    assert raw.lines.tolist() == list(range(1, 2001))
    assert IdMap.from_keys(raw.user_keys).keys.tolist() == [str(u) for u in sorted(set(users.tolist()))]


def test_fast_and_exact_readers_agree_on_awkward_files(tmp_path: Path) -> None:
    """Leading zeros, huge ids, CRLF, a lone CR, padding and a missing last newline read as the exact reader reads them."""
    cases = {
        "zeros.txt": "007\t1\n7\t1\n0\t2\n",  # "007" and "7" are two keys
        "huge.txt": f"{10**17}\t{10**16}\n1\t2\n",  # beyond the dense table
        "crlf.tsv": "user\titem\tweight\r\n1\t2\t0.5\r\n3\t2\t2\r\n",
        "lone_cr.tsv": "1\t2\r3\t4\n",  # one line: item "2\r3", weight 4
        "padded.csv": "user,item\n a ,b \nc, d\n",
        "no_newline.txt": "1\t2\n3\t4",
        "weights.csv": "1,2,1.5\n2,2,3e0\n",
    }
    for name, text in cases.items():
        path = tmp_path / name
        path.write_bytes(text.encode())
        fmt = "auto" if name.endswith((".csv", ".tsv")) else "paper" if name != "lone_cr.tsv" else "tsv"
        exact = _read_exact(path, fmt)
        assert _rows(path, fmt) == list(zip(exact.users.tolist(), exact.items.tolist(), exact.weights.tolist(),
                                            exact.lines.tolist())), name
    assert _rows(tmp_path / "zeros.txt", "paper")[0][:2] == ("007", "1")
    assert len({row[0] for row in _rows(tmp_path / "zeros.txt", "paper")}) == 3


def test_bad_row_deep_in_a_large_file_is_named_by_line(tmp_path: Path) -> None:
    """A bad row after many good ones fails the fast read; the exact pass names its file and line."""
    lines = [f"{u}\t{u % 97}" for u in range(20_000)]
    for index, bad, message in ((14_321, "5\tx7", "item id 'x7' is not a non-negative integer"),
                                (17_000, "", "empty line"), (9_999, "3\t3\t1", "got 3"), (18_500, "12\t12", "first on line 13")):
        text = lines.copy()
        text[index] = bad
        path = tmp_path / "big.txt"
        path.write_text("\n".join(text) + "\n")
        with pytest.raises(DataError, match=message) as caught:
            read_interactions(path, "paper")
        assert caught.value.line == index + 1 and str(caught.value).startswith(f"{path}:{index + 1}: ")


def _parquet(path: Path, **columns: list) -> Path:
    """A Parquet file of the given columns."""
    pq.write_table(pa.table(columns), path)
    return path


def test_parquet_integer_and_string_columns(tmp_path: Path) -> None:
    """Parquet tables (integer or string keys, optional numeric weight) read like the same CSV."""
    ints = _parquet(tmp_path / "a.parquet", user=[3, 1, 3], item=[10, 10, 11])
    assert _dense(ints) == {("1", "10"): 1.0, ("3", "10"): 1.0, ("3", "11"): 1.0}
    strings = _parquet(tmp_path / "b.pq", user_id=["bob", "al", "bob"], item_id=["x", "y", "y"], w=[2, 0.5, 1.5])
    csv = tmp_path / "b.csv"
    csv.write_text("user,item,weight\nbob,x,2\nal,y,0.5\nbob,y,1.5\n")
    assert _dense(strings) == _dense(csv) == {("bob", "x"): 2.0, ("al", "y"): 0.5, ("bob", "y"): 1.5}
    assert read_interactions(strings, "parquet").lines.tolist() == [1, 2, 3]


@pytest.mark.parametrize("columns, row, message", [
    ({"user": [1, 2, None], "item": [1, 2, 3]}, 3, "missing value in column 'user'"),
    ({"user": [1, 2, 3], "item": [1, 2, 3], "weight": [1.0, -2.0, 1.0]}, 2, "finite number > 0"),
    ({"user": ["a", "", "c"], "item": ["x", "y", "z"]}, 2, "empty user id"),
    ({"user": [1, 2, 1], "item": [5, 6, 5]}, 3, "duplicate pair user '1', item '5' \\(first on line 1\\)"),
])
def test_bad_parquet_rows_are_named_by_file_and_row(tmp_path: Path, columns: dict, row: int, message: str) -> None:
    """Parquet problems raise DataError naming the file and the 1-based row."""
    path = _parquet(tmp_path / "bad.parquet", **columns)
    with pytest.raises(DataError, match=message) as caught:
        read_interactions(path)
    assert caught.value.line == row and str(caught.value).startswith(f"{path}:{row}: ")


def test_parquet_with_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    """A table without 2 or 3 columns, or a text weight, is named as unreadable."""
    with pytest.raises(DataError, match="expected 2 or 3 columns"):
        read_interactions(_parquet(tmp_path / "one.parquet", user=[1]))
    with pytest.raises(DataError, match="expected a number"):
        read_interactions(_parquet(tmp_path / "text.parquet", user=[1], item=[2], weight=["1"]))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="junk.parquet"):
        read_interactions(tmp_path / "junk.parquet")
