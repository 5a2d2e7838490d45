"""The federation as real processes on 127.0.0.1: `cdimf serve-aggregator` + two `cdimf serve-node`,
driven through the control API; the result is compared with the in-process engine."""

import asyncio
import signal
from pathlib import Path

import grpc
import numpy as np
import pytest

from cdimf.common.config import RunParams
from cdimf.common.core.params import ADMMParams
from cdimf.common.rpc.aggregator_client import AggregatorClient
from cdimf.protos.v1 import federation_pb2 as pb
from cdimf.protos.v1 import federation_pb2_grpc as pb_grpc
from tests.federation_harness import (
    Processes,
    assert_matches_engine,
    checkpoints,
    node_data,
    port_of,
    reference_engine,
    user_key,
    wait_for_checkpoints,
    wait_for_domains,
    write_domains,
)

pytestmark = pytest.mark.timeout(90)
ADMM = ADMMParams(rho=1.5, prox="l2", lambda_z=0.2)
# each node its own local hyperparameters (only the rank is the run's)
LOCAL = {"sport": {"alpha": 0.05, "lam": 0.3, "nu": 0.0}, "cloth": {"alpha": 0.3, "lam": 0.8, "nu": 0.5}}



async def _run_to_end(address: str, params: RunParams, folder: Path) -> list[pb.RoundEvent]:
    """Start a run once both nodes registered; follow it to its end; wait for the final checkpoints."""
    async with AggregatorClient(address, rpc_timeout_s=10, retry_for_s=30) as control:
        await wait_for_domains(control, 2)
        run = await control.start_run(params)
        events = [event async for event in control.watch_run(run.run_id)]
    await wait_for_checkpoints(folder, params.rounds)
    return events


def test_a_synchronous_federated_run_of_processes_reproduces_the_engine(tmp_path: Path, processes: Processes) -> None:
    """Separate node processes, each with its own alpha/lam/nu, gRPC on loopback: X, Y and U equal the engine's to 1e-5 relative."""
    files = write_domains(tmp_path / "data")
    processes.local = LOCAL
    _, address = processes.aggregator()
    processes.nodes(files, address)
    params = RunParams(rounds=4, rank=6, admm=ADMM, domain_aggregation_period={"cloth": 2}, min_domains=2)
    events = asyncio.run(_run_to_end(address, params, tmp_path))
    kinds = [pb.EventKind.Name(event.kind) for event in events]
    assert kinds.count("EVENT_KIND_ROUND_CLOSED") == 4 and "EVENT_KIND_RUN_FINISHED" in kinds
    # every domain reported validation metrics for every round
    reported = {(event.domain, event.round) for event in events if event.kind == pb.EVENT_KIND_METRICS}
    assert reported == {(d, r) for d in ("sport", "cloth") for r in range(1, 5)}
    found = checkpoints(tmp_path)
    assert len(found["sport"].receiver_rows) == 2, "users 90, 91 are cold in sport, held by cloth"
    assert_matches_engine(found, reference_engine(files, ADMM, 4, {"cloth": 2}, LOCAL))
    # the nodes really trained with their own values: the engine with one shared set differs
    shared = reference_engine(files, ADMM, 4, {"cloth": 2})
    assert not np.allclose(found["cloth"].trainer.items, shared.trainers[1].state.items, rtol=1e-3)


async def _node_call(address: str, method: str, request: object) -> object:
    """One plaintext DomainNode call to a node process."""
    async with grpc.aio.insecure_channel(address) as channel:
        return await getattr(pb_grpc.DomainNodeStub(channel), method)(request, timeout=10)


def test_node_server_serves_status_evaluate_and_cold_start_recommendations(tmp_path: Path, processes: Processes) -> None:
    """After a run: GetStatus, Evaluate on test, Recommend for a warm and a cold-start user key."""
    files = write_domains(tmp_path / "data")
    _, address = processes.aggregator()
    _, sport = processes.nodes(files, address)["sport"]
    asyncio.run(_run_to_end(address, RunParams(rounds=2, rank=6, min_domains=2), tmp_path))
    engine_free = checkpoints(tmp_path)["sport"]

    status = asyncio.run(_node_call(sport, "GetStatus", pb.StatusRequest()))
    assert status.domain == "sport" and status.round == 2 and status.phase == "finished"
    assert status.receiver_rows == 2 and status.shared_rows == len(engine_free.shared_rows) and "HR@10" in status.latest_metrics
    evaluated = asyncio.run(_node_call(sport, "Evaluate", pb.EvaluateRequest(split="test", k=10)))
    assert evaluated.users == 4 and evaluated.metrics["round"] == 2
    # HR@10 / NDCG@10 by brute force from the checkpoint: rank = 1 + negatives (not trained on) scoring >= the target
    data = node_data(files, "sport")
    assert data.test is not None
    vectors = engine_free.trainer.users.astype(np.float64).copy()
    vectors[engine_free.receiver_rows] = engine_free.trainer.receiver_consensus
    trained = data.train.toarray() > 0
    ranks = []
    for row, candidates in zip(data.test.users, data.test.candidates):
        scores = engine_free.trainer.items.astype(np.float64)[candidates] @ vectors[row]
        negatives = [j for j in range(1, len(candidates)) if not trained[row, candidates[j]]]
        ranks.append(1 + sum(scores[j] >= scores[0] for j in negatives))
    assert evaluated.metrics["HR@10"] == pytest.approx(np.mean([r <= 10 for r in ranks]), abs=1e-6)
    assert evaluated.metrics["NDCG@10"] == pytest.approx(np.mean([1 / np.log2(r + 1) if r <= 10 else 0.0 for r in ranks]), abs=1e-6)

    warm = asyncio.run(_node_call(sport, "Recommend", pb.RecommendRequest(user_key=user_key(3), k=5)))
    assert len(warm.items) == 5 and not warm.cold_start and list(warm.scores) == sorted(warm.scores, reverse=True)
    seen = {line.split(",")[1] for line in files["sport"]["train"].read_text().splitlines() if line.startswith(user_key(3) + ",")}
    assert seen and not seen & set(warm.items), "seen items are left out by default"
    # the top 5 by X_u . Y over the items user 3 did not train on, computed here
    warm_row = data.users.index_of(np.array([user_key(3)]))[0]
    warm_scores = engine_free.trainer.items.astype(np.float64) @ engine_free.trainer.users[warm_row].astype(np.float64)
    warm_scores[trained[warm_row]] = -np.inf
    best = np.argsort(-warm_scores, kind="stable")[:5]
    assert list(warm.items) == [str(key) for key in data.items.keys[best]]
    np.testing.assert_allclose(warm.scores, warm_scores[best], rtol=1e-5)
    cold = asyncio.run(_node_call(sport, "Recommend", pb.RecommendRequest(user_key=user_key(90), k=5)))
    assert cold.cold_start and len(cold.items) == 5
    # scored with its consensus vector: the ranking equals Z_user . Y
    row = node_data(files, "sport").users.index_of(np.array([user_key(90)]))[0]
    receiver = int(np.flatnonzero(engine_free.receiver_rows == row)[0])
    z = engine_free.trainer.receiver_consensus[receiver]
    scores = engine_free.trainer.items @ z
    cold_best = np.argsort(-scores.astype(np.float64), kind="stable")[:5]
    assert list(cold.items) == [str(key) for key in data.items.keys[cold_best]]
    np.testing.assert_allclose(cold.scores, scores[cold_best], rtol=1e-5)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        asyncio.run(_node_call(sport, "Recommend", pb.RecommendRequest(user_key="nobody", k=5)))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_sigkilled_aggregator_and_node_resume_and_equal_the_uninterrupted_run(tmp_path: Path, processes: Processes) -> None:
    """SIGKILL the aggregator mid-run and restart it on its port, then the same for a node: same factors."""
    files = write_domains(tmp_path / "data")
    aggregator, address = processes.aggregator()
    port = port_of(address)
    nodes = {domain: process for domain, (process, _) in processes.nodes(files, address).items()}
    rounds = 30
    params = RunParams(rounds=rounds, rank=6, admm=ADMM, min_domains=2)

    async def scenario() -> None:
        """Start the run, kill and restart the aggregator, then a node, and wait for the final checkpoints."""
        nonlocal aggregator
        control = AggregatorClient(address, rpc_timeout_s=10, retry_for_s=30)
        await wait_for_domains(control, 2)
        run = await control.start_run(params)
        async for event in control.watch_run(run.run_id):
            if event.kind == pb.EVENT_KIND_ROUND_CLOSED and event.round >= 3:
                break
        aggregator.send_signal(signal.SIGKILL)
        aggregator.wait(5)
        await control.close()
        aggregator, _ = await asyncio.to_thread(processes.aggregator, port, "aggregator-restarted")
        control = AggregatorClient(address, rpc_timeout_s=10, retry_for_s=30)
        async for event in control.watch_run(run.run_id, from_round=8):
            if event.kind == pb.EVENT_KIND_ROUND_CLOSED and event.round >= 8:
                break
        nodes["sport"].send_signal(signal.SIGKILL)
        nodes["sport"].wait(5)
        status = await control.get_status()
        assert status.run.state == pb.RUN_STATE_RUNNING and status.run.current_round < rounds, "killed mid-run"
        await asyncio.to_thread(processes.node, "sport", files, address, "node-sport-restarted")
        events = [event async for event in control.watch_run(run.run_id, from_round=rounds)]
        assert any(event.kind == pb.EVENT_KIND_RUN_FINISHED for event in events)
        await control.close()
        await wait_for_checkpoints(tmp_path, rounds)

    asyncio.run(scenario())
    assert "resuming run" in (tmp_path / "node-sport-restarted.log").read_text()
    assert_matches_engine(checkpoints(tmp_path), reference_engine(files, ADMM, rounds, {}))
