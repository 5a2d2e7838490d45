"""Every conversion between cdimf's models and the cdimf.v1 protobuf messages, and every enum map.

The pydantic models (cdimf.common.config) and the numerical core know nothing of protobuf; the
servicers, the aggregator client and the command line convert here and nowhere else. The
dataclasses below are what the aggregator client returns to a node or an operator.

Adding a prox operator: its function and registry entry in cdimf.common.core.admm and its value
in the proto's Prox enum (PROX_<NAME>); PROX_TO_WIRE below follows the enum.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from cdimf.common.config import ColdStartPolicy, RunParams, validate_config
from cdimf.common.core.membership import Membership
from cdimf.common.metric_labels import labelled_percent
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
        secure_aggregation=params.secure_aggregation,
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
        "secure_aggregation": message.secure_aggregation,
    }
    return validate_config(RunParams, data, "run parameters")


# ----- cold-start policies -----


def cold_start_to_proto(policy: ColdStartPolicy) -> pb.ColdStartPolicy:
    """The wire form of a node's cold-start policy (a cap field is present only when set)."""
    return pb.ColdStartPolicy(serve=policy.serve, max_served=policy.max_served, max_served_fraction=policy.max_served_fraction)


def cold_start_from_proto(message: pb.ColdStartPolicy | None) -> ColdStartPolicy:
    """Validate a registration's policy (None: it carried none, the defaults); ConfigError naming the bad field."""
    if message is None:
        return ColdStartPolicy()
    data: dict[str, Any] = {"serve": message.serve}
    for name in ("max_served", "max_served_fraction"):
        if message.HasField(name):
            data[name] = getattr(message, name)
    return validate_config(ColdStartPolicy, data, "registration", table=("cold_start",))


# ----- the aggregator's side: its state as messages -----


class RunBasics(Protocol):
    """What the wire shows of any run, current or kept."""

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
    def consensus_contributors(self) -> tuple[tuple[str, int], ...]:
        """(domain, round tag) of the contributions the newest consensus holds."""


class RunView(RunBasics, Protocol):
    """What the wire shows of the aggregator's current run."""

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

    @property
    def served_to(self) -> Mapping[str, int]:
        """How many of its users each other domain receives (cold start)."""

    @property
    def received_from(self) -> Mapping[str, int]:
        """How many receiver rows it gets from each holder."""

    @property
    def cold_start(self) -> ColdStartPolicy:
        """The cold-start policy it registered with."""

    @property
    def max_served_rows(self) -> int | None:
        """Its cap in receiver rows (None: no cap)."""


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
                served_to=entry.served_to,
                received_from=entry.received_from,
                cold_start=cold_start_to_proto(entry.cold_start),
                max_served_rows=entry.max_served_rows,
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
        consensus_contributors=_contributors_to_proto(run.consensus_contributors),
    )


def _contributors_to_proto(contributors: Sequence[tuple[str, int]]) -> list[pb.Contributor]:
    """(domain, round tag) pairs as Contributor messages."""
    return [pb.Contributor(domain=domain, round=tag) for domain, tag in contributors]


def event_to_proto(run: RunBasics, event: EventView) -> pb.RoundEvent:
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


def membership_to_proto(mine: Membership, domain: str, fingerprint: str, frozen: bool,
                        served_to: Mapping[str, int] | None = None, received_from: Mapping[str, int] | None = None) -> pb.Membership:
    """The membership summary a Register call answers with (and the domain's cold-start counts)."""
    return pb.Membership(
        served_to=served_to,
        received_from=received_from,
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
    """What the aggregator answers a registration with: row counts, fingerprint, whether a run froze it, cold-start counts."""

    domains: tuple[str, ...]
    rows: int
    shared_rows: int
    receiver_rows: int
    fingerprint: str
    frozen: bool
    served_to: Mapping[str, int] = field(default_factory=dict)
    received_from: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class NodeMembership(Membership):
    """A domain's Membership as GetMembership tells it, with how many of its users others receive and it receives."""

    served_to: Mapping[str, int] = field(default_factory=dict)
    received_from: Mapping[str, int] = field(default_factory=dict)


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
    """Z of one round for this domain: shared rows then receiver rows (float32).

    In a secure run: the masked ring sum of those rows (uint64, rank + 1 columns) instead.
    contributors: the (domain, round tag) contributions the aggregator summed, in its order.
    """

    round: int
    shared: np.ndarray
    receivers: np.ndarray
    contributors: tuple[tuple[str, int], ...] = ()


def receipt_from_proto(message: pb.Membership) -> RegistrationReceipt:
    """The summary of a Register reply."""
    return RegistrationReceipt(tuple(message.domains), message.rows, message.shared_rows, message.receiver_rows, message.fingerprint, message.frozen,
                               dict(message.served_to), dict(message.received_from))


def membership_from_wire(roles: np.ndarray, holder_masks: np.ndarray, domains: Sequence[str],
                         served_to: Mapping[str, int] | None = None, received_from: Mapping[str, int] | None = None) -> NodeMembership:
    """A GetMembership stream's assembled roles, masks and cold-start counts as this domain's Membership."""
    plain = Membership.from_roles(domains, roles, holder_masks)
    return NodeMembership(plain.domains, plain.roles, plain.holder_masks, plain.shared_rows, plain.receiver_rows,
                          dict(served_to or {}), dict(received_from or {}))


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


def consensus_from_wire(z: np.ndarray, header: pb.Header, shared: int, contributors: Sequence[tuple[str, int]] = ()) -> Consensus:
    """A pulled Z (shared rows first) with the round its header names and the contributions it holds."""
    return Consensus(header.round, z[:shared], z[shared:], tuple(contributors))


# ----- the operator's side: names and JSON -----


def run_state_name(state: int) -> str:
    """The name of a wire RunState ("running", ...; "unknown" for values this version lacks)."""
    return RUN_STATE_NAMES.get(state, "unknown")


def event_kind_name(kind: int) -> str:
    """The name of a wire EventKind ("round_closed", ...; "unknown" for values this version lacks)."""
    return EVENT_KIND_NAMES.get(kind, "unknown")


def run_record_to_proto(run: "RecordView", with_events: bool) -> pb.RunRecord:
    """The wire form of a kept run (ListRuns), its events when asked for."""
    message = pb.RunRecord(
        info=pb.RunInfo(run_id=run.run_id, state=RUN_STATES[run.state], params=run_params_to_proto(run.params),
                        current_round=run.current_round, latest_consensus_round=run.consensus_round, admitted_domains=list(run.domains),
                        consensus_contributors=_contributors_to_proto(run.consensus_contributors)),
        started_unix_s=run.started_wall,
        stop_reason=run.stop_reason,
    )
    if with_events:
        message.events.extend(event_to_proto(run, event) for event in run.events)
    return message


class RecordView(RunBasics, Protocol):
    """What the wire shows of a kept run (the aggregator's SavedRun)."""

    @property
    def started_wall(self) -> float:
        """Wall-clock start, seconds since the epoch."""

    @property
    def stop_reason(self) -> str:
        """Why it was stopped ('' otherwise)."""

    @property
    def domains(self) -> tuple[str, ...]:
        """The admitted domains."""

    @property
    def events(self) -> Sequence[EventView]:
        """Its events, oldest first."""


# ----- JSON: one schema for every command's --json (documented in README, "Machine-readable output") -----


def metrics_to_json(metrics: Mapping[str, float], split: str = "valid") -> dict[str, float]:
    """Reported metrics (fractions) as {labelled name: percent}: `{"valid NDCG@10 (99 neg)": 12.5}`."""
    return labelled_percent(metrics, split)


def run_info_to_json(info: pb.RunInfo) -> dict[str, Any]:
    """A run: id (null while idle), lower-case state, the round it is in, its rounds, the newest Z's round, its domains."""
    rounds = info.params.rounds if info.run_id else 0
    return {
        "run_id": info.run_id or None,
        "state": run_state_name(info.state),
        # a finished run's open round is rounds + 1: show the last one it closed
        "round": min(info.current_round, rounds) if rounds else int(info.current_round),
        "rounds": rounds,
        "consensus_round": int(info.latest_consensus_round),
        "domains": list(info.admitted_domains),
        "params": run_params_from_proto(info.params).model_dump(mode="json") if info.run_id else None,
        "consensus_contributors": [{"domain": entry.domain, "round": int(entry.round)} for entry in info.consensus_contributors],
    }


def event_to_json(event: pb.RoundEvent) -> dict[str, Any]:
    """A run event as a JSON-ready dict (what `cdimf train --json` prints per line)."""
    shown: dict[str, Any] = {
        "kind": event_kind_name(event.kind),
        "run_id": event.run_id,
        "round": int(event.round),
        "rounds": int(event.rounds),
        "domain": event.domain or None,
        "metrics": metrics_to_json(event.metrics),
        "contributors": list(event.contributors),
        "missing": list(event.missing),
        "elapsed_s": round(event.elapsed_s, 3),
    }
    if event.message:  # persist_failed: why
        shown["message"] = event.message
    return shown


_ENDS = (pb.EVENT_KIND_RUN_FINISHED, pb.EVENT_KIND_RUN_STOPPED)


def ended_last(events: Sequence[pb.RoundEvent]) -> list[pb.RoundEvent]:
    """The events in their order, except the run's end (finished or stopped), which goes last.

    The final round's metrics may be recorded after the run ended; every history a command
    shows ends with the end, as `train --follow --json` does.
    """
    return [event for event in events if event.kind not in _ENDS] + [event for event in events if event.kind in _ENDS]


def run_record_to_json(record: pb.RunRecord) -> dict[str, Any]:
    """A kept run (`cdimf runs`, `cdimf log`): its run_info fields, start time, stop reason and, when fetched, its events (the end last)."""
    return {**run_info_to_json(record.info), "started_unix_s": round(record.started_unix_s, 3), "stop_reason": record.stop_reason or None,
            "events": [event_to_json(event) for event in ended_last(record.events)]}


def status_to_json(status: pb.AggregatorStatus) -> dict[str, Any]:
    """The aggregator's status (what `cdimf status --json` prints): numbers as numbers, every field present."""
    return {
        "run": run_info_to_json(status.run),
        "shared_users": int(status.shared_users),
        "domains": [
            {"domain": entry.domain, "rows": int(entry.rows), "shared_rows": int(entry.shared_rows), "receiver_rows": int(entry.receiver_rows),
             "admitted": entry.admitted, "latest_contribution_round": int(entry.latest_contribution_round),
             "contributions": int(entry.contributions), "latest_metrics": metrics_to_json(entry.latest_metrics),
             "served_to": {name: int(count) for name, count in sorted(entry.served_to.items())},
             "received_from": {name: int(count) for name, count in sorted(entry.received_from.items())},
             "cold_start": cold_start_from_proto(entry.cold_start).model_dump(mode="json") if entry.HasField("cold_start") else None,
             "max_served_rows": int(entry.max_served_rows) if entry.HasField("max_served_rows") else None}
            for entry in status.domains
        ],
    }
