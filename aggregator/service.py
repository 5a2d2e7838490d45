"""The aggregator's grpc.aio server (service cdimf.v1.Aggregator) on uvloop.

Entry points:
- `serve(config)`: blocking; serves until SIGINT/SIGTERM, then stops gracefully. This is what
  `python -m cdimf.aggregator --config aggregator.toml` and the CLI call.
- `await start_aggregator(config)`: starts the server inside a running event loop and returns a
  RunningAggregator (its bound `port`, `address`, `state`, `await stop()`); for tests and for
  embedding (`listen = "127.0.0.1:0"` binds a free port).

Security follows the TLS section of the config: `insecure = true` serves plaintext and lets
every caller speak for any domain; otherwise TLS from the config's files, every call's client
certificate proved and checked by the server's interceptor before any handler runs
(UNAUTHENTICATED, cdimf.common.rpc.channels), and cdimf.common.rpc.auth's policy in the handlers
(PERMISSION_DENIED).

Health: the standard gRPC health service (grpc.health.v1.Health) answers for "" and
"cdimf.v1.Aggregator": SERVING once the port is bound and serving, NOT_SERVING from the moment
`stop()` begins (open Watch streams see it before the server closes). Under mutual TLS any
certificate the federation CA issued may call it (domain, operator or aggregator: each compose
service probes itself with its own certificate); the interceptor already refuses callers without
one, and the answer reveals nothing but whether the server serves, so no identity check applies.

Status codes of cdimf.v1.Aggregator: malformed streams and bad parameters INVALID_ARGUMENT; unknown run or domain
NOT_FOUND; replayed contribution or metrics ALREADY_EXISTS; out-of-order, too stale, not-yet-open
rounds or ended runs FAILED_PRECONDITION; no consensus within a pull's wait DEADLINE_EXCEEDED.
A refused request changes no state.
"""

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cdimf.aggregator.rounds import StateError
from cdimf.aggregator.state import AggregatorState
from cdimf.common.config import AggregatorConfig, ConfigError, RunParams
from cdimf.common.core.membership import AlignedMembership
from cdimf.common.rpc import metrics
from cdimf.common.rpc.auth import Authorizer
from cdimf.common.rpc.channels import bind_port, create_server, serve_until_signalled
from cdimf.common.rpc.fastpath import add_aggregator_to_server
from cdimf.common.rpc.heap import reuse_freed_chunk_memory
from cdimf.common.security.names import is_party_name, shown
from cdimf.common.wire.chunks import (
    ChunkError,
    MatrixAssembler,
    RegistrationAssembler,
    encode_matrix_serialized,
    encode_membership,
    split_matrix_chunk,
    wire_dtype,
)
from cdimf.common.wire.serde import (
    cold_start_from_proto,
    event_to_proto,
    membership_to_proto,
    run_info_to_proto,
    run_params_from_proto,
    run_record_to_proto,
    status_to_proto,
)
from cdimf.protos.v1 import federation_pb2 as pb
from cdimf.protos.v1 import federation_pb2_grpc as pb_grpc

log = logging.getLogger("cdimf.aggregator")
# How long a watch stays open after the run ended, for the final round's metrics.
FINAL_METRICS_GRACE_S = 10.0
# With exit_after_run: how long the server keeps serving after the run completed, so that the
# last replies (final metrics acks, the end of watch streams) reach their callers.
EXIT_LINGER_S = 2.0
# What the health service answers for: the whole server and the aggregator's service.
HEALTH_SERVICE_NAMES = ("", "cdimf.v1.Aggregator")
# The most bytes of one ReportMetrics request on the wire: 16 metrics of 32-character names take
# under 800, a header under 300. Bounded before decoding: repeated map entries parse into one.
MAX_METRICS_REPORT_BYTES = 4096
Result = TypeVar("Result")
# bytes: a MatrixChunk stream received unparsed (PushContribution)
Chunk = TypeVar("Chunk", pb.MatrixChunk, pb.PseudonymChunk, bytes)


class _Changes:
    """Wakes every waiter (pulls, WaitForRun, WatchRun) when the state changed."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        """Wake current waiters; later waiters wait for the next change."""
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float | None) -> None:
        """Wait for the next change or the timeout, whichever first."""
        event = self._event
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)


class AggregatorService(pb_grpc.AggregatorServicer):
    """Implements cdimf.v1.Aggregator over an AggregatorState (all state access under one lock)."""

    def __init__(self, state: AggregatorState, authorizer: Authorizer) -> None:
        self.state = state
        self.authorizer = authorizer
        self.lock = asyncio.Lock()
        self.changes = _Changes()
        self.tasks: list[asyncio.Task[None]] = []
        # closes of rounds a push completed, running after its ack (awaited, not cancelled, at stop)
        self.closing: set[asyncio.Future[None]] = set()
        # set once serving: answers NOT_SERVING while the state cannot be saved
        self.health: health.aio.HealthServicer | None = None
        self._healthy = True

    # ----- plumbing -----

    async def _locked(self, context: grpc.aio.ServicerContext, action: Callable[[], Result], in_thread: bool = False,
                      call: str = "other") -> Result:
        """Run a state action under the lock; StateError becomes the gRPC status it names (counted per `call`)."""
        async with self.lock:
            try:
                # heavy actions (consensus, saving state) run off the event loop so keepalives
                # and other streams are served meanwhile; the lock still serialises state access
                return await asyncio.to_thread(action) if in_thread else action()
            except StateError as error:
                metrics.on_refused(call, error.status)
                await context.abort(grpc.StatusCode[error.status], error.message)
                raise AssertionError("unreachable") from error
            finally:
                await self.reflect_persistence()

    async def reflect_persistence(self) -> None:
        """Health NOT_SERVING while the state cannot be saved, SERVING again once it is."""
        healthy = self.state.persist_error is None
        if self.health is None or healthy == self._healthy:
            return
        self._healthy = healthy
        answer = health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in HEALTH_SERVICE_NAMES:
            await self.health.set(name, answer)

    async def _domain(self, context: grpc.aio.ServicerContext, domain: str) -> None:
        """Abort unless header.domain is set and the caller may speak for it."""
        if not domain:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "header.domain is empty")
        if not is_party_name(domain):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"domain name {shown(domain)} is invalid: use 1-63 of a-z 0-9 _ - starting with a letter or digit")
        await self.authorizer.require_domain(context, domain)

    async def _operator(self, context: grpc.aio.ServicerContext) -> None:
        """Abort unless the caller may use the control API."""
        await self.authorizer.require_operator(context)

    async def _first_chunk(self, context: grpc.aio.ServicerContext, stream: AsyncIterator[Chunk], what: str) -> Chunk:
        """The first message of a request stream (its header decides who may send the rest)."""
        first = await anext(aiter(stream), None)
        if first is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: empty stream, no chunk received")
            raise AssertionError("unreachable")
        return first

    async def _assemble(
        self, context: grpc.aio.ServicerContext, add: Callable[[Chunk], None], result: Callable[[], Result], first: Chunk, stream: AsyncIterator[Chunk]
    ) -> Result:
        """Feed a stream's chunks (messages or wire bytes) to an assembler's `add`; a malformed stream aborts with INVALID_ARGUMENT."""
        try:
            add(first)
            async for chunk in stream:
                add(chunk)
            return result()
        except ChunkError as error:
            log.warning("refused a malformed stream from %s: %s", context.peer(), error)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            raise

    def start_task(self, work: Awaitable[None]) -> None:
        """Run a background task (deadline watch, auto-start) until stop_tasks."""
        self.tasks.append(asyncio.ensure_future(work))

    async def stop_tasks(self) -> None:
        """Let a round close in progress finish (its Z saved), then cancel the background tasks and wait for them."""
        if self.closing:
            await asyncio.gather(*self.closing, return_exceptions=True)
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.tasks.clear()

    async def deadline_loop(self) -> None:
        """Close rounds whose deadline passed (asynchronous mode); runs as a background task."""
        while True:
            async with self.lock:
                timeout = self.state.seconds_to_deadline()
            await self.changes.wait(timeout)
            async with self.lock:
                failing = self.state.persist_error is not None
                try:
                    closed = await asyncio.to_thread(self.state.poll)
                except Exception:  # a failing close must not kill the loop; it is retried
                    log.exception("closing a round at its deadline failed")
                    closed = None
                await self.reflect_persistence()
                recovered = failing and self.state.persist_error is None
                failing = self.state.persist_error is not None
            if closed is not None or recovered:
                if closed is not None:
                    log.info("round %d closed at its deadline", closed)
                    metrics.on_round_closed()
                self.changes.notify()
            elif failing:
                continue  # the save is retried on its own clock (seconds_to_deadline)
            elif timeout == 0.0:
                # deadline passed without min_domains: wait for the next push, not a busy loop
                await self.changes.wait(None)

    # ----- node API -----

    async def Register(self, request_iterator: AsyncIterator[pb.PseudonymChunk], context: grpc.aio.ServicerContext) -> pb.Membership:
        """Receive a domain's pseudonyms and holder flags; reply with its membership summary."""
        first = await self._first_chunk(context, request_iterator, "registration")
        await self._domain(context, first.header.domain)
        registration = RegistrationAssembler()
        pseudonyms, holder, header = await self._assemble(context, registration.add, registration.result, first, request_iterator)
        domain = header.domain
        try:
            policy = cold_start_from_proto(registration.cold_start)
        except ConfigError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"registration of {domain}: {error}")
            raise

        def register() -> pb.Membership:
            registered = self.state.register(domain, pseudonyms, holder, policy)
            mine, frozen = self.state.membership_for(domain)
            counts = self.state.cold_start_counts()
            return membership_to_proto(mine, domain, registered.fingerprint, frozen, counts.served_to(domain), counts.received_from(domain))

        reply = await self._locked(context, register, in_thread=True, call="Register")
        log.info("domain %s registered %d rows (cold start: %s; others receive %s; it receives %s)", domain, reply.rows, policy.describe(),
                 dict(reply.served_to) or "none", dict(reply.received_from) or "none")
        metrics.on_registration(domain)
        self.changes.notify()
        return reply

    async def GetMembership(self, request: pb.GetMembershipRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.MembershipChunk]:
        """Stream the domain's per-row roles and holder masks (the run's frozen membership when admitted)."""
        domain = request.header.domain
        await self._domain(context, domain)
        def seen() -> tuple[AlignedMembership, dict[str, int], dict[str, int]]:
            """The membership the domain sees and its cold-start counts."""
            mine, _ = self.state.membership_for(domain)
            counts = self.state.cold_start_counts()
            return mine, counts.served_to(domain), counts.received_from(domain)

        mine, served_to, received_from = await self._locked(context, seen, in_thread=True)
        for chunk in encode_membership(mine.roles, mine.holder_masks, list(mine.domains), request.header,
                                       served_to=served_to, received_from=received_from):
            yield chunk

    async def WaitForRun(self, request: pb.WaitForRunRequest, context: grpc.aio.ServicerContext) -> pb.RunInfo:
        """The current run (other than after_run_id), waiting up to wait_s for one to start."""
        domain = request.header.domain
        if domain:
            await self._domain(context, domain)
        else:
            await self._operator(context)
        if not np.isfinite(request.wait_s) or request.wait_s < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"wait_s must be finite and >= 0, got {request.wait_s}")
        give_up = time.monotonic() + request.wait_s

        def started() -> pb.RunInfo | None:
            """The wire form of the run to answer with, None while there is none yet."""
            run = self.state.current_run(request.after_run_id)
            return None if run is None else run_info_to_proto(run)

        while True:
            info = await self._locked(context, started)
            if info is not None:
                return info
            left = give_up - time.monotonic()
            if left <= 0:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no run started within {request.wait_s} s")
            await self.changes.wait(left)

    # the fast path registers this method without a request deserializer: it takes wire bytes
    async def PushContribution(self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> pb.Ack:  # type: ignore[override]
        """Receive X + U of the domain's shared rows for header.round; may close the round.

        Its chunks arrive as MatrixChunk wire bytes (cdimf.common.rpc.fastpath): only the
        small fields are parsed, and each payload is copied once, into the matrix.
        """
        first = await self._first_chunk(context, request_iterator, "contribution")
        try:
            fields, _ = split_matrix_chunk(first, "contribution: chunk 0")
        except ChunkError as error:
            log.warning("refused a PushContribution from %s: %s", context.peer(), error)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            raise
        header = fields.header
        await self._domain(context, header.domain)
        ring = fields.dtype == pb.DTYPE_RING64
        rows, cols = await self._locked(context, lambda: self.state.check_contribution(header.run_id, header.domain, header.round, ring),
                                        call="PushContribution")
        assembler = MatrixAssembler(f"contribution of {header.domain}", expected_rows=rows, expected_cols=cols)
        values, _ = await self._assemble(context, assembler.add_serialized, assembler.result, first, request_iterator)
        # The lock is taken here and, when this push completes the round, handed to the task
        # that closes it: nothing else runs on the state between the two, every later call
        # (a pull, the next round's push, a status) waits for the close and its save, and the
        # ack does not: the contribution itself is on disk before the ack (take_contribution), so
        # a crash before the close loses nothing acked; the restart finishes the close.
        await self.lock.acquire()
        handed_over = False
        try:
            try:
                accepted_round = await asyncio.to_thread(self.state.take_contribution, header.run_id, header.domain, header.round, values)
            except StateError as error:
                metrics.on_refused("PushContribution", error.status)
                if self.state.persist_error is not None:
                    self.changes.notify()  # the deadline loop retries the save on its own clock from now
                await context.abort(grpc.StatusCode[error.status], error.message)
                raise AssertionError("unreachable") from error
            if self.state.round_due():
                self.closing.add(asyncio.ensure_future(self._close_round_holding_lock()))
                handed_over = True
        finally:
            if not handed_over:
                await self.reflect_persistence()
                self.lock.release()
        metrics.on_contribution(header.domain, values.nbytes, header.round, accepted_round)
        self.changes.notify()
        return pb.Ack(header=header, accepted_round=accepted_round)

    async def _close_round_holding_lock(self) -> None:
        """Close the due round (consensus, then the save before Z is served) with the lock a push handed over; release it."""
        try:
            closed = await asyncio.to_thread(self.state.poll)
        except Exception:  # a failing close is retried by the deadline loop on the next change
            log.exception("closing a round failed")
            closed = None
        finally:
            await self.reflect_persistence()
            self.lock.release()
            self.closing.discard(asyncio.current_task())
        if closed is not None:
            log.info("round %d closed", closed)
            metrics.on_round_closed()
        self.changes.notify()

    # the fast path registers this method without a response serializer: it yields wire bytes
    async def PullConsensus(self, request: pb.PullRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:  # type: ignore[override]
        """Stream Z for the domain's shared then receiver rows: the newest round >= min_round.

        Chunks are yielded as MatrixChunk wire bytes (cdimf.common.rpc.fastpath), each
        payload copied once from Z's rows into the message.
        """
        header = request.header
        await self._domain(context, header.domain)
        if not np.isfinite(request.wait_s) or request.wait_s < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"wait_s must be finite and >= 0, got {request.wait_s}")
        try:
            dtype = wire_dtype(request.dtype)
        except ChunkError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            raise
        # unspecified: whatever the run serves (a secure run's masked sum, else float32)
        asked_ring = None if request.dtype == pb.DTYPE_UNSPECIFIED else dtype == pb.DTYPE_RING64
        if await self._locked(context, lambda: self.state.pull_encoding(header.run_id, asked_ring)):
            dtype = pb.DTYPE_RING64
        give_up = time.monotonic() + request.wait_s

        while True:
            found = await self._locked(context, lambda: self.state.pull(header.run_id, header.domain, request.min_round))
            if found is not None:
                break
            left = give_up - time.monotonic()
            if left <= 0:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no consensus of round >= {request.min_round} within {request.wait_s} s")
            await self.changes.wait(left)
        # Z is never modified in place (each round builds a new array), so streaming it
        # outside the lock is safe even if the next round closes meanwhile
        reply_header = pb.Header(run_id=header.run_id, domain=header.domain, round=found.round)
        sent = 0
        for chunk in encode_matrix_serialized(found.z, reply_header, dtype=dtype, row_index=found.rows, contributors=found.contributors):
            sent += len(chunk)
            yield chunk
        metrics.on_pull(header.domain, sent)

    async def ReportMetrics(self, request: pb.MetricsReport, context: grpc.aio.ServicerContext) -> pb.Ack:
        """Record the domain's validation metrics for header.round."""
        header = request.header
        await self._domain(context, header.domain)
        reported = dict(request.metrics)
        await self._locked(context, lambda: self.state.report_metrics(header.run_id, header.domain, header.round, reported),
                           call="ReportMetrics")
        metrics.on_validation(header.domain, reported)
        self.changes.notify()
        return pb.Ack(header=header, accepted_round=header.round)

    # ----- control API -----

    async def StartRun(self, request: pb.StartRunRequest, context: grpc.aio.ServicerContext) -> pb.RunInfo:
        """Start a run with the given parameters over the registered domains."""
        await self._operator(context)
        try:
            params = run_params_from_proto(request.params)
        except ConfigError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            raise
        run = await self._locked(context, lambda: self.state.start_run(params), in_thread=True)
        log.info("run %s started over %s", run.run_id, ", ".join(run.admitted))
        metrics.on_run_started()
        self.changes.notify()
        return run_info_to_proto(run)

    async def GetStatus(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.AggregatorStatus:
        """The current run and every registered domain."""
        await self._operator(context)

        def status() -> pb.AggregatorStatus:
            """The state's status snapshot in its wire form (converted under the lock: it names the live run)."""
            return status_to_proto(self.state.status())

        return await self._locked(context, status)

    async def WatchRun(self, request: pb.WatchRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.RoundEvent]:
        """Replay the run's events of rounds >= from_round, then follow until it ends.

        After the run ended the stream stays open up to FINAL_METRICS_GRACE_S for the final
        round's metrics (nodes evaluate after the last Z), ending early once every admitted
        domain reported them.
        """
        await self._operator(context)
        run = await self._locked(context, lambda: self.state.watched_run(request.header.run_id))
        sent = 0
        ended_at: float | None = None
        while True:
            watch = await self._locked(context, functools.partial(self.state.watch, run, sent))
            for event in watch.events:
                if event.round >= request.from_round or event.kind in ("run_finished", "run_stopped"):
                    yield event_to_proto(run, event)
            sent += len(watch.events)
            if watch.events:
                continue  # more may have come while those were sent: decide on a fresh look
            if not watch.current or watch.complete:
                return
            timeout = None
            if watch.ended:
                ended_at = time.monotonic() if ended_at is None else ended_at
                timeout = ended_at + FINAL_METRICS_GRACE_S - time.monotonic()
                if timeout <= 0:
                    return
            await self.changes.wait(timeout)

    async def ListRuns(self, request: pb.ListRunsRequest, context: grpc.aio.ServicerContext) -> pb.RunList:
        """The kept runs (current and ended, oldest first), or the one header.run_id names, with their events when asked for."""
        await self._operator(context)

        def listed() -> pb.RunList:
            """Converted under the lock: the current run's events are live."""
            return pb.RunList(runs=[run_record_to_proto(run, request.with_events) for run in self.state.runs(request.header.run_id)])

        return await self._locked(context, listed)

    async def StopRun(self, request: pb.StopRunRequest, context: grpc.aio.ServicerContext) -> pb.RunInfo:
        """Stop the running run; nodes see FAILED_PRECONDITION on their next push or pull."""
        await self._operator(context)
        run = await self._locked(context, lambda: self.state.stop_run(request.header.run_id, request.reason), in_thread=True)
        self.changes.notify()
        return run_info_to_proto(run)


@dataclass
class RunningAggregator:
    """A started aggregator server: its port, the service, its health service and how to stop it."""

    server: grpc.aio.Server
    service: AggregatorService
    port: int
    host: str
    health: health.aio.HealthServicer

    @property
    def address(self) -> str:
        """host:port to dial."""
        return f"{self.host}:{self.port}"

    @property
    def state(self) -> AggregatorState:
        """The bookkeeping behind the server."""
        return self.service.state

    async def stop(self, grace: float | None = 2.0) -> None:
        """Report NOT_SERVING, then stop the deadline task and serving (in-flight calls get `grace` seconds)."""
        await self.health.enter_graceful_shutdown()
        await self.service.stop_tasks()
        await self.server.stop(grace)

    async def wait(self) -> None:
        """Wait until the server terminates."""
        await self.server.wait_for_termination()


async def start_aggregator(
    config: AggregatorConfig,
    clock: Callable[[], float] = time.monotonic,
) -> RunningAggregator:
    """Restore state from config.state_dir, bind config.listen and start serving."""
    reuse_freed_chunk_memory()
    state = AggregatorState(config.state_dir, clock=clock, fsync=config.fsync_state)
    service = AggregatorService(state, Authorizer(config.tls.insecure))
    server = create_server(config.tls, options=[("grpc.max_concurrent_streams", config.max_concurrent_streams)],
                           request_limits={f"/{pb.DESCRIPTOR.services_by_name['Aggregator'].full_name}/ReportMetrics": MAX_METRICS_REPORT_BYTES})
    add_aggregator_to_server(service, server)
    health_service = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    port = bind_port(server, config.listen, config.tls, "aggregator")
    await server.start()
    service.start_task(service.deadline_loop())
    for name in HEALTH_SERVICE_NAMES:
        await health_service.set(name, health_pb2.HealthCheckResponse.SERVING)
    service.health = health_service
    host = config.listen.rsplit(":", 1)[0]
    running = RunningAggregator(server, service, port, host, health_service)
    if config.metrics_listen:
        log.info("metrics on http://%s:%d/metrics", config.metrics_listen.rsplit(":", 1)[0],
                 metrics.start_metrics_server(config.metrics_listen, "aggregator"))
    if config.run is not None:
        await _auto_start(running, config.run)
    log.info("aggregator listening on %s", running.address)
    return running


async def _auto_start(running: RunningAggregator, params: RunParams) -> None:
    """Start the configured run once min_domains domains registered (unless one is running)."""

    async def starter() -> None:
        """Wait for enough registrations, then start the run (once)."""
        service = running.service
        while True:
            async with service.lock:
                # aligning the registrations is heavy: off the event loop, like StartRun
                done = await asyncio.to_thread(service.state.start_when_ready, params)
            if done:
                metrics.on_run_started()
                service.changes.notify()
                return
            await service.changes.wait(None)

    running.service.start_task(starter())


async def run_completed(running: RunningAggregator) -> None:
    """Return once a run that was not already over when this server started has ended and is complete.

    Complete: stopped, or every admitted domain reported the final round (so every node has
    pulled the last Z). A run restored already ended (a second `up` on old volumes) is not it.
    """
    service = running.service
    async with service.lock:
        restored = service.state.run
        already_over = restored if restored is not None and restored.state != "running" else None
    while True:
        async with service.lock:
            run = service.state.run
            complete = run is not None and run is not already_over and service.state.watch(run, len(run.events)).complete
        if complete:
            assert run is not None
            log.info("run %s %s: exiting (exit_after_run)", run.run_id, run.state)
            await asyncio.sleep(EXIT_LINGER_S)
            return
        await service.changes.wait(None)


def serve(config: AggregatorConfig, on_ready: Callable[[RunningAggregator], Awaitable[None] | None] | None = None) -> None:
    """Serve until SIGINT or SIGTERM (or, with exit_after_run, the end of a run), on uvloop; `on_ready` gets the started server."""
    ends_early = (lambda running: asyncio.ensure_future(run_completed(running))) if config.exit_after_run else None
    serve_until_signalled(lambda: start_aggregator(config), on_ready, ends_early=ends_early, what="aggregator")
