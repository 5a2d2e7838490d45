"""Process-wide allocator tuning for streaming megabyte-sized chunks."""

import ctypes
import ctypes.util
import sys

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned = False


def reuse_freed_chunk_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = 4 << 30) -> bool:
    """Keep freed chunk and matrix buffers on the heap for reuse; returns whether the allocator took it.

    glibc serves each allocation over 128 KiB with a fresh mmap and unmaps it on free, so every
    1 MiB chunk of a matrix stream (its bytes, the protobuf copy, the serialised message)
    page-faults in anew, a large part of the per-megabyte cost of encoding and decoding. The
    same holds for the matrices a stream is assembled into (hundreds of MB), allocated every
    round: below a 1 GiB threshold they come from the heap too and reuse the memory freed by
    the previous round. The cost: freed memory up to trim_threshold stays with the process
    until it is reused, so the resident size stays near its peak.
    Allocations made in other threads still get their own mappings. A no-op off glibc.
    """
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    return _tuned
