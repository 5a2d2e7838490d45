"""What secure aggregation's arithmetic costs: encode+mask, the ring sum, unmask+decode, against the float consensus.

    python benchmarks/secure_aggregation.py [--rows 1000000] [--rank 64] [--repeats 2] [--overlap 1.0]

Two domains each hold `overlap` of the rows (the first domain every row, the second a random subset
when overlap < 1). Baseline, measured in the same run over the same float32 rows: the aggregator's
plain consensus today (admm.blockwise_consensus of the two float32 contributions, mean and identity
prox). Timed: one domain's mask_contribution (encode, check column, AES masks), the aggregator's
ring_sums over both masked contributions, and one node's unmask_sum (both contributors' masks,
check column, range check) plus consensus_from_ring. MB/s is over the float32 rows each step
handles (rows x rank x 4 bytes per contribution). Prints one JSON line: seconds (best of
--repeats), MB/s and each step's ratio to the baseline (time / baseline time).
"""

import argparse
import json
import time
from collections.abc import Callable

import numpy as np

from cdimf.common.core.admm import blockwise_consensus
from cdimf.common.core.params import ADMMParams
from cdimf.common.core.ring import consensus_from_ring, ring_sums
from cdimf.common.security.masks import mask_contribution, unmask_sum

SECRET = b"benchmark-secret-of-32-bytes-000"
RUN = "bench"
MB = 1e6


def _best(action: Callable[[], object], repeats: int) -> tuple[float, object]:
    """The fastest of `repeats` runs of `action` in seconds, and its last result."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - started)
    return min(times), result


def main() -> None:
    """Time each secure step and the plain consensus on the same rows; print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--overlap", type=float, default=1.0, help="share of the rows the second domain holds")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n, rank = args.rows, args.rank
    ids = rng.integers(0, 256, (n, 32), dtype=np.uint8)  # stand-ins for HMAC pseudonyms (uniform bytes)
    rows_a = np.arange(n)
    rows_b = np.arange(n) if args.overlap >= 1.0 else np.sort(rng.choice(n, size=int(n * args.overlap), replace=False))
    values_a = rng.standard_normal((len(rows_a), rank)).astype(np.float32)
    values_b = rng.standard_normal((len(rows_b), rank)).astype(np.float32)
    admm = ADMMParams(rho=1.0)
    plain_bytes = (len(rows_a) + len(rows_b)) * rank * 4

    baseline, z_plain = _best(lambda: blockwise_consensus([(rows_a, values_a), (rows_b, values_b)], n, rank, admm), args.repeats)
    mask_time, masked_a = _best(lambda: mask_contribution(values_a, ids[rows_a], SECRET, RUN, "a", 0), args.repeats)
    masked = [(rows_a, masked_a), (rows_b, mask_contribution(values_b, ids[rows_b], SECRET, RUN, "b", 0))]
    del masked_a
    sum_time, total = _best(lambda: ring_sums(masked, n, rank + 1), args.repeats)
    masked.clear()  # one copy of each large array: the contributions go before unmasking
    holds = np.stack([np.ones(n, dtype=bool), np.isin(np.arange(n), rows_b)])

    def unmask_and_decode() -> np.ndarray:
        sums, holders = unmask_sum(total, ids, [("a", 0), ("b", 0)], holds, SECRET, RUN)  # type: ignore[arg-type]
        return consensus_from_ring(sums, holders, admm)

    unmask_time, z_secure = _best(unmask_and_decode, args.repeats)
    gap = float(np.max(np.abs(np.asarray(z_secure) - np.asarray(z_plain))))
    report = {
        "rows": n,
        "rank": rank,
        "overlap": args.overlap,
        "baseline": "admm.blockwise_consensus of the same two float32 contributions",
        "baseline_s": round(baseline, 4),
        "baseline_MBps": round(plain_bytes / baseline / MB, 1),
        "mask_one_domain_s": round(mask_time, 4),
        "mask_MBps": round(len(rows_a) * rank * 4 / mask_time / MB, 1),
        "ring_sums_two_domains_s": round(sum_time, 4),
        "ring_sums_MBps": round(plain_bytes / sum_time / MB, 1),
        "unmask_decode_one_node_s": round(unmask_time, 4),
        "unmask_decode_MBps": round(plain_bytes / unmask_time / MB, 1),
        "ratio_mask_vs_baseline": round(mask_time / baseline, 2),
        "ratio_ring_sums_vs_baseline": round(sum_time / baseline, 2),
        "ratio_unmask_decode_vs_baseline": round(unmask_time / baseline, 2),
        "max_abs_z_secure_minus_plain": gap,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
