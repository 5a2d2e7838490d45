"""A run's round rules as a plain class: contributions, staleness, deadlines, closing a round, pulls, metrics.

- A push tagged t from domain d while round c is open is accepted when t <= c, t is newer than
  d's latest accepted tag and c - t <= max_staleness; it replaces d's contribution and marks d
  as reported in round c.
- Round c closes when every admitted domain reported, or when the deadline has passed and at
  least min_domains reported; then Z = prox(mean of each domain's latest accepted contribution)
  over holders (cdimf.common.core.admm.blockwise_consensus) and round c + 1 opens (the run
  finishes after `rounds`). The round records which contributions it used: [(domain, tag)].
- A secure run (params.secure_aggregation) takes only masked ring contributions (uint64, rank + 1
  columns) and keeps, in place of Z, their sum in Z/2^64 over holders (ring_sums): the
  aggregator cannot decode it, and never applies the prox; each node unmasks the contributions
  listed with the sum and applies the prox itself.
- Every refusal raises StateError with a status name and changes nothing.

Persistence is not here: the caller saves each contribution before accepting it and the run
(SavedRun) where a rule says it changed.
"""

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from cdimf.common.config import RunParams
from cdimf.common.core.admm import BlockPlan, block_plan, blockwise_consensus, consensus_block_rows
from cdimf.common.core.membership import AlignedMembership
from cdimf.common.core.ring import ring_sums
from cdimf.common.security.names import shown

StatusName = Literal["INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "ALREADY_EXISTS", "RESOURCE_EXHAUSTED", "UNAVAILABLE"]
RunStateName = Literal["running", "finished", "stopped"]
EventKind = Literal["run_started", "round_closed", "metrics", "run_finished", "run_stopped", "persist_failed", "persist_recovered"]
# A metrics report is a few named numbers (HR@k, NDCG@k); these bounds keep a report from
# growing the saved run (which every round close rewrites) beyond a few kilobytes.
MAX_METRICS = 16
MAX_METRIC_NAME = 32


class StateError(Exception):
    """A request the state refuses; `status` names the gRPC status code the server answers with."""

    def __init__(self, status: StatusName, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Event:
    """One progress event of a run (mirrors the proto RoundEvent)."""

    kind: EventKind
    round: int
    elapsed_s: float
    contributors: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    domain: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    message: str = ""


@dataclass(frozen=True)
class PushOutcome:
    """What accepting a contribution did: the round it counted in and whether that closed it."""

    accepted_round: int
    closed_round: int | None


@dataclass(frozen=True)
class Pulled:
    """A consensus ready for a pull: its round, Z itself, the rows of Z the domain receives and the contributions it holds.

    Z is never modified in place (each round builds a new array), so it may be read after the
    state moved on; the rows are gathered by whoever sends them, not copied here. In a secure
    run z is the masked ring sum (uint64, rank + 1 columns).
    """

    round: int
    z: np.ndarray
    rows: np.ndarray
    contributors: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class SavedRun:
    """What a store keeps of a run at a round boundary: everything a restart resumes from.

    fingerprints: the registrations the run was admitted with, by domain (domain-name order).
    contributions: the latest accepted values by domain, kept only where later rounds may reuse
    them (see Run.saved).
    """

    run_id: str
    params: RunParams
    fingerprints: dict[str, str]
    state: RunStateName
    current_round: int
    consensus_round: int
    consensus: np.ndarray | None
    tags: dict[str, int]
    contributions: dict[str, np.ndarray]
    contribution_counts: dict[str, int]
    started_wall: float
    metrics: dict[str, dict[int, dict[str, float]]]
    events: tuple[Event, ...]
    stop_reason: str
    # (domain, round tag) of the contributions the consensus holds, in summation order
    consensus_contributors: tuple[tuple[str, int], ...] = ()
    # the domains that reported in the open round (empty at a close; a record saved mid-round has some)
    reported: tuple[str, ...] = ()
    # domain -> (tag, values) of contributions accepted after this record was saved (each saved on
    # arrival): a restart accepts them again, so nobody pushes again what it was acked for
    arrived: dict[str, tuple[int, np.ndarray]] = field(default_factory=dict)

    @property
    def domains(self) -> tuple[str, ...]:
        """The admitted domains (sorted)."""
        return tuple(self.fingerprints)


def elapsed_since(started_wall: float) -> float:
    """Wall seconds since a run started (event timestamps)."""
    return max(0.0, time.time() - started_wall)


@dataclass
class Run:
    """One run: its parameters, frozen membership, open round, contributions and consensus.

    memberships: each admitted domain's Membership, in domain-name order (the summation order of
    Z, the same for every round and after a restart). Methods validate first and mutate last.
    """

    run_id: str
    params: RunParams
    memberships: dict[str, AlignedMembership]
    state: RunStateName = "running"
    current_round: int = 1
    consensus: np.ndarray | None = None
    consensus_round: int = 0
    # domain -> (round tag, X + U on its shared rows) of its latest accepted contribution
    contributions: dict[str, tuple[int, np.ndarray]] = field(default_factory=dict)
    # domain -> round tag of its latest accepted contribution (kept on restart even where the
    # values are not: synchronous runs do not save them)
    tags: dict[str, int] = field(default_factory=dict)
    contribution_counts: dict[str, int] = field(default_factory=dict)
    reported: list[str] = field(default_factory=list)
    round_opened_at: float = 0.0
    started_wall: float = 0.0
    metrics: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    stop_reason: str = ""
    # (domain, block rows) -> where its shared rows fall among Z's blocks: derived from the frozen membership
    # at the first close and kept (sorting a million row ids took a second of every close)
    block_plans: dict[tuple[str, int], BlockPlan] = field(default_factory=dict, repr=False, compare=False)

    # (domain, round tag) of the contributions the consensus holds, in summation order
    consensus_contributors: tuple[tuple[str, int], ...] = ()

    @property
    def secure(self) -> bool:
        """Whether the run aggregates masked ring contributions (the aggregator never sees a plain one)."""
        return self.params.secure_aggregation

    @property
    def admitted(self) -> tuple[str, ...]:
        """Domains admitted to this run (sorted)."""
        return tuple(self.memberships)

    @property
    def exchanged_rows(self) -> int:
        """Rows of Z: the users shared or received somewhere."""
        return next(iter(self.memberships.values())).exchanged_rows if self.memberships else 0

    @classmethod
    def start(cls, run_id: str, params: RunParams, memberships: dict[str, AlignedMembership], now: float) -> "Run":
        """A new run with round 1 open at clock time `now`."""
        run = cls(run_id, params, memberships, round_opened_at=now, started_wall=time.time())
        run.events.append(Event("run_started", 0, 0.0))
        return run

    def membership(self, domain: str) -> AlignedMembership:
        """An admitted domain's membership, else StateError NOT_FOUND."""
        mine = self.memberships.get(domain)
        if mine is None:
            raise StateError("NOT_FOUND", f"domain {shown(domain)} is not admitted to run {self.run_id}")
        return mine

    def stop(self, reason: str) -> None:
        """Stop the running run (its last Z stays pullable)."""
        if self.state != "running":
            raise StateError("FAILED_PRECONDITION", f"run {self.run_id} is already {self.state}")
        self.state = "stopped"
        self.stop_reason = reason
        self.events.append(Event("run_stopped", self.current_round, elapsed_since(self.started_wall)))

    def check_contribution(self, domain: str, tag: int) -> tuple[int, int]:
        """Validate a push before its payload is read; returns the expected (rows, rank)."""
        mine = self.membership(domain)
        if self.state != "running":
            raise StateError("FAILED_PRECONDITION", f"run {self.run_id} is {self.state}")
        if tag < 1:
            raise StateError("INVALID_ARGUMENT", "contribution round must be >= 1")
        if tag > self.current_round:
            raise StateError("FAILED_PRECONDITION", f"round {tag} is not open yet (open round: {self.current_round})")
        latest = self.tags.get(domain, 0)
        if tag == latest:
            raise StateError("ALREADY_EXISTS", f"domain {domain} already contributed to round {tag}")
        if tag < latest:
            raise StateError("FAILED_PRECONDITION", f"round {tag} is older than domain {domain}'s latest contribution (round {latest})")
        if self.current_round - tag > self.params.max_staleness:
            raise StateError(
                "FAILED_PRECONDITION",
                f"contribution of round {tag} is {self.current_round - tag} rounds stale"
                f" (open round {self.current_round}, max_staleness {self.params.max_staleness})",
            )
        # a secure push adds a linear check column to the masked rows
        return len(mine.shared_rows), self.params.rank + 1 if self.secure else self.params.rank

    def check_encoding(self, ring: bool) -> None:
        """INVALID_ARGUMENT unless a contribution's wire type fits the run: ring elements in a secure run, floats otherwise."""
        if ring and not self.secure:
            raise StateError("INVALID_ARGUMENT", f"run {self.run_id} is not secure (secure_aggregation = false): push float32, not DTYPE_RING64")
        if self.secure and not ring:
            raise StateError("INVALID_ARGUMENT", f"run {self.run_id} is secure (secure_aggregation = true): push masked DTYPE_RING64 rows"
                             f" with rank + 1 = {self.params.rank + 1} columns, never plain factors")

    def accept_contribution(self, domain: str, tag: int, values: np.ndarray) -> int:
        """Take a decoded contribution (re-checked: the round may have moved while it streamed); returns the open round it counts in."""
        self.check_values(domain, tag, values)
        self.contributions[domain] = (tag, values)
        self.tags[domain] = tag
        self.contribution_counts[domain] = self.contribution_counts.get(domain, 0) + 1
        if domain not in self.reported:
            self.reported.append(domain)
        return self.current_round

    def check_values(self, domain: str, tag: int, values: np.ndarray) -> None:
        """Everything accept_contribution checks, changing nothing (so the contribution can be saved before it is taken)."""
        expected = self.check_contribution(domain, tag)
        if values.shape != expected:
            raise StateError("INVALID_ARGUMENT", f"contribution of {domain} has shape {values.shape}, expected {expected}")
        self.check_encoding(values.dtype == np.uint64)
        if not self.secure and (values.dtype != np.float32 or not np.isfinite(values).all()):
            raise StateError("INVALID_ARGUMENT", f"contribution of {domain} must be finite float32")

    def deadline_at(self) -> float | None:
        """Clock time when the open round's deadline passes (None: synchronous or not running)."""
        if self.state != "running" or self.params.round_deadline_s <= 0:
            return None
        return self.round_opened_at + self.params.round_deadline_s

    def due(self, now: float) -> bool:
        """Whether the open round closes now: everyone reported, or the deadline passed with min_domains."""
        if self.state != "running":
            return False
        everyone = len(self.reported) == len(self.memberships)
        deadline = self.deadline_at()
        timed_out = deadline is not None and now >= deadline and len(self.reported) >= self.params.min_domains
        return everyone or timed_out

    def close_round(self, now: float) -> int:
        """Z over the latest contributions, a round_closed event, the next round opened at `now`; returns the closed round."""
        closed = self.current_round
        contributors_now = [name for name in self.memberships if name in self.contributions]
        contributions = [(self.memberships[name].shared_index, self.contributions[name][1]) for name in contributors_now]
        # The new Z replaces the last one: a pull still streaming that one holds its own
        # reference, so ours goes first and one Z less is alive while the new one is computed.
        # Should the computation fail, pulls wait (no Z of the open round is served) until a
        # retried close succeeds.
        self.consensus = None
        if self.secure:
            # the masked sum only: nobody here can decode it, so mean and prox are the nodes' job
            self.consensus = ring_sums(contributions, self.exchanged_rows, self.params.rank + 1)
        else:
            block_rows = consensus_block_rows(self.params.rank)
            plans = [self.block_plan(name, block_rows) for name in contributors_now]
            self.consensus = blockwise_consensus(contributions, self.exchanged_rows, self.params.rank, self.params.admm, block_rows, plans)
        self.consensus_round = closed
        self.consensus_contributors = tuple((name, self.contributions[name][0]) for name in self.memberships if name in self.contributions)
        if self.params.round_deadline_s <= 0:
            # synchronous: the next round closes only on a fresh contribution from every domain, so
            # these are never used again (nor saved, see saved); held on, they would double the
            # memory while the next round's pushes arrive
            del contributions
            self.contributions = {}
        contributors = [d for d in self.admitted if d in self.reported]
        missing = [d for d in self.admitted if d not in self.reported]
        self.events.append(Event("round_closed", closed, elapsed_since(self.started_wall), contributors, missing))
        self.reported = []
        self.current_round = closed + 1
        self.round_opened_at = now
        if closed >= self.params.rounds:
            self.state = "finished"
            self.events.append(Event("run_finished", closed, elapsed_since(self.started_wall)))
        return closed

    def block_plan(self, domain: str, block_rows: int) -> BlockPlan:
        """Where a domain's shared rows fall among Z's blocks of `block_rows` rows (derived once per run)."""
        plan = self.block_plans.get((domain, block_rows))
        if plan is None:
            plan = block_plan(self.memberships[domain].shared_index, self.exchanged_rows, block_rows)
            self.block_plans[(domain, block_rows)] = plan
        return plan

    def pull(self, domain: str, min_round: int) -> Pulled | None:
        """The newest Z for a domain if its round >= min_round; None means "not yet" (wait and ask again).

        Refuses a wait that cannot end: the run is over without such a round, or the domain
        never pushed the round it waits for (e.g. the aggregator restarted from the last
        round's state and lost it): push it again.
        """
        mine = self.membership(domain)
        if self.consensus is not None and self.consensus_round >= max(min_round, 1):
            return Pulled(self.consensus_round, self.consensus, mine.pull_index, self.consensus_contributors)
        if self.state != "running":
            raise StateError(
                "FAILED_PRECONDITION", f"run {self.run_id} is {self.state} at round {self.consensus_round}; no consensus of round {min_round} will come"
            )
        if min_round > self.current_round:
            raise StateError("FAILED_PRECONDITION", f"round {min_round} is not open yet (open round: {self.current_round})")
        latest = self.tags.get(domain, 0)
        if min_round >= 1 and latest < min_round and min_round == self.current_round:
            raise StateError("FAILED_PRECONDITION", f"no contribution of round {min_round} from {domain} is held; push it again")
        return None

    def report_metrics(self, domain: str, round_index: int, metrics: dict[str, float]) -> None:
        """Record a domain's validation metrics for a round (once per domain and round, rounds >= 1, bounded)."""
        self.membership(domain)
        if round_index < 1:
            raise StateError("INVALID_ARGUMENT", f"metrics for round {round_index}: rounds count from 1")
        if len(metrics) > MAX_METRICS:
            raise StateError("INVALID_ARGUMENT", f"metrics of {domain}: {len(metrics)} values, at most {MAX_METRICS}")
        if not all(0 < len(name) <= MAX_METRIC_NAME and name.isascii() and name.isprintable() for name in metrics):
            raise StateError("INVALID_ARGUMENT", f"metrics of {domain}: names must be 1-{MAX_METRIC_NAME} printable ASCII characters")
        if round_index > self.consensus_round:
            raise StateError("FAILED_PRECONDITION", f"metrics for round {round_index} but the latest consensus is round {self.consensus_round}")
        if not all(np.isfinite(value) for value in metrics.values()):
            raise StateError("INVALID_ARGUMENT", f"metrics of {domain} must be finite numbers")
        per_round = self.metrics.setdefault(domain, {})
        if round_index in per_round:
            raise StateError("ALREADY_EXISTS", f"{domain} already reported metrics for round {round_index}")
        per_round[round_index] = dict(metrics)
        self.events.append(Event("metrics", round_index, elapsed_since(self.started_wall), domain=domain, metrics=dict(metrics)))

    def final_metrics_in(self) -> bool:
        """Whether every admitted domain reported metrics for the latest consensus round."""
        return all(self.consensus_round in self.metrics.get(d, {}) for d in self.admitted)

    def saved(self, fingerprints: dict[str, str]) -> SavedRun:
        """The run as a store keeps it (arrays shared, not copied: they are never modified in place).

        Its contributions are those the run still holds: a synchronous run lets go of them at
        each close (the next round closes on fresh ones only), so only a record saved mid-round
        (a stop, a retried save) names any; a deadline run keeps them for later rounds. Each
        is on disk already (saved on arrival): a record only names them.
        """
        return SavedRun(
            run_id=self.run_id,
            params=self.params,
            fingerprints={d: fingerprints[d] for d in self.admitted},
            state=self.state,
            current_round=self.current_round,
            consensus_round=self.consensus_round,
            consensus=self.consensus,
            tags=dict(self.tags),
            contributions={d: values for d, (_, values) in self.contributions.items()},
            reported=tuple(self.reported),
            contribution_counts=dict(self.contribution_counts),
            started_wall=self.started_wall,
            metrics={d: {r: dict(m) for r, m in rounds.items()} for d, rounds in self.metrics.items()},
            events=tuple(self.events),
            stop_reason=self.stop_reason,
            consensus_contributors=self.consensus_contributors,
        )

    @classmethod
    def resumed(cls, saved: SavedRun, memberships: dict[str, AlignedMembership], now: float) -> "Run":
        """A saved run brought back with its frozen memberships; its open round restarts at `now`.

        The contributions that arrived after the record was saved are accepted again (domain-name
        order, as rows are summed): StateError if one no longer fits (a state folder mixed up by hand).
        """
        run = cls(saved.run_id, saved.params, memberships, state=saved.state, current_round=saved.current_round)
        run.consensus_round = saved.consensus_round
        run.consensus = saved.consensus
        run.tags = dict(saved.tags)
        run.contributions = {d: (run.tags[d], values) for d, values in saved.contributions.items()}
        run.contribution_counts = dict(saved.contribution_counts)
        run.started_wall = saved.started_wall
        run.metrics = {d: {r: dict(m) for r, m in rounds.items()} for d, rounds in saved.metrics.items()}
        run.events = list(saved.events)
        run.stop_reason = saved.stop_reason
        run.consensus_contributors = saved.consensus_contributors
        run.round_opened_at = now
        run.reported = list(saved.reported)
        for domain in sorted(saved.arrived):
            tag, values = saved.arrived[domain]
            run.accept_contribution(domain, tag, values)
        return run
