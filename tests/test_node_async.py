"""Asynchronous tolerance: a node frozen (SIGSTOP) past the round deadline, and a node late for the last round."""

import asyncio
import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from cdimf.aggregator.service import start_aggregator
from cdimf.common.config import AggregatorConfig, RunParams, TLSConfig
from cdimf.common.rpc.aggregator_client import AggregatorClient
from cdimf.domain_node.checkpoint import load_checkpoint
from cdimf.protos.v1 import federation_pb2 as pb
from cdimf.protos.v1 import federation_pb2_grpc as pb_grpc
from tests.aggregator_helpers import FakeClock
from tests.federation_harness import (
    RANK,
    Processes,
    run_with_cloth_late_for_the_last_round,
    wait_for_checkpoints,
    wait_for_domains,
    write_domains,
)

pytestmark = pytest.mark.timeout(90)
PAUSED_ROUNDS = 4
DEADLINE_S = 0.3
POLL_S = 0.02



def test_a_paused_node_does_not_stop_the_run_and_rejoins(tmp_path: Path, processes: Processes) -> None:
    """cloth is SIGSTOPped for several deadlines: rounds close without it, sport keeps training and
    reporting, and once SIGCONTed cloth contributes again and ends on the final consensus.

    The aggregator runs in this process on a clock the test moves (its gRPC server and both
    nodes are real): a round's deadline passes only when the test, having seen sport's push of
    that round while cloth is stopped, moves the clock past it. Outside the pause no deadline
    ever passes, so every other round closes with both domains, however slow the machine is.
    """
    files = write_domains(tmp_path / "data")
    rounds = 12
    params = RunParams(rounds=rounds, rank=RANK, round_deadline_s=DEADLINE_S, min_domains=1, max_staleness=2)
    clock = FakeClock()

    async def scenario() -> tuple[list[tuple[str, pb.RoundEvent]], dict[str, int]]:
        """Pause cloth after round 2, close PAUSED_ROUNDS rounds on sport alone by moving the clock, resume cloth."""
        aggregator = await start_aggregator(AggregatorConfig(listen="127.0.0.1:0", state_dir=tmp_path / "aggregator",
                                                             tls=TLSConfig(insecure=True)), clock=clock)
        timeline: list[tuple[str, pb.RoundEvent]] = []
        phase = "before"
        epochs: dict[str, int] = {}
        try:
            nodes = await asyncio.to_thread(processes.nodes, files, aggregator.address)
            cloth = nodes["cloth"][0]
            async with AggregatorClient(aggregator.address, rpc_timeout_s=10, retry_for_s=30) as control, \
                    grpc.aio.insecure_channel(nodes["sport"][1]) as channel:
                sport = pb_grpc.DomainNodeStub(channel)
                await wait_for_domains(control, 2)
                run = await control.start_run(params)

                async def close_rounds_without_cloth() -> None:
                    """While cloth is stopped: once sport pushed the open round, move the clock past its deadline
                    (PAUSED_ROUNDS times; cloth cannot have pushed that round, or it would have closed already)."""
                    moved_for, moves, give_up = first_paused, 0, time.monotonic() + 60
                    while moves < PAUSED_ROUNDS:
                        assert time.monotonic() < give_up, "sport did not push the rounds of the pause"
                        status = await control.get_status()
                        open_round = status.run.current_round
                        pushed = {domain.domain: domain.latest_contribution_round for domain in status.domains}
                        if pushed.get("sport", 0) >= open_round > moved_for:
                            clock.now += DEADLINE_S + 1.0
                            aggregator.service.changes.notify()  # wake the deadline loop now
                            moved_for, moves = open_round, moves + 1
                        await asyncio.sleep(POLL_S)

                mover: asyncio.Task[None] | None = None
                missed = first_paused = 0
                async for event in control.watch_run(run.run_id):
                    timeline.append((phase, event))
                    if event.kind != pb.EVENT_KIND_ROUND_CLOSED:
                        continue
                    if phase == "before" and event.round >= 2:
                        cloth.send_signal(signal.SIGSTOP)
                        phase, first_paused = "paused", event.round
                        epochs["paused"] = (await sport.GetStatus(pb.StatusRequest(), timeout=10)).epochs
                        mover = asyncio.create_task(close_rounds_without_cloth())
                    elif phase == "paused" and "cloth" in event.missing:
                        missed += 1
                        if missed >= PAUSED_ROUNDS:
                            phase = "resumed"
                            assert mover is not None
                            await mover
                            epochs["resumed"] = (await sport.GetStatus(pb.StatusRequest(), timeout=10)).epochs
                            cloth.send_signal(signal.SIGCONT)
                await wait_for_checkpoints(tmp_path, rounds)
        finally:
            await aggregator.stop(0.5)
        return timeline, epochs

    timeline, epochs = asyncio.run(scenario())
    closed = [(phase, event) for phase, event in timeline if event.kind == pb.EVENT_KIND_ROUND_CLOSED]
    assert [event.round for _, event in closed] == list(range(1, rounds + 1))
    assert any(event.kind == pb.EVENT_KIND_RUN_FINISHED for _, event in timeline)
    # exactly the rounds the test let time out closed without cloth, each on sport alone
    paused = [event for phase, event in closed if "cloth" in event.missing]
    assert len(paused) == PAUSED_ROUNDS and all(list(event.contributors) == ["sport"] for event in paused), paused
    assert all(phase != "before" for phase, event in closed if "cloth" in event.missing)
    # sport went on: it trained (its epoch count grew while cloth was stopped) and reported
    # validation metrics for every round closed without cloth
    assert epochs["resumed"] > epochs["paused"], epochs
    sport_metrics = {event.round for _, event in timeline if event.kind == pb.EVENT_KIND_METRICS and event.domain == "sport"}
    assert {event.round for event in paused} <= sport_metrics
    # cloth came back: it contributes to rounds after SIGCONT, the rest closed with both, and it reports the last round
    resumed = [event for phase, event in closed if phase == "resumed"]
    assert resumed and all(sorted(event.contributors) == ["cloth", "sport"] for event in resumed[1:]), resumed
    cloth_rounds = {event.round for _, event in timeline if event.kind == pb.EVENT_KIND_METRICS and event.domain == "cloth"}
    assert max(cloth_rounds) == rounds


def test_a_node_late_for_the_last_round_still_applies_the_final_consensus(tmp_path: Path) -> None:
    """In-process aggregator and runners over loopback gRPC: cloth's push of the last round is held
    back until the round closed without it and the run finished. The aggregator refuses that push;
    cloth must then pull the final Z, checkpoint the last round and report it, not end early.

    The aggregator's clock is the test's: no deadline passes until cloth's last push is held, so
    the earlier rounds close with both domains however slow the machine is."""
    files = write_domains(tmp_path / "data")
    rounds = 3
    params = RunParams(rounds=rounds, rank=RANK, round_deadline_s=DEADLINE_S, min_domains=1, max_staleness=2)
    clock = FakeClock()

    state, runners = asyncio.run(run_with_cloth_late_for_the_last_round(tmp_path, files, params, clock))
    run = state.run
    assert run is not None and run.state == "finished"
    last = next(event for event in run.events if event.kind == "round_closed" and event.round == rounds)
    assert last.missing == ["cloth"], "the scenario needs the last round closed without cloth"
    earlier = [event.missing for event in run.events if event.kind == "round_closed" and event.round < rounds]
    assert earlier == [[]] * (rounds - 1), "no deadline passed before the test moved the clock"
    assert rounds in run.metrics["cloth"], "cloth reports the last round after pulling the final Z"
    assert runners["cloth"].progress.phase == "finished" and runners["cloth"].progress.round == rounds
    # cloth's receiver and dual state took the final Z: its consensus equals the aggregator's rows for it
    checkpoint = load_checkpoint(tmp_path / "cloth")
    assert checkpoint is not None and checkpoint.round == rounds and checkpoint.trainer.exchanges == rounds
    membership = run.memberships["cloth"]
    assert run.consensus is not None and checkpoint.trainer.consensus is not None
    np.testing.assert_array_equal(checkpoint.trainer.consensus, run.consensus[membership.shared_index])
