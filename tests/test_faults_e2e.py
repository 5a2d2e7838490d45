"""Faults survived visibly, with real processes on 127.0.0.1: a full disk, changed data, a taken port, an aggregator outage."""

import asyncio
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cdimf.common.config import RunParams
from cdimf.common.core.params import ADMMParams
from cdimf.common.rpc.aggregator_client import AggregatorClient
from cdimf.protos.v1 import federation_pb2 as pb
from tests.federation_harness import (
    REPO_ROOT,
    SECRET,
    Processes,
    assert_matches_engine,
    checkpoints,
    port_of,
    reference_engine,
    wait_for_checkpoints,
    wait_for_domains,
    write_domains,
)

ADMM = ADMMParams(rho=1.5, prox="l2", lambda_z=0.2)
ROUNDS = 12



def _limit_file_size(pid: int, limit: int) -> None:
    """Set a running process's soft file-size limit (the fault: its writes past `limit` bytes fail with EFBIG; the hard limit stays)."""
    _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard if limit == resource.RLIM_INFINITY else limit, hard))


async def _health(address: str) -> int:
    """The aggregator's health answer for its service."""
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="cdimf.v1.Aggregator"), timeout=5)
        return reply.status


def _wait_exit(process: subprocess.Popen[bytes], timeout_s: float) -> int:
    """The exit status of a process expected to end by itself."""
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError("the process did not exit") from None


def test_an_aggregator_that_cannot_save_holds_z_back_visibly_and_loses_nothing(tmp_path: Path, processes: Processes) -> None:
    """Its state folder stops taking writes once the run started: NOT_SERVING, the error in GetStatus and in the
    watched events, the nodes wait; once writes work again the run ends equal to the engine's."""
    files = write_domains(tmp_path / "data")
    aggregator, address = processes.aggregator()
    processes.nodes(files, address)
    params = RunParams(rounds=ROUNDS, rank=6, admm=ADMM, min_domains=2)

    async def scenario() -> list[pb.RoundEvent]:
        async with AggregatorClient(address, rpc_timeout_s=10, retry_for_s=30) as control:
            await wait_for_domains(control, 2)
            run = await control.start_run(params)
            # the run is saved: from now on (an early round, the nodes are still training) no
            # write of the aggregator succeeds
            _limit_file_size(aggregator.pid, 1)
            events: list[pb.RoundEvent] = []
            async for event in control.watch_run(run.run_id):
                events.append(event)
                if event.kind == pb.EVENT_KIND_PERSIST_FAILED:
                    # the first write refused: a node's contribution (saved before its ack), a Z file or a commit record
                    state_files = ("/contributions/", "/consensus/", "run.arrays")
                    assert any(name in event.message for name in state_files) and "EFBIG" in event.message, event.message
                    status = await control.get_status()
                    assert any(name in status.persistence_error for name in state_files), status.persistence_error
                    assert await _health(address) == health_pb2.HealthCheckResponse.NOT_SERVING
                    held = status.run.latest_consensus_round
                    await asyncio.sleep(3)
                    status = await control.get_status()
                    assert status.run.latest_consensus_round == held, "no round closes on an unsaved one"
                    _limit_file_size(aggregator.pid, resource.RLIM_INFINITY)
            assert await _health(address) == health_pb2.HealthCheckResponse.SERVING
            assert (await control.get_status()).persistence_error == ""
            return events

    events = asyncio.run(scenario())
    kinds = [event.kind for event in events]
    assert pb.EVENT_KIND_PERSIST_FAILED in kinds and pb.EVENT_KIND_PERSIST_RECOVERED in kinds and pb.EVENT_KIND_RUN_FINISHED in kinds
    asyncio.run(wait_for_checkpoints(tmp_path, ROUNDS))
    assert_matches_engine(checkpoints(tmp_path), reference_engine(files, ADMM, ROUNDS, {}))


@pytest.mark.parametrize("change", ["one interaction removed", "one user removed"])
def test_a_node_restarted_on_other_data_refuses_to_resume_and_says_how_to_start_over(
    tmp_path: Path, processes: Processes, change: str
) -> None:
    """Never a silent resume on other data, never an endless re-registration: exit 2 naming the checkpoint."""
    files = write_domains(tmp_path / "data")
    _, address = processes.aggregator()
    nodes = processes.nodes(files, address)

    async def scenario() -> None:
        async with AggregatorClient(address, rpc_timeout_s=10, retry_for_s=30) as control:
            await wait_for_domains(control, 2)
            run = await control.start_run(RunParams(rounds=200, rank=6, admm=ADMM, min_domains=2))
            async for event in control.watch_run(run.run_id):
                if event.kind == pb.EVENT_KIND_ROUND_CLOSED and event.round >= 2:
                    break

    asyncio.run(scenario())
    sport = nodes["sport"][0]
    sport.send_signal(signal.SIGKILL)
    sport.wait(5)
    lines = files["sport"]["train"].read_text().splitlines()
    if change == "one interaction removed":
        kept = lines[:5] + lines[6:]
    else:
        first_user = lines[1].split(",")[0]
        kept = [line for line in lines if not line.startswith(first_user + ",")]
    files["sport"]["train"].write_text("\n".join(kept) + "\n")
    restarted = processes.launch("node-sport-restarted", processes._node_arguments("sport", files, address), {"CDIMF_SECRET": SECRET})
    assert _wait_exit(restarted, 60) == 2
    log = (tmp_path / "node-sport-restarted.log").read_text()
    expected = "other interactions" if change == "one interaction removed" else "other users"
    assert expected in log and "delete" in log and "node-checkpoint.arrays" in log, log[-2000:]
    assert "Traceback" not in log


def test_a_second_server_on_a_taken_port_exits_with_one_line(tmp_path: Path, processes: Processes) -> None:
    """No SO_REUSEPORT: the second aggregator on the same address does not start."""
    _, address = processes.aggregator()
    port = port_of(address)
    second = subprocess.run(
        [sys.executable, "-m", "cdimf", "serve-aggregator", "--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "second"), "--insecure"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert second.returncode == 2, second.stderr
    errors = [line for line in second.stderr.splitlines() if line.startswith("cdimf: error")]
    assert errors and f"127.0.0.1:{port}" in errors[0] and "Traceback" not in second.stderr, second.stderr


def test_train_follow_outlasts_an_aggregator_restart_longer_than_its_rpc_timeout(tmp_path: Path, processes: Processes) -> None:
    """The aggregator is killed and comes back 6 s later on its port; `train --follow` (2 s rpc timeout) exits 0."""
    files = write_domains(tmp_path / "data")
    aggregator, address = processes.aggregator()
    port = port_of(address)
    processes.nodes(files, address)
    asyncio.run(_registered(address))
    follower = subprocess.Popen(
        [sys.executable, "-m", "cdimf", "train", "--follow", "--aggregator", address, "--insecure", "--rpc-timeout-s", "2",
         "--rounds", "40", "--rank", "6", "--min-domains", "2", "--admm-rho", "1.5"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        # kill it mid-run: after a round closed, while the run still has rounds to go
        status = asyncio.run(_after_first_round(address))
        assert status.run.state == pb.RUN_STATE_RUNNING and status.run.current_round < 40, status
        aggregator.send_signal(signal.SIGKILL)
        aggregator.wait(5)
        time.sleep(6)
        processes.aggregator(port, "aggregator-restarted")
        _, err = follower.communicate(timeout=180)
    finally:
        if follower.poll() is None:
            follower.kill()
    assert follower.returncode == 0, err[-2000:]
    assert "finished" in err


async def _after_first_round(address: str) -> pb.AggregatorStatus:
    """The aggregator's status once the run closed its first round (polled, at most 60 s)."""
    async with AggregatorClient(address, rpc_timeout_s=10, retry_for_s=30) as control:
        give_up = time.monotonic() + 60
        while time.monotonic() < give_up:
            status = await control.get_status()
            if status.run.latest_consensus_round >= 1:
                return status
            await asyncio.sleep(0.05)
    raise AssertionError("no round closed within 60 s")


async def _registered(address: str) -> None:
    """Until both nodes registered."""
    async with AggregatorClient(address, rpc_timeout_s=10, retry_for_s=30) as control:
        await wait_for_domains(control, 2)
