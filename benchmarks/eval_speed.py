"""Time the paper's sampled evaluation (and full-catalog metrics) on warm Sport with random factors.

Prints the best of --repeats runs, wall and CPU seconds, and the load average: the machine is
shared, so a high load inflates wall time.
"""

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cdimf.common.core.metrics import full_catalog_metrics, hit_rate, ndcg, sample_negatives, sampled_ranks
from cdimf.pairs import load_warm_pair

WARM_ROOT = Path(__file__).resolve().parents[1] / "data" / "amazon-cdr" / "warm-start_sport_cloth"


def best_of(repeats: int, step: Callable[[], object]) -> tuple[float, float, object]:
    """Smallest wall and CPU seconds of `repeats` calls, and the last result."""
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = step()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus), result


def main() -> None:
    """Load warm Sport, draw random factors, print seconds for each evaluation step."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rank", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="also time full-catalog metrics")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    wall, cpu, (sport, _) = best_of(1, lambda: load_warm_pair(WARM_ROOT))
    print(f"load warm pair: {wall:.2f} s wall, {cpu:.2f} s CPU")
    rng = np.random.default_rng(0)
    user_vecs = rng.standard_normal((sport.n_users, args.rank), dtype=np.float32)
    item_vecs = rng.standard_normal((sport.n_items, args.rank), dtype=np.float32)
    exclude, catalog = sport.held_out_matrix("test"), sport.catalog()
    draw_wall, draw_cpu, candidates = best_of(args.repeats, lambda: sample_negatives(
        sport.n_items, sport.test_users, sport.test_items, exclude, catalog=catalog))
    rank_wall, rank_cpu, ranks = best_of(args.repeats, lambda: sampled_ranks(
        user_vecs, item_vecs, candidates, sport.test_users, sport.train))
    print(f"sampled protocol, {len(ranks)} rows x {candidates.shape[1]} candidates, rank {args.rank}: "
          f"negatives {draw_wall:.2f} s + ranks {rank_wall:.2f} s = {draw_wall + rank_wall:.2f} s wall "
          f"({draw_cpu + rank_cpu:.2f} s CPU); HR@10 {hit_rate(ranks, 10):.4f}, NDCG@10 {ndcg(ranks, 10):.4f} "
          f"(random factors: HR@10 about 0.01)")
    if args.full:
        wall, cpu, metrics = best_of(1, lambda: full_catalog_metrics(
            user_vecs, item_vecs, sport.train, sport.test_users, sport.test_items))
        print(f"full catalog ({catalog.size} items): {wall:.2f} s wall, {cpu:.2f} s CPU; {metrics}")


if __name__ == "__main__":
    main()
