"""A node's training checkpoint: X, Y, U, Z and the round, written atomically at the end of every round.

The checkpoint names what it was trained on (the membership fingerprint and a digest of the
training matrix), so a node restarted on other data refuses to resume instead of silently
mixing two datasets. The file itself carries a checksum (cdimf.common.atomic_files).

Writing it, a node follows one rule: a write that fails (full or read-only disk) is retried
every CHECKPOINT_RETRY_EVERY_S for NodeConfig.checkpoint_retry_s, stale temp files removed
before each try; the next round is not pushed meanwhile (so the run waits, nothing is lost),
and when the time is up the node exits with the file and errno.
"""

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import xxhash

from cdimf.common.atomic_files import StateFileError, read_arrays_or_npz, remove_stale_temporaries, write_arrays_atomically
from cdimf.common.core.model import TrainerState

log = logging.getLogger("cdimf.node")
CHECKPOINT_RETRY_EVERY_S = 2.0

# a plain array container (cdimf.common.atomic_files): ~3x less CPU per round than an .npz (no zip
# CRC over every byte), which matters as it is written while the next round trains
CHECKPOINT_FILE = "node-checkpoint.arrays"
# what earlier versions wrote (an .npz with the same arrays): still read when it is the only one
LEGACY_CHECKPOINT_FILE = "node-checkpoint.npz"
_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what is wrong."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint of the current run trained on other data or another membership: never resumed."""


def training_digest(train: sp.csr_matrix) -> str:
    """A digest of a training matrix (shape, rows, items and values): one fast pass over its arrays."""
    digest = xxhash.xxh3_128(np.asarray(train.shape, dtype=np.int64).tobytes())
    for part in (train.indptr, train.indices, train.data):
        digest.update(np.ascontiguousarray(part).data)
    return digest.hexdigest()


def checkpoint_path(state_dir: Path) -> Path:
    """Where a node's checkpoint lives in its state folder."""
    return Path(state_dir) / CHECKPOINT_FILE


@dataclass
class Checkpoint:
    """The trainer state after the Z of `round` was applied, for run `run_id` and one membership."""

    run_id: str
    round: int
    fingerprint: str
    shared_rows: np.ndarray
    receiver_rows: np.ndarray
    trainer: TrainerState
    # training_digest of the data it was trained on ("" in checkpoints of earlier versions)
    data_digest: str = ""


def save_checkpoint(state_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write the checkpoint into state_dir (replacing the previous one atomically); returns its path."""
    trainer = checkpoint.trainer
    meta = {
        "format": _FORMAT,
        "run_id": checkpoint.run_id,
        "round": checkpoint.round,
        "fingerprint": checkpoint.fingerprint,
        "data_digest": checkpoint.data_digest,
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
    path = checkpoint_path(state_dir)
    write_arrays_atomically(path, arrays)
    # the new file is durable: an older-format checkpoint must not be read instead of it later
    (Path(state_dir) / LEGACY_CHECKPOINT_FILE).unlink(missing_ok=True)
    return path


def load_checkpoint(state_dir: Path) -> Checkpoint | None:
    """The checkpoint in state_dir, None when there is none; CheckpointError when it is unreadable."""
    path = checkpoint_path(state_dir)
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
                          saved["shared_rows"], saved["receiver_rows"], trainer, str(meta.get("data_digest", "")))
    except (OSError, ValueError, KeyError, TypeError) as error:
        if isinstance(error, CheckpointError):
            raise
        detail = str(error) if isinstance(error, StateFileError) else f"{path}: {type(error).__name__}: {error}"
        raise CheckpointError(f"cannot read the node checkpoint: {detail}; delete {path} to start this node over") from error


def save_checkpoint_retrying(state_dir: Path, checkpoint: Checkpoint, retry_for_s: float) -> Path:
    """save_checkpoint under the node's write rule (module docstring): retried, then the OSError naming file and errno."""
    give_up = time.monotonic() + retry_for_s
    while True:
        try:
            return save_checkpoint(state_dir, checkpoint)
        except OSError as error:
            if time.monotonic() >= give_up:
                raise
            log.warning("%s; retrying in %.0f s (for up to %.0f s, then the node exits)", error, CHECKPOINT_RETRY_EVERY_S, retry_for_s)
            time.sleep(CHECKPOINT_RETRY_EVERY_S)
            remove_stale_temporaries(checkpoint_path(state_dir))


def check_same_data(checkpoint: Checkpoint, path: Path, fingerprint: str, data_digest: str) -> None:
    """CheckpointMismatch unless the checkpoint was trained on this membership and training data."""
    what = None
    if checkpoint.fingerprint != fingerprint:
        what = "other users (its registered rows differ)"
    elif checkpoint.data_digest and checkpoint.data_digest != data_digest:
        what = "other interactions (the training data's digest differs)"
    if what is not None:
        raise CheckpointMismatch(
            f"{path} holds run {checkpoint.run_id} up to round {checkpoint.round}, trained on {what} than this node now has;"
            f" restore the data it was trained on, or start this node over: delete {path}"
            " (when its users changed, the run must also be stopped and a new one started)"
        )


def check_resumable(checkpoint: Checkpoint, users: int, items: int, shared: int, rank: int) -> None:
    """Raise CheckpointError unless the checkpoint's arrays fit this node's data and run."""
    trainer = checkpoint.trainer
    expected = {"users": (users, rank), "items": (items, rank), "duals": (shared, rank)}
    for name, shape in expected.items():
        actual = getattr(trainer, name).shape
        if actual != shape:
            raise CheckpointError(f"checkpoint of run {checkpoint.run_id}: {name} has shape {actual}, expected {shape}")
