"""The native backend of the iALS half-step: ials_kernel.c (next to this file) built with the system C compiler.

The kernel does per-row register-tiled Gramians and Cholesky solves over a length-sorted row
list. It is compiled on first use into a per-user cache (keyed by the source, the flags and
this CPU, because it is built for the host's instruction set) and loaded with ctypes, which
releases the GIL during the call, so the solver's own thread pool runs it in parallel. Where
no compiler is present or the build fails, `available()` is False and the backend "auto"
resolves to numpy; nothing else changes.
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

from cdimf.common.core.ials_numpy import FLOAT, RowSystems, run_parallel, solve_exact

_SOURCE = Path(__file__).with_name("ials_kernel.c")
# -fopenmp-simd honours the vectorisation pragmas without linking an OpenMP runtime.
_FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-ffp-contract=fast", "-fno-math-errno", "-fPIC", "-shared", "-std=c11"]
# Light rows (shorter than the rank) per grab from the kernel's shared cursor; heavy rows are
# taken one at a time, longest first, so the threads finish together.
_BLOCK = 16
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
        ctypes.c_void_p,  # extra_row (read only with extra)
        ctypes.c_void_p,  # start or NULL
        ctypes.c_void_p,  # out
        ctypes.c_int64,  # d
        ctypes.c_int64,  # cg_steps
        ctypes.c_void_p,  # failed
    ]
    return library


def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel library, or None where it cannot be built."""
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


def available() -> bool:
    """Whether the compiled kernel could be built and loaded here."""
    return load_kernel() is not None


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
    extra: np.ndarray | None  # float32 (n_extra, d) added to the right-hand sides of some rows
    extra_row: np.ndarray | None  # int32 (n_rows,) each row's row of extra, -1 for none
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
            _address(self.extra_row),
            _address(self.start),
            _address(self.out),
            self.rotated.shape[1],
            self.cg_steps,
            _address(self.failed),
        )
        if n_failed < 0:
            raise MemoryError("the iALS kernel could not allocate its scratch space")
        return int(n_failed)


def _solve_rows(
    systems: RowSystems, start: np.ndarray | None, cg_steps: int, out: np.ndarray, n_threads: int
) -> np.ndarray:
    """All rows through the C kernel; returns the ids of rows whose float32 Cholesky broke down."""
    csr = systems.pattern
    indptr = csr.indptr.astype(np.int64, copy=False)
    indices = np.ascontiguousarray(csr.indices, dtype=np.int32)
    lengths = np.diff(indptr)
    heavy = np.flatnonzero(lengths >= systems.rotated.shape[1])
    heavy = heavy[np.argsort(-lengths[heavy], kind="stable")]
    light = np.flatnonzero(lengths < systems.rotated.shape[1])
    heavy_cursor, light_cursor = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64)
    failed = np.zeros(csr.shape[0], dtype=np.uint8)
    kernel = RowKernel(
        indptr=indptr,
        indices=indices,
        weights=csr.data if systems.weighted else None,
        rotated=systems.rotated,
        eigvals=systems.eigvals.astype(FLOAT),
        shift=systems.shift,
        extra=systems.extra,
        extra_row=systems.extra_row,
        start=start,
        out=out,
        cg_steps=cg_steps,
        failed=failed,
    )

    def task() -> int:
        """One thread's share: rows from the shared cursors until none are left; returns its failures."""
        # every thread drains the heavy rows one by one, then the light rows in blocks
        return kernel.solve(heavy, heavy_cursor, 1) + kernel.solve(light, light_cursor, _BLOCK)

    n_failed = sum(run_parallel([task] * n_threads, n_threads))
    return np.flatnonzero(failed) if n_failed else np.empty(0, dtype=np.int64)


def solve(systems: RowSystems, start: np.ndarray | None, cg_steps: int, n_threads: int) -> np.ndarray:
    """Every row of `systems` in the eigenbasis through the C kernel: exactly when cg_steps is 0, else CG from `start`."""
    solved = np.empty((systems.shift.shape[0], systems.rotated.shape[1]), dtype=FLOAT)
    failed = _solve_rows(systems, start, cg_steps, solved, n_threads)
    if len(failed):
        # float32 Cholesky broke down on a nearly singular row: redo those rows with pivoted LU
        solve_exact(systems, failed, solved, n_threads)
    return solved
