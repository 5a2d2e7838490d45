"""Synthetic interaction files for the scale benchmarks: Zipf-like users and items, unique pairs, partial user overlap.

Users of domain d are the integers [d * stride, d * stride + n_users): with stride < n_users
consecutive domains share n_users - stride users. Each domain draws `interactions` distinct
(user, item) pairs, user and item popularity power-law distributed, and writes them in the
paper's format (user \\t item, no header) through pyarrow's CSV writer.
"""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv


def draw_pairs(n_users: int, n_items: int, interactions: int, seed: int, exponent: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """`interactions` distinct (user, item) index pairs, power-law popular users and items, every user at least once."""
    rng = np.random.default_rng(seed)

    def popular(n: int, size: int) -> np.ndarray:
        """Indices in [0, n) drawn with weight (rank + 1) ** -exponent, ranks shuffled."""
        weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
        cdf = np.cumsum(weights / weights.sum())
        return rng.permutation(n)[np.minimum(np.searchsorted(cdf, rng.random(size)), n - 1)].astype(np.int64)

    # every user once (so the domain really has n_users), the rest by popularity; dedupe and top up
    users = np.concatenate([np.arange(n_users, dtype=np.int64), popular(n_users, interactions - n_users)])
    items = popular(n_items, interactions)
    codes = np.unique(users * n_items + items)
    while len(codes) < interactions:
        extra = popular(n_users, interactions - len(codes)) * n_items + popular(n_items, interactions - len(codes))
        codes = np.unique(np.concatenate([codes, extra]))
    codes = rng.permutation(codes[:interactions]) if len(codes) > interactions else rng.permutation(codes)
    return codes // n_items, codes % n_items


def write_domain(path: Path, users: np.ndarray, items: np.ndarray) -> Path:
    """A paper-format file (user \\t item) of integer keys."""
    table = pa.table({"user": pa.array(users, pa.int64()), "item": pa.array(items, pa.int64())})
    pa_csv.write_csv(table, path, pa_csv.WriteOptions(include_header=False, delimiter="\t"))
    return path


def write_domains(directory: Path, n_domains: int, n_users: int, n_items: int, interactions: int,
                  overlap: float = 0.5, seed: int = 0) -> list[Path]:
    """One train file per domain (train_<d>.txt); consecutive domains share `overlap` of their users."""
    directory.mkdir(parents=True, exist_ok=True)
    stride = max(1, round(n_users * (1.0 - overlap)))
    paths = []
    for domain in range(n_domains):
        users, items = draw_pairs(n_users, n_items, interactions, seed + domain)
        paths.append(write_domain(directory / f"train_{domain}.txt", users + domain * stride, items))
        del users, items
    return paths
