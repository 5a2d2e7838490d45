"""Property-based fuzzing of every RPC of both servers, in real processes on 127.0.0.1.

Each example sends one call, as arbitrary bytes or as a message with arbitrary field values
(tests.proto_strategies: from scratch, or a valid request with some fields replaced), then checks:

- the server still runs and its health answers SERVING;
- the call ended OK or with a clean refusal: any status but UNKNOWN, INTERNAL and UNAVAILABLE
  (a client-side DEADLINE_EXCEEDED of a call that waits is fine: those wait by design);
- a refused call changed nothing: the state snapshot (aggregator: GetStatus and ListRuns with
  every event; node: GetStatus and one fixed Recommend) is the same bytes before and after.
  An accepted call of a method that changes state (a push that happens to be valid) moves the
  baseline on.

The aggregator under fuzz has two domains registered by the test and a synchronous run waiting
for their pushes, so nothing changes by itself; the node under fuzz finished a real two-round
run with its peer. Example counts are small for CI; FUZZ_EXAMPLES raises them. Calls that
change state are fuzzed last (StartRun, StopRun), so the earlier ones see a running run.
"""

import asyncio
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdimf.common.config import RunParams
from cdimf.common.rpc.aggregator_client import AggregatorClient
from cdimf.common.security.pseudonyms import pseudonymize
from cdimf.common.wire.chunks import encode_matrix, encode_registration
from cdimf.common.wire.serde import run_params_to_proto
from cdimf.protos.v1 import federation_pb2 as pb
from cdimf.protos.v1 import federation_pb2_grpc as pb_grpc
from tests.federation_harness import Processes, user_key, wait_for_checkpoints, wait_for_domains, write_domains
from tests.fuzz_tally import count
from tests.proto_strategies import messages, near

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "12"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize="FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CLEAN_FAILURES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE}
WAITING_TIMEOUT_S = 0.3  # client-side limit of calls that wait by design (a run, a Z, the next event)
CALL_TIMEOUT_S = 10.0
RUN_ID = "fuzz-run"
QUIET_RANK = 4
SECRET = b"fuzz-secret-0123456789abcdef"

pytestmark = pytest.mark.timeout(900)


@dataclass(frozen=True)
class Method:
    """One RPC: its path, request type, streaming shape, whether it waits and whether it may change state."""

    service: str
    name: str
    request: type[Message]
    client_streams: bool = False
    server_streams: bool = False
    waits: bool = False
    mutates: bool = False

    @property
    def path(self) -> str:
        """The gRPC method path."""
        return f"/cdimf.v1.{self.service}/{self.name}"


AGGREGATOR_METHODS = [
    Method("Aggregator", "Register", pb.PseudonymChunk, client_streams=True, mutates=True),
    Method("Aggregator", "GetMembership", pb.GetMembershipRequest, server_streams=True),
    Method("Aggregator", "WaitForRun", pb.WaitForRunRequest, waits=True),
    Method("Aggregator", "PushContribution", pb.MatrixChunk, client_streams=True, mutates=True),
    Method("Aggregator", "PullConsensus", pb.PullRequest, server_streams=True, waits=True),
    Method("Aggregator", "ReportMetrics", pb.MetricsReport, mutates=True),
    Method("Aggregator", "GetStatus", pb.StatusRequest),
    Method("Aggregator", "WatchRun", pb.WatchRequest, server_streams=True, waits=True),
    Method("Aggregator", "ListRuns", pb.ListRunsRequest),
    Method("Aggregator", "StartRun", pb.StartRunRequest, mutates=True),
    Method("Aggregator", "StopRun", pb.StopRunRequest, mutates=True),
]
NODE_METHODS = [
    Method("DomainNode", "GetStatus", pb.StatusRequest),
    Method("DomainNode", "Evaluate", pb.EvaluateRequest),
    Method("DomainNode", "Recommend", pb.RecommendRequest),
]


def test_every_rpc_of_both_services_is_fuzzed() -> None:
    """The lists above are the services' whole method sets, with their request types and shapes."""
    for methods, service in ((AGGREGATOR_METHODS, "Aggregator"), (NODE_METHODS, "DomainNode")):
        described = pb.DESCRIPTOR.services_by_name[service].methods
        assert sorted(method.name for method in methods) == sorted(method.name for method in described)
        for method in methods:
            proto = pb.DESCRIPTOR.services_by_name[service].methods_by_name[method.name]
            assert proto.input_type.full_name == method.request.DESCRIPTOR.full_name
            assert (proto.client_streaming, proto.server_streaming) == (method.client_streams, method.server_streams)


@dataclass
class Target:
    """A server under fuzz: its channel, how to snapshot its state, valid requests to start from, a tally."""

    name: str
    process: Any
    channel: grpc.Channel
    snapshot: Callable[[], bytes]
    valid: dict[str, list[Message]]
    log: Path
    tally: dict[str, int] = field(default_factory=lambda: {"calls": 0, "accepted": 0, "refused": 0})
    codes: dict[str, int] = field(default_factory=dict)  # "<method> <status>": count

    def call(self, method: Method, requests: list[bytes]) -> grpc.StatusCode:
        """Send one call of raw request bytes; its final status code (responses are read and dropped)."""
        timeout = WAITING_TIMEOUT_S if method.waits else CALL_TIMEOUT_S
        kind = {(False, False): self.channel.unary_unary, (True, False): self.channel.stream_unary,
                (False, True): self.channel.unary_stream, (True, True): self.channel.stream_stream}
        stub = kind[(method.client_streams, method.server_streams)](method.path, request_serializer=None, response_deserializer=None)
        argument = iter(requests) if method.client_streams else (requests[0] if requests else b"")
        try:
            if method.server_streams:
                for _ in stub(argument, timeout=timeout):
                    pass
            else:
                stub(argument, timeout=timeout)
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    def serving(self) -> int:
        """The health answer for the whole server."""
        reply = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT_S)
        return reply.status

    def _errors_logged(self) -> int:
        """ERROR lines and tracebacks in the server's log so far."""
        text = self.log.read_text(errors="replace")
        return text.count("Traceback") + text.count(" ERROR ")

    def check(self, method: Method, requests: list[bytes]) -> None:
        """The property: clean status, still serving, no ERROR logged, state unchanged unless an accepted call may change it."""
        before, errors = self.snapshot(), self._errors_logged()
        code = self.call(method, requests)
        self.tally["calls"] += 1
        self.tally["accepted" if code == grpc.StatusCode.OK else "refused"] += 1
        key = f"{method.name} {code.name}"
        self.codes[key] = self.codes.get(key, 0) + 1
        assert self.process.poll() is None, f"{self.name} exited after {method.name}"
        assert self.serving() == health_pb2.HealthCheckResponse.SERVING, f"{self.name} not serving after {method.name}"
        assert code not in CLEAN_FAILURES, f"{method.name} answered {code.name} to {requests!r}"[:3000]
        # a refusal is a WARNING at most: the server logs its ERROR lines when it answers, before the client sees the status
        assert self._errors_logged() == errors, f"{method.name} ({code.name}) logged an ERROR: {self.log.read_text()[-3000:]}"
        if not (code == grpc.StatusCode.OK and method.mutates):
            assert self.snapshot() == before, f"{method.name} ({code.name}) changed the state of {self.name}"
        # counted once the call passed every check: "refused" means refused cleanly
        count(f"rpc: {self.name} {method.name}", "accepted" if code == grpc.StatusCode.OK else "refused")


def _serialized(chunks: list[Message]) -> list[bytes]:
    return [chunk.SerializeToString() for chunk in chunks]


def _quiet_aggregator(processes: Processes) -> Target:
    """An aggregator with sport and cloth registered by the test and a run waiting for round 1's pushes."""
    process, address = processes.aggregator(name="fuzzed-aggregator")
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.AggregatorStub(channel)
    users = {"sport": [f"u{index}" for index in range(0, 6)], "cloth": [f"u{index}" for index in range(3, 9)]}
    registrations = {}
    for domain, keys in users.items():
        chunks = list(encode_registration(pseudonymize(keys, SECRET), np.ones(len(keys), dtype=bool), pb.Header(domain=domain)))
        stub.Register(iter(chunks), timeout=CALL_TIMEOUT_S)
        registrations[domain] = chunks
    params = RunParams(run_id=RUN_ID, rounds=3, rank=QUIET_RANK, min_domains=2)
    stub.StartRun(pb.StartRunRequest(params=run_params_to_proto(params)), timeout=CALL_TIMEOUT_S)
    shared = 3  # u3, u4, u5 are held by both
    header = pb.Header(run_id=RUN_ID, domain="sport", round=1)
    push = list(encode_matrix(np.full((shared, QUIET_RANK), 0.25, dtype=np.float32), header, chunk_bytes=QUIET_RANK * 4))
    valid: dict[str, list[Message]] = {
        "Register": registrations["sport"],
        "GetMembership": [pb.GetMembershipRequest(header=pb.Header(run_id=RUN_ID, domain="sport"))],
        "WaitForRun": [pb.WaitForRunRequest(header=pb.Header(domain="sport"), wait_s=0.0)],
        "PushContribution": push,
        "PullConsensus": [pb.PullRequest(header=pb.Header(run_id=RUN_ID, domain="sport"), min_round=1, wait_s=0.0)],
        "ReportMetrics": [pb.MetricsReport(header=pb.Header(run_id=RUN_ID, domain="sport", round=1), metrics={"HR@10": 0.5})],
        "GetStatus": [pb.StatusRequest()],
        "WatchRun": [pb.WatchRequest(header=pb.Header(run_id=RUN_ID), from_round=0)],
        "ListRuns": [pb.ListRunsRequest(header=pb.Header(run_id=RUN_ID), with_events=True)],
        "StartRun": [pb.StartRunRequest(params=run_params_to_proto(params))],
        "StopRun": [pb.StopRunRequest(header=pb.Header(run_id=RUN_ID), reason="fuzz")],
    }

    def snapshot() -> bytes:
        status = stub.GetStatus(pb.StatusRequest(), timeout=CALL_TIMEOUT_S)
        runs = stub.ListRuns(pb.ListRunsRequest(with_events=True), timeout=CALL_TIMEOUT_S)
        return status.SerializeToString(deterministic=True) + b"|" + runs.SerializeToString(deterministic=True)

    return Target("aggregator", process, channel, snapshot, valid, processes.folder / "fuzzed-aggregator.log")


def _finished_node(processes: Processes, folder: Path) -> Target:
    """sport's node after a real two-round run with cloth (its own aggregator, not the fuzzed one)."""
    files = write_domains(folder / "data")
    _, address = processes.aggregator(name="node-aggregator")
    nodes = processes.nodes(files, address)

    async def run() -> None:
        async with AggregatorClient(address, rpc_timeout_s=10, retry_for_s=30) as control:
            await wait_for_domains(control, 2)
            info = await control.start_run(RunParams(rounds=2, rank=6, min_domains=2))
            _ = [event async for event in control.watch_run(info.run_id)]
        await wait_for_checkpoints(folder, 2)

    asyncio.run(run())
    process, node_address = nodes["sport"]
    channel = grpc.insecure_channel(node_address)
    stub = pb_grpc.DomainNodeStub(channel)
    known = user_key(3)
    valid: dict[str, list[Message]] = {
        "GetStatus": [pb.StatusRequest()],
        "Evaluate": [pb.EvaluateRequest(split="test", k=10, protocol="sampled")],
        "Recommend": [pb.RecommendRequest(user_key=known, k=5)],
    }

    def snapshot() -> bytes:
        status = stub.GetStatus(pb.StatusRequest(), timeout=CALL_TIMEOUT_S)
        recommended = stub.Recommend(pb.RecommendRequest(user_key=known, k=5), timeout=CALL_TIMEOUT_S)
        return status.SerializeToString(deterministic=True) + b"|" + recommended.SerializeToString(deterministic=True)

    target = Target("node", process, channel, snapshot, valid, folder / "node-sport.log")
    assert stub.GetStatus(pb.StatusRequest(), timeout=CALL_TIMEOUT_S).phase == "finished"
    assert target.snapshot() == target.snapshot(), "the finished node's state must hold still for the property"
    return target


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Target]]:
    """Both servers under fuzz, in real processes; their tallies are printed at the end."""
    folders = {side: tmp_path_factory.mktemp(side) for side in ("aggregator-side", "node-side")}
    sides = {side: Processes(folder) for side, folder in folders.items()}  # one state folder each
    try:
        found = {"Aggregator": _quiet_aggregator(sides["aggregator-side"]),
                 "DomainNode": _finished_node(sides["node-side"], folders["node-side"])}
        yield found
        tally = {target.name: {**target.tally, "by_status": target.codes} for target in found.values()}
        print(f"\nfuzzed servers: {json.dumps(tally)}")
    finally:
        for processes in sides.values():
            processes.close()


ALL = [*AGGREGATOR_METHODS, *NODE_METHODS]
IDS = [method.path for method in ALL]


def _stream(method: Method, one: st.SearchStrategy[bytes]) -> st.SearchStrategy[list[bytes]]:
    """One request, or 0-3 of them for a request stream."""
    return st.lists(one, min_size=0, max_size=3) if method.client_streams else one.map(lambda item: [item])


@pytest.mark.parametrize("method", ALL, ids=IDS)
@FUZZ
@given(data=st.data())
def test_arbitrary_field_values_are_refused_cleanly_without_changing_state(targets: dict[str, Target], method: Method,
                                                                           data: st.DataObject) -> None:
    """Messages drawn over every field, from scratch or from a valid request with fields replaced."""
    target = targets[method.service]
    valid = target.valid[method.name]
    if data.draw(st.booleans(), label="from a valid request"):
        at = data.draw(st.integers(0, len(valid) - 1), label="replaced message")
        requests = list(valid)
        requests[at] = data.draw(near(valid[at]), label="fields replaced")
        serialized = _serialized(requests)
    else:
        serialized = data.draw(_stream(method, messages(method.request).map(lambda message: message.SerializeToString())))
    target.check(method, serialized)


# Undecodable request bytes reach grpc's own deserializer, which answers UNKNOWN and logs an
# ERROR traceback; PushContribution decodes its bytes itself and refuses them cleanly. The request
# gate of branch w3-proof (issue 12, finding 12) decodes every request and answers
# INVALID_ARGUMENT: strict, so that these marks fail once it is merged and must then go.
UNDECODABLE = pytest.mark.xfail(strict=True, reason="undecodable requests answer UNKNOWN with an ERROR traceback (finding 12)")
BYTES_CASES = [pytest.param(method, id=method.path, marks=() if method.name == "PushContribution" else UNDECODABLE) for method in ALL]


@pytest.mark.parametrize("method", BYTES_CASES)
@FUZZ
@given(data=st.data())
def test_arbitrary_bytes_are_refused_cleanly_without_changing_state(targets: dict[str, Target], method: Method,
                                                                    data: st.DataObject) -> None:
    """Raw bytes as the request (or as each message of a request stream): most are no valid message at all."""
    target = targets[method.service]
    target.check(method, data.draw(_stream(method, st.binary(max_size=200))))
