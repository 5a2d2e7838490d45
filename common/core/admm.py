"""The ADMM consensus step of CDIMF as plain functions over arrays.

Each domain i holds X_i (its shared users' factors) and a scaled dual U_i. It sends
V_i = X_i + U_i; the aggregator computes Z = prox(mean of V_i over the domains that hold the
user); each domain then updates U_i += X_i - Z and solves its shared rows towards h = Z - U_i
with weight rho.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from cdimf.common.core.params import ADMMParams

FLOAT = np.float32


def consensus_mean(
    contributions: Sequence[tuple[np.ndarray, np.ndarray]], n_rows: int, rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the contributions per global row over the domains that sent that row.

    `contributions` holds (global row ids, values) per domain, row ids unique within a domain.
    Returns (mean float32 (n_rows, rank), holder count int64 (n_rows,)); rows nobody sent are 0.
    """
    total = np.zeros((n_rows, rank), dtype=np.float64)
    holders = np.zeros(n_rows, dtype=np.int64)
    for rows, values in contributions:
        if values.shape != (len(rows), rank):
            raise ValueError(f"contribution has shape {values.shape}, expected ({len(rows)}, {rank})")
        if _has_repeats(rows):
            raise ValueError("contribution names a row twice")
        # every row once, in order (a fully shared block): the same sum without a gather and a scatter
        # (a block none of this domain's rows fall in has no rows: its ends are never read)
        ends = len(rows) == 0 or (rows[0] == 0 and rows[-1] == n_rows - 1)  # mutation: equivalent (a wrong end only skips the fast path)
        if len(rows) == n_rows and ends and _is_increasing(rows):  # mutation: equivalent Eq_Gt,Eq_GtE,Eq_Is (only skips the fast path)
            total += values
            holders += 1
            continue
        # rows are unique within one domain, so fancy-index accumulation is exact
        total[rows] += values
        holders[rows] += 1
    held = holders > 0  # mutation: equivalent Gt_NotEq (a count is never negative)
    # divided in place where held (rows nobody sent stay 0): no masked copies of the block
    np.divide(total, holders[:, None], out=total, where=held[:, None])
    return total.astype(FLOAT), holders


def _is_increasing(values: np.ndarray) -> bool:
    """Whether an array is strictly increasing."""
    return bool(np.all(values[1:] > values[:-1]))  # mutation: equivalent Gt_Eq,Gt_GtE,Gt_Is (ids are unique: only skips a sort)


def _has_repeats(values: np.ndarray) -> bool:
    """Whether an array holds a value twice (sort-based: numpy's hashing unique is far slower here)."""
    ordered = np.sort(values, kind="stable")
    return bool(np.any(ordered[1:] == ordered[:-1]))  # mutation: equivalent Eq_LtE (sorted: a next value <= the previous is equal)


def prox_identity(mean: np.ndarray, holders: np.ndarray, params: ADMMParams) -> np.ndarray:
    """Z = mean (a copy)."""
    return mean.astype(FLOAT, copy=True)


def prox_l2(mean: np.ndarray, holders: np.ndarray, params: ADMMParams) -> np.ndarray:
    """Z = mean * N rho / (N rho + lambda_z) with N holders per row (rows nobody holds stay 0)."""
    weight = holders.astype(np.float64) * params.rho
    denom = weight + params.lambda_z
    scale = np.divide(weight, denom, out=np.zeros_like(weight), where=denom > 0)  # mutation: equivalent NotEq,GtE,NumberReplacer (lambda_z > 0)
    return (mean * scale[:, None]).astype(FLOAT)


ProxOperator = Callable[[np.ndarray, np.ndarray, ADMMParams], np.ndarray]
# ADMMParams.prox names one of these; the wire's Prox enum maps onto the same names (wire/serde.py).
PROX_OPERATORS: dict[str, ProxOperator] = {"identity": prox_identity, "l2": prox_l2}


def apply_prox(mean: np.ndarray, holders: np.ndarray, params: ADMMParams) -> np.ndarray:
    """Z = prox(mean) with the operator params.prox names (float32 (n_rows, rank))."""
    return PROX_OPERATORS[params.prox](mean, holders, params)


def consensus(
    contributions: Sequence[tuple[np.ndarray, np.ndarray]], n_rows: int, rank: int, params: ADMMParams
) -> tuple[np.ndarray, np.ndarray]:
    """The aggregator's step: Z = prox(mean over holders); returns (Z, holder counts)."""
    mean, holders = consensus_mean(contributions, n_rows, rank)
    return apply_prox(mean, holders, params), holders


def dual_update(duals: np.ndarray, local: np.ndarray, consensus_rows: np.ndarray) -> np.ndarray:
    """The domain's dual step U + X - Z for its shared rows (a new array)."""
    # one new array, summed into in place (U + X, then - Z: the same float32 operations as the
    # expression, without its two (shared rows, rank) temporaries); the inputs are not written
    updated = np.add(duals, local, dtype=FLOAT)
    updated -= consensus_rows
    return updated


def proximal_target(consensus_rows: np.ndarray, duals: np.ndarray) -> np.ndarray:
    """The target h = Z - U that the domain's shared rows are pulled to with weight rho."""
    return (consensus_rows - duals).astype(FLOAT, copy=False)  # mutation: equivalent FalseWithTrue (a new array: its copy is equal)


# blockwise_consensus works on blocks of rows whose float64 temporaries take about this many
# bytes: small enough to stay in cache
CONSENSUS_BLOCK_BYTES = 512 * 1024  # mutation: equivalent (block size: every row's consensus is the same in any block)


@dataclass(frozen=True)
class BlockPlan:
    """Where one domain's rows fall among Z's row blocks: what blockwise_consensus derives from its row ids alone.

    order: the permutation that sorts the row ids (None: already increasing, the rows are cut
    into views); sorted_index: the sorted ids; cuts: per block boundary, the first sorted row at
    or after it. A run's memberships are frozen, so the aggregator derives it once per domain
    and run instead of sorting a million ids at every round close.
    """

    order: np.ndarray | None
    sorted_index: np.ndarray
    cuts: np.ndarray


def consensus_block_rows(rank: int) -> int:
    """Rows per block of blockwise_consensus at this rank: about CONSENSUS_BLOCK_BYTES of float64, at least 64."""
    return max(64, CONSENSUS_BLOCK_BYTES // (8 * max(rank, 1)))  # mutation: equivalent (block size, at least 64 rows)


def block_plan(index: np.ndarray, n_rows: int, block_rows: int) -> BlockPlan:
    """The BlockPlan of one domain's row ids for blocks of `block_rows` rows of an n_rows Z."""
    starts = np.arange(0, n_rows + block_rows, block_rows).clip(max=n_rows)
    # int32 where it fits: half the bytes of int64 for a plan the aggregator keeps all run long
    narrow = np.int32 if max(len(index), n_rows) < 2**31 else np.int64  # mutation: equivalent Lt_LtE (at 2**31 rows every id fits int32)
    order = None if _is_increasing(index) else np.argsort(index, kind="stable").astype(narrow)
    sorted_index = index if order is None else index[order].astype(narrow)
    return BlockPlan(order, sorted_index, np.searchsorted(sorted_index, starts))


def blockwise_consensus(
    contributions: Sequence[tuple[np.ndarray, np.ndarray]],
    n_rows: int,
    rank: int,
    params: ADMMParams,
    block_rows: int | None = None,
    plans: Sequence[BlockPlan] | None = None,
) -> np.ndarray:
    """consensus() applied to blocks of rows: the same values, with one block's temporaries.

    Mean and prox are per row and the domains are summed in the same order, so Z is bit for bit
    the one-shot consensus, without a float64 copy of everything and in cache-sized passes.
    block_rows None: consensus_block_rows(rank). plans: each contribution's BlockPlan for these
    blocks (derived here when None).
    """
    if block_rows is None:
        block_rows = consensus_block_rows(rank)
    if plans is None:
        plans = [block_plan(index, n_rows, block_rows) for index, _ in contributions]
    if len(plans) != len(contributions):
        raise ValueError(f"{len(plans)} block plans for {len(contributions)} contributions")
    z = np.empty((n_rows, rank), dtype=FLOAT)
    starts = np.arange(0, n_rows + block_rows, block_rows).clip(max=n_rows)
    parts = [(plan.order, plan.sorted_index, plan.cuts, values) for plan, (_, values) in zip(plans, contributions)]
    for plan, (index, _) in zip(plans, contributions):
        if len(plan.sorted_index) != len(index) or len(plan.cuts) != len(starts):
            raise ValueError(f"a block plan of {len(plan.sorted_index)} rows and {len(plan.cuts)} cuts does not fit "
                             f"{len(index)} rows in blocks of {block_rows} of {n_rows}")
    # a loop over blocks of rows (n_rows / block_rows iterations), each one vectorised
    for block, (start, stop) in enumerate(pairwise(starts)):
        block_parts = [
            (
                sorted_index[cuts[block] : cuts[block + 1]] - start,
                values[cuts[block] : cuts[block + 1]] if order is None else values[order[cuts[block] : cuts[block + 1]]],
            )
            for order, sorted_index, cuts, values in parts
        ]
        z[start:stop], _ = consensus(block_parts, int(stop - start), rank, params)
    return z
