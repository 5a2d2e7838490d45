"""Crash-safe file replacement shared by the aggregator's and the nodes' state folders.

Two formats: .npz (numpy's zip) and a plain array container written by `write_arrays_atomically`
(a magic line, then one .npy record per array, name first): no zip bookkeeping and no CRC pass
over every byte, and both the write and the read stream straight from and into the arrays. The
container relies on the atomic replacement below against torn files; truncation and trailing
bytes are detected when it is read.
"""

import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

ARRAYS_MAGIC = b"CDIMF-ARRAYS 1\n"
_NAME_LENGTH = struct.Struct("<I")


def replace_atomically(path: Path, write: Callable[[BinaryIO], None], fsync: bool = True) -> None:
    """Write a file through `write(stream)` so that readers see the old file or the new one, never a torn one.

    Temp file in the same folder, fsync, rename over the target, then fsync the folder (without
    it a crash could bring the old directory entry back). fsync=False keeps the atomic rename,
    which survives a killed process, but not a power loss or kernel crash (the fsyncs cost
    ~10-30 ms per write on a virtual disk, ~50 ms for 50 MB).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
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


def write_npz_atomically(path: Path, arrays: dict[str, np.ndarray], fsync: bool = True) -> None:
    """Write an .npz atomically (see replace_atomically)."""
    # numpy's stubs type **kwds as if a key could be its allow_pickle flag
    replace_atomically(path, lambda stream: np.savez(stream, **arrays), fsync)  # type: ignore[arg-type]


def write_arrays_atomically(path: Path, arrays: dict[str, np.ndarray], fsync: bool = True) -> None:
    """Write named arrays in the plain container atomically (see replace_atomically); no object arrays."""

    def write(stream: BinaryIO) -> None:
        """The magic line, then per array its UTF-8 name (length-prefixed) and its .npy record."""
        stream.write(ARRAYS_MAGIC)
        for name, array in arrays.items():
            encoded = name.encode()
            stream.write(_NAME_LENGTH.pack(len(encoded)) + encoded)
            np.lib.format.write_array(stream, np.asarray(array), allow_pickle=False)

    replace_atomically(path, write, fsync)


def read_arrays_or_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a container or, from earlier versions, of an .npz (told apart by the first bytes).

    Errors as read_arrays, or zipfile.BadZipFile / ValueError from numpy for a damaged .npz.
    """
    with open(path, "rb") as stream:
        container = stream.read(len(ARRAYS_MAGIC)) == ARRAYS_MAGIC
    if container:
        return read_arrays(path)
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a `write_arrays_atomically` container.

    ValueError naming the file when it is not one, is cut short or has bytes after its last array.
    """
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    with open(path, "rb") as stream:
        if stream.read(len(ARRAYS_MAGIC)) != ARRAYS_MAGIC:
            raise ValueError(f"{path}: not a CDIMF array container")
        size = os.fstat(stream.fileno()).st_size
        while stream.tell() < size:
            prefix = stream.read(_NAME_LENGTH.size)
            if len(prefix) != _NAME_LENGTH.size:
                raise ValueError(f"{path}: {len(prefix)} stray bytes after {len(arrays)} arrays")
            (length,) = _NAME_LENGTH.unpack(prefix)
            encoded = stream.read(length)
            if len(encoded) != length:
                raise ValueError(f"{path}: cut short in an array name")
            name = encoded.decode()
            if name in arrays:
                raise ValueError(f"{path}: array {name!r} appears twice")
            try:
                arrays[name] = np.lib.format.read_array(stream, allow_pickle=False)
            except (ValueError, EOFError, OSError) as error:
                raise ValueError(f"{path}: array {name!r} is unreadable: {error}") from error
            if stream.tell() > size:
                raise ValueError(f"{path}: array {name!r} is cut short")
    return arrays

