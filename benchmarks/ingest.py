"""Ingestion: the product's load of one interaction file against a raw `pyarrow.csv.read_csv` of the same file.

    python benchmarks/ingest.py [--users 1000000] [--items 100000] [--interactions 5000000] [--file PATH]

Writes a synthetic paper-format file (benchmarks/synthetic.py) unless --file names one, then
runs, each in a fresh process so that its peak memory (VmHWM) is its own:
- baseline: `pyarrow.csv.read_csv` of the file (tab-separated, no header, types inferred);
- product: `read_interactions` + the user and item IdMaps + the users x items CSR (what a node
  holds after loading, before carving validation).
Prints both times and peaks, the load-time ratio (target <= 2x) and the product's peak over the
bytes of what it keeps: the CSR plus both id maps (target <= 3x). Peaks are measured above each
process's resident size after its imports, so the interpreter and libraries are not counted.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

MB = 1 << 20

_MEASURE = r"""
import json, sys, time
from pathlib import Path
import numpy as np, pyarrow as pa, pyarrow.csv as pa_csv

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)

from cdimf.domain_node.data import IdMap, read_interactions, to_csr
path, mode = Path(sys.argv[1]), sys.argv[2]
base = status("VmRSS")
start = time.perf_counter()
if mode == "raw":
    table = pa_csv.read_csv(path, read_options=pa_csv.ReadOptions(autogenerate_column_names=True),
                            parse_options=pa_csv.ParseOptions(delimiter="\t"))
    rows, kept = table.num_rows, table.nbytes
else:
    raw = read_interactions(path)
    users, items = IdMap.from_keys(raw.user_keys), IdMap.from_keys(raw.item_keys)
    matrix = to_csr(raw, users, items)
    del raw
    rows = matrix.nnz
    kept = matrix.data.nbytes + matrix.indices.nbytes + matrix.indptr.nbytes
    for ids in (users, items):
        kept += sum(a.nbytes for a in (ids._numbers, ids._text, ids._lexical_keys, ids._lexical_positions) if a is not None)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak": status("VmHWM") - base, "rows": rows, "kept": kept}))
"""


def measure(path: Path, mode: str) -> dict[str, float]:
    """Time, peak memory above the post-import baseline, rows and kept bytes of one load in a fresh process."""
    output = subprocess.run([sys.executable, "-c", _MEASURE, str(path), mode], check=True, capture_output=True,
                            text=True, cwd=REPO_ROOT).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    """Write (or take) the file, measure both loads, print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--interactions", type=int, default=5_000_000)
    parser.add_argument("--file", type=Path, default=None, help="measure this file instead of a synthetic one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cdimf-ingest-") as scratch:
        path = args.file
        if path is None:
            from benchmarks.synthetic import draw_pairs, write_domain

            users, items = draw_pairs(args.users, args.items, args.interactions, seed=0)
            path = write_domain(Path(scratch) / "train.txt", users, items)
            del users, items
        size = path.stat().st_size
        raw = measure(path, "raw")
        product = measure(path, "product")
    print(f"file: {path.name if args.file else 'synthetic'} {size / MB:.0f} MiB, {product['rows']:,} interactions")
    print(f"pyarrow.csv.read_csv : {raw['seconds']:6.2f} s  peak {raw['peak'] / MB:7.0f} MiB")
    print(f"product load         : {product['seconds']:6.2f} s  peak {product['peak'] / MB:7.0f} MiB"
          f"  (keeps CSR + id maps {product['kept'] / MB:.0f} MiB)")
    print(f"load time / raw read : {product['seconds'] / raw['seconds']:.2f}x  (target <= 2x)")
    print(f"peak / kept          : {product['peak'] / product['kept']:.2f}x  (target <= 3x)")


if __name__ == "__main__":
    main()
