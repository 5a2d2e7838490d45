"""The node-side (and operator-side) client of the aggregator: one async method per RPC.

Usage from a node (inside an asyncio loop; run numpy training in a thread meanwhile):

    client = AggregatorClient("127.0.0.1:7070", domain="sport", credentials=None)
    registration = await client.register(pseudonymize(user_keys, secret), holder_flags)
    run = await client.wait_for_run(wait_s=600)                 # RunInfo (the run's params)
    view = await client.get_membership()                        # shared_rows / receiver_rows
    for r in range(1, run.rounds + 1):
        ... local epochs (run.params.period_for(domain)) ...
        await client.push_contribution(run.run_id, r, trainer.contribution())
        z = await client.pull_consensus(run.run_id, r, wait_s=..., shared=len(view.shared_rows),
                                        receivers=len(view.receiver_rows))
        if z is not None: trainer.receive_consensus(z.shared, z.receivers)
        await client.report_metrics(run.run_id, z.round, {"hr@10": ...})
    await client.close()

A node that joins late or restarts mid-run: `wait_for_run` gives `current_round`; pull the
newest Z with `pull_consensus(run_id, 1, ...)` (returns at once when one exists), apply it, and
push with round = the open round (`info.current_round`, or the pulled `z.round + 1`).

Every call has a deadline (rpc_timeout_s; pulls and waits add their wait time). UNAVAILABLE
(aggregator down or restarting) is retried with exponential backoff and full jitter until
`retry_for_s` has passed; other failures raise AggregatorError with the gRPC status code. Each
channel sends keepalive pings (cdimf.common.rpc.channels.CHANNEL_OPTIONS). A push whose Ack was lost and is
retried gets ALREADY_EXISTS, reported as PushResult(replayed=True).
"""

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
import numpy as np

from cdimf.common.config import ColdStartPolicy, NodeConfig, RunParams
from cdimf.common.rpc.channels import create_channel, credentials_for
from cdimf.common.rpc.fastpath import MatrixExchange
from cdimf.common.rpc.heap import CLIENT_MMAP_THRESHOLD, CLIENT_TRIM_THRESHOLD, reuse_freed_chunk_memory
from cdimf.common.wire.chunks import ChunkError, MembershipAssembler, encode_registration, wire_dtype
from cdimf.common.wire.serde import (
    Consensus,
    NodeMembership,
    PushResult,
    RegistrationReceipt,
    RunInfo,
    cold_start_to_proto,
    consensus_from_wire,
    membership_from_wire,
    push_result_from_proto,
    receipt_from_proto,
    run_info_from_proto,
    run_params_to_proto,
)
from cdimf.protos.v1 import federation_pb2 as pb
from cdimf.protos.v1 import federation_pb2_grpc as pb_grpc

Result = TypeVar("Result")
ROLE_SHARED, ROLE_RECEIVER = pb.ROW_ROLE_SHARED, pb.ROW_ROLE_RECEIVER


class AggregatorError(Exception):
    """An aggregator call failed with a gRPC status (after retries, for UNAVAILABLE).

    Callers that act on the reason catch a subclass: the round loop branches on these, in the
    protocol's terms, and never on status codes.
    """

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{method}: {code.name}: {details}")
        self.method = method
        self.code = code
        self.details = details


class AggregatorUnreachable(AggregatorError):
    """The aggregator could not be reached for the whole retry window."""


class NotAcceptedNow(AggregatorError):
    """Refused in this state of the run: a round not open yet or closed, a stale push, an ended run."""


class AlreadyAccepted(AggregatorError):
    """The aggregator already holds this contribution or report (a replay after a restart)."""


class OverLimit(AggregatorError):
    """Refused for a limit no retry soon lifts: a holder's cold-start cap (registration), the number of domains."""


class DataMismatch(AggregatorError):
    """What came back does not fit this domain's data or membership (a malformed stream, another fingerprint)."""


_ERRORS_BY_CODE: dict[grpc.StatusCode, type[AggregatorError]] = {
    grpc.StatusCode.UNAVAILABLE: AggregatorUnreachable,
    grpc.StatusCode.FAILED_PRECONDITION: NotAcceptedNow,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyAccepted,
    grpc.StatusCode.DATA_LOSS: DataMismatch,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverLimit,
}


def aggregator_error(method: str, code: grpc.StatusCode, details: str) -> AggregatorError:
    """The domain error for a failed call's status."""
    return _ERRORS_BY_CODE.get(code, AggregatorError)(method, code, details)


def data_mismatch(method: str, details: str) -> DataMismatch:
    """A DataMismatch found on this side (no status came from the aggregator)."""
    return DataMismatch(method, grpc.StatusCode.DATA_LOSS, details)


def gave_up(method: str, details: str) -> AggregatorError:
    """A call this side stopped retrying because the run kept moving under it."""
    return AggregatorError(method, grpc.StatusCode.ABORTED, details)


# a retry spell is reported when it starts, then once per this many seconds, and when it ends
RETRY_REPORT_S = 10.0
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    """Reconnect policy: delays grow from `initial_s` by `factor` up to `max_s`, full jitter."""

    initial_s: float = 0.2
    max_s: float = 10.0
    factor: float = 2.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to sleep before retry number `attempt` (0-based)."""
        return rng.uniform(0.0, min(self.max_s, self.initial_s * self.factor**attempt))




class AggregatorClient:
    """Async client of cdimf.v1.Aggregator for one domain (domain "" for operator-only use)."""

    def __init__(
        self,
        address: str,
        domain: str = "",
        credentials: grpc.ChannelCredentials | None = None,
        rpc_timeout_s: float = 30.0,
        retry_for_s: float = 120.0,
        backoff: Backoff = Backoff(),
        seed: int | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        # chunk buffers only: a node's matrices must go back to the system when freed (heap.py)
        reuse_freed_chunk_memory(CLIENT_MMAP_THRESHOLD, CLIENT_TRIM_THRESHOLD)
        self.address = address
        # who hears about retries: what is retried, for how long, and when it gives up (default: the log)
        self.on_retry = on_retry if on_retry is not None else log.warning
        self.domain = domain
        self.rpc_timeout_s = rpc_timeout_s
        self.retry_for_s = retry_for_s
        self.backoff = backoff
        self._rng = random.Random(seed)
        # interceptors see every outgoing request: the privacy tests capture traffic with them
        self.channel = create_channel(address, credentials, interceptors)
        self.stub = pb_grpc.AggregatorStub(self.channel)
        # the factor streams skip protobuf's copies of their payloads (cdimf.common.rpc.fastpath)
        self._matrices = MatrixExchange(self.channel)

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()

    async def __aenter__(self) -> "AggregatorClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def header(self, run_id: str = "", round_index: int = 0) -> pb.Header:
        """A request header from this client's domain."""
        return pb.Header(run_id=run_id, domain=self.domain, round=round_index)

    async def _call(self, method: str, attempt: Callable[[], Awaitable[Result]]) -> Result:
        """Run one call, retrying UNAVAILABLE with backoff and jitter until retry_for_s passed (each retry spell is reported)."""
        started = time.monotonic()
        give_up = started + self.retry_for_s
        tries, reported = 0, 0.0
        while True:
            try:
                result = await attempt()
                if tries:
                    self.on_retry(f"{method}: reached the aggregator at {self.address} again after {time.monotonic() - started:.0f} s")
                return result
            except grpc.aio.AioRpcError as error:
                code = error.code()
                if code != grpc.StatusCode.UNAVAILABLE:
                    raise aggregator_error(method, code, error.details() or "") from error
                if time.monotonic() >= give_up:
                    self.on_retry(f"{method}: giving up after {time.monotonic() - started:.0f} s: the aggregator at {self.address} "
                                  f"stayed unreachable ({error.details() or code.name})")
                    raise aggregator_error(method, code, error.details() or "") from error
                reported = self._report_retry(method, started, reported, error.details() or code.name)
            delay = self.backoff.delay(tries, self._rng)
            tries += 1
            await asyncio.sleep(min(delay, max(0.0, give_up - time.monotonic())))

    def _report_retry(self, method: str, started: float, reported: float, why: str, window_s: float | None = None) -> float:
        """Say the first retry of a spell, then one line per RETRY_REPORT_S (what, how long so far, for how long); the last report's time."""
        window = self.retry_for_s if window_s is None else window_s
        now = time.monotonic()
        if not reported:
            self.on_retry(f"{method}: the aggregator at {self.address} is unreachable ({why}); retrying for up to {window:.0f} s")
            return now
        if now - reported >= RETRY_REPORT_S:
            self.on_retry(f"{method}: still retrying the aggregator at {self.address} ({now - started:.0f} s of up to {window:.0f} s)")
            return now
        return reported

    # ----- node API -----

    async def register(self, pseudonyms: np.ndarray, holder: np.ndarray, cold_start: ColdStartPolicy | None = None) -> RegistrationReceipt:
        """Register every row of this domain: (n, 32) pseudonyms and n holder flags, in row order, and its cold-start policy.

        cold_start None sends none (the aggregator applies the defaults: serve, no cap). A policy
        that a holder's cap refuses raises AggregatorError RESOURCE_EXHAUSTED, its details the reason.
        """
        header = self.header()
        policy = cold_start_to_proto(cold_start) if cold_start is not None else None

        async def attempt() -> pb.Membership:
            return await self.stub.Register(encode_registration(pseudonyms, holder, header, cold_start=policy), timeout=self.rpc_timeout_s)

        return receipt_from_proto(await self._call("Register", attempt))

    async def get_membership(self, run_id: str = "") -> NodeMembership:
        """The roles and holder masks of this domain's rows (the run's frozen membership once admitted) and its cold-start counts."""
        request = pb.GetMembershipRequest(header=self.header(run_id))

        async def attempt() -> NodeMembership:
            """One GetMembership stream, assembled."""
            assembler = MembershipAssembler()
            async for chunk in self.stub.GetMembership(request, timeout=self.rpc_timeout_s):
                assembler.add(chunk)
            roles, masks, domains = assembler.result()
            return membership_from_wire(roles, masks, domains, assembler.served_to, assembler.received_from)

        try:
            return await self._call("GetMembership", attempt)
        except ChunkError as error:
            raise data_mismatch("GetMembership", str(error)) from error

    async def wait_for_run(self, wait_s: float, after_run_id: str = "") -> RunInfo | None:
        """The current run other than `after_run_id`, waiting up to wait_s; None if none started."""
        request = pb.WaitForRunRequest(header=self.header(), wait_s=wait_s, after_run_id=after_run_id)

        async def attempt() -> pb.RunInfo:
            return await self.stub.WaitForRun(request, timeout=wait_s + self.rpc_timeout_s)

        try:
            return run_info_from_proto(await self._call("WaitForRun", attempt))
        except AggregatorError as error:
            if error.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return None
            raise

    async def push_contribution(self, run_id: str, round_index: int, values: np.ndarray, dtype: str = "float32") -> PushResult:
        """Send X + U of the shared rows (membership order) for a round.

        Raises AggregatorError: FAILED_PRECONDITION (round not open, too stale, run ended),
        INVALID_ARGUMENT (shape, NaN/Inf), NOT_FOUND (unknown run or domain).
        """
        header = self.header(run_id, round_index)
        tries = 0

        async def attempt() -> pb.Ack:
            nonlocal tries
            tries += 1
            return await self._matrices.push(values, header, dtype, timeout=self._stream_timeout(values.nbytes))

        try:
            ack = await self._call("PushContribution", attempt)
        except AggregatorError as error:
            # a retried push whose first attempt landed (Ack lost with the connection)
            if error.code == grpc.StatusCode.ALREADY_EXISTS and tries > 1:
                return PushResult(round_index, replayed=True)
            raise
        return push_result_from_proto(ack)

    async def pull_consensus(
        self, run_id: str, min_round: int, wait_s: float, shared: int, receivers: int, dtype: str = "float32"
    ) -> Consensus | None:
        """Z of the newest round >= min_round, waiting up to wait_s; None when none came in time.

        dtype "ring64" in a secure run: the masked sum (uint64, rank + 1 columns) and the
        contributions it holds (Consensus.contributors), to be unmasked by the caller.

        `shared` and `receivers` are the row counts from the membership: the stream must hold
        exactly shared + receivers rows (a mismatch raises AggregatorError DATA_LOSS).
        """
        request = pb.PullRequest(header=self.header(run_id), min_round=min_round, wait_s=wait_s, dtype=wire_dtype(dtype))

        async def attempt() -> tuple[np.ndarray, pb.Header, tuple[tuple[str, int], ...]]:
            """One PullConsensus stream, assembled."""
            return await self._matrices.pull(request, "consensus", shared + receivers, timeout=wait_s + self._stream_timeout(0))

        try:
            z, header, contributors = await self._call("PullConsensus", attempt)
        except AggregatorError as error:
            if error.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return None
            raise
        except ChunkError as error:
            raise data_mismatch("PullConsensus", str(error)) from error
        return consensus_from_wire(z, header, shared, contributors)

    async def report_metrics(self, run_id: str, round_index: int, metrics: dict[str, float]) -> None:
        """Report this domain's validation metrics of a round (shown by WatchRun)."""
        request = pb.MetricsReport(header=self.header(run_id, round_index), metrics=metrics)

        async def attempt() -> pb.Ack:
            return await self.stub.ReportMetrics(request, timeout=self.rpc_timeout_s)

        await self._call("ReportMetrics", attempt)

    # ----- control API -----

    async def start_run(self, params: RunParams) -> RunInfo:
        """Start a run over the registered domains."""
        request = pb.StartRunRequest(header=self.header(), params=run_params_to_proto(params))

        async def attempt() -> pb.RunInfo:
            return await self.stub.StartRun(request, timeout=self.rpc_timeout_s)

        return run_info_from_proto(await self._call("StartRun", attempt))

    async def get_status(self) -> pb.AggregatorStatus:
        """The aggregator's status (current run, registered domains) as the proto message."""

        async def attempt() -> pb.AggregatorStatus:
            return await self.stub.GetStatus(pb.StatusRequest(header=self.header()), timeout=self.rpc_timeout_s)

        return await self._call("GetStatus", attempt)

    async def watch_run(self, run_id: str = "", from_round: int = 0, outage_s: float | None = None) -> AsyncIterator[pb.RoundEvent]:
        """Yield the run's events (replayed from from_round, then live) until it ends.

        No overall deadline (runs are long); keepalive detects a dead aggregator, and a dropped
        stream is resumed after the last round seen. An unreachable aggregator is retried for
        `outage_s` (default retry_for_s) since the last event, so a follower outlasts restarts.
        """
        next_round = from_round
        window_s = self.retry_for_s if outage_s is None else outage_s
        started = time.monotonic()
        give_up = started + window_s
        tries, reported = 0, 0.0
        while True:
            request = pb.WatchRequest(header=self.header(run_id), from_round=next_round)
            try:
                async for event in self.stub.WatchRun(request):
                    if tries:
                        self.on_retry(f"WatchRun: following the run again after {time.monotonic() - started:.0f} s")
                    tries, reported = 0, 0.0
                    started = time.monotonic()
                    give_up = started + window_s
                    # resume after the last closed round; metrics of that round may repeat
                    if event.kind == pb.EVENT_KIND_ROUND_CLOSED:
                        next_round = event.round + 1
                    yield event
                return
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise aggregator_error("WatchRun", error.code(), error.details() or "") from error
                if time.monotonic() >= give_up:
                    self.on_retry(f"WatchRun: giving up after {time.monotonic() - started:.0f} s: the aggregator at {self.address} "
                                  f"stayed unreachable ({error.details() or error.code().name})")
                    raise aggregator_error("WatchRun", error.code(), error.details() or "") from error
                reported = self._report_retry("WatchRun", started, reported, error.details() or error.code().name, window_s)
            await asyncio.sleep(self.backoff.delay(tries, self._rng))
            tries += 1

    async def list_runs(self, run_id: str = "", with_events: bool = False) -> pb.RunList:
        """The aggregator's kept runs (or the one named), with their events when asked for."""
        request = pb.ListRunsRequest(header=self.header(run_id), with_events=with_events)

        async def attempt() -> pb.RunList:
            return await self.stub.ListRuns(request, timeout=self.rpc_timeout_s)

        return await self._call("ListRuns", attempt)

    async def stop_run(self, run_id: str, reason: str = "") -> RunInfo:
        """Stop a running run."""
        request = pb.StopRunRequest(header=self.header(run_id), reason=reason)

        async def attempt() -> pb.RunInfo:
            return await self.stub.StopRun(request, timeout=self.rpc_timeout_s)

        return run_info_from_proto(await self._call("StopRun", attempt))

    def _stream_timeout(self, nbytes: int) -> float:
        """Deadline of a matrix stream: the unary deadline plus time for the bytes at >= 20 MB/s."""
        return self.rpc_timeout_s + nbytes / 20e6



def node_client(
    config: NodeConfig,
    backoff: Backoff = Backoff(initial_s=0.1, max_s=2.0),
    retry_for_s: float = 60.0,
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
) -> AggregatorClient:
    """The client a domain node dials its aggregator with: its address, domain, TLS and timeouts from its config."""
    return AggregatorClient(
        config.aggregator,
        config.domain,
        credentials_for(config.tls),
        rpc_timeout_s=config.rpc_timeout_s,
        retry_for_s=retry_for_s,
        backoff=backoff,
        interceptors=interceptors,
    )
