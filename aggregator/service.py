"""The aggregator's grpc.aio server (service cdimf.v1.Aggregator) on uvloop.

Entry points:
- `serve(config)`: blocking; serves until SIGINT/SIGTERM, then stops gracefully. This is what
  `python -m cdimf.aggregator --config aggregator.toml` and the CLI call.
- `await start_aggregator(config)`: starts the server inside a running event loop and returns a
  RunningAggregator (its bound `port`, `address`, `state`, `await stop()`); for tests and for
  embedding (`listen = "127.0.0.1:0"` binds a free port).

Security (issue 5) follows the TLS section of the config: `insecure = true` serves plaintext and
lets every caller speak for any domain; otherwise TLS from the config's files, every call's
client certificate proved and checked by cdimf.common.security.call_proof's interceptor before any handler runs
(UNAUTHENTICATED), and cdimf.common.security.tls's identity checks in the handlers (PERMISSION_DENIED).

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
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cdimf.aggregator.state import AggregatorState, StateError
from cdimf.common.config import SERVER_OPTIONS, AggregatorConfig, ConfigError, RunParams, TLSConfig
from cdimf.common.rpc.heap import reuse_freed_chunk_memory
from cdimf.common.wire.chunks import (
    ChunkError,
    MatrixAssembler,
    RegistrationAssembler,
    encode_matrix_serialized,
    encode_membership,
    split_matrix_chunk,
    wire_dtype,
)
from cdimf.common.wire.serde import event_to_proto, membership_to_proto, run_info_to_proto, run_params_from_proto
from cdimf.protos.v1 import federation_pb2 as pb
from cdimf.protos.v1 import federation_pb2_grpc as pb_grpc

log = logging.getLogger("cdimf.aggregator")
Refusal = tuple[grpc.StatusCode, str]
# How long a watch stays open after the run ended, for the final round's metrics.
FINAL_METRICS_GRACE_S = 10.0
# What the health service answers for: the whole server and the aggregator's service.
HEALTH_SERVICE_NAMES = ("", "cdimf.v1.Aggregator")
Result = TypeVar("Result")
# bytes: a MatrixChunk stream received unparsed (PushContribution)
Chunk = TypeVar("Chunk", pb.MatrixChunk, pb.PseudonymChunk, bytes)
Assembler = MatrixAssembler | RegistrationAssembler


class Authorizer(Protocol):
    """Decides who may speak for a domain and who may use the control API."""

    def check_domain(self, context: grpc.aio.ServicerContext, domain: str) -> Refusal | None:
        """None when the caller may act as `domain`, else the status and detail to abort with."""
        ...

    def check_operator(self, context: grpc.aio.ServicerContext) -> Refusal | None:
        """None when the caller may start, stop and watch runs."""
        ...


class AllowAll:
    """Plaintext deployments (tests, loopback demos): every caller may do everything."""

    def check_domain(self, context: grpc.aio.ServicerContext, domain: str) -> Refusal | None:
        """Always allowed."""
        return None

    def check_operator(self, context: grpc.aio.ServicerContext) -> Refusal | None:
        """Always allowed."""
        return None


class CertificateAuthorizer:
    """Mutual TLS: a domain may only speak for the domain in its certificate (cdimf.common.security.tls)."""

    def check_domain(self, context: grpc.aio.ServicerContext, domain: str) -> Refusal | None:
        """Refuse unless the client certificate names `domain`."""
        from cdimf.common.security.tls import domain_check

        return domain_check(context, domain)

    def check_operator(self, context: grpc.aio.ServicerContext) -> Refusal | None:
        """Refuse unless the client holds an operator or aggregator certificate."""
        from cdimf.common.security.tls import operator_check

        return operator_check(context)


def security_from_config(
    tls: TLSConfig,
) -> tuple[grpc.ServerCredentials | None, Authorizer, list[grpc.aio.ServerInterceptor]]:
    """Server credentials (None: plaintext), the matching authorizer and the server's
    interceptors (the per-call client certificate check) for a TLS section."""
    if tls.insecure:
        return None, AllowAll(), []
    from cdimf.common.security.tls import server_credentials, server_interceptors

    assert tls.cert_file is not None and tls.key_file is not None and tls.ca_file is not None
    return server_credentials(tls.cert_file, tls.key_file, tls.ca_file), CertificateAuthorizer(), server_interceptors(tls)


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

    # ----- plumbing -----

    async def _locked(self, context: grpc.aio.ServicerContext, action: Callable[[], Result], in_thread: bool = False) -> Result:
        """Run a state action under the lock; StateError becomes the gRPC status it names."""
        async with self.lock:
            try:
                # heavy actions (consensus, saving state) run off the event loop so keepalives
                # and other streams are served meanwhile; the lock still serialises state access
                return await asyncio.to_thread(action) if in_thread else action()
            except StateError as error:
                await context.abort(grpc.StatusCode[error.status], error.message)
                raise AssertionError("unreachable") from error

    async def _domain(self, context: grpc.aio.ServicerContext, domain: str) -> None:
        """Abort unless header.domain is set and the caller may speak for it."""
        if not domain:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "header.domain is empty")
        refusal = self.authorizer.check_domain(context, domain)
        if refusal is not None:
            await context.abort(*refusal)

    async def _operator(self, context: grpc.aio.ServicerContext) -> None:
        """Abort unless the caller may use the control API."""
        refusal = self.authorizer.check_operator(context)
        if refusal is not None:
            await context.abort(*refusal)

    async def _first_chunk(self, context: grpc.aio.ServicerContext, stream: AsyncIterator[Chunk], what: str) -> Chunk:
        """The first message of a request stream (its header decides who may send the rest)."""
        first = await anext(aiter(stream), None)
        if first is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: empty stream, no chunk received")
            raise AssertionError("unreachable")
        return first

    async def _assemble(
        self, context: grpc.aio.ServicerContext, assembler: Assembler, first: Chunk, stream: AsyncIterator[Chunk], serialized: bool = False
    ) -> Any:
        """Feed the stream (messages, or wire bytes when `serialized`) to a chunk assembler; a malformed stream aborts with INVALID_ARGUMENT."""
        add = assembler.add_serialized if serialized and isinstance(assembler, MatrixAssembler) else assembler.add
        try:
            add(first)
            async for chunk in stream:
                add(chunk)
            return assembler.result()
        except ChunkError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            raise

    def start_task(self, work: Awaitable[None]) -> None:
        """Run a background task (deadline watch, auto-start) until stop_tasks."""
        self.tasks.append(asyncio.ensure_future(work))

    async def stop_tasks(self) -> None:
        """Cancel the background tasks and wait for them."""
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.tasks.clear()

    async def deadline_loop(self) -> None:
        """Close rounds whose deadline passed (asynchronous mode); runs as a background task."""
        while True:
            deadline = self.state.deadline_at()
            timeout = None if deadline is None else max(0.0, deadline - self.state.clock())
            await self.changes.wait(timeout)
            async with self.lock:
                try:
                    closed = await asyncio.to_thread(self.state.poll)
                except Exception:  # a failing close must not kill the loop; it is retried
                    log.exception("closing a round at its deadline failed")
                    closed = None
            if closed is not None:
                log.info("round %d closed at its deadline", closed)
                self.changes.notify()
            elif deadline is not None and timeout == 0.0:
                # deadline passed without min_domains: wait for the next push, not a busy loop
                await self.changes.wait(None)

    # ----- node API -----

    async def Register(self, request_iterator: AsyncIterator[pb.PseudonymChunk], context: grpc.aio.ServicerContext) -> pb.Membership:
        """Receive a domain's pseudonyms and holder flags; reply with its membership summary."""
        first = await self._first_chunk(context, request_iterator, "registration")
        await self._domain(context, first.header.domain)
        pseudonyms, holder, header = await self._assemble(context, RegistrationAssembler(), first, request_iterator)
        domain = header.domain

        def register() -> pb.Membership:
            registration = self.state.register(domain, pseudonyms, holder)
            layout, frozen = self.state.layout_for(domain)
            return membership_to_proto(layout, domain, registration.fingerprint, frozen)

        reply = await self._locked(context, register, in_thread=True)
        log.info("domain %s registered %d rows", domain, reply.rows)
        self.changes.notify()
        return reply

    async def GetMembership(self, request: pb.GetMembershipRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.MembershipChunk]:
        """Stream the domain's per-row roles and holder masks (the run's frozen membership when admitted)."""
        domain = request.header.domain
        await self._domain(context, domain)
        layout, _ = await self._locked(context, lambda: self.state.layout_for(domain), in_thread=True)
        mine = layout.per_domain[domain]
        for chunk in encode_membership(mine.roles, mine.holder_masks, list(layout.domains), request.header):
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
        while True:
            run = self.state.run
            if run is not None and run.run_id != request.after_run_id:
                return run_info_to_proto(run)
            left = give_up - time.monotonic()
            if left <= 0:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no run started within {request.wait_s} s")
            await self.changes.wait(left)

    async def PushContribution(self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> pb.Ack:
        """Receive X + U of the domain's shared rows for header.round; may close the round.

        Its chunks arrive as MatrixChunk wire bytes (see add_aggregator_to_server): only the
        small fields are parsed, and each payload is copied once, into the matrix.
        """
        first = await self._first_chunk(context, request_iterator, "contribution")
        try:
            fields, _ = split_matrix_chunk(first, "contribution: chunk 0")
        except ChunkError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            raise
        header = fields.header
        await self._domain(context, header.domain)
        rows, rank = await self._locked(context, lambda: self.state.check_contribution(header.run_id, header.domain, header.round))
        assembler = MatrixAssembler(f"contribution of {header.domain}", expected_rows=rows, expected_cols=rank)
        values, _ = await self._assemble(context, assembler, first, request_iterator, serialized=True)
        outcome = await self._locked(
            context, lambda: self.state.accept_contribution(header.run_id, header.domain, header.round, values), in_thread=True
        )
        if outcome.closed_round is not None:
            log.info("round %d closed", outcome.closed_round)
        self.changes.notify()
        return pb.Ack(header=header, accepted_round=outcome.accepted_round)

    async def PullConsensus(self, request: pb.PullRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """Stream Z for the domain's shared then receiver rows: the newest round >= min_round.

        Chunks are yielded as MatrixChunk wire bytes (see add_aggregator_to_server), each
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
        give_up = time.monotonic() + request.wait_s

        def newest() -> tuple[int, np.ndarray, np.ndarray] | None:
            """(round, Z, this domain's pull rows) of the newest consensus >= min_round, or None yet."""
            run = self.state.run
            # the case where consensus_for would return Z: answered here without it, because it
            # returns Z[pull_index] copied whole (256 MB at 1M x 64, in the event loop), which
            # the stream below would gather again chunk by chunk; that copy halved pull speed
            if (
                run is not None
                and run.run_id == header.run_id
                and header.domain in run.admitted
                and run.consensus is not None
                and run.consensus_round >= max(request.min_round, 1)
            ):
                return run.consensus_round, run.consensus, run.layout.per_domain[header.domain].pull_index
            # otherwise the state refuses (unknown run, domain not admitted, a wait that cannot end) or says wait
            found = self.state.consensus_for(header.run_id, header.domain, request.min_round)
            if found is None or run is None or run.consensus is None:
                return None
            return found[0], run.consensus, run.layout.per_domain[header.domain].pull_index

        while True:
            found = await self._locked(context, newest)
            if found is not None:
                break
            left = give_up - time.monotonic()
            if left <= 0:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no consensus of round >= {request.min_round} within {request.wait_s} s")
            await self.changes.wait(left)
        round_index, z, rows = found
        # z is never modified in place (each round builds a new array), so streaming it
        # outside the lock is safe even if the next round closes meanwhile
        reply_header = pb.Header(run_id=header.run_id, domain=header.domain, round=round_index)
        for chunk in encode_matrix_serialized(z, reply_header, dtype=dtype, row_index=rows):
            yield chunk

    async def ReportMetrics(self, request: pb.MetricsReport, context: grpc.aio.ServicerContext) -> pb.Ack:
        """Record the domain's validation metrics for header.round."""
        header = request.header
        await self._domain(context, header.domain)
        metrics = dict(request.metrics)
        await self._locked(context, lambda: self.state.report_metrics(header.run_id, header.domain, header.round, metrics))
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
        self.changes.notify()
        return run_info_to_proto(run)

    async def GetStatus(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.AggregatorStatus:
        """The current run and every registered domain."""
        await self._operator(context)
        async with self.lock:
            run = self.state.run
            status = pb.AggregatorStatus(run=run_info_to_proto(run))
            if run is not None:
                status.shared_users = run.layout.exchanged_rows
            for name, registration in sorted(self.state.registrations.items()):
                admitted = run is not None and name in run.admitted
                entry = pb.DomainStatus(domain=name, rows=len(registration.holder), admitted=admitted)
                if admitted and run is not None:
                    mine = run.layout.per_domain[name]
                    entry.shared_rows = len(mine.shared_rows)
                    entry.receiver_rows = len(mine.receiver_rows)
                    entry.latest_contribution_round = run.tags.get(name, 0)
                    entry.contributions = run.contribution_counts.get(name, 0)
                    reported = run.metrics.get(name, {})
                    if reported:
                        entry.latest_metrics.update(reported[max(reported)])
                status.domains.append(entry)
            return status

    async def WatchRun(self, request: pb.WatchRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.RoundEvent]:
        """Replay the run's events of rounds >= from_round, then follow until it ends.

        After the run ended the stream stays open up to FINAL_METRICS_GRACE_S for the final
        round's metrics (nodes evaluate after the last Z), ending early once every admitted
        domain reported them.
        """
        await self._operator(context)
        run_id = request.header.run_id
        run = self.state.run
        if run is None or (run_id and run.run_id != run_id):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown run {run_id!r}")
            return
        sent = 0
        ended_at: float | None = None
        while True:
            # index by index: events appended while a yield is suspended are sent in this pass
            # (a snapshot's length taken after the loop would count them as sent)
            while sent < len(run.events):
                event = run.events[sent]
                sent += 1
                if event.round >= request.from_round or event.kind in ("run_finished", "run_stopped"):
                    yield event_to_proto(run, event)
            if self.state.run is not run:
                return
            timeout = None
            if run.state != "running":
                final = run.consensus_round
                if run.state == "stopped" or all(final in run.metrics.get(d, {}) for d in run.admitted):
                    return
                ended_at = time.monotonic() if ended_at is None else ended_at
                timeout = ended_at + FINAL_METRICS_GRACE_S - time.monotonic()
                if timeout <= 0:
                    return
            await self.changes.wait(timeout)

    async def StopRun(self, request: pb.StopRunRequest, context: grpc.aio.ServicerContext) -> pb.RunInfo:
        """Stop the running run; nodes see FAILED_PRECONDITION on their next push or pull."""
        await self._operator(context)
        run = await self._locked(context, lambda: self.state.stop_run(request.header.run_id, request.reason), in_thread=True)
        self.changes.notify()
        return run_info_to_proto(run)


class _HandlerCapture:
    """Stands in for a server to receive the generated code's method handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        """Ignored: the same handlers also come through add_registered_method_handlers."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        """Keep the handlers by method name."""
        self.handlers.update(handlers)


def add_aggregator_to_server(service: AggregatorService, server: grpc.aio.Server) -> None:
    """Register the service as the generated code does, with the factor streams as wire bytes.

    PushContribution takes its MatrixChunk messages unparsed and PullConsensus yields them
    already serialised: the same bytes on the wire, but each 1 MB payload is copied once
    instead of three times (upb parse, .data read; tobytes, encoder, output), which was most of
    the CPU of a push and a pull.
    """
    capture = _HandlerCapture()
    pb_grpc.add_AggregatorServicer_to_server(service, capture)
    handlers = dict(capture.handlers)
    handlers["PushContribution"] = handlers["PushContribution"]._replace(request_deserializer=None)
    handlers["PullConsensus"] = handlers["PullConsensus"]._replace(response_serializer=None)
    name = pb.DESCRIPTOR.services_by_name["Aggregator"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


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
    credentials, authorizer, interceptors = security_from_config(config.tls)
    state = AggregatorState(config.state_dir, clock=clock, fsync=config.fsync_state)
    service = AggregatorService(state, authorizer)
    options = [*SERVER_OPTIONS, ("grpc.max_concurrent_streams", config.max_concurrent_streams)]
    server = grpc.aio.server(options=options, interceptors=interceptors)
    add_aggregator_to_server(service, server)
    health_service = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    port = server.add_secure_port(config.listen, credentials) if credentials is not None else server.add_insecure_port(config.listen)
    if port == 0:
        raise OSError(f"cannot bind the aggregator to {config.listen}")
    await server.start()
    service.start_task(service.deadline_loop())
    for name in HEALTH_SERVICE_NAMES:
        await health_service.set(name, health_pb2.HealthCheckResponse.SERVING)
    host = config.listen.rsplit(":", 1)[0]
    running = RunningAggregator(server, service, port, host, health_service)
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
                state = service.state
                if state.run is not None and state.run.state == "running":
                    return
                if len(state.registrations) >= params.min_domains:
                    state.start_run(params)
                    service.changes.notify()
                    return
            await service.changes.wait(None)

    running.service.start_task(starter())


def run_on_uvloop(main: Awaitable[None]) -> None:
    """Run a coroutine to completion on uvloop where available (Linux/macOS), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # Windows: the default loop works, just slower
        asyncio.run(main)  # type: ignore[arg-type]
        return
    uvloop.run(main)  # type: ignore[arg-type]


def serve(config: AggregatorConfig, on_ready: Callable[[RunningAggregator], Awaitable[None] | None] | None = None) -> None:
    """Serve until SIGINT or SIGTERM, on uvloop; `on_ready` gets the started server (e.g. to print its port)."""

    async def main() -> None:
        """Start, report ready, wait for SIGINT/SIGTERM, then stop gracefully."""
        running = await start_aggregator(config)
        if on_ready is not None:
            maybe = on_ready(running)
            if maybe is not None:
                await maybe
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("stopping the aggregator")
        await running.stop(grace=2.0)

    run_on_uvloop(main())
