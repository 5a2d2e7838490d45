"""What the state files' checksum costs: writing and reading Z (rows x rank float32) with and without it.

Baseline, measured in the same run: the same bytes written as .npy records (numpy's own writer)
and read back with numpy's reader, without any digest. `python benchmarks/state_checksum.py
[--rows 1000000] [--rank 64] [--repeats 3]`; prints one JSON line with both timings and the ratios.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from cdimf.common.atomic_files import read_arrays, replace_atomically, write_arrays_atomically


def _best(action: "callable[[], object]", repeats: int) -> float:  # type: ignore[valid-type]
    """The fastest of `repeats` runs of `action`, in seconds."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    """Time both formats on one Z and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    z = np.random.default_rng(0).standard_normal((args.rows, args.rank)).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        checked, plain = Path(folder) / "run.arrays", Path(folder) / "plain.npy"
        write_checked = _best(lambda: write_arrays_atomically(checked, {"consensus": z}, fsync=False), args.repeats)
        write_plain = _best(lambda: replace_atomically(plain, lambda stream: np.lib.format.write_array(stream, z), fsync=False), args.repeats)
        read_checked = _best(lambda: read_arrays(checked), args.repeats)
        read_plain = _best(lambda: np.load(plain), args.repeats)
    print(json.dumps({
        "rows": args.rows, "rank": args.rank, "megabytes": round(z.nbytes / 2**20, 1),
        "write_checksummed_s": round(write_checked, 4), "write_plain_npy_s": round(write_plain, 4),
        "write_ratio": round(write_checked / write_plain, 3),
        "read_checksummed_s": round(read_checked, 4), "read_plain_npy_s": round(read_plain, 4),
        "read_ratio": round(read_checked / read_plain, 3),
    }))


if __name__ == "__main__":
    main()
