"""The holders' cold-start policies at registration: receiver rows served per domain pair, and the caps they must keep.

A receiver row (no interactions in its domain, held elsewhere) receives Z, which on such a row is
the holders' own user factors. Each holder's ColdStartPolicy says whether it serves them and how
many at most; a registration after which any holder would serve more is refused whole.

What a refusal tells the registering domain is bounded: a receiver-side registrant learns which
holder refused and its cap (so: more than that many of its receiver rows are held there), never
the exact count, which only the aggregator's log shows. A holder refused for its own cap learns
the count, as its served_to counts would show it once accepted.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np

from cdimf.aggregator.rounds import StateError
from cdimf.aggregator.store import Registration
from cdimf.common.core.membership import Membership, served_matrix

# the status a registration over a holder's cap gets: the holder's quota of served rows is spent
OVER_CAP_STATUS: Final = "RESOURCE_EXHAUSTED"


@dataclass(frozen=True)
class ColdStartCounts:
    """Receiver rows per domain pair over a set of registrations: served[h, r] of domains[r]'s rows domains[h] holds."""

    domains: tuple[str, ...]
    served: np.ndarray

    def served_to(self, domain: str) -> dict[str, int]:
        """How many of `domain`'s users each other domain receives."""
        holder = self.domains.index(domain)
        return {other: int(self.served[holder, index]) for index, other in enumerate(self.domains) if index != holder}

    def received_from(self, domain: str) -> dict[str, int]:
        """How many receiver rows `domain` gets from each other domain (holder)."""
        receiver = self.domains.index(domain)
        return {other: int(self.served[index, receiver]) for index, other in enumerate(self.domains) if index != receiver}

    def total_served(self, domain: str) -> int:
        """Receiver rows of every other domain that `domain` holds."""
        return int(self.served[self.domains.index(domain)].sum())


def cold_start_counts(memberships: Mapping[str, Membership]) -> ColdStartCounts:
    """The counts of aligned memberships (their holder masks name the domains in the same order)."""
    domains = tuple(sorted(memberships))
    return ColdStartCounts(domains, served_matrix([memberships[name] for name in domains]))


def served_cap(registration: Registration) -> int | None:
    """The most receiver rows this registration's domain serves (None: no cap)."""
    return registration.cold_start.cap(int(np.count_nonzero(registration.holder)))


def require_within_caps(registrations: Mapping[str, Registration], counts: ColdStartCounts, registering: str) -> None:
    """StateError OVER_CAP_STATUS when some holder would serve more receiver rows than its policy allows.

    The message is for `registering` (see the module's note on what it reveals); the exact count
    goes to the caller's log through `over_cap_detail`.
    """
    for holder in counts.domains:
        cap = served_cap(registrations[holder])
        total = counts.total_served(holder)
        if cap is None or total <= cap:
            continue
        policy = registrations[holder].cold_start.describe()
        if holder == registering:
            takers = ", ".join(f"{name} {count}" for name, count in counts.served_to(holder).items() if count)
            raise StateError(OVER_CAP_STATUS, f"cold start: {holder}'s own policy ({policy}, a cap of {cap} rows) is below the {total}"
                                              f" receiver rows the registered domains already take ({takers}); raise the cap or have them re-register")
        why = "does not serve its users to other domains" if cap == 0 and not registrations[holder].cold_start.serve else f"serves at most {cap} receiver rows"
        raise StateError(OVER_CAP_STATUS, f"cold start: holder {holder} {why} ({policy}); with this registration of {registering}"
                                          f" it would serve more, so the registration is refused and nothing changed")


def over_cap_detail(registrations: Mapping[str, Registration], counts: ColdStartCounts) -> str:
    """Every holder over its cap with the count it would reach and who takes them (for the aggregator's log only)."""
    parts = []
    for holder in counts.domains:
        cap = served_cap(registrations[holder])
        total = counts.total_served(holder)
        if cap is not None and total > cap:
            takers = ", ".join(f"{name} {count}" for name, count in counts.served_to(holder).items() if count)
            parts.append(f"{holder} would serve {total} > cap {cap} ({takers})")
    return "; ".join(parts)


def served_lines(registrations: Mapping[str, Registration], counts: ColdStartCounts) -> list[str]:
    """One line per holder that serves receiver rows: how many, to whom, and its cap (the aggregator logs them)."""
    lines = []
    for holder in counts.domains:
        served = {name: count for name, count in counts.served_to(holder).items() if count}
        if served:
            cap = served_cap(registrations[holder])
            lines.append(f"{holder} serves {counts.total_served(holder)} receiver rows ({', '.join(f'to {name} {count}' for name, count in served.items())};"
                         f" cap {'none' if cap is None else cap})")
    return lines
