"""Crash-safe file replacement shared by the aggregator's and the nodes' state folders."""

import os
import tempfile
from pathlib import Path

import numpy as np


def write_npz_atomically(path: Path, arrays: dict[str, np.ndarray], fsync: bool = True) -> None:
    """Write an .npz so that readers see the old file or the new one, never a torn one.

    Temp file in the same folder, fsync, rename over the target, then fsync the folder (without
    it a crash could bring the old directory entry back). fsync=False keeps the atomic rename,
    which survives a killed process, but not a power loss or kernel crash (the fsyncs cost
    ~10-30 ms per write on a virtual disk).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, **arrays)
            stream.flush()
            if fsync:
                os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    if not fsync:
        return
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
