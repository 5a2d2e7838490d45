"""Shared helpers of the federated runtime tests: small CSV domains, real `cdimf` processes, cleanup."""

import asyncio
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from cdimf.common.core.params import ADMMParams, IALSParams
from cdimf.common.rpc.aggregator_client import AggregatorClient
from cdimf.domain_node.checkpoint import Checkpoint, load_checkpoint
from cdimf.domain_node.node_data import NodeData, load_node_data
from cdimf.engine import CDIMFEngine, DomainInput

REPO_ROOT = Path(__file__).resolve().parent.parent
SECRET = "tests-federation-secret-0123456789"
DOMAINS = ("sport", "cloth")
RANK = 6
START_TIMEOUT_S = 30.0


def user_key(index: int) -> str:
    """A raw user key long enough that it cannot appear by chance inside factor bytes."""
    return f"customer-{index:05d}@shop.example"


def item_key(domain: str, index: int) -> str:
    """A raw item key of a domain."""
    return f"{domain}-sku-{index:05d}"


def write_domains(folder: Path, seed: int = 0, n_items: int = 60) -> dict[str, dict[str, Path]]:
    """Two small domains as CSV: sport users 0..59, cloth users 35..99 (25 shared).

    sport's test file holds two users (90, 91) that only cloth trains on: sport registers them
    without interactions, so they become receiver rows scored with their consensus vector.
    """
    rng = np.random.default_rng(seed)
    ranges = {"sport": range(0, 60), "cloth": range(35, 100)}
    files: dict[str, dict[str, Path]] = {}
    folder.mkdir(parents=True, exist_ok=True)
    for domain, users in ranges.items():
        pairs: set[tuple[int, int]] = set()
        for user in users:
            # four taste groups, each mostly on its own quarter of the catalog: a signal to learn
            group = np.arange(user % 4 * n_items // 4, (user % 4 + 1) * n_items // 4)
            count = int(rng.integers(4, 10))
            picks = np.where(rng.random(count) < 0.85, rng.choice(group, count), rng.integers(0, n_items, count))
            for item in np.unique(picks):
                pairs.add((user, int(item)))
        lines = "".join(f"{user_key(u)},{item_key(domain, i)}\n" for u, i in sorted(pairs))
        train = folder / f"{domain}_train.csv"
        train.write_text("user,item\n" + lines)
        files[domain] = {"train": train}
    test = folder / "sport_test.csv"
    test.write_text("user,item\n" + "".join(f"{user_key(u)},{item_key('sport', u % 7)}\n" for u in (3, 10, 90, 91)))
    files["sport"]["test"] = test
    return files


def ials(seed: int) -> IALSParams:
    """The local model of the tests (one solver thread: two nodes share two cores)."""
    return IALSParams(rank=RANK, alpha=0.1, lam=0.5, seed=seed, threads=1)


def seeds() -> dict[str, int]:
    """Per-domain init seeds."""
    return {"sport": 1, "cloth": 2}


def node_data(files: dict[str, dict[str, Path]], domain: str) -> NodeData:
    """What the node process loads for `domain`."""
    return load_node_data(domain, files[domain]["train"], None, files[domain].get("test"), "csv")


def reference_engine(files: dict[str, dict[str, Path]], admm: ADMMParams, rounds: int, periods: dict[str, int],
                     local: dict[str, dict[str, float]] | None = None) -> CDIMFEngine:
    """The in-process engine on exactly the nodes' data, run for `rounds`; `local`: a domain's own alpha/lam/nu."""
    inputs = []
    for domain in DOMAINS:
        data = node_data(files, domain)
        params = ials(seeds()[domain]).model_copy(update=(local or {}).get(domain, {}))
        inputs.append(DomainInput(domain, data.users.keys, data.train, params, periods.get(domain, 1)))
    engine = CDIMFEngine(inputs, admm)
    engine.run(rounds)
    return engine


def assert_matches_engine(checkpoints: dict[str, Checkpoint], engine: CDIMFEngine) -> None:
    """Every domain's X, Y, U equal the engine's to 1e-5 relative."""
    for trainer in engine.trainers:
        state = checkpoints[trainer.name].trainer
        np.testing.assert_array_equal(checkpoints[trainer.name].shared_rows, trainer.shared_rows)
        np.testing.assert_array_equal(checkpoints[trainer.name].receiver_rows, trainer.receiver_rows)
        for mine, theirs in ((state.users, trainer.state.users), (state.items, trainer.state.items), (state.duals, trainer.state.duals)):
            np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-5 * float(np.abs(theirs).max()))


def port_of(address: str) -> int:
    """The port of a host:port address (a server bound to port 0 prints the one it got)."""
    return int(address.rsplit(":", 1)[1])


@contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port held bound but not listening while the block runs: connecting to it is refused,
    and no other process can take it meanwhile (a port merely free a moment ago could be)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]


def read_line(stream: IO[Any], timeout_s: float, alive: Callable[[], bool] = lambda: True) -> str:
    """The next whole line of a child's stdout or stderr pipe, waiting at most `timeout_s`; "" if it ended first.

    Reads the pipe's file descriptor directly, a byte at a time once select says data is there: a
    buffered readline() after select blocks without limit when only part of a line has arrived.
    """
    give_up = time.monotonic() + timeout_s
    line = bytearray()
    descriptor = stream.fileno()
    while time.monotonic() < give_up:
        if not select.select([descriptor], [], [], min(0.2, max(0.0, give_up - time.monotonic())))[0]:
            if not alive():
                return ""
            continue
        byte = os.read(descriptor, 1)
        if not byte:
            return ""
        if byte == b"\n":
            return line.decode(errors="replace")
        line += byte
    raise AssertionError(f"no whole line within {timeout_s} s (got {bytes(line)!r})")


def _environment() -> dict[str, str]:
    """This process's environment without CDIMF_* variables (children get only what a test gives)."""
    return {name: value for name, value in os.environ.items() if not name.startswith("CDIMF_")}


@dataclass
class Processes:
    """Real `cdimf` processes of one test, each in its own process group; `close` kills them all."""

    folder: Path
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)
    local: dict[str, dict[str, float]] = field(default_factory=dict)  # a node's own alpha/lam/nu, as --ials-* flags

    def launch(self, name: str, arguments: list[str], environ: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start `cdimf ARGUMENTS` in its own process group (see `listening`)."""
        with open(self.folder / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "cdimf", *arguments, "--log-level", "INFO"], cwd=REPO_ROOT,
                env={**_environment(), **(environ or {})}, stdout=subprocess.PIPE, stderr=log, start_new_session=True,
            )
        self.started.append(process)
        return process

    def listening(self, name: str, process: subprocess.Popen[bytes]) -> str:
        """The address from the process's LISTENING line (bounded by START_TIMEOUT_S)."""
        assert process.stdout is not None
        give_up = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < give_up:
            line = read_line(process.stdout, max(0.0, give_up - time.monotonic()), lambda: process.poll() is None).strip()
            if line.startswith("LISTENING "):
                return line.split(" ", 1)[1]
            if not line and process.poll() is not None:
                break
        raise AssertionError(f"{name} did not start:\n{(self.folder / f'{name}.log').read_text()[-3000:]}")

    def spawn(self, name: str, arguments: list[str], environ: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
        """Start `cdimf ARGUMENTS` and wait for its LISTENING line; returns (process, address)."""
        process = self.launch(name, arguments, environ)
        return process, self.listening(name, process)

    def aggregator(self, port: int = 0, name: str = "aggregator") -> tuple[subprocess.Popen[bytes], str]:
        """`cdimf serve-aggregator` on 127.0.0.1 (plaintext: the TLS paths have their own tests)."""
        return self.spawn(name, ["serve-aggregator", "--listen", f"127.0.0.1:{port}", "--state-dir", str(self.folder / "aggregator"), "--insecure"])

    def _node_arguments(self, domain: str, files: dict[str, dict[str, Path]], aggregator: str) -> list[str]:
        """The `cdimf serve-node` arguments of one test domain."""
        arguments = ["serve-node", "--domain", domain, "--train-path", str(files[domain]["train"]), "--data-format", "csv",
                     "--listen", "127.0.0.1:0", "--aggregator", aggregator, "--state-dir", str(self.folder / domain),
                     "--insecure", "--ials-rank", str(RANK), "--ials-alpha", "0.1", "--ials-lam", "0.5",
                     "--ials-seed", str(seeds()[domain]), "--ials-threads", "1", "--rpc-timeout-s", "10"]
        if "test" in files[domain]:
            arguments += ["--test-path", str(files[domain]["test"])]
        for name, value in self.local.get(domain, {}).items():  # argparse keeps a repeated flag's last value
            arguments += [f"--ials-{name}", str(value)]
        return arguments

    def node(self, domain: str, files: dict[str, dict[str, Path]], aggregator: str, name: str | None = None) -> tuple[subprocess.Popen[bytes], str]:
        """`cdimf serve-node` of one domain (its own files only; the secret through CDIMF_SECRET)."""
        return self.spawn(name or f"node-{domain}", self._node_arguments(domain, files, aggregator), {"CDIMF_SECRET": SECRET})

    def nodes(self, files: dict[str, dict[str, Path]], aggregator: str) -> dict[str, tuple[subprocess.Popen[bytes], str]]:
        """Both domains' nodes, started at once (they load their data in parallel)."""
        launched = {domain: self.launch(f"node-{domain}", self._node_arguments(domain, files, aggregator), {"CDIMF_SECRET": SECRET})
                    for domain in DOMAINS}
        return {domain: (process, self.listening(f"node-{domain}", process)) for domain, process in launched.items()}

    def close(self) -> None:
        """SIGKILL every process group and reap."""
        for process in self.started:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            process.wait(10)
            if process.stdout is not None:
                process.stdout.close()


def processes_fixture(tmp_path: Path) -> Iterator[Processes]:
    """Body of the `processes` fixture of the test modules."""
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.close()


async def wait_for_domains(client: AggregatorClient, count: int, timeout_s: float = START_TIMEOUT_S) -> None:
    """Until `count` domains registered with the aggregator."""
    give_up = time.monotonic() + timeout_s
    while len((await client.get_status()).domains) < count:
        assert time.monotonic() < give_up, "domains did not register"
        await asyncio.sleep(0.05)


def checkpoints(folder: Path) -> dict[str, Checkpoint]:
    """Each domain's checkpoint in the test folder."""
    found = {domain: load_checkpoint(folder / domain) for domain in DOMAINS}
    assert all(value is not None for value in found.values()), found
    return found  # type: ignore[return-value]


async def wait_for_checkpoints(folder: Path, round_index: int, timeout_s: float = 20.0) -> dict[str, Checkpoint]:
    """Until every domain checkpointed `round_index` (nodes checkpoint after applying the last Z)."""
    give_up = time.monotonic() + timeout_s
    while True:
        found = {domain: load_checkpoint(folder / domain) for domain in DOMAINS}
        if all(value is not None and value.round >= round_index for value in found.values()):
            return found  # type: ignore[return-value]
        assert time.monotonic() < give_up, {d: (c.round if c else None) for d, c in found.items()}
        await asyncio.sleep(0.05)



def runner_config(files: dict[str, dict[str, Path]], domain: str, aggregator: str, folder: Path) -> Any:
    """The NodeConfig of an in-process NodeRunner of one test domain (plaintext loopback, state in folder/domain)."""
    from pydantic import SecretStr

    from cdimf.common.config import NodeConfig, TLSConfig

    return NodeConfig(domain=domain, train_path=files[domain]["train"], test_path=files[domain].get("test"), data_format="csv",
                      aggregator=aggregator, state_dir=folder / domain, secret=SecretStr(SECRET), ials=ials(seeds()[domain]),
                      tls=TLSConfig(insecure=True))


def hold_last_push(runner: Any, aggregator: Any, clock: Any, rounds: int, deadline_s: float, poll_s: float = 0.02) -> None:
    """Make the runner's push of round `rounds` wait until that round closed without it (the test's clock passes its deadline)
    and the run finished; earlier pushes go through as they are."""
    push = runner._push
    state = aggregator.service.state

    async def late_push(run_id: str, round_index: int, values: np.ndarray) -> int:
        """The push, held back on the last round until the run finished without it."""
        if round_index >= rounds:
            # the last round's deadline passes now: it closes on the other domains' pushes alone
            clock.now += deadline_s + 1.0
            aggregator.service.changes.notify()
        give_up = time.monotonic() + 60
        while round_index >= rounds and state.run is not None and state.run.state == "running":
            assert time.monotonic() < give_up, "the last round did not close without the held-back domain"
            await asyncio.sleep(poll_s)
        return int(await push(run_id, round_index, values))

    runner._push = late_push


async def run_with_cloth_late_for_the_last_round(folder: Path, files: dict[str, dict[str, Path]], params: Any, clock: Any) -> tuple[Any, dict[str, Any]]:
    """In-process aggregator on `clock` and both domains' NodeRunners over loopback gRPC, cloth's last push held back
    (hold_last_push) until the run finished without it; returns (the aggregator's state, the runners) once both checkpointed the last round."""
    from cdimf.aggregator.service import start_aggregator
    from cdimf.common.config import AggregatorConfig, TLSConfig
    from cdimf.domain_node.runner import NodeRunner

    aggregator = await start_aggregator(AggregatorConfig(listen="127.0.0.1:0", state_dir=folder / "aggregator", tls=TLSConfig(insecure=True)), clock=clock)
    runners = {domain: NodeRunner(runner_config(files, domain, aggregator.address, folder), node_data(files, domain)) for domain in DOMAINS}
    tasks = []
    try:
        hold_last_push(runners["cloth"], aggregator, clock, params.rounds, params.round_deadline_s)
        tasks = [asyncio.create_task(runner.run()) for runner in runners.values()]
        async with AggregatorClient(aggregator.address, rpc_timeout_s=10, retry_for_s=30) as control:
            await wait_for_domains(control, 2)
            run = await control.start_run(params)
            _ = [event async for event in control.watch_run(run.run_id)]
        await wait_for_checkpoints(folder, params.rounds, timeout_s=20.0)
        return aggregator.service.state, runners
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for runner in runners.values():
            await runner.close()
        await aggregator.stop(0.5)
