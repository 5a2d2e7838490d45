"""Time the paper's sampled evaluation (and full-catalog metrics) on warm Sport with random rank-192 factors."""

import argparse
import time
from pathlib import Path

import numpy as np

from common.metrics import full_catalog_metrics, sample_negatives, sampled_ranks, hit_rate, ndcg
from domain_node.data import load_warm_pair

WARM_ROOT = Path(__file__).resolve().parents[1] / "data" / "amazon-cdr" / "warm-start_sport_cloth"


def main() -> None:
    """Load warm Sport, draw random factors, print seconds for each evaluation step."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rank", type=int, default=192)
    parser.add_argument("--full", action="store_true", help="also time full-catalog metrics")
    args = parser.parse_args()
    started = time.perf_counter()
    sport, _ = load_warm_pair(WARM_ROOT)
    print(f"load warm pair: {time.perf_counter() - started:.2f} s")
    rng = np.random.default_rng(0)
    user_vecs = rng.standard_normal((sport.n_users, args.rank), dtype=np.float32)
    item_vecs = rng.standard_normal((sport.n_items, args.rank), dtype=np.float32)
    started = time.perf_counter()
    candidates = sample_negatives(sport.n_items, sport.test_users, sport.test_items, sport.held_out_matrix("test"),
                                  catalog=sport.catalog())
    sampled = time.perf_counter() - started
    started = time.perf_counter()
    ranks = sampled_ranks(user_vecs, item_vecs, candidates, sport.test_users, sport.train)
    ranked = time.perf_counter() - started
    print(f"sampled protocol, {len(ranks)} rows x {candidates.shape[1]} candidates, rank {args.rank}: "
          f"negatives {sampled:.2f} s + ranks {ranked:.2f} s = {sampled + ranked:.2f} s "
          f"(HR@10 {hit_rate(ranks, 10):.4f}, NDCG@10 {ndcg(ranks, 10):.4f}; random factors: ~0.01)")
    if args.full:
        started = time.perf_counter()
        metrics = full_catalog_metrics(user_vecs, item_vecs, sport.train, sport.test_users, sport.test_items)
        print(f"full catalog ({sport.n_items} items): {time.perf_counter() - started:.2f} s {metrics}")


if __name__ == "__main__":
    main()
