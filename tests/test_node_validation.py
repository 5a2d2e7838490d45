"""A node's per-round validation settings (NodeConfig.validation) on real servers over loopback gRPC."""

import asyncio
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from pydantic import SecretStr

from cdimf.aggregator.service import FINAL_METRICS_GRACE_S, start_aggregator
from cdimf.common.config import AggregatorConfig, NodeConfig, RunParams, TLSConfig, ValidationParams
from cdimf.common.rpc.aggregator_client import AggregatorClient
from cdimf.domain_node.service import RunningNode, start_node
from cdimf.protos.v1 import federation_pb2 as pb
from cdimf.protos.v1 import federation_pb2_grpc as pb_grpc
from tests.federation_harness import RANK, SECRET, ials, seeds, wait_for_domains, write_domains

pytestmark = pytest.mark.timeout(60)
ROUNDS = 3


def test_due_rounds() -> None:
    """every = N validates rounds divisible by N and the last one; every = 0 never."""
    assert [r for r in range(1, 8) if ValidationParams(every=3).due(r, 7)] == [3, 6, 7]
    assert [r for r in range(1, 4) if ValidationParams().due(r, 3)] == [1, 2, 3]
    assert not any(ValidationParams(every=0).due(r, 3) for r in range(1, 4))


def test_validation_every_k_and_negatives_and_a_node_that_never_validates(tmp_path: Path) -> None:
    """sport validates every 2nd round and the last at k=5 against 20 negatives; cloth never
    validates and reports an empty set for the last round, so the run's watch ends without its grace period."""
    files = write_domains(tmp_path / "data")
    settings = {"sport": ValidationParams(every=2, negatives=20, k=5), "cloth": ValidationParams(every=0)}

    async def scenario() -> tuple[list[pb.RoundEvent], float, RunningNode, dict[str, pb.EvaluateReply]]:
        """Run three rounds; the watched events, the seconds the watch stayed open after the run finished, sport's node
        and its Evaluate replies on both splits."""
        aggregator = await start_aggregator(AggregatorConfig(listen="127.0.0.1:0", state_dir=tmp_path / "aggregator", tls=TLSConfig(insecure=True)))
        nodes: list[RunningNode] = []
        try:
            for domain in ("sport", "cloth"):
                config = NodeConfig(domain=domain, train_path=files[domain]["train"], test_path=files[domain].get("test"),
                                    data_format="csv", aggregator=aggregator.address, state_dir=tmp_path / domain,
                                    secret=SecretStr(SECRET), ials=ials(seeds()[domain]), tls=TLSConfig(insecure=True),
                                    validation=settings[domain])
                nodes.append(await start_node(config))
            events: list[pb.RoundEvent] = []
            async with AggregatorClient(aggregator.address) as control:
                await wait_for_domains(control, 2)
                run = await control.start_run(RunParams(rounds=ROUNDS, rank=RANK, min_domains=2))
                finished_at = float("inf")
                async for event in control.watch_run(run.run_id):
                    events.append(event)
                    if event.kind == pb.EVENT_KIND_RUN_FINISHED:
                        finished_at = time.monotonic()
                after_finish = time.monotonic() - finished_at
            async with grpc.aio.insecure_channel(f"127.0.0.1:{nodes[0].port}") as channel:
                stub = pb_grpc.DomainNodeStub(channel)
                replies = {split: await stub.Evaluate(pb.EvaluateRequest(split=split, k=5), timeout=10) for split in ("valid", "test")}
            return events, after_finish, nodes[0], replies
        finally:
            for node in nodes:
                await node.stop()
            await aggregator.stop(0.5)

    events, after_finish, sport, replies = asyncio.run(scenario())
    reported = {(e.domain, e.round): dict(e.metrics) for e in events if e.kind == pb.EVENT_KIND_METRICS}
    assert set(reported) == {("sport", 2), ("sport", 3), ("cloth", 3)}
    assert all(set(reported["sport", r]) == {"HR@5", "NDCG@5", "negatives"} for r in (2, 3))
    assert all(reported["sport", r]["negatives"] == 20 for r in (2, 3)), "the report says which protocol its numbers are under"
    assert reported["cloth", 3] == {}
    assert after_finish < FINAL_METRICS_GRACE_S, "the watch waited for metrics that never come"
    valid = sport.runner.data.valid
    assert valid is not None and valid.candidates.shape == (len(valid.users), 21)
    assert sport.runner.data.test is not None and sport.runner.data.test.candidates.shape[1] > 21, "test keeps the paper's negatives"

    # Evaluate on the valid split ranks against the validation candidates (20 negatives), on test
    # against the paper's; its HR@5 / NDCG@5 are the brute-force ones of the published model
    model = sport.runner.progress.model
    assert model is not None and replies["valid"].round == model.round == ROUNDS
    assert replies["valid"].negatives == 20 and replies["valid"].users == len(valid.users)
    assert replies["test"].negatives == sport.runner.data.test.candidates.shape[1] - 1 > 20
    hr, ndcg = brute_force_sampled(model.users, model.items, valid.candidates, valid.users, sport.runner.data.train.toarray() > 0, 5)
    assert replies["valid"].metrics["HR@5"] == pytest.approx(hr, abs=1e-9)
    assert replies["valid"].metrics["NDCG@5"] == pytest.approx(ndcg, abs=1e-6)
    assert dict(replies["valid"].metrics).items() >= {"HR@5": reported["sport", 3]["HR@5"], "NDCG@5": reported["sport", 3]["NDCG@5"]}.items()


def brute_force_sampled(users: np.ndarray, items: np.ndarray, candidates: np.ndarray, rows: np.ndarray, trained: np.ndarray,
                        k: int) -> tuple[float, float]:
    """HR@k and NDCG@k in float64, row by row: the target's rank is 1 + the untrained negatives
    scoring at least as high (ties count against it; trained negatives go to the bottom)."""
    hits, gains = 0.0, 0.0
    for row, user in enumerate(rows):
        scores = items[candidates[row]].astype(np.float64) @ users[user].astype(np.float64)
        above = (scores[1:] >= scores[0]) & ~trained[user, candidates[row, 1:]]
        rank = 1 + int(above.sum())
        if rank <= k:
            hits += 1
            gains += 1 / np.log2(rank + 1)
    return hits / len(rows), gains / len(rows)
