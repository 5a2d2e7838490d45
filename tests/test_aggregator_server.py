"""The aggregator over real sockets: a grpc.aio server on 127.0.0.1 (and a real process for restarts),
driven through cdimf.common.rpc.aggregator_client and raw stubs for malformed input."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
import scipy.sparse as sp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cdimf.aggregator.service import RunningAggregator, start_aggregator
from cdimf.common.config import AggregatorConfig, RunParams, TLSConfig
from cdimf.common.core.admm import consensus
from cdimf.common.core.membership import Membership
from cdimf.common.core.model import DomainTrainer
from cdimf.common.core.params import ADMMParams, IALSParams
from cdimf.common.rpc.aggregator_client import AggregatorClient, AggregatorError, Backoff
from cdimf.common.security.pseudonyms import pseudonymize
from cdimf.common.wire.chunks import encode_matrix, encode_registration
from cdimf.engine import CDIMFEngine, DomainInput
from cdimf.protos.v1 import federation_pb2 as pb
from cdimf.protos.v1 import federation_pb2_grpc as pb_grpc
from tests.aggregator_helpers import FakeClock
from tests.federation_harness import port_of, read_line
from tests.wire_capture import WireRecorder

SECRET = b"test-federation-secret-32-bytes!"
REPO_ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def aggregator(state_dir: Path, clock: Callable[[], float] = time.monotonic) -> AsyncIterator[RunningAggregator]:
    """A real aggregator server on a free loopback port (deadlines on `clock`)."""
    running = await start_aggregator(AggregatorConfig(listen="127.0.0.1:0", state_dir=state_dir, tls=TLSConfig(insecure=True)), clock=clock)
    try:
        yield running
    finally:
        await running.stop(grace=0.5)


def _keys(prefix: str, ids: range | list[int]) -> np.ndarray:
    """Raw user keys PREFIX<i>."""
    return np.array([f"{prefix}{i}" for i in ids])


async def _register_two(address: str, rows: int = 6) -> tuple[AggregatorClient, AggregatorClient]:
    """sport holds u0..u5, cloth holds u3..u8: u3..u5 shared."""
    sport, cloth = AggregatorClient(address, "sport"), AggregatorClient(address, "cloth")
    await sport.register(pseudonymize(_keys("u", range(rows)), SECRET), np.ones(rows, bool))
    await cloth.register(pseudonymize(_keys("u", range(3, 3 + rows)), SECRET), np.ones(rows, bool))
    return sport, cloth


# ----- equivalence with the in-process engine -----


def _domain_data(seed: int, n_users: int, n_items: int, empty_rows: list[int]) -> sp.csr_matrix:
    """A random interaction matrix with the given rows left empty (receivers)."""
    rng = np.random.default_rng(seed)
    dense = (rng.random((n_users, n_items)) < 0.15).astype(np.float32)
    dense[empty_rows] = 0  # receivers: registered with no interactions
    dense[np.arange(n_users), rng.integers(0, n_items, n_users)] = 1
    dense[empty_rows] = 0
    return sp.csr_matrix(dense)


async def _federated_domain(
    client: AggregatorClient, trainer: DomainTrainer, view: Membership, run_id: str, rounds: int, period: int
) -> None:
    """What a node does each round, in the order of the in-process engine."""
    for round_index in range(1, rounds + 1):
        await asyncio.to_thread(trainer.local_epochs, period)
        await client.push_contribution(run_id, round_index, trainer.contribution())
        z = await client.pull_consensus(run_id, round_index, 20.0, len(view.shared_rows), len(view.receiver_rows))
        assert z is not None and z.round == round_index
        trainer.receive_consensus(z.shared, z.receivers)


def test_synchronous_federated_run_equals_the_in_process_engine(tmp_path: Path) -> None:
    """Two domains through the real aggregator give the engine's factors (same seeds, l2 prox, other row orders)."""
    admm = ADMMParams(rho=1.5, prox="l2", lambda_z=0.2)
    sport_keys = _keys("u", range(0, 40))
    cloth_keys = _keys("u", range(25, 70))[::-1]  # another row order than sport's
    inputs = [
        DomainInput("sport", sport_keys, _domain_data(1, 40, 30, [3, 30]), IALSParams(rank=6, seed=1, threads=1), 1),
        DomainInput("cloth", cloth_keys, _domain_data(2, 45, 25, [5]), IALSParams(rank=6, seed=2, threads=1), 2),
    ]
    engine = CDIMFEngine(inputs, admm)
    engine.run(3)

    async def federated() -> list[DomainTrainer]:
        """Register, start a run and drive each domain's rounds through the aggregator."""
        async with aggregator(tmp_path) as running:
            clients = [AggregatorClient(running.address, d.name) for d in inputs]
            for client, domain in zip(clients, inputs):
                holds = np.diff(domain.train.indptr) > 0
                await client.register(pseudonymize(domain.user_keys, SECRET), holds)
            control = AggregatorClient(running.address)
            params = RunParams(rounds=3, rank=6, admm=admm, domain_aggregation_period={"cloth": 2})
            run = await control.start_run(params)
            trainers, tasks = [], []
            for client, domain in zip(clients, inputs):
                info = await client.wait_for_run(5.0)
                assert info is not None and info.run_id == run.run_id
                view = await client.get_membership(run.run_id)
                trainer = DomainTrainer(domain.name, domain.train, domain.params, admm.rho, view.shared_rows, view.receiver_rows)
                trainers.append(trainer)
                assert info.params is not None
                tasks.append(_federated_domain(client, trainer, view, run.run_id, 3, info.params.period_for(domain.name)))
            await asyncio.gather(*tasks)
            status = await control.get_status()
            assert status.run.state == pb.RUN_STATE_FINISHED and status.run.latest_consensus_round == 3
            for client in [*clients, control]:
                await client.close()
            return trainers

    trainers = asyncio.run(federated())
    for trainer, reference in zip(trainers, engine.trainers):
        np.testing.assert_array_equal(trainer.shared_rows, reference.shared_rows)
        np.testing.assert_array_equal(trainer.receiver_rows, reference.receiver_rows)
        for mine, theirs in [(trainer.state.users, reference.state.users), (trainer.state.items, reference.state.items),
                             (trainer.state.duals, reference.state.duals)]:
            np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6 * np.abs(theirs).max())
    assert len(trainers[0].shared_rows) > 5


# ----- bad input -----


def _chunks(run_id: str, domain: str, round_index: int, values: np.ndarray) -> list[pb.MatrixChunk]:
    """A contribution as two-row chunks (so that a stream has several to tamper with)."""
    return list(encode_matrix(values, pb.Header(run_id=run_id, domain=domain, round=round_index), chunk_bytes=2 * values.shape[1] * 4))


def _state_snapshot(running: RunningAggregator) -> tuple:
    """Everything a refused request must leave unchanged: rounds, Z, contributions, reporters, events, registrations."""
    run = running.state.run
    assert run is not None
    contributions = {d: (tag, values.tobytes()) for d, (tag, values) in run.contributions.items()}
    z = None if run.consensus is None else run.consensus.tobytes()
    return run.current_round, run.consensus_round, z, contributions, list(run.reported), len(run.events), len(running.state.registrations)


def test_bad_input_gets_the_right_status_and_changes_nothing(tmp_path: Path) -> None:
    """Malformed chunks, wrong shapes, NaN, unknown run or domain, replays and out-of-order rounds: the right status, no state change."""
    async def scenario() -> None:
        """Send each bad request and compare the state before and after."""
        async with aggregator(tmp_path) as running:
            sport, cloth = await _register_two(running.address)
            run = await AggregatorClient(running.address).start_run(RunParams(rounds=3, rank=4))
            good = np.ones((3, 4), np.float32)
            await sport.push_contribution(run.run_id, 1, good)
            before = _state_snapshot(running)
            stub = pb_grpc.AggregatorStub(sport.channel)

            corrupt = _chunks(run.run_id, "cloth", 1, good)
            corrupt[1].data = b"\x00" * len(corrupt[1].data)
            nan = good.copy()
            nan[2, 3] = np.nan
            gap = _chunks(run.run_id, "cloth", 1, good)
            del gap[0]
            cases = [
                ("checksum", corrupt, grpc.StatusCode.INVALID_ARGUMENT),
                ("missing chunk", gap, grpc.StatusCode.INVALID_ARGUMENT),
                ("wrong shape", _chunks(run.run_id, "cloth", 1, np.ones((4, 4), np.float32)), grpc.StatusCode.INVALID_ARGUMENT),
                ("wrong rank", _chunks(run.run_id, "cloth", 1, np.ones((3, 5), np.float32)), grpc.StatusCode.INVALID_ARGUMENT),
                ("NaN", _chunks(run.run_id, "cloth", 1, nan), grpc.StatusCode.INVALID_ARGUMENT),
                ("empty stream", [], grpc.StatusCode.INVALID_ARGUMENT),
                ("unknown run", _chunks("nope", "cloth", 1, good), grpc.StatusCode.NOT_FOUND),
                ("unknown domain", _chunks(run.run_id, "music", 1, good), grpc.StatusCode.NOT_FOUND),
                ("replayed round", _chunks(run.run_id, "sport", 1, good), grpc.StatusCode.ALREADY_EXISTS),
                ("future round", _chunks(run.run_id, "cloth", 2, good), grpc.StatusCode.FAILED_PRECONDITION),
            ]
            for label, chunks, code in cases:
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await stub.PushContribution(iter(chunks), timeout=5)
                assert error.value.code() == code, f"{label}: {error.value.details()}"
                assert _state_snapshot(running) == before, label

            # the server parses PushContribution's wire bytes itself: bytes that are no MatrixChunk
            raw_push = sport.channel.stream_unary("/cdimf.v1.Aggregator/PushContribution", request_serializer=None,
                                                  response_deserializer=pb.Ack.FromString)
            wire = [chunk.SerializeToString() for chunk in _chunks(run.run_id, "cloth", 1, good)]
            for label, messages in [("not protobuf", [b"\xff" * 16]), ("first chunk cut short", [wire[0][: len(wire[0]) // 2]]),
                                    ("later chunk cut short", [wire[0], wire[1][:-3]])]:
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await raw_push(iter(messages), timeout=5)
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{label}: {error.value.details()}"
                assert _state_snapshot(running) == before, label

            bad_registration = list(encode_registration(pseudonymize(["a", "b"], SECRET), np.ones(2, bool), pb.Header(domain="books")))
            bad_registration[0].crc32 ^= 1
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.Register(iter(bad_registration), timeout=5)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "checksum" in error.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.StartRun(pb.StartRunRequest(params=pb.RunParams(rounds=0, rank=4)), timeout=5)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "rounds" in error.value.details()
            with pytest.raises(AggregatorError) as client_error:
                await cloth.pull_consensus(run.run_id, 1, 0.1, 3, 0)
            assert client_error.value.code == grpc.StatusCode.FAILED_PRECONDITION  # cloth never pushed round 1
            with pytest.raises(AggregatorError) as client_error:
                await cloth.report_metrics("nope", 0, {"hr": 0.5})
            assert client_error.value.code == grpc.StatusCode.NOT_FOUND
            assert _state_snapshot(running) == before
            # and the run still works afterwards
            await cloth.push_contribution(run.run_id, 1, 3 * good)
            z = await sport.pull_consensus(run.run_id, 1, 5.0, 3, 0)
            assert z is not None and z.round == 1
            np.testing.assert_array_equal(z.shared, 2 * good)
            for client in (sport, cloth):
                await client.close()

    asyncio.run(scenario())


# ----- waiting, deadlines, staleness, events -----


def test_pull_waits_for_the_round_and_times_out_without_one(tmp_path: Path) -> None:
    """A pull waits for its round's Z and gives up with DEADLINE_EXCEEDED without one."""
    async def scenario() -> None:
        """One pull that is answered once the round closes, one that times out."""
        async with aggregator(tmp_path) as running:
            sport, cloth = await _register_two(running.address)
            run = await AggregatorClient(running.address).start_run(RunParams(rounds=2, rank=4))
            await sport.push_contribution(run.run_id, 1, np.ones((3, 4), np.float32))
            assert await sport.pull_consensus(run.run_id, 1, 0.2, 3, 0) is None
            waiting = asyncio.ensure_future(sport.pull_consensus(run.run_id, 1, 10.0, 3, 0))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            await cloth.push_contribution(run.run_id, 1, np.full((3, 4), 3.0, np.float32))
            z = await waiting
            assert z is not None and z.round == 1 and np.all(z.shared == 2.0)
            half = await cloth.pull_consensus(run.run_id, 1, 1.0, 3, 0, dtype="float16")
            assert half is not None and np.all(half.shared == 2.0)

    asyncio.run(scenario())


def test_a_silent_domain_does_not_stop_rounds_past_the_deadline(tmp_path: Path) -> None:
    """With a deadline, rounds close on one domain's pushes while the other stays silent.

    The deadline runs on a clock the test moves: a round closes by deadline only when the test
    says so, so a stalled scheduler cannot close round 3 before cloth's late push lands in it.
    """
    clock = FakeClock()

    async def scenario() -> None:
        """Only sport pushes; rounds still close at their deadline."""
        async with aggregator(tmp_path, clock) as running:
            sport, cloth = await _register_two(running.address)
            params = RunParams(rounds=4, rank=4, round_deadline_s=0.2, min_domains=1, max_staleness=1)
            run = await AggregatorClient(running.address).start_run(params)
            for round_index in (1, 2):
                await sport.push_contribution(run.run_id, round_index, np.full((3, 4), float(round_index), np.float32))
                # the deadline loop re-reads the clock at least every 0.2 s of real time
                clock.now += 0.25
                z = await sport.pull_consensus(run.run_id, round_index, 5.0, 3, 0)
                assert z is not None and z.round == round_index and np.all(z.shared == round_index)
            # cloth comes back: it first catches up on the newest Z (returned at once) ...
            newest = await cloth.pull_consensus(run.run_id, 1, 0.0, 3, 0)
            assert newest is not None and newest.round == 2 and np.all(newest.shared == 2.0)
            # ... and its round-2 contribution is one round stale, so it counts in round 3
            late = await cloth.push_contribution(run.run_id, 2, np.full((3, 4), 10.0, np.float32))
            assert late.accepted_round == 3
            with pytest.raises(AggregatorError) as error:
                await cloth.push_contribution(run.run_id, 1, np.zeros((3, 4), np.float32))
            assert error.value.code == grpc.StatusCode.FAILED_PRECONDITION
            await sport.push_contribution(run.run_id, 3, np.full((3, 4), 4.0, np.float32))
            z = await cloth.pull_consensus(run.run_id, 2, 5.0, 3, 0)
            assert z is not None and z.round == 3 and np.all(z.shared == 7.0)

    asyncio.run(scenario())


def test_watch_run_streams_rounds_and_metrics(tmp_path: Path) -> None:
    """WatchRun replays and follows round closes and metrics; GetStatus shows each domain's latest metrics."""
    async def scenario() -> None:
        """Two rounds with metrics, followed by a watch."""
        async with aggregator(tmp_path) as running:
            sport, cloth = await _register_two(running.address)
            control = AggregatorClient(running.address)
            run = await control.start_run(RunParams(rounds=2, rank=4))
            events: list[pb.RoundEvent] = []

            async def watch() -> None:
                async for event in control.watch_run(run.run_id):
                    events.append(event)

            watcher = asyncio.ensure_future(watch())
            for round_index in (1, 2):
                for client in (sport, cloth):
                    await client.push_contribution(run.run_id, round_index, np.ones((3, 4), np.float32))
                await sport.report_metrics(run.run_id, round_index, {"hr@10": 0.1 * round_index})
            await asyncio.sleep(0.1)
            assert not watcher.done(), "the watch waits for cloth's final metrics"
            await cloth.report_metrics(run.run_id, 2, {"hr@10": 0.5})
            await asyncio.wait_for(watcher, 5)
            kinds = [(pb.EventKind.Name(e.kind), e.round) for e in events]
            # the final round's metrics arrive after the run finished; the watch waits for them
            assert kinds == [
                ("EVENT_KIND_RUN_STARTED", 0), ("EVENT_KIND_ROUND_CLOSED", 1), ("EVENT_KIND_METRICS", 1),
                ("EVENT_KIND_ROUND_CLOSED", 2), ("EVENT_KIND_RUN_FINISHED", 2), ("EVENT_KIND_METRICS", 2),
                ("EVENT_KIND_METRICS", 2),
            ]
            assert list(events[1].contributors) == ["cloth", "sport"]
            assert events[2].domain == "sport" and events[2].metrics["hr@10"] == pytest.approx(0.1)
            assert {events[5].domain, events[6].domain} == {"sport", "cloth"}
            status = await control.get_status()
            latest = {d.domain: dict(d.latest_metrics) for d in status.domains}
            assert latest == {"sport": {"hr@10": pytest.approx(0.2)}, "cloth": {"hr@10": pytest.approx(0.5)}}

    asyncio.run(scenario())


def test_watch_sends_events_that_arrive_while_it_sends_others(tmp_path: Path) -> None:
    """Metrics appended while WatchRun is suspended at a yield are still sent, before it ends.

    Both domains report the final round while the watch is sending its first event: an end
    check that counted them as sent would close the stream without them (seen as a launcher
    that printed one domain's final metrics only).
    """
    async def scenario() -> None:
        """A one-round run, finished; the servicer's stream is driven by hand around the reports."""
        async with aggregator(tmp_path) as running:
            sport, cloth = await _register_two(running.address)
            run = await AggregatorClient(running.address).start_run(RunParams(rounds=1, rank=4))
            for client in (sport, cloth):
                await client.push_contribution(run.run_id, 1, np.ones((3, 4), np.float32))
            request = pb.WatchRequest(header=pb.Header(run_id=run.run_id))
            # AllowAll (plaintext) never reads the context
            stream = running.service.WatchRun(request, None)  # type: ignore[arg-type]
            first = await anext(stream)
            await sport.report_metrics(run.run_id, 1, {"hr@10": 0.25})
            await cloth.report_metrics(run.run_id, 1, {"hr@10": 0.5})
            rest = [event async for event in stream]
            kinds = [pb.EventKind.Name(e.kind) for e in [first, *rest]]
            assert kinds == ["EVENT_KIND_RUN_STARTED", "EVENT_KIND_ROUND_CLOSED", "EVENT_KIND_RUN_FINISHED",
                             "EVENT_KIND_METRICS", "EVENT_KIND_METRICS"]
            assert [e.domain for e in rest[2:]] == ["sport", "cloth"]

    asyncio.run(scenario())


def test_a_large_matrix_crosses_with_default_message_limits(tmp_path: Path) -> None:
    """120k x 64 float32 (31 MB, 7x gRPC's 4 MB default) each way."""
    rows = 120_000

    async def scenario() -> None:
        """Register 120k rows on both domains, push and pull one round."""
        async with aggregator(tmp_path) as running:
            sport, cloth = AggregatorClient(running.address, "sport"), AggregatorClient(running.address, "cloth")
            # random digests stand in for pseudonyms: hashing 120k keys is not what this tests
            digests = np.random.default_rng(5).integers(0, 256, (rows, 32), dtype=np.uint8)
            await sport.register(digests, np.ones(rows, bool))
            await cloth.register(digests, np.ones(rows, bool))
            run = await AggregatorClient(running.address).start_run(RunParams(rounds=1, rank=64))
            values = np.random.default_rng(0).standard_normal((rows, 64)).astype(np.float32)
            await sport.push_contribution(run.run_id, 1, values)
            await cloth.push_contribution(run.run_id, 1, values)
            z = await sport.pull_consensus(run.run_id, 1, 10.0, rows, 0)
            assert z is not None
            np.testing.assert_array_equal(z.shared, values)

    asyncio.run(scenario())


# ----- the standard health service -----


def test_health_is_serving_once_listening_and_not_serving_while_stopping(tmp_path: Path) -> None:
    """A health Watch of both names sees SERVING on a fresh aggregator, then NOT_SERVING as soon as stop() begins."""
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

    async def scenario() -> None:
        """Check both names, then watch the status across stop()."""
        running = await start_aggregator(AggregatorConfig(listen="127.0.0.1:0", state_dir=tmp_path, tls=TLSConfig(insecure=True)))
        stopping: asyncio.Future[None] | None = None
        try:
            async with grpc.aio.insecure_channel(running.address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                for name in ("", "cdimf.v1.Aggregator"):
                    assert (await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status == serving
                watch = stub.Watch(health_pb2.HealthCheckRequest(service="cdimf.v1.Aggregator"), timeout=10)
                assert (await watch.read()).status == serving
                stopping = asyncio.ensure_future(running.stop(grace=2.0))
                assert (await watch.read()).status == not_serving
                watch.cancel()
        finally:
            await (stopping if stopping is not None else running.stop(grace=0.5))

    asyncio.run(scenario())


# ----- a real process killed and restarted -----


def _spawn(port: int, state_dir: Path) -> tuple[subprocess.Popen[str], int]:
    """`python -m cdimf.aggregator` on `port` (0: any free one) and a state folder, once it prints LISTENING; (process, its port)."""
    environ = {**os.environ, "CDIMF_LISTEN": f"127.0.0.1:{port}", "CDIMF_STATE_DIR": str(state_dir), "CDIMF_TLS__INSECURE": "true"}
    process = subprocess.Popen(
        [sys.executable, "-m", "cdimf.aggregator", "--log-level", "WARNING"],
        cwd=REPO_ROOT, env=environ, stdout=subprocess.PIPE, text=True,
    )
    assert process.stdout is not None
    line = read_line(process.stdout, 60, lambda: process.poll() is None)
    assert line.startswith("LISTENING "), line
    return process, port_of(line.split(" ", 1)[1])


def test_sigkilled_aggregator_restarts_from_its_state_and_nodes_reconnect(tmp_path: Path, aggregator_processes: list) -> None:
    """SIGKILL between rounds: a restarted aggregator resumes the run from its state and retrying clients finish it."""
    first, port = _spawn(0, tmp_path)  # the restart below comes back on the port this one got
    aggregator_processes.append(first)
    address = f"127.0.0.1:{port}"
    admm = ADMMParams(rho=1.0, prox="l2", lambda_z=0.5)
    rng = np.random.default_rng(3)
    pushes = {(d, r): rng.standard_normal((3, 4)).astype(np.float32) for d in ("sport", "cloth") for r in (1, 2)}

    async def scenario() -> None:
        """Round 1, kill, push while down, restart, round 2 equals the expected consensus."""
        backoff = Backoff(initial_s=0.05, max_s=0.3)
        sport = AggregatorClient(address, "sport", rpc_timeout_s=5, retry_for_s=20, backoff=backoff, seed=1)
        cloth = AggregatorClient(address, "cloth", rpc_timeout_s=5, retry_for_s=20, backoff=backoff, seed=2)
        for client, first in ((sport, 0), (cloth, 3)):
            await client.register(pseudonymize(_keys("u", range(first, first + 6)), SECRET), np.ones(6, bool))
        run = await AggregatorClient(address).start_run(RunParams(run_id="r1", rounds=2, rank=4, admm=admm))
        for domain, client in (("sport", sport), ("cloth", cloth)):
            await client.push_contribution(run.run_id, 1, pushes[domain, 1])
        assert (await sport.pull_consensus(run.run_id, 1, 5.0, 3, 0)).round == 1

        aggregator_processes[0].send_signal(signal.SIGKILL)
        aggregator_processes[0].wait(5)
        # pushes while the aggregator is down retry with backoff until it is back
        pending = asyncio.ensure_future(sport.push_contribution(run.run_id, 2, pushes["sport", 2]))
        await asyncio.sleep(0.3)
        assert not pending.done()
        aggregator_processes.append((await asyncio.to_thread(_spawn, port, tmp_path))[0])
        assert (await pending).accepted_round == 2
        await cloth.push_contribution(run.run_id, 2, pushes["cloth", 2])
        z = await cloth.pull_consensus(run.run_id, 2, 5.0, 3, 0)
        assert z is not None and z.round == 2
        expected, _ = consensus([(np.arange(3), pushes["sport", 2]), (np.arange(3), pushes["cloth", 2])], 3, 4, admm)
        np.testing.assert_array_equal(z.shared, expected)
        for client in (sport, cloth):
            await client.close()

    asyncio.run(scenario())


# ----- privacy: what a domain's client puts on the wire -----


def test_a_domain_sends_only_headers_pseudonyms_and_shared_factor_rows(tmp_path: Path) -> None:
    """A client's captured traffic holds headers, pseudonyms and shared rows' factors, never raw user keys."""
    raw_keys = np.array([f"customer-{i:04d}@shop.example" for i in range(30)])
    capture = WireRecorder()

    async def scenario() -> None:
        """One round of sport (recorded) and cloth through the real aggregator."""
        async with aggregator(tmp_path) as running:
            sport = AggregatorClient(running.address, "sport", interceptors=capture.interceptors())
            cloth = AggregatorClient(running.address, "cloth")
            holds = np.arange(30) % 7 != 0
            await sport.register(pseudonymize(raw_keys, SECRET), holds)
            await cloth.register(pseudonymize(raw_keys[10:], SECRET), np.ones(20, bool))
            run = await AggregatorClient(running.address).start_run(RunParams(rounds=1, rank=4))
            info = await sport.wait_for_run(1.0)
            view = await sport.get_membership(info.run_id)
            x = np.random.default_rng(0).standard_normal((len(view.shared_rows), 4)).astype(np.float32)
            await sport.push_contribution(run.run_id, 1, x)
            cloth_view = await cloth.get_membership(run.run_id)
            await cloth.push_contribution(run.run_id, 1, np.zeros((len(cloth_view.shared_rows), 4), np.float32))
            assert (await sport.pull_consensus(run.run_id, 1, 5.0, len(view.shared_rows), len(view.receiver_rows))).round == 1
            await sport.report_metrics(run.run_id, 1, {"hr@10": 0.3})

    asyncio.run(scenario())
    methods = {method.rsplit("/", 1)[1] for method, _ in capture.sent}
    assert methods == {"Register", "WaitForRun", "GetMembership", "PushContribution", "PullConsensus", "ReportMetrics"}
    wire = b"".join(message.SerializeToString() for _, message in capture.sent)
    for key in raw_keys:
        assert key.encode() not in wire and key.split("@")[0].encode() not in wire
    digests = pseudonymize(raw_keys, SECRET)
    for method, message in capture.sent:
        assert message.header.domain == "sport"
        if method.endswith("Register"):
            assert message.pseudonyms == digests[message.row_offset : message.row_offset + message.rows].tobytes()
        if method.endswith("PushContribution"):
            # only the shared rows (held here and elsewhere) cross: 20 of 30 minus the non-holders
            shared = np.flatnonzero((np.arange(30) >= 10) & (np.arange(30) % 7 != 0))
            assert message.total_rows == len(shared) and message.cols == 4


def test_a_configured_run_starts_once_enough_domains_registered(tmp_path: Path) -> None:
    """AggregatorConfig.run starts by itself once min_domains domains registered."""
    async def scenario() -> None:
        """Register one domain (no run yet), then the second (the run starts)."""
        params = RunParams(run_id="auto", rounds=1, rank=4, min_domains=2)
        config = AggregatorConfig(listen="127.0.0.1:0", state_dir=tmp_path, tls=TLSConfig(insecure=True), run=params)
        running = await start_aggregator(config)
        try:
            sport = AggregatorClient(running.address, "sport")
            await sport.register(pseudonymize(_keys("u", range(6)), SECRET), np.ones(6, bool))
            assert await sport.wait_for_run(0.2) is None, "one domain is below min_domains"
            cloth = AggregatorClient(running.address, "cloth")
            await cloth.register(pseudonymize(_keys("u", range(3, 9)), SECRET), np.ones(6, bool))
            info = await sport.wait_for_run(5.0)
            assert info is not None and info.run_id == "auto" and info.admitted_domains == ("cloth", "sport")
        finally:
            await running.stop(grace=0.5)

    asyncio.run(scenario())
