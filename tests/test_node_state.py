"""The node's checkpoint: atomic write, exact round trip, clear errors for unusable files."""

import json
from pathlib import Path

import numpy as np
import pytest

from cdimf.common.core.model import TrainerState
from cdimf.domain_node.checkpoint import CHECKPOINT_FILE, LEGACY_CHECKPOINT_FILE, Checkpoint, CheckpointError, check_resumable, load_checkpoint, save_checkpoint


def _checkpoint(round_index: int, with_consensus: bool = True) -> Checkpoint:
    """A random checkpoint of a small trainer state for `round_index`."""
    rng = np.random.default_rng(round_index)
    state = TrainerState(
        users=rng.standard_normal((7, 3)).astype(np.float32),
        items=rng.standard_normal((5, 3)).astype(np.float32),
        duals=rng.standard_normal((2, 3)).astype(np.float32),
        consensus=rng.standard_normal((2, 3)).astype(np.float32) if with_consensus else None,
        receiver_consensus=rng.standard_normal((1, 3)).astype(np.float32) if with_consensus else None,
        epochs=4 * round_index,
        exchanges=round_index,
    )
    return Checkpoint("run-1", round_index, "ab" * 32, np.array([1, 4]), np.array([6]), state)


def test_a_checkpoint_round_trips_exactly_and_replaces_the_previous_one(tmp_path: Path) -> None:
    """Every array and counter comes back bit for bit; a later save replaces the file, no temp files stay."""
    assert load_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, _checkpoint(1, with_consensus=False))
    assert load_checkpoint(tmp_path).trainer.consensus is None
    save_checkpoint(tmp_path, _checkpoint(2))
    loaded = load_checkpoint(tmp_path)
    expected = _checkpoint(2)
    assert (loaded.run_id, loaded.round, loaded.fingerprint) == ("run-1", 2, "ab" * 32)
    np.testing.assert_array_equal(loaded.shared_rows, [1, 4])
    np.testing.assert_array_equal(loaded.receiver_rows, [6])
    for name in ("users", "items", "duals", "consensus", "receiver_consensus"):
        np.testing.assert_array_equal(getattr(loaded.trainer, name), getattr(expected.trainer, name))
    assert (loaded.trainer.epochs, loaded.trainer.exchanges) == (8, 2)
    assert [path.name for path in tmp_path.iterdir()] == [CHECKPOINT_FILE]


def test_unusable_checkpoints_raise_errors_naming_the_file(tmp_path: Path) -> None:
    """A torn file and arrays of another shape are refused with a CheckpointError."""
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match=CHECKPOINT_FILE):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="users has shape"):
        check_resumable(_checkpoint(1), users=8, items=5, shared=2, rank=3)
    check_resumable(_checkpoint(1), users=7, items=5, shared=2, rank=3)


def test_a_truncated_checkpoint_is_refused_naming_the_file(tmp_path: Path) -> None:
    """A checkpoint cut anywhere (here: inside the items) raises CheckpointError, never a partial state."""
    path = save_checkpoint(tmp_path, _checkpoint(3))
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) - 20])
    with pytest.raises(CheckpointError, match=CHECKPOINT_FILE):
        load_checkpoint(tmp_path)


def test_an_npz_checkpoint_of_earlier_versions_is_read_until_a_new_one_is_saved(tmp_path: Path) -> None:
    """A state folder from before the plain container (node-checkpoint.npz) resumes; the next save replaces it."""
    old = _checkpoint(5)
    meta = {"format": 1, "run_id": old.run_id, "round": old.round, "fingerprint": old.fingerprint,
            "epochs": old.trainer.epochs, "exchanges": old.trainer.exchanges}
    np.savez(tmp_path / LEGACY_CHECKPOINT_FILE, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
             users=old.trainer.users, items=old.trainer.items, duals=old.trainer.duals, consensus=old.trainer.consensus,
             receiver_consensus=old.trainer.receiver_consensus, shared_rows=old.shared_rows, receiver_rows=old.receiver_rows)
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.round == 5
    np.testing.assert_array_equal(loaded.trainer.items, old.trainer.items)
    np.testing.assert_array_equal(loaded.trainer.receiver_consensus, old.trainer.receiver_consensus)
    save_checkpoint(tmp_path, _checkpoint(6))
    assert [path.name for path in tmp_path.iterdir()] == [CHECKPOINT_FILE]
    assert load_checkpoint(tmp_path).round == 6
