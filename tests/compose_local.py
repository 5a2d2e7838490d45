"""Run docker-compose.yml without Docker: every service as local processes, each in its own network namespace.

Each service gets the file-system view its volume list describes, rebuilt under a sandbox
folder (bind mounts link to the repository, named volumes to folders shared between services,
as Docker shares them; container paths in commands are mapped onto the view), its own network
namespace named after the service (so `aggregator:7070` resolves as on the compose network),
the environment the compose file lists, and exactly its command with `cdimf` as entrypoint.
Services start in `depends_on` order, honouring `service_completed_successfully` and
`service_healthy` (by running the service's own health check until it passes).

Used by tests/test_compose.py; run it by hand for the full two-domain simulation:
    sudo .venv/bin/python tests/compose_local.py [--keep SANDBOX]
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # netns.py beside this file, also when run as a script
import netns

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
WORKDIR = PurePosixPath("/srv/cdimf")  # the image's WORKDIR (deploy/Dockerfile)
HEALTH_POLL_S = 0.2
STOP_GRACE_S = 15.0


def load_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The parsed compose file (YAML anchors and merge keys applied, as Compose applies them)."""
    return yaml.safe_load(path.read_text())


def volume_mounts(service: Mapping[str, Any]) -> list[tuple[str, PurePosixPath, bool]]:
    """(source, container target, read-only) of each short-syntax volume of a service."""
    mounts = []
    for entry in service.get("volumes", []):
        if not isinstance(entry, str):
            raise ValueError(f"only the short volume syntax is supported, got {entry!r}")
        source, target, *mode = entry.split(":")
        mounts.append((source, PurePosixPath(target), mode == ["ro"]))
    return mounts


def is_bind(source: str) -> bool:
    """Whether a volume source is a host path (bind mount) rather than a named volume."""
    return source.startswith((".", "/"))


def build_view(name: str, service: Mapping[str, Any], sandbox: Path) -> Path:
    """Recreate the service's mounts under sandbox/<name>/ and return that root."""
    root = sandbox / name
    (root / WORKDIR.relative_to("/")).mkdir(parents=True, exist_ok=True)
    for source, target, _ in volume_mounts(service):
        place = root / target.relative_to("/")
        place.parent.mkdir(parents=True, exist_ok=True)
        if is_bind(source):
            host = (REPO / source).resolve()
            if not host.exists():
                raise FileNotFoundError(f"{name}: bind source {source} does not exist")
            if host.is_file():
                # copied, not linked: the config loader resolves its own path to find relative files
                shutil.copy(host, place)
            else:
                place.symlink_to(host, target_is_directory=True)
        else:
            shared = sandbox / "volumes" / source
            shared.mkdir(parents=True, exist_ok=True)
            place.symlink_to(shared, target_is_directory=True)
    return root


def in_view(root: Path, argument: str) -> str:
    """Map an absolute container path in a command line onto the service's view."""
    return str(root / argument.lstrip("/")) if argument.startswith("/") else argument


def start_order(services: Mapping[str, Any]) -> list[str]:
    """Service names so that each comes after everything it depends on (compose's order)."""
    ordered: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        """Append `name` after its dependencies (depth first); ValueError on a cycle."""
        if name in ordered:
            return
        if name in visiting:
            raise ValueError(f"depends_on cycle through {name}")
        visiting.add(name)
        for dependency in services[name].get("depends_on", {}):
            visit(dependency)
        visiting.discard(name)
        ordered.append(name)

    for name in services:
        visit(name)
    return ordered


@dataclass
class StackRun:
    """What happened: each one-shot service's finished process, and where the logs are."""

    finished: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    stop_status: dict[str, int] = field(default_factory=dict)


def _environment(service: Mapping[str, Any], extra: Mapping[str, str]) -> dict[str, str]:
    """The process environment: ours (PATH, the virtualenv), the compose file's, then `extra`."""
    listed = service.get("environment", {})
    if isinstance(listed, list):
        listed = dict(item.split("=", 1) for item in listed)
    return {**os.environ, **{key: str(value) for key, value in listed.items()}, **extra}


def _check_dependencies(name: str, service: Mapping[str, Any], result: "StackRun", healthy: set[str]) -> None:
    """Assert that what `name` depends on is in the state its depends_on condition asks for."""
    for dependency, rule in service.get("depends_on", {}).items():
        condition = rule["condition"]
        if condition == "service_completed_successfully":
            assert result.finished[dependency].returncode == 0, f"{name} needs {dependency} to succeed"
        elif condition == "service_healthy":
            assert dependency in healthy, f"{name} needs {dependency} healthy"
        else:
            raise ValueError(f"{name}: unsupported depends_on condition {condition}")


def run_stack(
    sandbox: Path,
    compose: Mapping[str, Any] | None = None,
    extra_env: Mapping[str, Mapping[str, str]] | None = None,
    health_deadline_s: float = 60.0,
    one_shot_deadline_s: float = 900.0,
) -> StackRun:
    """Run every service until the last one-shot service ends, then stop the servers with
    SIGTERM (as `docker compose down` does). `extra_env` adds variables per service.

    Services start in waves, as compose starts them: all whose dependencies are met start
    together (the two nodes in parallel), and a wave ends when its one-shots finished and its
    servers are healthy.
    """
    compose = load_compose() if compose is None else compose
    services = compose["services"]
    extra_env = extra_env or {}
    entrypoint = str(Path(sys.executable).with_name("cdimf"))
    result = StackRun()
    healthy: set[str] = set()
    with netns.private_network(list(services)) as network:
        servers: dict[str, subprocess.Popen[bytes]] = {}
        pending = start_order(services)
        while pending:
            wave = [name for name in pending
                    if all(dependency in result.finished or dependency in healthy for dependency in services[name].get("depends_on", {}))]
            assert wave, f"no service can start: {pending}"
            probes: dict[str, tuple[list[str], Path, dict[str, str]]] = {}
            for name in wave:
                service = services[name]
                _check_dependencies(name, service, result, healthy)
                root = build_view(name, service, sandbox)
                workdir = root / WORKDIR.relative_to("/")
                command = [entrypoint, *(in_view(root, argument) for argument in service["command"])]
                environment = _environment(service, extra_env.get(name, {}))
                result.logs[name] = sandbox / f"{name}.log"
                if service.get("restart") == "no":
                    finished = network.run(name, command, timeout=one_shot_deadline_s, cwd=workdir, env=environment)
                    result.finished[name] = finished
                    result.logs[name].write_text(finished.stdout + finished.stderr)
                    continue
                with open(result.logs[name], "wb") as log:
                    servers[name] = network.popen(name, command, cwd=workdir, env=environment, stdout=log, stderr=subprocess.STDOUT)
                probe = [entrypoint, *(in_view(root, argument) for argument in service["healthcheck"]["test"][2:])]
                probes[name] = (probe, workdir, environment)
            for name, (probe, workdir, environment) in probes.items():
                _wait_healthy(network, name, probe, workdir, environment, servers[name], health_deadline_s, result.logs[name])
                healthy.add(name)
            pending = [name for name in pending if name not in wave]
        for process in servers.values():
            process.send_signal(signal.SIGTERM)
        for name, process in servers.items():
            try:
                result.stop_status[name] = process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                result.stop_status[name] = -9  # private_network kills it on exit
    return result


def _wait_healthy(
    network: netns.Network, name: str, probe: list[str], workdir: Path, environment: Mapping[str, str],
    process: subprocess.Popen[bytes], deadline_s: float, log: Path,
) -> None:
    """Run the service's own health check until it passes; fail early if the server exits.

    Probing starts once the server printed its `LISTENING host:port` line (the runtime's
    readiness contract), because each probe is a whole `cdimf` process.
    """
    give_up = time.monotonic() + deadline_s
    while "LISTENING " not in log.read_text(errors="replace") and process.poll() is None and time.monotonic() < give_up:
        time.sleep(HEALTH_POLL_S)
    while True:
        checked = network.run(name, probe, cwd=workdir, env=dict(environment), timeout=30)
        if checked.returncode == 0:
            return
        if process.poll() is not None:
            raise AssertionError(f"{name} exited with {process.returncode} before it was healthy:\n{log.read_text()[-2000:]}")
        if time.monotonic() > give_up:
            raise AssertionError(f"{name} not healthy after {deadline_s} s: {checked.stdout}{checked.stderr}")
        time.sleep(HEALTH_POLL_S)  # the poll interval of a bounded wait, like compose's start_interval


def main(argv: list[str] | None = None) -> int:
    """Run the whole compose simulation locally and exit with the launcher's status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="sandbox folder to keep (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    reason = netns.unavailable_reason()
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    sandbox = args.keep or Path(tempfile.mkdtemp(prefix="cdimf-compose-"))
    try:
        run = run_stack(sandbox)
        for name, finished in run.finished.items():
            print(f"== {name} (exit {finished.returncode})\n{finished.stdout}{finished.stderr}")
        print(f"servers stopped with {run.stop_status}")
        return run.finished["launcher"].returncode
    finally:
        if args.keep is None:
            shutil.rmtree(sandbox, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
