"""Hand the C heap's freed pages back to the system after a phase that freed many mid-sized arrays.

glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), so the many
1-30 MiB temporaries of aligning a million pseudonyms or of a round's consensus end up in the
heap, and their pages stay resident after they are freed: the aggregator at 1M users per domain
kept ~130 MiB of freed memory after starting a run. malloc_trim(0) returns those pages; it frees
nothing that is in use, so values and speed are unchanged (one call per phase, milliseconds).
"""

import ctypes
import ctypes.util
from collections.abc import Callable


def _load_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        library = ctypes.CDLL(name) if name else None
        trim = getattr(library, "malloc_trim", None)
    except OSError:
        return None
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _load_trim()


def release_freed_memory() -> bool:
    """Return the heap's free pages to the system; True when the C library could (glibc), False elsewhere."""
    if _TRIM is None:
        return False
    return bool(_TRIM(0))
