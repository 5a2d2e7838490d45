"""Asynchronous tolerance with real node processes: one node frozen (SIGSTOP) past the round deadline."""

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.config import RunParams
from domain_node.aggregator_client import AggregatorClient
from protos.v1 import federation_pb2 as pb
from tests.federation_harness import Processes, processes_fixture, wait_for_checkpoints, wait_for_domains, write_domains

pytestmark = pytest.mark.timeout(90)
PAUSED_ROUNDS = 4


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """Real processes, killed at the end of the test."""
    yield from processes_fixture(tmp_path)


def test_a_paused_node_does_not_stop_the_run_and_rejoins(tmp_path: Path, processes: Processes) -> None:
    """cloth is SIGSTOPped for several deadlines: rounds close without it, sport keeps training and
    reporting, and once SIGCONTed cloth contributes again and ends on the final consensus."""
    files = write_domains(tmp_path / "data")
    _, address = processes.aggregator()
    cloth, _ = processes.nodes(files, address)["cloth"]
    rounds = 40
    params = RunParams(rounds=rounds, rank=6, round_deadline_s=0.3, min_domains=1, max_staleness=2)

    async def scenario() -> list[tuple[str, pb.RoundEvent]]:
        """Start the run, pause cloth after round 2 and resume it after enough missed rounds; the watched events."""
        timeline: list[tuple[str, pb.RoundEvent]] = []
        phase = "before"
        missed = 0
        async with AggregatorClient(address, rpc_timeout_s=10, retry_for_s=30) as control:
            await wait_for_domains(control, 2)
            run = await control.start_run(params)
            async for event in control.watch_run(run.run_id):
                timeline.append((phase, event))
                if event.kind != pb.EVENT_KIND_ROUND_CLOSED:
                    continue
                if phase == "before" and event.round >= 2:
                    cloth.send_signal(signal.SIGSTOP)
                    phase = "paused"
                elif phase == "paused" and "cloth" in event.missing:
                    missed += 1
                    if missed >= PAUSED_ROUNDS:
                        cloth.send_signal(signal.SIGCONT)
                        phase = "resumed"
        await wait_for_checkpoints(tmp_path, rounds)
        return timeline

    timeline = asyncio.run(scenario())
    closed = [(phase, event) for phase, event in timeline if event.kind == pb.EVENT_KIND_ROUND_CLOSED]
    assert [event.round for _, event in closed] == list(range(1, rounds + 1))
    assert any(event.kind == pb.EVENT_KIND_RUN_FINISHED for _, event in timeline)
    paused = [event for phase, event in closed if phase == "paused" and "cloth" in event.missing]
    assert len(paused) >= PAUSED_ROUNDS - 1 and all(list(event.contributors) == ["sport"] for event in paused)
    # sport went on: it reported validation metrics for the rounds closed without cloth
    paused_rounds = {event.round for event in paused}
    sport_metrics = {event.round: event.metrics["NDCG@10"] for _, event in timeline
                     if event.kind == pb.EVENT_KIND_METRICS and event.domain == "sport"}
    assert paused_rounds <= set(sport_metrics)
    assert sport_metrics[max(paused_rounds)] > sport_metrics[1], "sport's validation improves while cloth is away"
    # cloth came back: it contributes to rounds after SIGCONT and reports metrics again
    assert any("cloth" in event.contributors for phase, event in closed if phase == "resumed")
    cloth_rounds = {event.round for _, event in timeline if event.kind == pb.EVENT_KIND_METRICS and event.domain == "cloth"}
    assert max(cloth_rounds) == rounds
