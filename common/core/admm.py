"""The ADMM consensus step of CDIMF as plain functions over arrays.

Each domain i holds X_i (its shared users' factors) and a scaled dual U_i. It sends
V_i = X_i + U_i; the aggregator computes Z = prox(mean of V_i over the domains that hold the
user); each domain then updates U_i += X_i - Z and solves its shared rows towards h = Z - U_i
with weight rho.
"""

from collections.abc import Callable, Sequence

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
        # rows are unique within one domain, so fancy-index accumulation is exact
        total[rows] += values
        holders[rows] += 1
    mean = np.zeros((n_rows, rank), dtype=FLOAT)
    held = holders > 0
    mean[held] = (total[held] / holders[held, None]).astype(FLOAT)
    return mean, holders


def _has_repeats(values: np.ndarray) -> bool:
    """Whether an array holds a value twice (sort-based: numpy's hashing unique is far slower here)."""
    ordered = np.sort(values, kind="stable")
    return bool(np.any(ordered[1:] == ordered[:-1]))


def prox_identity(mean: np.ndarray, holders: np.ndarray, params: ADMMParams) -> np.ndarray:
    """Z = mean (a copy)."""
    return mean.astype(FLOAT, copy=True)


def prox_l2(mean: np.ndarray, holders: np.ndarray, params: ADMMParams) -> np.ndarray:
    """Z = mean * N rho / (N rho + lambda_z) with N holders per row (rows nobody holds stay 0)."""
    weight = holders.astype(np.float64) * params.rho
    denom = weight + params.lambda_z
    scale = np.divide(weight, denom, out=np.zeros_like(weight), where=denom > 0)
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
    return (duals + local - consensus_rows).astype(FLOAT)


def proximal_target(consensus_rows: np.ndarray, duals: np.ndarray) -> np.ndarray:
    """The target h = Z - U that the domain's shared rows are pulled to with weight rho."""
    return (consensus_rows - duals).astype(FLOAT)


def residuals(local: np.ndarray, consensus_rows: np.ndarray, previous_consensus: np.ndarray | None, rho: float) -> tuple[float, float]:
    """ADMM primal ||X - Z|| and dual rho ||Z - Z_prev|| residual norms, for monitoring."""
    primal = float(np.linalg.norm(local.astype(np.float64) - consensus_rows))
    if previous_consensus is None:
        return primal, float("nan")
    dual = rho * float(np.linalg.norm(consensus_rows.astype(np.float64) - previous_consensus))
    return primal, dual
