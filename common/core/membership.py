"""Which user rows each domain shares with the others, from user keys or pseudonyms (plain arrays)."""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAX_DOMAINS = 64  # holder masks are uint64
ROLE_LOCAL, ROLE_SHARED, ROLE_RECEIVER = 1, 2, 3  # the values of the wire's RowRole


@dataclass(frozen=True)
class Membership:
    """One domain's rows in the federation: their roles, who holds them, which are exchanged.

    roles: per row of the domain, ROLE_LOCAL, ROLE_SHARED or ROLE_RECEIVER. holder_masks: per row,
    bit i set when domains[i] holds that user. shared_rows: rows with interactions here whose user
    another domain also holds or wants scored (pushed and pulled; a user held here alone but cold
    elsewhere must still be pushed, or the cold domain would receive nothing). receiver_rows: rows
    with no interactions here that some other domain holds (pulled only: cold-start users scored
    with the consensus). Both ascending. This is what a node learns of the alignment.
    """

    domains: tuple[str, ...]
    roles: np.ndarray
    holder_masks: np.ndarray
    shared_rows: np.ndarray
    receiver_rows: np.ndarray

    @classmethod
    def from_roles(cls, domains: Sequence[str], roles: np.ndarray, holder_masks: np.ndarray) -> "Membership":
        """A Membership whose exchanged rows follow from the roles (as a node rebuilds it from the wire)."""
        return cls(tuple(domains), roles, holder_masks, np.flatnonzero(roles == ROLE_SHARED), np.flatnonzero(roles == ROLE_RECEIVER))


@dataclass(frozen=True)
class AlignedMembership(Membership):
    """A Membership with its place in the aligned union of domains, known to the aligner (aggregator, engine).

    shared_global/receiver_global: the exchanged rows' ids in the union of every domain's keys.
    shared_index/receiver_index: their positions among the exchanged rows (shared or received
    somewhere), of which there are exchanged_rows: the rows of the aggregator's Z.
    """

    shared_global: np.ndarray
    receiver_global: np.ndarray
    shared_index: np.ndarray
    receiver_index: np.ndarray
    exchanged_rows: int

    @property
    def pull_index(self) -> np.ndarray:
        """Rows of Z a domain pulls: its shared rows then its receiver rows."""
        return np.concatenate([self.shared_index, self.receiver_index])


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique by sorting: numpy's plain np.unique hashes, which is far slower on a million ints."""
    ordered = np.sort(values)
    if len(ordered) == 0:
        return ordered
    return ordered[np.concatenate([[True], ordered[1:] != ordered[:-1]])]


def align_memberships(
    keys: Sequence[np.ndarray], holds: Sequence[np.ndarray], domains: Sequence[str] | None = None
) -> tuple[list[AlignedMembership], np.ndarray]:
    """Align domains on user keys; holds[i][r] says whether domain i's row r has interactions.

    Returns each domain's Membership and the global key array (global id = position in it).
    Keys must be unique within a domain; `domains` names the domains (bit i of a holder mask),
    by default "0", "1", ...
    """
    if len(keys) != len(holds):
        raise ValueError("keys and holds must have one entry per domain")
    names = tuple(domains) if domains is not None else tuple(str(index) for index in range(len(keys)))
    if len(names) != len(keys):
        raise ValueError(f"{len(names)} domain names for {len(keys)} domains")
    if len(keys) > MAX_DOMAINS:
        raise ValueError(f"at most {MAX_DOMAINS} domains, got {len(keys)}")
    held = [np.asarray(domain_holds, dtype=bool) for domain_holds in holds]
    for index, (domain_keys, domain_holds) in enumerate(zip(keys, held)):
        if len(domain_keys) != len(domain_holds):
            raise ValueError(f"domain {index}: {len(domain_keys)} keys but {len(domain_holds)} holder flags")
        if len(sorted_unique(np.asarray(domain_keys))) != len(domain_keys):
            raise ValueError(f"domain {index}: a user key appears twice")
    all_keys = np.concatenate([np.asarray(k) for k in keys]) if keys else np.zeros(0)
    global_keys, inverse = np.unique(all_keys, return_inverse=True)
    bounds = np.cumsum([0] + [len(k) for k in keys])
    global_ids = [inverse[bounds[i] : bounds[i + 1]].astype(np.int64) for i in range(len(keys))]
    holder_count = np.zeros(len(global_keys), dtype=np.int64)
    receiver_count = np.zeros(len(global_keys), dtype=np.int64)
    holder_masks = np.zeros(len(global_keys), dtype=np.uint64)
    for bit, (ids, domain_holds) in enumerate(zip(global_ids, held)):
        # ids are unique within one domain, so fancy-index accumulation is exact
        holder_count[ids[domain_holds]] += 1
        receiver_count[ids[~domain_holds]] += 1
        holder_masks[ids[domain_holds]] |= np.uint64(1 << bit)
    exchanged = np.zeros(len(global_keys), dtype=bool)
    rows = []
    for ids, held_here in zip(global_ids, held):
        wanted_elsewhere = (holder_count[ids] >= 2) | (receiver_count[ids] >= 1)
        shared = np.flatnonzero(held_here & wanted_elsewhere)
        receiver = np.flatnonzero(~held_here & (holder_count[ids] >= 1))
        exchanged[ids[shared]] = True
        exchanged[ids[receiver]] = True
        rows.append((shared, receiver))
    # Z lives only on exchanged rows: rows one domain holds alone never cross the network, and
    # prox is per row, so its values equal those of a Z over every global row
    position = np.cumsum(exchanged) - 1
    exchanged_rows = int(exchanged.sum())
    memberships = []
    for ids, (shared, receiver) in zip(global_ids, rows):
        roles = np.full(len(ids), ROLE_LOCAL, dtype=np.uint8)
        roles[shared] = ROLE_SHARED
        roles[receiver] = ROLE_RECEIVER
        shared_global, receiver_global = ids[shared], ids[receiver]
        memberships.append(
            AlignedMembership(
                domains=names,
                roles=roles,
                holder_masks=holder_masks[ids],
                shared_rows=shared.astype(np.int64, copy=False),
                receiver_rows=receiver.astype(np.int64, copy=False),
                shared_global=shared_global,
                receiver_global=receiver_global,
                shared_index=position[shared_global].astype(np.int64, copy=False),
                receiver_index=position[receiver_global].astype(np.int64, copy=False),
                exchanged_rows=exchanged_rows,
            )
        )
    return memberships, global_keys


def served_matrix(memberships: Sequence[Membership]) -> np.ndarray:
    """Cold-start rows per domain pair: entry [h, r] counts the receiver rows of domain r whose user domain h holds.

    memberships[i] is domain i's (bit i of the holder masks). A receiver row held by two domains
    counts for both holders: each of their factors reaches it through Z.
    """
    served = np.zeros((len(memberships), len(memberships)), dtype=np.int64)
    bits = np.arange(len(memberships), dtype=np.uint64)
    for receiver, mine in enumerate(memberships):
        masks = mine.holder_masks[mine.receiver_rows]
        if len(masks):
            # one pass per holder bit over the receiver rows: a loop over domains, never rows
            served[:, receiver] = [np.count_nonzero((masks >> bit) & np.uint64(1)) for bit in bits]
    return served
