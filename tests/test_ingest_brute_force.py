"""The fast ingest path (int32 keys overwritten by codes, the sorted-pair CSR) against a dict brute force."""

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from cdimf.common.core import sparse
from cdimf.domain_node import arrow_reader
from cdimf.domain_node.data import DataError, IdMap, read_interactions, to_csr


def _expected(users: list[int], items: list[int], weights: list[float]) -> dict[tuple[int, int], float]:
    """{(row, col): summed weight}, rows and columns in numeric key order, built with plain Python."""
    user_rank = {u: r for r, u in enumerate(sorted(set(users)))}
    item_rank = {i: c for c, i in enumerate(sorted(set(items)))}
    cells: dict[tuple[int, int], float] = {}
    for u, i, w in zip(users, items, weights):
        cell = (user_rank[u], item_rank[i])
        cells[cell] = cells.get(cell, 0.0) + w
    return cells


def _loaded(path: Path, duplicates: str = "reject") -> tuple[sp.csr_matrix, IdMap, IdMap]:
    """The product's load: reader, both id maps and the users x items CSR."""
    raw = read_interactions(path, "auto", duplicates=duplicates)
    users, items = IdMap.from_keys(raw.user_keys), IdMap.from_keys(raw.item_keys)
    return to_csr(raw, users, items), users, items


def _cells(matrix: sp.csr_matrix) -> dict[tuple[int, int], float]:
    """{(row, col): value} of a canonical CSR, after checking it is canonical."""
    assert matrix.has_canonical_format
    assert matrix.dtype == np.float32
    coo = matrix.tocoo()
    return {(r, c): v for r, c, v in zip(coo.row.tolist(), coo.col.tolist(), coo.data.tolist())}


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of a few thousand rows, so a test file of 60k rows crosses every block boundary many times."""
    monkeypatch.setattr(arrow_reader, "_STREAM_BLOCK", 1 << 14)
    monkeypatch.setattr(arrow_reader, "_CODE_BLOCK", 4093)
    monkeypatch.setattr(sparse, "_BLOCK", 3001)


def test_sparse_ids_over_many_blocks_give_the_brute_force_matrix(tmp_path: Path, small_blocks: None) -> None:
    """Ids up to 10^8 (not a dense table), unsorted, over many stream and code blocks: every cell as written."""
    rng = np.random.default_rng(11)
    user_pool, item_pool = rng.choice(10**8, 9000, replace=False), rng.choice(10**7, 700, replace=False)
    codes = rng.choice(9000 * 700, size=60_000, replace=False)
    users, items = user_pool[codes // 700].tolist(), item_pool[codes % 700].tolist()
    path = tmp_path / "train.txt"
    path.write_text("".join(f"{u}\t{i}\n" for u, i in zip(users, items)))
    matrix, user_ids, item_ids = _loaded(path)
    assert matrix.shape == (len(set(users)), len(set(items)))
    assert _cells(matrix) == _expected(users, items, [1.0] * len(users))
    assert user_ids.keys.tolist() == [str(u) for u in sorted(set(users))]
    assert item_ids.keys.tolist() == [str(i) for i in sorted(set(items))]


def test_repeated_pairs_sum_or_are_refused(tmp_path: Path, small_blocks: None) -> None:
    """Repeated pairs far apart in the file: summed under duplicates="sum", refused by default with the line."""
    rng = np.random.default_rng(5)
    users = rng.integers(0, 4000, 30_000).tolist()
    items = rng.integers(0, 300, 30_000).tolist()
    path = tmp_path / "train.txt"
    path.write_text("".join(f"{u}\t{i}\n" for u, i in zip(users, items)))
    expected = _expected(users, items, [1.0] * len(users))
    assert len(expected) < len(users)  # the draw repeats pairs
    matrix, _, _ = _loaded(path, duplicates="sum")
    assert _cells(matrix) == expected
    with pytest.raises(DataError, match="train.txt"):
        read_interactions(path, "auto")


def test_weighted_file_over_many_blocks_gives_the_brute_force_matrix(tmp_path: Path, small_blocks: None) -> None:
    """A weighted CSV (the path that keeps each row's weight) builds the same cells as the brute force."""
    rng = np.random.default_rng(8)
    codes = rng.choice(5000 * 400, size=40_000, replace=False)
    users, items = (codes // 400 * 3 + 1).tolist(), (codes % 400 * 7).tolist()
    weights = rng.integers(1, 9, 40_000).astype(float) / 4
    path = tmp_path / "train.csv"
    path.write_text("user,item,weight\n" + "".join(f"{u},{i},{w}\n" for u, i, w in zip(users, items, weights.tolist())))
    matrix, _, _ = _loaded(path)
    assert _cells(matrix) == _expected(users, items, weights.tolist())


def test_pattern_csr_against_a_dense_brute_force(small_blocks: None) -> None:
    """pattern_csr's cells equal a dense array filled pair by pair; a repeated pair gives None."""
    rng = np.random.default_rng(2)
    codes = rng.choice(500 * 37, size=9000, replace=False)
    rows, cols = (codes // 37).astype(np.int32), (codes % 37).astype(np.int32)
    dense = np.zeros((500, 37), dtype=np.float32)
    for r, c in zip(rows.tolist(), cols.tolist()):
        dense[r, c] = 2.5
    matrix = sparse.pattern_csr(rows, cols, (500, 37), value=2.5)
    assert matrix is not None and matrix.has_canonical_format
    np.testing.assert_array_equal(matrix.toarray(), dense)
    repeated = np.concatenate([rows, rows[4321:4322]]), np.concatenate([cols, cols[4321:4322]])
    assert sparse.pattern_csr(*repeated, (500, 37)) is None
