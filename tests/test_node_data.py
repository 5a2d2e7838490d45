"""A node's own data: rows, holder flags, cold users, carved validation and its splits' candidates."""

from pathlib import Path

import numpy as np
import pytest

from cdimf.common.config import VALID_NEGATIVES
from cdimf.common.core.evaluation import PAPER_NEGATIVES
from cdimf.domain_node.data import DataError
from cdimf.domain_node.node_data import load_node_data


def _write(path: Path, pairs: list[tuple[str, str]]) -> Path:
    """A user,item CSV file of the pairs."""
    path.write_text("user,item\n" + "".join(f"{u},{i}\n" for u, i in pairs))
    return path


def test_users_only_in_held_out_files_are_rows_without_interactions(tmp_path: Path) -> None:
    """Test-only users get rows (non-holders, for cold start); validation is carved the same way twice."""
    train = _write(tmp_path / "train.csv", [(f"u{u}", f"i{(u * 3 + k) % 12}") for u in range(10) for k in range(3)])
    test = _write(tmp_path / "test.csv", [("u1", "i2"), ("cold-a", "i5"), ("cold-b", "i7")])
    first = load_node_data("sport", train, None, test, "csv")
    again = load_node_data("sport", train, None, test, "csv")
    assert first.train.shape == (12, 12) and first.valid_carved
    cold = first.users.index_of(np.array(["cold-a", "cold-b"]))
    assert not first.holder[cold].any() and first.holder.sum() == 10
    assert first.train.nnz == 30 - len(first.valid.users)
    np.testing.assert_array_equal(first.valid.users, again.valid.users)
    np.testing.assert_array_equal(first.valid.candidates, again.valid.candidates)
    other = load_node_data("cloth", train, None, test, "csv")
    assert not np.array_equal(first.valid.items, other.valid.items), "another domain name carves other pairs"
    # a tiny catalog: as many negatives as every row can get, none of them the target or a held-out item
    assert first.test.candidates.shape == (3, 12)
    assert all(len(set(row)) == 12 for row in first.test.candidates.tolist())


def test_an_item_unknown_to_train_is_refused_with_file_and_line(tmp_path: Path) -> None:
    """Held-out items must occur in the domain's train (they could not be scored)."""
    train = _write(tmp_path / "train.csv", [("u1", "i1"), ("u2", "i2")])
    test = _write(tmp_path / "test.csv", [("u1", "i2"), ("u2", "i9")])
    with pytest.raises(DataError, match=r"test\.csv:3: item 'i9'"):
        load_node_data("sport", train, None, test, "csv")


def test_validation_ranks_against_its_own_negatives_and_test_against_the_papers(tmp_path: Path) -> None:
    """valid_negatives sets the validation candidates per row; the test split keeps 999."""
    # 1200 items, each held by two users (so carving keeps it in train): room for the paper's 999 negatives
    train = _write(tmp_path / "train.csv", [(f"u{u}", f"i{u % 10 * 120 + k}") for u in range(20) for k in range(120)])
    test = _write(tmp_path / "test.csv", [("u1", "i5"), ("u2", "i700")])
    data = load_node_data("sport", train, None, test, "csv", valid_negatives=50)
    assert data.valid is not None and data.valid.candidates.shape == (len(data.valid.users), 51) and len(data.valid.users) > 10
    assert data.test is not None and data.test.candidates.shape == (2, PAPER_NEGATIVES + 1)
    default = load_node_data("sport", train, None, None, "csv").valid
    assert default is not None and default.candidates.shape[1] == VALID_NEGATIVES + 1
