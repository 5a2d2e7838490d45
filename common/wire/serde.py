"""Every conversion between cdimf's models and the cdimf.v1 protobuf messages, and every enum map.

The pydantic models (cdimf.common.config) and the numerical core know nothing of protobuf; the
servicers, the aggregator client and the command line convert here and nowhere else. The
dataclasses below are what the aggregator client returns to a node or an operator.

Adding a prox operator: its function and registry entry in cdimf.common.core.admm and its value
in the proto's Prox enum (PROX_<NAME>); PROX_TO_WIRE below follows the enum.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from google.protobuf.json_format import MessageToDict

from cdimf.common.config import RunParams, validate_config
from cdimf.common.core.membership import Membership
from cdimf.protos.v1 import federation_pb2 as pb


def _names(enum: Any, prefix: str) -> dict[str, Any]:
    """{lower-case name without the prefix: value} of a proto enum, its UNSPECIFIED value left out."""
    return {name.removeprefix(prefix).lower(): value for name, value in enum.items() if value != 0}


# The wire's enum values are named after the models' names (PROX_L2 is "l2", RUN_STATE_RUNNING
# "running", EVENT_KIND_ROUND_CLOSED "round_closed"), so each map follows its proto enum.
PROX_TO_WIRE: dict[str, "pb.Prox.ValueType"] = _names(pb.Prox, "PROX_")
# PROX_UNSPECIFIED: a caller that never set the field asked for the default
PROX_FROM_WIRE: dict[int, str] = {pb.PROX_UNSPECIFIED: "identity", **{value: name for name, value in PROX_TO_WIRE.items()}}
RUN_STATES: dict[str, "pb.RunState.ValueType"] = _names(pb.RunState, "RUN_STATE_")
RUN_STATE_NAMES: dict[int, str] = {value: name for name, value in RUN_STATES.items()}
EVENT_KINDS: dict[str, "pb.EventKind.ValueType"] = _names(pb.EventKind, "EVENT_KIND_")
EVENT_KIND_NAMES: dict[int, str] = {value: name for name, value in EVENT_KINDS.items()}


# ----- run parameters -----


def run_params_to_proto(params: RunParams) -> pb.RunParams:
    """The wire form of a run's parameters (StartRun, RunInfo)."""
    return pb.RunParams(
        run_id=params.run_id or "",
        rounds=params.rounds,
        rank=params.rank,
        rho=params.admm.rho,
        prox=PROX_TO_WIRE[params.admm.prox],
        lambda_z=params.admm.lambda_z,
        aggregation_period=params.aggregation_period,
        domain_aggregation_period=params.domain_aggregation_period,
        round_deadline_s=params.round_deadline_s,
        min_domains=params.min_domains,
        max_staleness=params.max_staleness,
    )


def run_params_from_proto(message: pb.RunParams) -> RunParams:
    """Validate the wire form; raises ConfigError naming the bad field."""
    prox = PROX_FROM_WIRE.get(message.prox, f"<enum {message.prox}>")
    data: dict[str, Any] = {
        "run_id": message.run_id or None,
        "rounds": message.rounds,
        "rank": message.rank,
        "admm": {"rho": message.rho, "prox": prox, "lambda_z": message.lambda_z},
        "aggregation_period": message.aggregation_period or 1,
        "domain_aggregation_period": dict(message.domain_aggregation_period),
        "round_deadline_s": message.round_deadline_s,
        "min_domains": message.min_domains or 1,
        "max_staleness": message.max_staleness,
    }
    return validate_config(RunParams, data, "run parameters")


# ----- the aggregator's side: its state as messages -----


class RunView(Protocol):
    """What the wire shows of the aggregator's run."""

    @property
    def run_id(self) -> str:
        """The run's identifier."""

    @property
    def params(self) -> RunParams:
        """The parameters it was started with."""

    @property
    def state(self) -> str:
        """running, finished or stopped."""

    @property
    def current_round(self) -> int:
        """The open round (rounds + 1 once finished)."""

    @property
    def consensus_round(self) -> int:
        """The round of the newest Z (0 before the first)."""

    @property
    def admitted(self) -> tuple[str, ...]:
        """The domains taking part."""


class EventView(Protocol):
    """What the wire shows of one run event."""

    @property
    def kind(self) -> str:
        """A name of EVENT_KINDS."""

    @property
    def round(self) -> int:
        """The round it is about."""

    @property
    def elapsed_s(self) -> float:
        """Seconds since the run started."""

    @property
    def contributors(self) -> Sequence[str]:
        """Domains whose contribution a closed round holds."""

    @property
    def missing(self) -> Sequence[str]:
        """Domains a closed round went without."""

    @property
    def domain(self) -> str:
        """The domain that reported metrics."""

    @property
    def metrics(self) -> Mapping[str, float]:
        """The reported metrics."""

    @property
    def message(self) -> str:
        """Why a save failed (persist_failed events)."""


class DomainStatusView(Protocol):
    """What GetStatus shows of one registered domain (round fields 0 unless admitted)."""

    @property
    def domain(self) -> str:
        """The domain's name."""

    @property
    def rows(self) -> int:
        """Its registered rows."""

    @property
    def admitted(self) -> bool:
        """Whether the current run admitted it."""

    @property
    def shared_rows(self) -> int:
        """Rows it pushes and pulls."""

    @property
    def receiver_rows(self) -> int:
        """Rows it only pulls."""

    @property
    def latest_contribution_round(self) -> int:
        """The round of its newest accepted contribution."""

    @property
    def contributions(self) -> int:
        """Contributions accepted in the run."""

    @property
    def latest_metrics(self) -> Mapping[str, float]:
        """Its newest reported validation metrics."""


class StatusView(Protocol):
    """What GetStatus shows of the aggregator: the current run, its exchanged rows, every registered domain."""

    @property
    def run(self) -> RunView | None:
        """The current run, if any."""

    @property
    def shared_users(self) -> int:
        """Rows of the run's Z."""

    @property
    def domains(self) -> Sequence[DomainStatusView]:
        """Every registered domain, by name."""

    @property
    def persistence_error(self) -> str:
        """Why the last round could not be saved ("" while state is saved)."""


def status_to_proto(status: StatusView) -> pb.AggregatorStatus:
    """The wire form of an aggregator status snapshot."""
    message = pb.AggregatorStatus(run=run_info_to_proto(status.run), shared_users=status.shared_users, persistence_error=status.persistence_error)
    for entry in status.domains:
        message.domains.append(
            pb.DomainStatus(
                domain=entry.domain,
                rows=entry.rows,
                admitted=entry.admitted,
                shared_rows=entry.shared_rows,
                receiver_rows=entry.receiver_rows,
                latest_contribution_round=entry.latest_contribution_round,
                contributions=entry.contributions,
                latest_metrics=entry.latest_metrics,
            )
        )
    return message


def run_info_to_proto(run: RunView | None) -> pb.RunInfo:
    """The wire form of a run (an idle RunInfo when there is none)."""
    if run is None:
        return pb.RunInfo(state=pb.RUN_STATE_IDLE)
    return pb.RunInfo(
        run_id=run.run_id,
        state=RUN_STATES[run.state],
        params=run_params_to_proto(run.params),
        current_round=run.current_round,
        latest_consensus_round=run.consensus_round,
        admitted_domains=list(run.admitted),
    )


def event_to_proto(run: RunView, event: EventView) -> pb.RoundEvent:
    """The wire form of one run event."""
    return pb.RoundEvent(
        run_id=run.run_id,
        kind=EVENT_KINDS[event.kind],
        round=event.round,
        contributors=event.contributors,
        missing=event.missing,
        domain=event.domain,
        metrics=event.metrics,
        elapsed_s=event.elapsed_s,
        rounds=run.params.rounds,
        message=event.message,
    )


def membership_to_proto(mine: Membership, domain: str, fingerprint: str, frozen: bool) -> pb.Membership:
    """The membership summary a Register call answers with."""
    return pb.Membership(
        domains=list(mine.domains),
        domain=domain,
        rows=len(mine.roles),
        shared_rows=len(mine.shared_rows),
        receiver_rows=len(mine.receiver_rows),
        fingerprint=fingerprint,
        frozen=frozen,
    )


# ----- the client's side: messages as plain values -----


@dataclass(frozen=True)
class RegistrationReceipt:
    """What the aggregator answers a registration with: row counts, fingerprint, whether a run froze it."""

    domains: tuple[str, ...]
    rows: int
    shared_rows: int
    receiver_rows: int
    fingerprint: str
    frozen: bool


@dataclass(frozen=True)
class RunInfo:
    """A run as a node or an operator sees it (params None while idle)."""

    run_id: str
    state: str
    params: RunParams | None
    current_round: int
    latest_consensus_round: int
    admitted_domains: tuple[str, ...]

    @property
    def rounds(self) -> int:
        """Rounds of the run (0 when idle)."""
        return self.params.rounds if self.params is not None else 0


@dataclass(frozen=True)
class PushResult:
    """The open round the contribution counted in; replayed: the aggregator already had it."""

    accepted_round: int
    replayed: bool


@dataclass(frozen=True)
class Consensus:
    """Z of one round for this domain: shared rows then receiver rows (float32)."""

    round: int
    shared: np.ndarray
    receivers: np.ndarray


def receipt_from_proto(message: pb.Membership) -> RegistrationReceipt:
    """The summary of a Register reply."""
    return RegistrationReceipt(tuple(message.domains), message.rows, message.shared_rows, message.receiver_rows, message.fingerprint, message.frozen)


def membership_from_wire(roles: np.ndarray, holder_masks: np.ndarray, domains: Sequence[str]) -> Membership:
    """A GetMembership stream's assembled roles and masks as this domain's Membership."""
    return Membership.from_roles(domains, roles, holder_masks)


def run_info_from_proto(message: pb.RunInfo) -> RunInfo:
    """A wire RunInfo (idle runs have no params); ConfigError when its params are invalid."""
    return RunInfo(
        run_id=message.run_id,
        state=RUN_STATE_NAMES.get(message.state, "unknown"),
        params=run_params_from_proto(message.params) if message.run_id else None,
        current_round=message.current_round,
        latest_consensus_round=message.latest_consensus_round,
        admitted_domains=tuple(message.admitted_domains),
    )


def push_result_from_proto(ack: pb.Ack) -> PushResult:
    """A PushContribution's Ack (a first delivery)."""
    return PushResult(ack.accepted_round, replayed=False)


def consensus_from_wire(z: np.ndarray, header: pb.Header, shared: int) -> Consensus:
    """A pulled Z (shared rows first) with the round its header names."""
    return Consensus(header.round, z[:shared], z[shared:])


# ----- the operator's side: names and JSON -----


def run_state_name(state: int) -> str:
    """The name of a wire RunState ("running", ...; "unknown" for values this version lacks)."""
    return RUN_STATE_NAMES.get(state, "unknown")


def event_kind_name(kind: int) -> str:
    """The name of a wire EventKind ("round_closed", ...; "unknown" for values this version lacks)."""
    return EVENT_KIND_NAMES.get(kind, "unknown")


def event_to_json(event: pb.RoundEvent) -> dict[str, Any]:
    """A run event as a JSON-ready dict (what `cdimf train --json` prints per line)."""
    shown: dict[str, Any] = {
        "run_id": event.run_id,
        "kind": event_kind_name(event.kind),
        "round": event.round,
        "rounds": event.rounds,
        "domain": event.domain,
        "metrics": dict(event.metrics),
        "contributors": list(event.contributors),
        "missing": list(event.missing),
        "elapsed_s": round(event.elapsed_s, 3),
    }
    if event.message:  # persist_failed: why
        shown["message"] = event.message
    return shown


def status_to_json(status: pb.AggregatorStatus) -> dict[str, Any]:
    """The aggregator's status as a JSON-ready dict (what `cdimf status --json` prints)."""
    return MessageToDict(status, preserving_proto_field_name=True)
