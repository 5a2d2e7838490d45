"""Optional compiled backend for the iALS row solves: common/ials_kernel.c built with the system C compiler.

The kernel is compiled on first use into a per-user cache (keyed by the source, the flags and
this CPU, because it is built for the host's instruction set) and loaded with ctypes, which
releases the GIL during the call, so the solver's own thread pool runs it in parallel. Where
no compiler is present or the build fails, `load_kernel()` returns None and the solver uses
its numpy path; nothing else changes.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_SOURCE = Path(__file__).with_name("ials_kernel.c")
# -fopenmp-simd honours the vectorisation pragmas without linking an OpenMP runtime.
_FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-ffp-contract=fast", "-fno-math-errno", "-fPIC", "-shared", "-std=c11"]
_lock = threading.Lock()
_state: dict[str, object] = {}

_i64p = ctypes.POINTER(ctypes.c_int64)


def _cpu_signature() -> str:
    """What -march=native depends on: the machine and its CPU flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features", "model name")):
                    flags += line
                if line.strip() == "":
                    break
    except OSError:
        pass
    return platform.machine() + flags


def _cache_dir() -> Path:
    """Where built kernels live: $CDIMF_CACHE_DIR, else the XDG cache, else the temp dir."""
    configured = os.environ.get("CDIMF_CACHE_DIR")
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "cdimf"


def _private(path: Path) -> bool:
    """Whether path is ours and writable by nobody else (a shared temp dir could hold a planted file)."""
    info = path.stat()
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def _build(compiler: str) -> Path:
    """Compile the kernel unless a build for this source, flags and CPU is cached; return its path."""
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *_FLAGS]).encode() + _cpu_signature().encode()).hexdigest()
    for directory in (_cache_dir(), Path(tempfile.gettempdir()) / f"cdimf-{os.getuid()}"):
        target = directory / f"ials_kernel_{key[:20]}.so"
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not _private(directory) or (target.exists() and not _private(target)):
                continue  # never load code that someone else could have written
            if target.exists():
                return target
            # build under a private name, then rename: concurrent builders never see half a file
            partial = directory / f".{target.name}.{os.getpid()}.{threading.get_ident()}"
            subprocess.run(
                [compiler, *_FLAGS, "-o", str(partial), str(_SOURCE), "-lm"],
                check=True,
                capture_output=True,
                timeout=120,
            )
            os.replace(partial, target)
            for stale in directory.glob("ials_kernel_*.so"):
                if stale != target:  # builds of older sources; a process still using one keeps its mapping
                    stale.unlink(missing_ok=True)
            return target
        except (OSError, subprocess.SubprocessError):
            continue
    raise OSError("could not build the iALS kernel")


def _bind(path: Path) -> ctypes.CDLL:
    """Load the shared library and declare the kernel's signature."""
    library = ctypes.CDLL(str(path))
    function = library.ials_solve_rows
    function.restype = ctypes.c_int64
    function.argtypes = [
        ctypes.c_void_p,  # order
        ctypes.c_int64,  # n_order
        ctypes.c_void_p,  # cursor
        ctypes.c_int64,  # block
        ctypes.c_void_p,  # indptr
        ctypes.c_void_p,  # indices
        ctypes.c_void_p,  # weights or NULL
        ctypes.c_void_p,  # rotated
        ctypes.c_void_p,  # eigvals
        ctypes.c_void_p,  # shift
        ctypes.c_void_p,  # extra or NULL
        ctypes.c_void_p,  # start or NULL
        ctypes.c_void_p,  # out
        ctypes.c_int64,  # d
        ctypes.c_int64,  # cg_steps
        ctypes.c_void_p,  # failed
    ]
    return library


def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel library, or None where it cannot be built or CDIMF_IALS_BACKEND=numpy."""
    if os.environ.get("CDIMF_IALS_BACKEND", "").lower() == "numpy":
        return None
    with _lock:
        if "library" not in _state:
            library = None
            compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
            if compiler:
                try:
                    library = _bind(_build(compiler))
                except OSError:
                    library = None
            _state["library"] = library
        return _state["library"]  # type: ignore[return-value]


def _address(array: np.ndarray | None) -> int | None:
    """The data pointer of a C-contiguous array (None for a missing optional argument)."""
    if array is None:
        return None
    if not array.flags.c_contiguous:
        raise ValueError("the iALS kernel needs C-contiguous arrays")
    return array.ctypes.data


@dataclass(frozen=True)
class RowKernel:
    """One half-step's arrays for the C kernel (layouts as in ials_kernel.c's `problem`)."""

    indptr: np.ndarray  # int64 (n_rows + 1,)
    indices: np.ndarray  # int32 (nnz,)
    weights: np.ndarray | None  # float32 (nnz,), None when all ones
    rotated: np.ndarray  # float32 (>= n_cols, d)
    eigvals: np.ndarray  # float32 (d,)
    shift: np.ndarray  # float64 (n_rows,)
    extra: np.ndarray | None  # float32 (n_rows, d) added to the right-hand sides
    start: np.ndarray | None  # float32 (n_rows, d) CG warm start
    out: np.ndarray  # float32 (n_rows, d)
    cg_steps: int  # 0 solves exactly
    failed: np.ndarray  # uint8 (n_rows,) set where a Cholesky broke down

    def solve(self, order: np.ndarray, cursor: np.ndarray, block: int) -> int:
        """Solve rows order[cursor...] in blocks; several threads may share one cursor. Returns the failures."""
        library = load_kernel()
        if library is None:
            raise RuntimeError("the iALS kernel is not available")
        n_failed = library.ials_solve_rows(
            _address(order),
            len(order),
            _address(cursor),
            block,
            _address(self.indptr),
            _address(self.indices),
            _address(self.weights),
            _address(self.rotated),
            _address(self.eigvals),
            _address(self.shift),
            _address(self.extra),
            _address(self.start),
            _address(self.out),
            self.rotated.shape[1],
            self.cg_steps,
            _address(self.failed),
        )
        if n_failed < 0:
            raise MemoryError("the iALS kernel could not allocate its scratch space")
        return int(n_failed)
