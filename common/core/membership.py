"""Which user rows each domain shares with the others, from user keys or pseudonyms (plain arrays)."""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DomainMembership:
    """One domain's rows that take part in the consensus, with their global ids.

    shared: rows with interactions here whose user another domain also holds or wants scored
    (pushed and pulled; a user held here alone but cold elsewhere must still be pushed, or the
    cold domain would receive nothing). receiver: rows with no interactions here that some other domain holds (pulled only:
    cold-start users scored with the consensus).
    """

    shared_rows: np.ndarray
    shared_global: np.ndarray
    receiver_rows: np.ndarray
    receiver_global: np.ndarray


def align_memberships(
    keys: Sequence[np.ndarray], holds: Sequence[np.ndarray]
) -> tuple[list[DomainMembership], np.ndarray]:
    """Align domains on user keys; holds[i][r] says whether domain i's row r has interactions.

    Returns each domain's membership and the global key array (global id = position in it).
    Keys must be unique within a domain.
    """
    if len(keys) != len(holds):
        raise ValueError("keys and holds must have one entry per domain")
    for index, (domain_keys, domain_holds) in enumerate(zip(keys, holds)):
        if len(domain_keys) != len(domain_holds):
            raise ValueError(f"domain {index}: {len(domain_keys)} keys but {len(domain_holds)} holder flags")
        ordered = np.sort(np.asarray(domain_keys))
        if np.any(ordered[1:] == ordered[:-1]):
            raise ValueError(f"domain {index}: a user key appears twice")
    all_keys = np.concatenate([np.asarray(k) for k in keys]) if keys else np.zeros(0)
    global_keys, inverse = np.unique(all_keys, return_inverse=True)
    bounds = np.cumsum([0] + [len(k) for k in keys])
    global_ids = [inverse[bounds[i] : bounds[i + 1]].astype(np.int64) for i in range(len(keys))]
    holder_count = np.zeros(len(global_keys), dtype=np.int64)
    receiver_count = np.zeros(len(global_keys), dtype=np.int64)
    for ids, domain_holds in zip(global_ids, holds):
        held = np.asarray(domain_holds, dtype=bool)
        holder_count[ids[held]] += 1
        receiver_count[ids[~held]] += 1
    memberships = []
    for ids, domain_holds in zip(global_ids, holds):
        held_here = np.asarray(domain_holds, dtype=bool)
        wanted_elsewhere = (holder_count[ids] >= 2) | (receiver_count[ids] >= 1)
        shared = np.flatnonzero(held_here & wanted_elsewhere)
        receiver = np.flatnonzero(~held_here & (holder_count[ids] >= 1))
        memberships.append(DomainMembership(shared, ids[shared], receiver, ids[receiver]))
    return memberships, global_keys
