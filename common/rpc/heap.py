"""Process-wide allocator tuning for streaming megabyte-sized chunks."""

import ctypes
import ctypes.util
import sys

from cdimf.common.wire.chunks import CHUNK_BYTES

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned = False

# A client of the aggregator (a domain node) keeps only chunk-sized buffers on the heap. Its
# matrices (a pulled Z, the duals, X + U: 122 MiB each at 1M users, rank 64) are made on the
# event loop's thread and freed while later ones live above them, so on the heap their pages
# stayed resident: at 1M users x 2 domains the node's heap held ~800 MiB at its peak, ~350 MiB
# of it freed, and its peak was 2.3x implicit's (1.9x with this). Over this threshold each block
# gets its own mapping and goes back to the system when freed; a chunk (1 MiB plus its header)
# is still reused from the heap.
CLIENT_MMAP_THRESHOLD = 4 * CHUNK_BYTES
# free memory at the heap's top is kept up to this for the next chunks. (The aggregator's
# 4 GiB does not fit mallopt's int: ctypes passes it as 0, so its heap top is always trimmed.)
CLIENT_TRIM_THRESHOLD = 64 << 20


def reuse_freed_chunk_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = 4 << 30) -> bool:
    """Keep freed chunk and matrix buffers on the heap for reuse; returns whether the allocator took it.

    glibc serves each allocation over 128 KiB with a fresh mmap and unmaps it on free, so every
    1 MiB chunk of a matrix stream (its bytes, the protobuf copy, the serialised message)
    page-faults in anew, a large part of the per-megabyte cost of encoding and decoding. The
    same holds for the matrices a stream is assembled into (hundreds of MB), allocated every
    round: below a 1 GiB threshold they come from the heap too and reuse the memory freed by
    the previous round. The cost: freed memory up to trim_threshold stays with the process
    until it is reused, so the resident size stays near its peak.
    Allocations made in other threads still get their own mappings. The aggregator takes the
    defaults; its clients take CLIENT_MMAP_THRESHOLD and CLIENT_TRIM_THRESHOLD (chunks only). The
    first call in a process sets the policy (later calls return True and change nothing). A
    no-op off glibc.
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
