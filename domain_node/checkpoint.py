"""A node's training checkpoint: X, Y, U, Z and the round, written atomically at the end of every round."""

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cdimf.common.atomic_files import read_arrays_or_npz, write_arrays_atomically
from cdimf.common.core.model import TrainerState

# a plain array container (cdimf.common.atomic_files): ~3x less CPU per round than an .npz (no zip
# CRC over every byte), which matters as it is written while the next round trains
CHECKPOINT_FILE = "node-checkpoint.arrays"
# what earlier versions wrote (an .npz with the same arrays): still read when it is the only one
LEGACY_CHECKPOINT_FILE = "node-checkpoint.npz"
_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what is wrong."""


@dataclass
class Checkpoint:
    """The trainer state after the Z of `round` was applied, for run `run_id` and one membership."""

    run_id: str
    round: int
    fingerprint: str
    shared_rows: np.ndarray
    receiver_rows: np.ndarray
    trainer: TrainerState


def save_checkpoint(state_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write the checkpoint into state_dir (replacing the previous one atomically); returns its path."""
    trainer = checkpoint.trainer
    meta = {
        "format": _FORMAT,
        "run_id": checkpoint.run_id,
        "round": checkpoint.round,
        "fingerprint": checkpoint.fingerprint,
        "epochs": trainer.epochs,
        "exchanges": trainer.exchanges,
    }
    arrays = {
        "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        "users": trainer.users,
        "items": trainer.items,
        "duals": trainer.duals,
        "shared_rows": np.asarray(checkpoint.shared_rows, dtype=np.int64),
        "receiver_rows": np.asarray(checkpoint.receiver_rows, dtype=np.int64),
    }
    if trainer.consensus is not None:
        arrays["consensus"] = trainer.consensus
    if trainer.receiver_consensus is not None:
        arrays["receiver_consensus"] = trainer.receiver_consensus
    path = Path(state_dir) / CHECKPOINT_FILE
    write_arrays_atomically(path, arrays)
    # the new file is durable: an older-format checkpoint must not be read instead of it later
    (Path(state_dir) / LEGACY_CHECKPOINT_FILE).unlink(missing_ok=True)
    return path


def load_checkpoint(state_dir: Path) -> Checkpoint | None:
    """The checkpoint in state_dir, None when there is none; CheckpointError when it is unreadable."""
    path = Path(state_dir) / CHECKPOINT_FILE
    if not path.exists():
        path = Path(state_dir) / LEGACY_CHECKPOINT_FILE
        if not path.exists():
            return None
    try:
        saved = read_arrays_or_npz(path)
        meta = json.loads(saved["meta"].tobytes())
        if meta.get("format") != _FORMAT:
            raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
        trainer = TrainerState(
            users=saved["users"],
            items=saved["items"],
            duals=saved["duals"],
            consensus=saved.get("consensus"),
            receiver_consensus=saved.get("receiver_consensus"),
            epochs=int(meta["epochs"]),
            exchanges=int(meta["exchanges"]),
        )
        return Checkpoint(str(meta["run_id"]), int(meta["round"]), str(meta["fingerprint"]),
                          saved["shared_rows"], saved["receiver_rows"], trainer)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{path}: cannot read the node checkpoint: {error}") from error


def check_resumable(checkpoint: Checkpoint, users: int, items: int, shared: int, rank: int) -> None:
    """Raise CheckpointError unless the checkpoint's arrays fit this node's data and run."""
    trainer = checkpoint.trainer
    expected = {"users": (users, rank), "items": (items, rank), "duals": (shared, rank)}
    for name, shape in expected.items():
        actual = getattr(trainer, name).shape
        if actual != shape:
            raise CheckpointError(f"checkpoint of run {checkpoint.run_id}: {name} has shape {actual}, expected {shape}")
