"""Asynchronous tolerance: a node frozen (SIGSTOP) past the round deadline, and a node late for the last round."""

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydantic import SecretStr

from cdimf.aggregator.service import start_aggregator
from cdimf.aggregator.state import AggregatorState
from cdimf.common.config import AggregatorConfig, NodeConfig, RunParams, TLSConfig
from cdimf.common.rpc.aggregator_client import AggregatorClient
from cdimf.domain_node.checkpoint import load_checkpoint
from cdimf.domain_node.runner import NodeRunner
from cdimf.protos.v1 import federation_pb2 as pb
from tests.federation_harness import (
    DOMAINS,
    RANK,
    SECRET,
    Processes,
    ials,
    node_data,
    processes_fixture,
    seeds,
    wait_for_checkpoints,
    wait_for_domains,
    write_domains,
)

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


def test_a_node_late_for_the_last_round_still_applies_the_final_consensus(tmp_path: Path) -> None:
    """In-process aggregator and runners over loopback gRPC: cloth's push of the last round is held
    back until the round closed without it and the run finished. The aggregator refuses that push;
    cloth must then pull the final Z, checkpoint the last round and report it, not end early."""
    files = write_domains(tmp_path / "data")
    rounds = 3
    params = RunParams(rounds=rounds, rank=RANK, round_deadline_s=0.3, min_domains=1, max_staleness=2)

    def node_config(domain: str, aggregator: str) -> NodeConfig:
        """The node config of one test domain (plaintext loopback, its own state folder)."""
        return NodeConfig(domain=domain, train_path=files[domain]["train"], test_path=files[domain].get("test"), data_format="csv",
                          aggregator=aggregator, state_dir=tmp_path / domain, secret=SecretStr(SECRET), ials=ials(seeds()[domain]),
                          tls=TLSConfig(insecure=True))

    async def scenario() -> tuple[AggregatorState, dict[str, NodeRunner]]:
        """Both runners train the run; cloth's last push waits for the run to finish first."""
        aggregator = await start_aggregator(AggregatorConfig(listen="127.0.0.1:0", state_dir=tmp_path / "aggregator", tls=TLSConfig(insecure=True)))
        state = aggregator.service.state
        runners = {domain: NodeRunner(node_config(domain, aggregator.address), node_data(files, domain)) for domain in DOMAINS}
        tasks = []
        try:
            cloth = runners["cloth"]
            push = cloth._push

            async def late_push(run_id: str, round_index: int, values: np.ndarray) -> int:
                """cloth's push, held back on the last round until the run finished without it."""
                while round_index >= rounds and state.run is not None and state.run.state == "running":
                    await asyncio.sleep(0.02)
                return await push(run_id, round_index, values)

            cloth._push = late_push  # type: ignore[method-assign]
            tasks = [asyncio.create_task(runner.run()) for runner in runners.values()]
            async with AggregatorClient(aggregator.address, rpc_timeout_s=10, retry_for_s=30) as control:
                await wait_for_domains(control, 2)
                run = await control.start_run(params)
                _ = [event async for event in control.watch_run(run.run_id)]
            await wait_for_checkpoints(tmp_path, rounds, timeout_s=10.0)
            return state, runners
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for runner in runners.values():
                await runner.close()
            await aggregator.stop(0.5)

    state, runners = asyncio.run(scenario())
    run = state.run
    assert run is not None and run.state == "finished"
    last = next(event for event in run.events if event.kind == "round_closed" and event.round == rounds)
    assert last.missing == ["cloth"], "the scenario needs the last round closed without cloth"
    assert rounds in run.metrics["cloth"], "cloth reports the last round after pulling the final Z"
    assert runners["cloth"].progress.phase == "finished" and runners["cloth"].progress.round == rounds
    # cloth's receiver and dual state took the final Z: its consensus equals the aggregator's rows for it
    checkpoint = load_checkpoint(tmp_path / "cloth")
    assert checkpoint is not None and checkpoint.round == rounds and checkpoint.trainer.exchanges == rounds
    membership = run.memberships["cloth"]
    assert run.consensus is not None and checkpoint.trainer.consensus is not None
    np.testing.assert_array_equal(checkpoint.trainer.consensus, run.consensus[membership.shared_index])
