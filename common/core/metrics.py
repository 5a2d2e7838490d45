"""Ranking kernels: the paper's sampled protocol (negative sampler, target ranks, HR/NDCG) and full-catalog metrics.

All metrics are fractions in [0, 1] (a table prints them as %). Conventions:

- Sampled protocol: per test row, the target and `n_negatives` items drawn uniformly without
  replacement from the catalog (every item unless one is given) minus the user's test
  items. The user's training items among the negatives are pushed to the bottom. The rank is
  1 + the number of remaining negatives that score >= the target: ties count against the
  target (pessimistic), so a constant model gets the worst rank, never a lucky one.
- Full catalog: per test user, the top-k of all catalog items minus the user's training items;
  HR@k = some test item in the top-k, Recall@k = share of the user's test items in the top-k,
  NDCG@k = DCG / ideal DCG over the user's test items; averaged over test users.
"""

import numpy as np
import scipy.sparse as sp

from cdimf.common.core.sparse import canonical_csr

FLOAT = np.float32
# Scores held at once when ranking by GEMM (rows x catalog floats): bounds peak memory.
_SAMPLED_CHUNK_FLOATS = 1 << 23  # mutation: equivalent (block size: memory and speed only)
# Draws per sampler block: memory only. The blocks consume the generator in row order, so a seed
# gives the same negatives in any block size.
_SAMPLER_CHUNK_DRAWS = 1 << 22  # mutation: equivalent (block size: the same draws in any block)
_FULL_CHUNK_FLOATS = 1 << 23  # mutation: equivalent (block size: memory and speed only)
# A gathered block small enough to stay in cache (about 8 MiB).
_GATHER_CHUNK_FLOATS = 1 << 21  # mutation: equivalent (block size: speed only)
# Ranking by one GEMM over all items costs per catalog item, gathering candidate vectors costs
# per candidate (memory-bound, one thread); the GEMM runs on every BLAS thread, so it is
# preferred up to this many catalog items per candidate.
_GEMM_ITEMS_PER_CANDIDATE = 64


def _pair_keys(users: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    """One int64 key per (user, item) pair; sorted for sorted users and items within a user."""
    return np.asarray(users, dtype=np.int64) * n_items + np.asarray(items, dtype=np.int64)


def _csr_keys(matrix: sp.csr_matrix) -> np.ndarray:
    """Sorted pair keys of a CSR's stored entries."""
    matrix = canonical_csr(matrix)
    rows = np.repeat(np.arange(matrix.shape[0], dtype=np.int64), np.diff(matrix.indptr))
    return _pair_keys(rows, matrix.indices, matrix.shape[1])


def _contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Membership of keys in a sorted key array."""
    if sorted_keys.size == 0:
        return np.zeros(keys.shape, dtype=bool)
    slots = np.searchsorted(sorted_keys, keys).clip(max=sorted_keys.size - 1)
    return sorted_keys[slots] == keys


def _check_rows(test_users: np.ndarray, test_items: np.ndarray, n_users: int,
                n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Test row arrays as int64, or ValueError when they do not pair up, are empty or out of range."""
    test_users = np.asarray(test_users, dtype=np.int64)
    test_items = np.asarray(test_items, dtype=np.int64)
    if test_users.shape != test_items.shape or test_users.ndim != 1:
        raise ValueError(f"test_users {test_users.shape} and test_items {test_items.shape} "
                         "must be equal-length 1-d arrays")
    if test_users.size == 0:
        raise ValueError("no test rows")
    if test_users.min() < 0 or test_users.max() >= n_users:
        raise ValueError(f"test_users holds indices outside [0, {n_users})")
    if test_items.min() < 0 or test_items.max() >= n_items:
        raise ValueError(f"test_items holds indices outside [0, {n_items})")
    return test_users, test_items


def _resolve_catalog(catalog: np.ndarray | None, n_items: int, train: sp.csr_matrix | None = None) -> np.ndarray:
    """Sorted unique catalog item indices: the given ones, else the items seen in train, else all."""
    if catalog is None:
        if train is None:
            return np.arange(n_items, dtype=np.int64)
        return np.flatnonzero(np.bincount(train.indices, minlength=n_items)).astype(np.int64)
    catalog = np.unique(np.asarray(catalog, dtype=np.int64))
    if catalog.size and (catalog[0] < 0 or catalog[-1] >= n_items):
        raise ValueError(f"catalog holds item indices outside [0, {n_items})")
    return catalog


def _draws_for(n_pool: int, n_wanted: int) -> int:
    """Uniform draws with replacement expected to give n_wanted distinct values from n_pool, with margin."""
    share = min(n_wanted / n_pool, 0.99)
    return int(np.ceil(-n_pool * np.log1p(-share) * 1.1)) + 16


def _first_at_least(sorted_rows: np.ndarray, rows: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Per query, the first column of its row in a row-sorted 2-d array whose value is >= its bound."""
    low = np.zeros(rows.size, dtype=np.int64)
    high = np.full(rows.size, sorted_rows.shape[1], dtype=np.int64)
    # Vectorised binary search: one pass per bit of the row length, not one per query.
    while bool((low < high).any()):
        middle = (low + high) // 2
        go_right = (low < high) & (sorted_rows[rows, np.minimum(middle, sorted_rows.shape[1] - 1)] < bounds)
        low = np.where(go_right, middle + 1, low)
        high = np.where(go_right | (low >= high), high, middle)
    return low


def _negatives_by_rejection(rng: np.random.Generator, n_pool: int, excluded_rows: np.ndarray,
                            excluded_positions: np.ndarray, n_rows: int, n_negatives: int) -> np.ndarray:
    """Catalog positions of n_negatives distinct, non-excluded uniform draws per row (pool >> n_negatives).

    Sequential sampling: draw with replacement and keep, in draw order, the first n_negatives
    values that are neither repeats nor excluded; that is a uniform sample without replacement.
    Rows left short are drawn again, more generously.
    """
    result = np.empty((n_rows, n_negatives), dtype=index_dtype(n_pool))
    n_excluded = np.bincount(excluded_rows, minlength=n_rows)
    order = np.argsort(excluded_rows, kind="stable")
    excluded_rows, excluded_positions = excluded_rows[order], excluded_positions[order]
    first_exclusion = np.searchsorted(excluded_rows, np.arange(n_rows + 1))
    pending = np.arange(n_rows)
    generosity = 1
    while pending.size:
        n_draws = generosity * _draws_for(n_pool, n_negatives + int(n_excluded[pending].max(initial=0)))
        generosity *= 2
        chunk = max(1, _SAMPLER_CHUNK_DRAWS // n_draws)  # mutation: equivalent (rows per block: the same draws in any block)
        short = []
        for start in range(0, pending.size, chunk):
            rows = pending[start:start + chunk]
            filled = _draw_rows(rng, n_pool, n_draws, n_negatives, rows, excluded_positions,
                                first_exclusion, result)
            short.append(rows[~filled])
        pending = np.concatenate(short)
    return result


def _draw_rows(rng: np.random.Generator, n_pool: int, n_draws: int, n_negatives: int, rows: np.ndarray,
               excluded_positions: np.ndarray, first_exclusion: np.ndarray, result: np.ndarray) -> np.ndarray:
    """One round of sequential sampling for some rows, written into result; flags the rows it filled."""
    key_type = np.int32 if n_pool * n_draws < np.iinfo(np.int32).max else np.int64
    draws = rng.integers(0, n_pool, size=(rows.size, n_draws), dtype=key_type)
    # Sort value-major, draw-minor (one packed key) so that the first copy of a value is its earliest draw.
    packed = np.sort(draws * key_type(n_draws) + np.arange(n_draws, dtype=key_type), axis=1)
    values, draw_order = np.divmod(packed, key_type(n_draws))
    keep_sorted = np.ones(packed.shape, dtype=bool)
    keep_sorted[:, 1:] = values[:, 1:] != values[:, :-1]
    counts = first_exclusion[rows + 1] - first_exclusion[rows]
    query_rows = np.repeat(np.arange(rows.size), counts)
    starts = np.repeat(first_exclusion[rows] - np.cumsum(counts) + counts, counts)
    banned = excluded_positions[starts + np.arange(query_rows.size)] if query_rows.size else excluded_positions[:0]
    found = _first_at_least(packed, query_rows, np.multiply(banned.astype(key_type), key_type(n_draws)))
    present = found < n_draws
    present[present] = values[query_rows[present], found[present]] == banned[present]
    keep_sorted[query_rows[present], found[present]] = False
    keep = np.empty(draws.shape, dtype=bool)
    np.put_along_axis(keep, draw_order, keep_sorted, axis=1)
    keep &= np.cumsum(keep, axis=1, dtype=np.int32) <= n_negatives
    filled = keep.sum(axis=1) == n_negatives
    if filled.all():
        result[rows] = draws[keep].reshape(-1, n_negatives)
    else:
        result[rows[filled]] = draws[filled][keep[filled]].reshape(-1, n_negatives)
    return filled


def _negatives_by_keys(rng: np.random.Generator, n_pool: int, excluded_rows: np.ndarray,
                       excluded_positions: np.ndarray, n_rows: int, n_negatives: int) -> np.ndarray:
    """Catalog positions of n_negatives uniform draws without replacement per row, for small pools.

    Every allowed position gets a uniform key and the n_negatives smallest win; excluded rows
    are sorted by row (they come from np.unique of row-major keys).
    """
    result = np.empty((n_rows, n_negatives), dtype=index_dtype(n_pool))
    chunk = max(1, _SAMPLER_CHUNK_DRAWS // n_pool)
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        keys = rng.random((stop - start, n_pool), dtype=FLOAT)
        first, last = np.searchsorted(excluded_rows, [start, stop])
        keys[excluded_rows[first:last] - start, excluded_positions[first:last]] = np.inf
        result[start:stop] = np.argpartition(keys, n_negatives - 1, axis=1)[:, :n_negatives]
    return result


def index_dtype(n: int) -> type[np.signedinteger]:
    """The smallest signed integer type of the indices 0..n-1 (int32 below 2**31: half of int64)."""
    return np.int32 if n <= np.iinfo(np.int32).max else np.int64


def sample_negatives(n_items: int, test_users: np.ndarray, test_items: np.ndarray, exclude: sp.csr_matrix,
                     n_negatives: int = 999, seed: int = 0, catalog: np.ndarray | None = None) -> np.ndarray:
    """Candidates (n_rows, 1 + n_negatives) of item indices (int32, see index_dtype): column 0 the target, then uniform negatives.

    Negatives are drawn per row without replacement from `catalog` (default: all n_items)
    minus the row's target and the user's items in `exclude` (users x items CSR, normally the
    user's test items), reproducibly from `seed`. ValueError when a row has too few items left.
    """
    exclude = canonical_csr(exclude, "exclude")
    if exclude.shape[1] != n_items:
        raise ValueError(f"exclude has {exclude.shape[1]} columns; expected n_items={n_items}")
    test_users, test_items = _check_rows(test_users, test_items, exclude.shape[0], n_items)
    if n_negatives < 1:
        raise ValueError(f"n_negatives must be >= 1, got {n_negatives}")
    catalog = _resolve_catalog(catalog, n_items)
    if catalog.size == 0:
        raise ValueError("the catalog is empty: no items to draw negatives from")
    position_of_item = np.full(n_items, -1, dtype=np.int64)
    position_of_item[catalog] = np.arange(catalog.size)
    # Per test row: its exclusions (the user's excluded items and the target), as catalog positions.
    user_rows = exclude[test_users]
    row_ids = np.arange(test_users.size)
    excluded_rows = np.concatenate([np.repeat(row_ids, np.diff(user_rows.indptr)), row_ids])
    excluded_positions = position_of_item[np.concatenate([user_rows.indices, test_items])]
    in_catalog = excluded_positions >= 0
    unique_keys = np.unique(_pair_keys(excluded_rows[in_catalog], excluded_positions[in_catalog], catalog.size))
    excluded_rows, excluded_positions = np.divmod(unique_keys, catalog.size)
    allowed = catalog.size - np.bincount(excluded_rows, minlength=test_users.size)
    if allowed.min() < n_negatives:
        row = int(np.argmin(allowed))
        raise ValueError(f"test row {row} (user {int(test_users[row])}) has only {int(allowed[row])} items to draw "
                         f"{n_negatives} negatives from")
    rng = np.random.default_rng(seed)
    sampler = _negatives_by_rejection if catalog.size >= 4 * n_negatives else _negatives_by_keys
    positions = sampler(rng, catalog.size, excluded_rows, excluded_positions, test_users.size, n_negatives)
    candidates = np.empty((test_users.size, 1 + n_negatives), dtype=index_dtype(n_items))
    candidates[:, 0] = test_items
    candidates[:, 1:] = positions if catalog.size == n_items else catalog[positions]
    return candidates


def _check_factors(user_vecs: np.ndarray, item_vecs: np.ndarray, n_users: int, n_items: int) -> None:
    """ValueError unless the factor matrices match the matrix shape and are finite."""
    user_vecs, item_vecs = np.asarray(user_vecs), np.asarray(item_vecs)
    if user_vecs.ndim != 2 or item_vecs.ndim != 2 or user_vecs.shape[1] != item_vecs.shape[1]:
        raise ValueError(f"user_vecs {user_vecs.shape} and item_vecs {item_vecs.shape} must be 2-d with equal rank")
    if user_vecs.shape[0] < n_users or item_vecs.shape[0] != n_items:
        raise ValueError(f"factors {user_vecs.shape} / {item_vecs.shape} do not cover the {n_users} x {n_items} matrix")
    if not (np.isfinite(item_vecs).all()):
        raise ValueError("item_vecs holds NaN or infinity")


def sampled_ranks(user_vecs: np.ndarray, item_vecs: np.ndarray, candidates: np.ndarray, test_users: np.ndarray,
                  train: sp.csr_matrix, method: str = "auto") -> np.ndarray:
    """1-based rank of each row's target (column 0) among its candidates; ties count against it.

    user_vecs[test_users[r]] scores row r; negatives in the user's training items are pushed to
    the bottom (the target itself is never pushed). Candidates must not repeat the target.
    method: "gemm" scores every item per row block, "gather" only the candidates; "auto" picks
    by catalog size (both give the same ranks up to float rounding).
    """
    if method not in ("auto", "gemm", "gather"):
        raise ValueError(f"method must be 'auto', 'gemm' or 'gather', got {method!r}")
    train = canonical_csr(train, "train")
    test_users = np.asarray(test_users, dtype=np.int64)
    # int32 candidates (what sample_negatives draws) are used as they are: a million rows of a
    # thousand candidates are 4 GB as int32, and an int64 copy would double that
    candidates = np.asarray(candidates)
    if candidates.dtype != np.int32:
        candidates = candidates.astype(np.int64)
    if candidates.ndim != 2 or candidates.shape[0] != test_users.size or candidates.shape[1] < 1:
        raise ValueError(f"candidates {candidates.shape} must have one row per test user ({test_users.size})")
    _check_rows(test_users, candidates[:, 0], train.shape[0], train.shape[1])
    if candidates.min() < 0 or candidates.max() >= train.shape[1]:
        raise ValueError(f"candidates hold item indices outside [0, {train.shape[1]})")
    _check_factors(user_vecs, item_vecs, train.shape[0], train.shape[1])
    user_vecs = np.asarray(user_vecs, dtype=FLOAT)
    item_vecs = np.asarray(item_vecs, dtype=FLOAT)
    n_cand = candidates.shape[1]
    ranks = np.empty(test_users.size, dtype=np.int64)
    score_all = method == "gemm" or (method == "auto" and item_vecs.shape[0] <= _GEMM_ITEMS_PER_CANDIDATE * n_cand)
    if score_all:
        chunk = max(1, _SAMPLED_CHUNK_FLOATS // item_vecs.shape[0])
        item_vecs_t = np.ascontiguousarray(item_vecs.T)
    else:
        chunk = max(1, _GATHER_CHUNK_FLOATS // (n_cand * item_vecs.shape[1]))
        train_keys = _csr_keys(train)
    for start in range(0, test_users.size, chunk):
        users = test_users[start:start + chunk]
        rows = candidates[start:start + chunk]
        queries = user_vecs[users]
        if not np.isfinite(queries).all():
            raise ValueError("user_vecs holds NaN or infinity for a test user")
        if score_all:
            all_scores = queries @ item_vecs_t
            target_scores = np.take_along_axis(all_scores, rows[:, :1], axis=1)
            # Pushing training items to the bottom is then one scatter of -inf, no lookups.
            seen = train[users]
            all_scores[np.repeat(np.arange(users.size), np.diff(seen.indptr)), seen.indices] = -np.inf
            ranks[start:start + chunk] = 1 + np.count_nonzero(
                np.take_along_axis(all_scores, rows[:, 1:], axis=1) >= target_scores, axis=1)
            continue
        scores = np.matmul(item_vecs[rows], queries[:, :, None])[:, :, 0]
        above = scores[:, 1:] >= scores[:, :1]
        # Only negatives that outrank the target need the train lookup.
        row_idx, col_idx = np.nonzero(above)
        pushed = _contains(train_keys, _pair_keys(users[row_idx], rows[row_idx, col_idx + 1], train.shape[1]))
        ranks[start:start + chunk] = 1 + above.sum(axis=1) - np.bincount(row_idx[pushed], minlength=users.size)
    return ranks


def hit_rate(ranks: np.ndarray, k: int) -> float:
    """Share of rows whose target ranks within the top k."""
    ranks = _check_ranks(ranks, k)
    return float(np.mean(ranks <= k))


def ndcg(ranks: np.ndarray, k: int) -> float:
    """Mean of 1/log2(rank + 1) over rows, counting 0 for rank > k."""
    ranks = _check_ranks(ranks, k)
    return float(np.mean(np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)))


def _check_ranks(ranks: np.ndarray, k: int) -> np.ndarray:
    """Ranks as a non-empty int array of values >= 1, or ValueError."""
    ranks = np.asarray(ranks)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if ranks.size == 0:
        raise ValueError("no ranks to average")
    if ranks.min() < 1:
        raise ValueError("ranks are 1-based; got a rank < 1")
    return ranks


def top_k_positions(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a 2-d score block, the columns of its k best scores (1 <= k <= columns), best first, and those scores."""
    best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    best_scores = np.take_along_axis(scores, best, axis=1)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best, order, axis=1), np.take_along_axis(best_scores, order, axis=1)


def _top_k(user_vecs: np.ndarray, item_vecs: np.ndarray, train: sp.csr_matrix, users: np.ndarray, k: int,
           catalog: np.ndarray) -> np.ndarray:
    """Top-k catalog items per user, best first, training items excluded; -1 where fewer than k remain."""
    _check_factors(user_vecs, item_vecs, train.shape[0], train.shape[1])
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    user_vecs = np.asarray(user_vecs, dtype=FLOAT)
    catalog_vecs = np.ascontiguousarray(np.asarray(item_vecs, dtype=FLOAT)[catalog])
    position_of_item = np.full(train.shape[1], -1, dtype=np.int64)  # mutation: equivalent (read only by its sign)
    position_of_item[catalog] = np.arange(catalog.size)
    width = min(k, catalog.size)
    top = np.full((users.size, k), -1, dtype=np.int64)
    chunk = max(1, _FULL_CHUNK_FLOATS // max(1, catalog.size))
    for start in range(0, users.size, chunk):
        block = users[start:start + chunk]
        queries = user_vecs[block]
        if not np.isfinite(queries).all():
            raise ValueError("user_vecs holds NaN or infinity for a test user")
        scores = queries @ catalog_vecs.T
        seen = train[block]
        seen_rows = np.repeat(np.arange(block.size), np.diff(seen.indptr))
        seen_positions = position_of_item[seen.indices]
        scores[seen_rows[seen_positions >= 0], seen_positions[seen_positions >= 0]] = -np.inf
        best, best_scores = top_k_positions(scores, width)
        recommendable = best_scores > -np.inf
        top[start:start + chunk, :width] = np.where(recommendable, catalog[best], -1)
    return top


def full_catalog_metrics(user_vecs: np.ndarray, item_vecs: np.ndarray, train: sp.csr_matrix, test_users: np.ndarray,
                         test_items: np.ndarray, k: int = 10, catalog: np.ndarray | None = None) -> dict[str, float]:
    """HR@k, NDCG@k, Recall@k and Coverage@k over the whole catalog (training items excluded), per test user.

    catalog defaults to the items with a training entry; "users" gives the number of test users.
    """
    train = canonical_csr(train, "train")
    test_users, test_items = _check_rows(test_users, test_items, train.shape[0], train.shape[1])
    catalog = _resolve_catalog(catalog, train.shape[1], train)
    test_keys = np.unique(_pair_keys(test_users, test_items, train.shape[1]))
    users, n_relevant = np.unique(test_keys // train.shape[1], return_counts=True)
    top = _top_k(user_vecs, item_vecs, train, users, k, catalog)
    hits = (top >= 0) & _contains(test_keys, _pair_keys(np.repeat(users, k).reshape(top.shape), top, train.shape[1]))
    discounts = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))
    ideal = np.cumsum(discounts)[np.minimum(n_relevant, k) - 1]
    return {
        f"HR@{k}": float(np.mean(hits.any(axis=1))),
        f"NDCG@{k}": float(np.mean((hits @ discounts) / ideal)),
        f"Recall@{k}": float(np.mean(hits.sum(axis=1) / n_relevant)),
        f"Coverage@{k}": _coverage(top, catalog.size),
        "users": float(users.size),
    }


def _coverage(top: np.ndarray, catalog_size: int) -> float:
    """Distinct recommended items over the catalog size."""
    return float(np.unique(top[top >= 0]).size / catalog_size) if catalog_size else 0.0
