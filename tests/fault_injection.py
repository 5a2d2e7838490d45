"""Seeded fault injection on a real federation: kill -9 or SIGSTOP/SIGCONT of any process at drawn moments.

One trial starts a real aggregator and both nodes of the small synthetic pair
(tests.federation_harness) on 127.0.0.1, starts a run, applies a list of faults drawn from a
seed (which process, kill or pause, when, for how long) and waits, bounded, for the run to end.
A killed process is started again with the same arguments and state folder (the aggregator on
the port it had). The trial's outcome holds the final arrays (each node's checkpoint, the
aggregator's stored Z) so that a synchronous trial can be compared bit for bit with an
uninterrupted one, and a tally of what happened (faults applied, processes that exited by
themselves, rounds missing from the stored run).

Used by tests/test_fault_injection.py (a few trials in CI) and scripts/fault_soak.py (many).
"""

import asyncio
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from cdimf.aggregator.store import stored_run_arrays
from cdimf.common.config import RunParams
from cdimf.common.core.params import ADMMParams
from cdimf.common.rpc.aggregator_client import AggregatorClient
from cdimf.domain_node.checkpoint import load_checkpoint
from cdimf.protos.v1 import federation_pb2 as pb
from cdimf.protos.v1 import federation_pb2_grpc as pb_grpc
from tests.federation_harness import DOMAINS, RANK, Processes, wait_for_domains, write_domains

ROLES = ("aggregator", *DOMAINS)
ADMM = ADMMParams(rho=1.5, prox="l2", lambda_z=0.2)
# every wait of a trial is bounded by this; a trial that needs longer counts as stalled
TRIAL_TIMEOUT_S = 120.0
POLL_S = 0.05


@dataclass(frozen=True)
class Fault:
    """One fault: `kind` ("kill" or "stop") of `role` at `at_s` seconds after the run started.

    kill: SIGKILL, then started again after `hold_s`; stop: SIGSTOP, SIGCONT after `hold_s`.
    """

    role: str
    kind: str
    at_s: float
    hold_s: float


def draw_faults(rng: random.Random, count: int, span_s: float, max_hold_s: float = 1.5) -> list[Fault]:
    """`count` faults at uniform moments of [0, span_s), each of a uniform role and kind, held 0.1..max_hold_s, in time order."""
    faults = [Fault(rng.choice(ROLES), rng.choice(("kill", "stop")), rng.uniform(0.0, span_s), rng.uniform(0.1, max_hold_s))
              for _ in range(count)]
    return sorted(faults, key=lambda fault: fault.at_s)


@dataclass
class Outcome:
    """What one trial ended with."""

    finished: bool  # the run ended "finished" and every node settled (see _ended)
    duration_s: float  # from the run's start to its end
    applied: list[Fault] = field(default_factory=list)  # faults that hit the running run
    skipped: list[Fault] = field(default_factory=list)  # faults drawn after the run had ended
    crashed: list[str] = field(default_factory=list)  # processes that exited without being killed
    missing_rounds: list[int] = field(default_factory=list)  # rounds without a round_closed event in the stored run
    # nodes without the last round: with a deadline, a node down for the end of the run comes
    # back to a finished run it has no state of and waits idle for the next one (synchronous
    # runs cannot end without every node)
    missed_the_end: list[str] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # "<domain>.<users|items|duals|consensus>", "aggregator.consensus"
    tracebacks: int = 0  # "Traceback" lines across the processes' logs

    def differences(self, reference: "Outcome") -> list[str]:
        """The names of arrays not bit-identical to the reference's (shape, dtype and every byte)."""
        names = sorted(set(self.arrays) | set(reference.arrays))
        return [name for name in names if name not in self.arrays or name not in reference.arrays
                or self.arrays[name].dtype != reference.arrays[name].dtype
                or self.arrays[name].shape != reference.arrays[name].shape
                or self.arrays[name].tobytes() != reference.arrays[name].tobytes()]


class Federation:
    """The aggregator and both nodes of one trial, each restartable with its own arguments."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.processes = Processes(folder)
        self.files = write_domains(folder / "data")
        self.live: dict[str, subprocess.Popen[bytes]] = {}
        self.addresses: dict[str, str] = {}  # each node's own server, for its status
        self.killed: set[int] = set()  # pids this trial SIGKILLed on purpose
        self.port = 0
        self.address = ""

    def start(self) -> None:
        """The aggregator on a port it picks (read back from its LISTENING line), then both nodes."""
        self._start("aggregator")
        for domain, (process, address) in self.processes.nodes(self.files, self.address).items():
            self.live[domain], self.addresses[domain] = process, address

    def _start(self, role: str) -> None:
        """Start `role`: the aggregator on self.port (0 the first time), a node with its usual arguments."""
        if role == "aggregator":
            process, address = self.processes.aggregator(self.port)
            self.address = address
            self.port = int(address.rsplit(":", 1)[1])
        else:
            process, self.addresses[role] = self.processes.node(role, self.files, self.address)
        self.live[role] = process

    async def apply(self, fault: Fault) -> None:
        """Kill and restart, or pause and resume, the fault's process (its whole process group)."""
        process = self.live[fault.role]
        if fault.kind == "kill":
            self.killed.add(process.pid)
            os.killpg(process.pid, signal.SIGKILL)
            await asyncio.to_thread(process.wait, 10)
            await asyncio.sleep(fault.hold_s)  # the outage itself: how long the process stays down
            await asyncio.to_thread(self._start, fault.role)
        else:
            os.killpg(process.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(fault.hold_s)  # the pause itself
            finally:
                os.killpg(process.pid, signal.SIGCONT)

    def crashed(self) -> list[str]:
        """Processes that exited although nobody killed them (servers keep serving after a run)."""
        return [f"{process.args[3] if len(process.args) > 3 else '?'} pid {process.pid} exit {process.returncode}"
                for process in self.processes.started if process.poll() is not None and process.pid not in self.killed]

    def tracebacks(self) -> int:
        """Traceback lines in every process log of the trial."""
        return sum(path.read_text(errors="replace").count("Traceback") for path in self.folder.glob("*.log"))

    def close(self) -> None:
        """SIGKILL every process of the trial (and SIGCONT first: a stopped process cannot be reaped promptly)."""
        for process in self.processes.started:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        self.processes.close()


async def _status(address: str) -> pb.AggregatorStatus | None:
    """The aggregator's status, None while it is down or paused (one short call, no retries)."""
    try:
        async with AggregatorClient(address, rpc_timeout_s=2, retry_for_s=0) as control:
            return await control.get_status()
    except Exception:  # down, paused, restarting: the caller polls again
        return None


async def _node_phase(address: str) -> str | None:
    """A node's phase from its own server, None while it is down or paused."""
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            return (await pb_grpc.DomainNodeStub(channel).GetStatus(pb.StatusRequest(), timeout=2)).phase
    except grpc.RpcError:
        return None


async def _ended(federation: Federation, rounds: int) -> bool:
    """Whether the run finished and every node settled: it checkpointed the last round and says
    "finished", or (only possible with a deadline) it says "idle", back after the run ended."""
    status = await _status(federation.address)
    if status is None or status.run.state != pb.RUN_STATE_FINISHED:
        return False
    for domain in DOMAINS:
        checkpoint = load_checkpoint(federation.folder / domain)
        phase = await _node_phase(federation.addresses[domain])
        final = checkpoint is not None and checkpoint.round >= rounds
        if not ((final and phase == "finished") or phase == "idle"):
            return False
    return True


async def _drive(federation: Federation, params: RunParams, faults: list[Fault], outcome: Outcome) -> None:
    """Start the run, apply each fault at its moment while the run goes on, then wait (bounded) for its end."""
    async with AggregatorClient(federation.address, rpc_timeout_s=10, retry_for_s=30) as control:
        await wait_for_domains(control, len(DOMAINS))
        await control.start_run(params)
    started = time.monotonic()
    give_up = started + TRIAL_TIMEOUT_S
    for fault in faults:
        # the fault's moment is the experiment's input, not a synchronisation: sleep until it,
        # checking on the way whether the run ended first (then the fault has nothing to hit)
        while time.monotonic() < started + fault.at_s and not await _ended(federation, params.rounds):
            await asyncio.sleep(min(POLL_S, max(0.0, started + fault.at_s - time.monotonic())))
        if await _ended(federation, params.rounds):
            outcome.skipped.append(fault)
            continue
        await federation.apply(fault)
        outcome.applied.append(fault)
    while not await _ended(federation, params.rounds):
        if time.monotonic() > give_up:
            return
        await asyncio.sleep(POLL_S)
    outcome.finished = True
    outcome.duration_s = time.monotonic() - started


def _collect(federation: Federation, rounds: int, outcome: Outcome) -> None:
    """Final arrays of the nodes and the aggregator, and the rounds the stored run lacks."""
    for domain in DOMAINS:
        checkpoint = load_checkpoint(federation.folder / domain)
        if checkpoint is None:
            continue
        state = checkpoint.trainer
        for name, values in (("users", state.users), ("items", state.items), ("duals", state.duals), ("consensus", state.consensus)):
            if values is not None:
                outcome.arrays[f"{domain}.{name}"] = np.asarray(values)
    stored = stored_run_arrays(federation.folder / "aggregator")
    outcome.arrays["aggregator.consensus"] = stored["consensus"]
    final = {domain: load_checkpoint(federation.folder / domain) for domain in DOMAINS}
    outcome.missed_the_end = [domain for domain, checkpoint in final.items() if checkpoint is None or checkpoint.round < rounds]


async def _closed_rounds(address: str) -> set[int]:
    """Rounds with a round_closed event in the aggregator's stored run (ListRuns with events)."""
    async with AggregatorClient(address, rpc_timeout_s=10, retry_for_s=30) as control:
        runs = await control.list_runs(with_events=True)
    return {event.round for run in runs.runs for event in run.events if event.kind == pb.EVENT_KIND_ROUND_CLOSED}


def run_trial(folder: Path, faults: list[Fault], rounds: int, round_deadline_s: float = 0.0) -> Outcome:
    """One run of `rounds` rounds under `faults` (synchronous when round_deadline_s is 0, else min_domains 1)."""
    folder.mkdir(parents=True, exist_ok=True)
    federation = Federation(folder)
    params = RunParams(rounds=rounds, rank=RANK, admm=ADMM, round_deadline_s=round_deadline_s,
                       min_domains=1 if round_deadline_s else len(DOMAINS), max_staleness=2)
    outcome = Outcome(finished=False, duration_s=TRIAL_TIMEOUT_S)
    try:
        federation.start()
        asyncio.run(_drive(federation, params, faults, outcome))
        outcome.crashed = federation.crashed()
        if outcome.finished:
            _collect(federation, rounds, outcome)
            closed = asyncio.run(_closed_rounds(federation.address))
            outcome.missing_rounds = [index for index in range(1, rounds + 1) if index not in closed]
    finally:
        federation.close()
        outcome.tracebacks = federation.tracebacks()
    return outcome
