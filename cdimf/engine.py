"""The in-process CDIMF engine: N domain trainers and the consensus step in one process, no gRPC."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.sparse as sp

from cdimf.common.core.admm import consensus
from cdimf.common.core.membership import AlignedMembership, align_memberships
from cdimf.common.core.model import DomainTrainer
from cdimf.common.core.params import ADMMParams, IALSParams, PrivacyParams
from cdimf.common.core.privacy import release
from cdimf.common.core.ring import ring_consensus
from cdimf.common.core.sparse import row_counts


@dataclass(frozen=True)
class DomainInput:
    """One domain's private inputs: its user keys (one per row) and its training matrix."""

    name: str
    user_keys: np.ndarray
    train: sp.csr_matrix
    params: IALSParams
    aggregation_period: int = 1
    # clipping and noise of what the domain sends, as a node's [privacy] does (seeded alike)
    privacy: PrivacyParams = field(default_factory=PrivacyParams)


@dataclass
class RoundReport:
    """What one round did: its index, the epochs each domain ran and any metrics a callback added."""

    round: int
    epochs: dict[str, int]
    metrics: dict[str, float] = field(default_factory=dict)


class CDIMFEngine:
    """Runs synchronous CDIMF rounds: local epochs, push X+U, Z = prox(mean), dual step."""

    def __init__(
        self,
        domains: Sequence[DomainInput],
        admm: ADMMParams,
        user_step: Literal["paper", "reference-code"] = "paper",
        quantize: bool = False,
    ) -> None:
        if len(domains) < 1:
            raise ValueError("at least one domain is needed")
        names = [d.name for d in domains]
        if len(set(names)) != len(names):
            raise ValueError(f"domain names must be unique, got {names}")
        ranks = {d.params.rank for d in domains}
        if len(ranks) != 1:
            raise ValueError(f"all domains must share one rank, got {sorted(ranks)}")
        for domain in domains:
            if len(domain.user_keys) != domain.train.shape[0]:
                raise ValueError(
                    f"domain {domain.name}: {len(domain.user_keys)} user keys for {domain.train.shape[0]} rows"
                )
            if domain.aggregation_period < 1:
                raise ValueError(f"domain {domain.name}: aggregation_period must be >= 1")
        self.admm = admm
        # quantize: the consensus of secure aggregation (fixed point in Z/2^64, common/core/ring.py),
        # so an in-process run gives the Z of a federated masked run bit for bit
        self.quantize = quantize
        self.rank = ranks.pop()
        self.domains = list(domains)
        holds = [row_counts(sp.csr_matrix(d.train)) > 0 for d in domains]
        self.memberships: list[AlignedMembership]
        self.memberships, self.global_keys = align_memberships([d.user_keys for d in domains], holds, names)
        self.trainers = [
            DomainTrainer(d.name, d.train, d.params, admm.rho, m.shared_rows, m.receiver_rows, user_step)
            for d, m in zip(domains, self.memberships)
        ]
        self.round = 0
        self.consensus: np.ndarray | None = None
        # what each domain sent in the last round (after its privacy step): the aggregator's view
        self.released: list[np.ndarray] = []

    def step(self) -> RoundReport:
        """One synchronous round over all domains."""
        for trainer, domain in zip(self.trainers, self.domains):
            trainer.local_epochs(domain.aggregation_period)
        # what leaves each domain: its X + U, clipped and noised under its privacy settings (before any masking)
        self.released = [release(t.contribution(), d.privacy, d.name, self.round + 1) for t, d in zip(self.trainers, self.domains)]
        contributions = [(m.shared_global, values) for m, values in zip(self.memberships, self.released)]
        combine = ring_consensus if self.quantize else consensus
        z, _ = combine(contributions, len(self.global_keys), self.rank, self.admm)
        for membership, trainer in zip(self.memberships, self.trainers):
            trainer.receive_consensus(z[membership.shared_global], z[membership.receiver_global])
        self.consensus = z
        self.round += 1
        return RoundReport(self.round, {t.name: t.state.epochs for t in self.trainers})

    def run(self, rounds: int, on_round: Callable[[RoundReport], bool | None] | None = None) -> list[RoundReport]:
        """Run up to `rounds` rounds; on_round may return True to stop early."""
        reports = []
        for _ in range(rounds):
            report = self.step()
            reports.append(report)
            if on_round is not None and on_round(report):
                break
        return reports
