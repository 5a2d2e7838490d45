"""`cdimf simulate`: the aggregator and one node per domain as separate OS processes on 127.0.0.1.

It starts them (each in its own process group, every server on port 0 of 127.0.0.1 and read back
from its `LISTENING host:port` line: a server owns the port it bound, so the aggregator comes
first and the nodes, told its address, after it), waits until every node registered, runs one
training run to its end, asks every node's Evaluate RPC for
HR@k/NDCG@k on its test split, prints the table and shuts everything down: SIGTERM to each
process group, SIGKILL after a grace period, also on Ctrl-C/SIGTERM of `cdimf simulate` itself.
Children also get SIGKILL from the kernel should this process die without cleaning up.

Transport: mutual TLS with throwaway certificates (a fresh CA in the run's temporary folder),
unless `insecure = true` (plaintext on loopback, an explicit opt-out). Each node gets only its
own domain's files and the federation secret; the aggregator gets neither.
"""

import argparse
import asyncio
import ctypes
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from pydantic import Field, model_validator

from cdimf.common.config import ColdStartPolicy, FederationDomain, RunParams, TLSConfig, ValidationParams, unique_domain_names
from cdimf.common.core.params import ADMMParams, LocalIALSParams, StrictModel
from cdimf.config_flags import add_model_flags, load_with_flags
from cdimf.progress import say
from cdimf.resources import embedded_pair

TERMINATE_GRACE_S = 5.0


class SimulatedDomain(FederationDomain):
    """One `[[domains]]` entry of simulate: a federation domain and its node's cold-start policy (its `[domains.cold_start]`)."""

    cold_start: ColdStartPolicy = Field(default_factory=ColdStartPolicy, description="which of its users other domains' cold-start rows may receive")

    def node_fields(self) -> dict[str, Any]:
        """This domain's fields of a NodeConfig, its cold-start policy included."""
        return {**super().node_fields(), "cold_start": self.cold_start.model_dump(mode="json")}


def _warm_pair() -> list[SimulatedDomain]:
    """The embedded warm Sport&Cloth pair, one entry per domain."""
    warm_pair = embedded_pair("warm-start_sport_cloth")
    return [
        SimulatedDomain(name=name, train_path=warm_pair / folder / "train.txt", test_path=warm_pair / folder / "test.txt", data_format="paper")
        for name, folder in (("sport", "sport_cloth"), ("cloth", "cloth_sport"))
    ]


def _warm_ials() -> LocalIALSParams:
    """The local model: configs/warm-sport-cloth.toml's CDIMF hyperparameters (at the run's rank)."""
    return LocalIALSParams(alpha=0.01, lam=1.0, nu=0.0, seed=0)


def _warm_run() -> RunParams:
    """The default run: 10 synchronous rounds at rank 64."""
    return RunParams(rounds=10, rank=64, admm=ADMMParams(rho=1.0, prox="identity"), min_domains=2)


class SimulateConfig(StrictModel):
    """A local federation: the domains' files, the local model, the run and the transport."""

    domains: list[SimulatedDomain] = Field(default_factory=_warm_pair, min_length=1, description="one node per domain")
    ials: LocalIALSParams = Field(default_factory=_warm_ials, description="every node's local model (its rank is run.rank)")
    run: RunParams = Field(default_factory=_warm_run)
    insecure: bool = Field(False, description="plaintext gRPC on loopback instead of throwaway mutual TLS")
    k: int = Field(10, ge=1, le=1000, description="cut-off of the test metrics")
    validation: ValidationParams = Field(default_factory=ValidationParams, description="every node's per-round validation")
    work_dir: Path | None = Field(None, description="folder for certificates, state and logs (default: a temporary one, removed)")
    startup_timeout_s: float = Field(120.0, gt=0, description="how long a process may take to start listening")

    @model_validator(mode="after")
    def _consistent(self) -> "SimulateConfig":
        """Unique domain names, no more min_domains than domains and no second rank."""
        unique_domain_names(self.domains)
        if self.run.min_domains > len(self.domains):
            raise ValueError(f"run.min_domains ({self.run.min_domains}) exceeds the {len(self.domains)} domains")
        self.ials.at_rank(self.run.rank)
        return self


class SimulationError(RuntimeError):
    """A process of the simulation failed to start or the run failed; the message says which and why."""


@dataclass
class Child:
    """A started process of the simulation."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    address: str = ""

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of its log (for error messages)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent dies (Linux), so no child outlives a killed launcher."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _child_environment(settings: dict[str, Any]) -> dict[str, str]:
    """This process's environment without CDIMF_* variables, plus the child's config as CDIMF_* JSON values."""
    environ = {name: value for name, value in os.environ.items() if not name.startswith("CDIMF_")}
    environ.update({f"CDIMF_{name.upper()}": json.dumps(value) for name, value in settings.items()})
    return environ


class Federation:
    """The started processes; `close` stops them all (SIGTERM to each group, then SIGKILL)."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.children: list[Child] = []

    def start(self, name: str, command: list[str], settings: dict[str, Any], extra_environment: dict[str, str] | None = None) -> Child:
        """Start a process in its own process group (call `wait_listening` for its address)."""
        log_path = self.work_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "cdimf", *command, "--log-level", "WARNING"],
                cwd=self.work_dir, env={**_child_environment(settings), **(extra_environment or {})}, stdout=subprocess.PIPE, stderr=log,
                start_new_session=True, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        child = Child(name, process, log_path)
        self.children.append(child)
        return child

    def wait_listening(self, child: Child, timeout_s: float) -> str:
        """The child's address from its LISTENING line."""
        child.address = self._listening(child, timeout_s)
        return child.address

    def _listening(self, child: Child, timeout_s: float) -> str:
        """Read the child's stdout until its LISTENING line; SimulationError if it exits or times out."""
        stream = child.process.stdout
        assert stream is not None
        give_up = time.monotonic() + timeout_s
        while time.monotonic() < give_up:
            ready, _, _ = select.select([stream], [], [], 0.2)
            if ready:
                line = stream.readline().decode(errors="replace").strip()
                if line.startswith("LISTENING "):
                    return line.split(" ", 1)[1]
                if not line and child.process.poll() is not None:
                    break
            elif child.process.poll() is not None:
                break
        raise SimulationError(f"{child.name} did not start (exit status {child.process.poll()}):\n{child.log_tail()}")

    def check_alive(self) -> None:
        """SimulationError naming the first process that exited."""
        for child in self.children:
            if child.process.poll() is not None:
                raise SimulationError(f"{child.name} exited with status {child.process.returncode}:\n{child.log_tail()}")

    def close(self) -> None:
        """Stop every process group: SIGTERM, then SIGKILL after TERMINATE_GRACE_S; reap them all."""
        for child in reversed(self.children):
            _signal_group(child.process, signal.SIGTERM)
        give_up = time.monotonic() + TERMINATE_GRACE_S
        for child in reversed(self.children):
            try:
                child.process.wait(max(0.0, give_up - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for child in self.children:
            # the group may hold grandchildren even after the leader exited
            _signal_group(child.process, signal.SIGKILL)
            child.process.wait()
            if child.process.stdout is not None:
                child.process.stdout.close()


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    """Send a signal to a child's process group (gone groups are ignored)."""
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def write_throwaway_certificates(folder: Path, domains: list[str]) -> dict[str, TLSConfig]:
    """Throwaway CA and certificates for the aggregator, each domain and the operator (this process)."""
    from cdimf.common.security import pki

    folder.mkdir(parents=True, exist_ok=True)
    ca = pki.create_ca("cdimf simulate CA", days=2)
    pki.write_public_file(folder / "ca.pem", ca.certificate_pem())
    issued = {"aggregator": pki.issue_aggregator_certificate(ca, ["127.0.0.1"], days=2),
              "operator": pki.issue_operator_certificate(ca, days=2)}
    for domain in domains:
        issued[domain] = pki.issue_domain_certificate(ca, domain, hosts=["127.0.0.1"], days=2)
    settings = {}
    for party, certificate in issued.items():
        certificate.write(folder / f"{party}.pem", folder / f"{party}.key")
        settings[party] = TLSConfig(ca_file=folder / "ca.pem", cert_file=folder / f"{party}.pem", key_file=folder / f"{party}.key")
    return settings


def _tls_settings(tls: TLSConfig) -> dict[str, Any]:
    """A TLS config as the JSON a child reads from CDIMF_TLS."""
    return tls.model_dump(mode="json")


async def _drive(config: SimulateConfig, federation: Federation, aggregator: str, nodes: dict[str, str],
                 operator: TLSConfig, as_json: bool) -> dict[str, Any]:
    """Start the run, follow it, then evaluate every node on its test split."""
    from cdimf.common.metric_labels import labelled_percent
    from cdimf.common.rpc.aggregator_client import AggregatorClient
    from cdimf.common.rpc.channels import credentials_for, open_channel
    from cdimf.common.wire.serde import ended_last, event_to_json
    from cdimf.protos.v1 import federation_pb2 as pb
    from cdimf.protos.v1 import federation_pb2_grpc as pb_grpc
    from cdimf.runtime_cli import follow_run, start_run

    client = AggregatorClient(aggregator, "", credentials_for(operator), rpc_timeout_s=30.0, retry_for_s=30.0,
                              on_retry=lambda message: say(f"cdimf simulate: {message}"))
    try:
        await _all_registered(client, set(nodes), config.startup_timeout_s)
        started = time.perf_counter()
        info = await start_run(client, config.run, config.startup_timeout_s)
        say(f"run {info.run_id} started over {', '.join(info.admitted_domains)}")
        # progress goes to stderr in both modes (JSON is stdout's)
        outcome = await follow_run(client, info.run_id, info.rounds, as_json=False)
        history = [event_to_json(event) for record in (await client.list_runs(info.run_id, with_events=True)).runs
                   for event in ended_last(record.events)]
    finally:
        await client.close()
    seconds = time.perf_counter() - started
    federation.check_alive()
    if outcome != 0:
        raise SimulationError(f"run {info.run_id} did not finish")

    async def evaluated(name: str, address: str) -> tuple[str, dict[str, Any]]:
        """(domain, its Evaluate reply on the test split, or valid without one)."""
        async with open_channel(address, operator) as channel:
            split = "test" if next(d for d in config.domains if d.name == name).test_path is not None else "valid"
            reply = await pb_grpc.DomainNodeStub(channel).Evaluate(pb.EvaluateRequest(split=split, k=config.k), timeout=600.0)
            return name, {"split": reply.split, "negatives": int(reply.negatives), "users": int(reply.users), "round": int(reply.round),
                          "metrics": labelled_percent(reply.metrics, reply.split, reply.negatives)}

    # every node evaluates in its own process: ask them all at once
    results = dict(await asyncio.gather(*(evaluated(name, address) for name, address in nodes.items())))
    return {"run_id": info.run_id, "rounds": info.rounds, "admitted": list(info.admitted_domains), "train_seconds": round(seconds, 3),
            "transport": "insecure" if config.insecure else "mutual TLS", "domains": results, "history": history}


async def _all_registered(client: Any, domains: set[str], timeout_s: float) -> None:
    """Wait until every domain of the simulation registered with the aggregator.

    StartRun admits only the domains that did, and run.min_domains may be lower than the number
    of domains (1 for asynchronous runs).
    """
    give_up = time.monotonic() + timeout_s
    said: set[str] = set()
    while True:
        registered = {entry.domain for entry in (await client.get_status()).domains}
        if domains <= registered:
            say(f"cdimf simulate: all {len(domains)} domains registered")
            return
        if time.monotonic() >= give_up:
            raise SimulationError(f"domains {sorted(domains - registered)} did not register within {timeout_s:.0f} s")
        if domains - registered != said:
            said = domains - registered
            say(f"cdimf simulate: waiting for {', '.join(sorted(said))} to register (up to {give_up - time.monotonic():.0f} s more)")
        await asyncio.sleep(0.05)


def format_results(results: dict[str, Any], k: int) -> str:
    """The results table: one row per domain, each metric labelled with its split and protocol, in %."""
    lines = [f"cdimf simulate: run {results['run_id']}, {results['rounds']} rounds, {results['train_seconds']:.1f} s, {results['transport']}"]
    from cdimf.common.core.evaluation import PAPER_NEGATIVES

    for name, row in results["domains"].items():
        shown = "  ".join(f"{label} {value:.2f}%" for label, value in row["metrics"].items())
        lines.append(f"{name:<12} {row['users']:>7} users  {shown}")
    for name, row in results["domains"].items():
        if row["split"] == "test" and 0 < row["negatives"] < PAPER_NEGATIVES:
            # a node caps its negatives to what a small catalog holds; say so beside the numbers
            lines.append(f"{name}: ranked against {row['negatives']} negatives, not the paper's {PAPER_NEGATIVES}: "
                         "its catalog has too few items (the node's log says how many)")
    return "\n".join(lines)


def simulate(config: SimulateConfig, as_json: bool = False) -> dict[str, Any]:
    """Run the whole simulation; returns the results (raises SimulationError on failure)."""
    temporary = config.work_dir is None
    # absolute: the children run with the work dir as their working directory
    work_dir = (Path(tempfile.mkdtemp(prefix="cdimf-simulate-")) if temporary else Path(config.work_dir)).resolve()  # type: ignore[arg-type]
    work_dir.mkdir(parents=True, exist_ok=True)
    federation = Federation(work_dir)
    failed = False
    try:
        names = [domain.name for domain in config.domains]
        if config.insecure:
            tls_of = {party: TLSConfig(insecure=True) for party in ["aggregator", "operator", *names]}
        else:
            tls_of = write_throwaway_certificates(work_dir / "certs", names)
        secret_file = work_dir / "federation.secret"
        from cdimf.common.security.pki import write_private_file

        write_private_file(secret_file, secrets.token_hex(32).encode() + b"\n")
        # the aggregator binds a port of its own (no port is reserved and handed over: servers
        # never share a port), and the nodes learn it from its LISTENING line
        aggregator = federation.start(
            "aggregator", ["serve-aggregator"],
            {"listen": "127.0.0.1:0", "state_dir": str(work_dir / "state" / "aggregator"), "tls": _tls_settings(tls_of["aggregator"])},
        )
        aggregator_address = federation.wait_listening(aggregator, config.startup_timeout_s)
        say(f"cdimf simulate: aggregator listening on {aggregator_address}")
        # the nodes share this machine: each gets its slice of the cores (solver and BLAS threads)
        threads = max(1, (os.cpu_count() or 1) // len(config.domains))
        ials = config.ials if config.ials.threads is not None else config.ials.model_copy(update={"threads": threads})
        blas = {name: str(ials.threads) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        started: list[Child] = []
        for domain in config.domains:
            settings = {
                **domain.node_fields(),
                "listen": "127.0.0.1:0",
                "aggregator": aggregator_address,
                "state_dir": str(work_dir / "state" / domain.name),
                "secret_file": str(secret_file),
                "ials": ials.model_dump(mode="json"),
                "validation": config.validation.model_dump(mode="json"),
                "tls": _tls_settings(tls_of[domain.name]),
            }
            started.append(federation.start(f"node-{domain.name}", ["serve-node"], settings, blas))
        say(f"cdimf simulate: started {len(started)} nodes; each loads its files ({', '.join(d.train_path.name for d in config.domains)} ...)")
        # the nodes load their data in parallel; each prints LISTENING once it serves
        nodes = {}
        for domain, child in zip(config.domains, started):
            nodes[domain.name] = federation.wait_listening(child, config.startup_timeout_s)
            say(f"cdimf simulate: node {domain.name} loaded its data and listens on {nodes[domain.name]}")
        return asyncio.run(_drive(config, federation, aggregator_address, nodes, tls_of["operator"], as_json))
    except BaseException:
        failed = True
        raise
    finally:
        federation.close()
        if temporary and not failed:
            shutil.rmtree(work_dir, ignore_errors=True)
        elif failed:
            print(f"cdimf simulate: logs kept in {work_dir}", file=sys.stderr)


def _interrupt_like_ctrl_c(signum: int, frame: object) -> None:
    """SIGTERM handler: deliver SIGINT, so that SIGTERM unwinds exactly like Ctrl-C and every child is stopped.

    Raising KeyboardInterrupt here instead would interrupt whatever bytecode runs, inside the
    event loop or gRPC's channel code as well, and a run left that way once hung on shutdown.
    Through SIGINT, asyncio.run cancels the main task cleanly (its own SIGINT handler), and
    outside the event loop Python's default handler raises KeyboardInterrupt as for Ctrl-C.
    """
    signal.raise_signal(signal.SIGINT)


def _run(args: argparse.Namespace) -> int:
    """The `cdimf simulate` handler."""
    config = load_with_flags(SimulateConfig, args.config, args, args.fields)
    # SIGTERM cleans up like Ctrl-C: the finally blocks stop every child
    previous = signal.signal(signal.SIGTERM, _interrupt_like_ctrl_c)
    try:
        results = simulate(config, args.json)
    except (SimulationError, grpc.RpcError) as error:
        from cdimf.runtime_cli import report_error

        report_error(f"simulate: {error}", args.json)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(json.dumps({"ok": True, **results}, indent=2) if args.json else format_results(results, config.k))
    return 0


def add_parser(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register `cdimf simulate` (SimulateConfig; --rounds N, --insecure, --json, ...)."""
    parser = commands.add_parser("simulate", help="run the aggregator and one node per domain as local processes and train once")
    parser.add_argument("--config", help="TOML file with the SimulateConfig fields (default: the embedded warm Sport&Cloth pair)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.set_defaults(handler=_run, fields=add_model_flags(parser, SimulateConfig, frozenset({"run"})))
