"""The wire conversions: run parameters, run info, events and memberships, and the enum maps."""

from dataclasses import dataclass

import numpy as np
import pytest

from cdimf.aggregator.state import Event
from cdimf.common.config import ConfigError, RunParams
from cdimf.common.core.admm import PROX_OPERATORS
from cdimf.common.core.membership import Membership
from cdimf.common.wire import serde
from cdimf.protos.v1 import federation_pb2 as pb


def test_run_params_round_trip_through_the_wire_form() -> None:
    params = RunParams(
        run_id="r-1", rounds=7, rank=12, admm={"rho": 2.0, "prox": "l2", "lambda_z": 0.3},
        aggregation_period=2, domain_aggregation_period={"cloth": 5}, round_deadline_s=1.5,
        min_domains=2, max_staleness=1,
    )
    assert serde.run_params_from_proto(serde.run_params_to_proto(params)) == params


def test_run_params_from_a_bad_wire_form_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"run parameters: field admm: .*lambda_z > 0"):
        serde.run_params_from_proto(pb.RunParams(rounds=3, rank=4, rho=1.0, prox=pb.PROX_L2))
    with pytest.raises(ConfigError, match=r"field rounds"):
        serde.run_params_from_proto(pb.RunParams(rounds=0, rank=4))
    with pytest.raises(ConfigError, match=r"field admm\.prox: .*unknown prox '<enum 99>'"):
        serde.run_params_from_proto(pb.RunParams(rounds=3, rank=4, prox=99))  # type: ignore[arg-type]


def test_unset_wire_fields_take_the_models_defaults() -> None:
    params = serde.run_params_from_proto(pb.RunParams(rounds=3, rank=4))
    assert params.admm.prox == "identity" and params.aggregation_period == 1 and params.min_domains == 1 and params.run_id is None


def test_every_prox_operator_has_a_wire_value_and_back() -> None:
    """The registry and the proto enum name the same operators, so neither can be extended alone."""
    assert set(serde.PROX_TO_WIRE) == set(PROX_OPERATORS)
    for name, value in serde.PROX_TO_WIRE.items():
        assert serde.PROX_FROM_WIRE[value] == name


def test_enum_maps_cover_the_models_names() -> None:
    assert set(serde.RUN_STATES) == {"idle", "running", "finished", "stopped"}
    assert set(serde.EVENT_KINDS) == {"run_started", "round_closed", "metrics", "run_finished", "run_stopped", "persist_failed", "persist_recovered"}
    assert serde.run_state_name(pb.RUN_STATE_RUNNING) == "running" and serde.run_state_name(77) == "unknown"
    assert serde.event_kind_name(pb.EVENT_KIND_ROUND_CLOSED) == "round_closed"


@dataclass
class _Run:
    run_id: str
    params: RunParams
    state: str = "running"
    current_round: int = 2
    consensus_round: int = 1
    admitted: tuple[str, ...] = ("cloth", "sport")
    consensus_contributors: tuple[tuple[str, int], ...] = (("cloth", 1), ("sport", 1))


def test_run_info_reaches_the_client_as_started() -> None:
    params = RunParams(run_id="r", rounds=3, rank=4, domain_aggregation_period={"cloth": 2})
    message = serde.run_info_to_proto(_Run("r", params))
    assert [(entry.domain, entry.round) for entry in message.consensus_contributors] == [("cloth", 1), ("sport", 1)]
    info = serde.run_info_from_proto(message)
    assert info == serde.RunInfo("r", "running", params, 2, 1, ("cloth", "sport"))
    assert info.rounds == 3 and info.params is not None and info.params.period_for("cloth") == 2
    idle = serde.run_info_from_proto(serde.run_info_to_proto(None))
    assert idle.state == "idle" and idle.params is None and idle.rounds == 0


def test_events_as_messages_and_json() -> None:
    run = _Run("r", RunParams(run_id="r", rounds=3, rank=4))
    message = serde.event_to_proto(run, Event("round_closed", 2, 1.23456, ["sport"], ["cloth"]))
    assert message.kind == pb.EVENT_KIND_ROUND_CLOSED and message.rounds == 3
    assert serde.event_to_json(message) == {"run_id": "r", "kind": "round_closed", "round": 2, "rounds": 3, "domain": None, "metrics": {},
                                            "contributors": ["sport"], "missing": ["cloth"], "elapsed_s": 1.235}
    metrics = serde.event_to_proto(run, Event("metrics", 3, 2.0, domain="sport", metrics={"HR@10": 0.25, "NDCG@10": 0.125, "negatives": 99}))
    assert serde.event_to_json(metrics)["metrics"] == {"valid HR@10 (99 neg)": 25.0, "valid NDCG@10 (99 neg)": 12.5}


def test_status_json_has_numbers_lower_case_states_and_every_field() -> None:
    run = _Run("r", RunParams(run_id="r", rounds=5, rank=4))
    info = serde.run_info_to_proto(run)
    info.current_round = 6  # a finished run's open round is rounds + 1
    capped = pb.DomainStatus(domain="cloth", rows=4, served_to={"sport": 2}, received_from={"sport": 0},
                             cold_start=pb.ColdStartPolicy(serve=True, max_served=3), max_served_rows=3)
    status = pb.AggregatorStatus(run=info, shared_users=7, domains=[pb.DomainStatus(domain="sport", rows=3), capped])
    shown = serde.status_to_json(status)
    assert shown["run"]["round"] == 5 and shown["run"]["rounds"] == 5 and shown["shared_users"] == 7
    assert shown["domains"] == [
        {"domain": "sport", "rows": 3, "shared_rows": 0, "receiver_rows": 0, "admitted": False, "latest_contribution_round": 0,
         "contributions": 0, "latest_metrics": {}, "served_to": {}, "received_from": {}, "cold_start": None, "max_served_rows": None},
        {"domain": "cloth", "rows": 4, "shared_rows": 0, "receiver_rows": 0, "admitted": False, "latest_contribution_round": 0,
         "contributions": 0, "latest_metrics": {}, "served_to": {"sport": 2}, "received_from": {"sport": 0},
         "cold_start": {"serve": True, "max_served": 3, "max_served_fraction": None}, "max_served_rows": 3},
    ]
    idle = serde.status_to_json(pb.AggregatorStatus(run=serde.run_info_to_proto(None)))
    assert idle["run"]["state"] == "idle" and idle["run"]["run_id"] is None and idle["run"]["round"] == 0


def test_membership_summary_and_view() -> None:
    roles = np.array([pb.ROW_ROLE_LOCAL, pb.ROW_ROLE_SHARED, pb.ROW_ROLE_RECEIVER, pb.ROW_ROLE_SHARED])
    mine = Membership(("cloth", "sport"), roles, np.array([2, 3, 3, 1]), np.array([1, 3]), np.array([2]))
    registered = serde.receipt_from_proto(serde.membership_to_proto(mine, "sport", "f" * 8, frozen=True))
    assert registered == serde.RegistrationReceipt(("cloth", "sport"), 4, 2, 1, "f" * 8, True)
    counted = serde.receipt_from_proto(serde.membership_to_proto(mine, "sport", "f" * 8, False, {"cloth": 5}, {"cloth": 1}))
    assert (counted.served_to, counted.received_from) == ({"cloth": 5}, {"cloth": 1})
    view = serde.membership_from_wire(roles, np.array([2, 3, 3, 1]), ["cloth", "sport"])
    np.testing.assert_array_equal(view.shared_rows, [1, 3])
    np.testing.assert_array_equal(view.receiver_rows, [2])
