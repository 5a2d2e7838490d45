"""A node's side of secure aggregation: mask what it pushes, unmask the masked sum it pulls, apply the prox.

In a secure run (RunParams.secure_aggregation) the aggregator only ever holds masked ring
elements: a node pushes mask_contribution(X + U) of its shared rows (fixed point in Z/2^64 plus
a per-(domain, round, row) mask from the federation secret, and a linear check column), and
pulls the sum of its rows over their holders with the list of contributions that sum holds.
Removing exactly those contributions' masks (each row's holders from the membership's holder
masks) gives the plain sum; a wrong list or a tampered sum fails the check column and raises
MaskedSumMismatch, and nothing is applied. The mean over holders and the prox are computed here
(consensus_from_ring), as the engine's quantized path computes them.
"""

import numpy as np

from cdimf.common.config import RunParams
from cdimf.common.core.membership import Membership
from cdimf.common.core.ring import consensus_from_ring
from cdimf.common.security.masks import MaskedSumMismatch, holders_of, mask_contribution, unmask_sum
from cdimf.common.wire.serde import Consensus


def masked_contribution(values: np.ndarray, shared_pseudonyms: np.ndarray, secret: bytes, run_id: str, domain: str, round_index: int) -> np.ndarray:
    """The ring rows a node pushes for `round_index` in place of X + U: uint64 (shared rows, rank + 1)."""
    return mask_contribution(values, shared_pseudonyms, secret, run_id, domain, round_index)


def unmasked_consensus(pulled: Consensus, view: Membership, pseudonyms: np.ndarray, secret: bytes, run_id: str, params: RunParams) -> Consensus:
    """Z of the pulled rows (shared then receivers, float32) from a masked sum; MaskedSumMismatch when it does not unmask.

    `pseudonyms`: every row's pseudonym of this domain (registration order).
    """
    rows = np.concatenate([view.shared_rows, view.receiver_rows])
    masked = np.concatenate([pulled.shared, pulled.receivers]) if len(pulled.receivers) else pulled.shared
    if masked.dtype != np.uint64 or masked.shape != (len(rows), params.rank + 1):
        raise MaskedSumMismatch(f"the masked sum of round {pulled.round} is {masked.dtype} {masked.shape}, "
                                f"expected uint64 ({len(rows)}, {params.rank + 1})")
    # an unknown or repeated domain in the list is refused there (MaskedSumMismatch)
    holds = holders_of(view.holder_masks[rows], view.domains, pulled.contributors)
    sums, holders = unmask_sum(masked, pseudonyms[rows], pulled.contributors, holds, secret, run_id)
    z = consensus_from_ring(sums, holders, params.admm)
    shared = len(view.shared_rows)
    return Consensus(pulled.round, z[:shared], z[shared:], pulled.contributors)
