"""The plain array container of the state folders: exact round trip, atomic replacement, damage detected."""

from pathlib import Path

import numpy as np
import pytest

from cdimf.common.atomic_files import read_arrays, read_arrays_or_npz, write_arrays_atomically


def _arrays() -> dict[str, np.ndarray]:
    """Arrays of several dtypes and shapes, an empty one and a non-contiguous one among them."""
    rng = np.random.default_rng(7)
    return {
        "meta": np.frombuffer(b'{"round": 3}', dtype=np.uint8),
        "factors": rng.standard_normal((40, 6)).astype(np.float32),
        "rows": np.arange(0, 80, 2, dtype=np.int64),
        "none": np.zeros((0, 6), dtype=np.float32),
        "transposed": rng.standard_normal((6, 5)).T,
        "flags": rng.random(9) < 0.5,
    }


def test_arrays_round_trip_bit_for_bit_and_replace_the_previous_file(tmp_path: Path) -> None:
    """Names, order, dtypes, shapes and values come back; a second write replaces the file and leaves no temp file."""
    path = tmp_path / "state.arrays"
    write_arrays_atomically(path, {"old": np.ones(3)})
    expected = _arrays()
    write_arrays_atomically(path, expected)
    loaded = read_arrays(path)
    assert list(loaded) == list(expected)
    for name, array in expected.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
        np.testing.assert_array_equal(loaded[name], array)
    assert [entry.name for entry in tmp_path.iterdir()] == ["state.arrays"]


def test_containers_and_npz_files_of_earlier_versions_read_alike(tmp_path: Path) -> None:
    """read_arrays_or_npz tells the formats apart by their first bytes and returns the same arrays."""
    expected = _arrays()
    write_arrays_atomically(tmp_path / "new.arrays", expected)
    np.savez(tmp_path / "old.npz", **expected)
    for name in ("new.arrays", "old.npz"):
        loaded = read_arrays_or_npz(tmp_path / name)
        assert sorted(loaded) == sorted(expected)
        for key, array in expected.items():
            np.testing.assert_array_equal(loaded[key], array)


@pytest.mark.parametrize("damage", ["cut in the magic", "cut in a name", "cut in an array", "trailing bytes", "not a container"])
def test_damaged_containers_raise_value_errors_naming_the_file(tmp_path: Path, damage: str) -> None:
    """Every kind of damage is reported with the file's path instead of returning some of the arrays."""
    path = tmp_path / "state.arrays"
    write_arrays_atomically(path, _arrays())
    whole = path.read_bytes()
    damaged = {
        "cut in the magic": whole[:5],
        "cut in a name": whole[:len(b"CDIMF-ARRAYS 1\n") + 6],
        "cut in an array": whole[: len(whole) // 2],
        "trailing bytes": whole + b"\x00\x01",
        "not a container": b"PK\x03\x04" + whole[4:],
    }[damage]
    path.write_bytes(damaged)
    with pytest.raises(ValueError, match="state.arrays"):
        read_arrays(path)


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path: Path) -> None:
    """An array that cannot be written (objects) aborts the write: the old file stays whole."""
    path = tmp_path / "state.arrays"
    write_arrays_atomically(path, {"kept": np.arange(4)})
    with pytest.raises(ValueError):
        write_arrays_atomically(path, {"fine": np.arange(3), "objects": np.array([{"a": 1}], dtype=object)})
    np.testing.assert_array_equal(read_arrays(path)["kept"], np.arange(4))
    assert [entry.name for entry in tmp_path.iterdir()] == ["state.arrays"]
