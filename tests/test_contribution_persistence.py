"""Contributions saved as they arrive, on real processes: an aggregator killed with SIGKILL between a round's acked
pushes (or right after its closing push) resumes from its state folder without asking anyone to push again, and
the run ends byte-identical to an uninterrupted one; a damaged contribution file stops the restart naming it.

The nodes are played by the test through cdimf.common.rpc.aggregator_client (the real network layer); each
round's contribution depends on the previous Z, so a resumed round that used other values would show in every
later one. The expected arrays come from an independent aggregator process that is never killed.
"""

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cdimf.aggregator.store import CONTRIBUTIONS_DIR, RUN_FILE
from cdimf.common.config import RunParams
from cdimf.common.rpc.aggregator_client import AggregatorClient, AggregatorError, Backoff
from cdimf.common.security.pseudonyms import pseudonymize
from tests.federation_harness import _environment, port_of, read_line

SECRET = b"persistence-test-federation-key!"
REPO_ROOT = Path(__file__).resolve().parent.parent
RANK = 4
ROUNDS = 3
# sport holds u0..u39, cloth u20..u59: u20..u39 shared (20 rows each pushes)
SHARED = 20
DOMAINS = {"cloth": range(20, 60), "sport": range(0, 40)}
pytestmark = pytest.mark.timeout(120)

MODES = {
    "synchronous": RunParams(run_id="p", rounds=ROUNDS, rank=RANK),
    # a deadline run keeps its contributions for later rounds: they are read back from their files
    "deadline": RunParams(run_id="p", rounds=ROUNDS, rank=RANK, round_deadline_s=600.0, min_domains=2),
    "secure": RunParams(run_id="p", rounds=ROUNDS, rank=RANK, secure_aggregation=True),
}


def _spawn(port: int, state_dir: Path) -> tuple[subprocess.Popen[str], int]:
    """`python -m cdimf.aggregator` on `port` (0: any free one) with a clean environment; (process, its port) once LISTENING."""
    environ = {**_environment(), "CDIMF_LISTEN": f"127.0.0.1:{port}", "CDIMF_STATE_DIR": str(state_dir), "CDIMF_TLS__INSECURE": "true"}
    process = subprocess.Popen([sys.executable, "-m", "cdimf.aggregator", "--log-level", "INFO"], cwd=REPO_ROOT, env=environ,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = read_line(process.stdout, 60, lambda: process.poll() is None)
    assert line.startswith("LISTENING "), (line, process.stderr.read() if process.poll() is not None and process.stderr else "")
    return process, port_of(line.split(" ", 1)[1])


def _contribution(params: RunParams, domain: str, round_index: int, previous: np.ndarray | None) -> np.ndarray:
    """What a node pushes: seeded values plus (from round 2) half the Z it pulled, so every round depends on the last."""
    rng = np.random.default_rng([round_index, sorted(DOMAINS).index(domain)])
    if params.secure_aggregation:
        # masked ring elements: any uint64 (the aggregator only adds them); rank + 1 columns
        values = rng.integers(0, 2**63, (SHARED, RANK + 1), dtype=np.uint64) * np.uint64(2)
        return values if previous is None else values + previous
    values = rng.standard_normal((SHARED, RANK)).astype(np.float32)
    return values if previous is None else (values + np.float32(0.5) * previous).astype(np.float32)


async def _kill_and_restart(processes: list[subprocess.Popen[str]], port: int, state_dir: Path) -> None:
    """SIGKILL the running aggregator and start a new one on the same port and state folder."""
    processes[-1].send_signal(signal.SIGKILL)
    processes[-1].wait(10)
    processes.append((await asyncio.to_thread(_spawn, port, state_dir))[0])


async def _federated_run(params: RunParams, processes: list[subprocess.Popen[str]], port: int, state_dir: Path,
                         kill_after_first_push: int = 0, kill_after_closing_push: int = 0) -> dict[str, bytes]:
    """Run every round as two nodes; SIGKILL and restart the aggregator after the first push of round
    `kill_after_first_push` and after the closing push of round `kill_after_closing_push`; the bytes of every Z pulled."""
    address = f"127.0.0.1:{port}"
    ring = "ring64" if params.secure_aggregation else "float32"
    backoff = Backoff(initial_s=0.05, max_s=0.3)
    clients = {name: AggregatorClient(address, name, rpc_timeout_s=10, retry_for_s=30, backoff=backoff, seed=i)
               for i, name in enumerate(sorted(DOMAINS))}
    operator = AggregatorClient(address, rpc_timeout_s=10, retry_for_s=30, backoff=backoff)
    pulled: dict[str, bytes] = {}
    try:
        for name, users in DOMAINS.items():
            await clients[name].register(pseudonymize(np.array([f"u{i}" for i in users]), SECRET), np.ones(len(users), bool))
        run = await operator.start_run(params)
        previous: dict[str, np.ndarray | None] = {name: None for name in DOMAINS}
        for round_index in range(1, ROUNDS + 1):
            first, last = "sport", "cloth"
            pushed = {name: _contribution(params, name, round_index, previous[name]) for name in DOMAINS}
            await clients[first].push_contribution(run.run_id, round_index, pushed[first], ring)
            if round_index == kill_after_first_push:
                # acked, the round still open (the other domain has not pushed): nothing of it is committed yet
                await _kill_and_restart(processes, port, state_dir)
                status = await operator.get_status()
                held = {domain.domain: domain.latest_contribution_round for domain in status.domains}
                assert status.run.current_round == round_index and held[first] == round_index, status
                # the restarted aggregator holds the acked push: pushing it again is refused, never asked for
                with pytest.raises(AggregatorError, match="ALREADY_EXISTS"):
                    await AggregatorClient(address, first, rpc_timeout_s=10, retry_for_s=0).push_contribution(
                        run.run_id, round_index, pushed[first], ring)
            await clients[last].push_contribution(run.run_id, round_index, pushed[last], ring)
            if round_index == kill_after_closing_push:
                # the close runs after the ack: killed before, during or after it, the restart must serve the same Z
                await _kill_and_restart(processes, port, state_dir)
            for name in sorted(DOMAINS):
                z = await clients[name].pull_consensus(run.run_id, round_index, 20.0, SHARED, 0, dtype=ring)
                assert z is not None and z.round == round_index
                pulled[f"{name}.{round_index}"] = z.shared.tobytes()
                previous[name] = z.shared
    finally:
        for client in (*clients.values(), operator):
            await client.close()
    return pulled


@pytest.mark.parametrize("mode", sorted(MODES))
def test_an_aggregator_killed_between_acked_pushes_resumes_and_ends_byte_identical(tmp_path: Path, aggregator_processes: list, mode: str) -> None:
    """SIGKILL after round 2's first acked push and after round 3's closing push: the same bytes as a run never killed."""
    params = MODES[mode]
    reference, port = _spawn(0, tmp_path / "reference")
    aggregator_processes.append(reference)
    expected = asyncio.run(_federated_run(params, aggregator_processes, port, tmp_path / "reference"))
    first, port = _spawn(0, tmp_path / "killed")
    aggregator_processes.append(first)
    got = asyncio.run(_federated_run(params, aggregator_processes, port, tmp_path / "killed", kill_after_first_push=2, kill_after_closing_push=3))
    assert len(aggregator_processes) == 4  # the reference, and the killed run's first aggregator and two restarts
    assert sorted(got) == sorted(expected) and all(got[key] == expected[key] for key in expected), mode
    # the state folder holds no leftovers of the kills: no temp files
    assert [path for path in (tmp_path / "killed").rglob("*.tmp")] == []


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "empty"])
def test_a_damaged_contribution_file_stops_the_restart_naming_it_and_changes_nothing(tmp_path: Path, aggregator_processes: list, damage: str) -> None:
    """A contribution file that fails its checksum is never used: the process exits naming it, and every state file stays as it was."""
    aggregator, port = _spawn(0, tmp_path)
    aggregator_processes.append(aggregator)
    params = MODES["synchronous"]

    async def first_push() -> None:
        """Both register, the run starts, sport's round-1 push is acked."""
        address = f"127.0.0.1:{port}"
        clients = {name: AggregatorClient(address, name, rpc_timeout_s=10) for name in DOMAINS}
        for name, users in DOMAINS.items():
            await clients[name].register(pseudonymize(np.array([f"u{i}" for i in users]), SECRET), np.ones(len(users), bool))
        run = await AggregatorClient(address).start_run(params)
        await clients["sport"].push_contribution(run.run_id, 1, _contribution(params, "sport", 1, None))
        for client in clients.values():
            await client.close()

    asyncio.run(first_push())
    aggregator.send_signal(signal.SIGKILL)
    aggregator.wait(10)
    path = tmp_path / CONTRIBUTIONS_DIR / "sport.arrays"
    whole = path.read_bytes()
    damaged = {"flipped byte": whole[: len(whole) // 2] + bytes([whole[len(whole) // 2] ^ 0x20]) + whole[len(whole) // 2 + 1 :],
               "truncated": whole[: len(whole) - 40], "empty": b""}[damage]
    path.write_bytes(damaged)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    environ = {**_environment(), "CDIMF_LISTEN": "127.0.0.1:0", "CDIMF_STATE_DIR": str(tmp_path), "CDIMF_TLS__INSECURE": "true"}
    refused = subprocess.run([sys.executable, "-m", "cdimf.aggregator"], cwd=REPO_ROOT, env=environ, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "LISTENING" not in refused.stdout
    assert f"{path}: " in refused.stderr and "may have been acked" in refused.stderr, refused.stderr[-2000:]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before, "the refused restart changed the state folder"
    # the good file back: the restart resumes with the acked push
    path.write_bytes(whole)
    restarted, port = _spawn(0, tmp_path)
    aggregator_processes.append(restarted)

    async def resumed() -> None:
        """The restarted aggregator holds sport's round 1."""
        async with AggregatorClient(f"127.0.0.1:{port}") as operator:
            status = await operator.get_status()
        held = {domain.domain: domain.latest_contribution_round for domain in status.domains}
        assert held == {"cloth": 0, "sport": 1} and status.run.current_round == 1

    asyncio.run(resumed())
    assert (tmp_path / RUN_FILE).exists() and os.path.getsize(tmp_path / RUN_FILE) < 64 * 1024, "the commit record holds no matrix"
