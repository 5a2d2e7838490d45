"""The compose stack of docker-compose.yml on a real Docker engine, for the container tier's tests.

Each Stack is its own compose project (own networks and volumes, removed at the end); every wait
is bounded. Without a reachable engine the tests skip, except where CDIMF_REQUIRE_DOCKER=1 (CI):
then they fail, so a skip can never hide the tier.
"""

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
METRICS_PORT = 9100


def docker_reachable() -> bool:
    """Whether a Docker engine answers here."""
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0


def compose_command() -> list[str]:
    """`docker compose` where the CLI has it (Compose v2), else docker-compose 1.29."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("no `docker compose` and no docker-compose")


def require_docker() -> None:
    """Skip without an engine; fail instead where CI requires the tier."""
    if docker_reachable():
        return
    if os.environ.get("CDIMF_REQUIRE_DOCKER") == "1":
        pytest.fail("CDIMF_REQUIRE_DOCKER=1 but no Docker engine is reachable")
    pytest.skip("no Docker engine reachable")


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the docker CLI; its completed process."""
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=check)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition as {'name{labels}': value} (comments dropped)."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


class Stack:
    """One compose project of docker-compose.yml plus an optional override file."""

    def __init__(self, tmp: Path, override: str = "") -> None:
        self.project = f"cdimft{uuid.uuid4().hex[:8]}"
        self.files = [REPO / "docker-compose.yml"]
        if override:
            extra = tmp / "override.yml"
            extra.write_text(override)
            self.files.append(extra)
        self.env = {**os.environ, "COMPOSE_PROJECT_NAME": self.project}
        self.compose = compose_command()

    def run(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`docker compose -f ... ARGS` of this project."""
        files = [part for path in self.files for part in ("-f", str(path))]
        command = [*self.compose, *files, *args]
        return subprocess.run(command, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout, check=check)

    def container(self, service: str) -> str:
        """The container id of a service, running or exited (Compose v2's `ps` lists exited ones only with -a)."""
        found = self.run("ps", "-a", "-q", service).stdout.split()
        assert found, f"no container of {service}"
        return found[0]

    def logs(self, service: str) -> str:
        """A service's output so far (stdout and stderr)."""
        done = docker("logs", self.container(service), timeout=60)
        return done.stdout + done.stderr

    def ip(self, service: str) -> str:
        """The service's address on the project's network."""
        info = json.loads(docker("inspect", self.container(service)).stdout)[0]
        return next(iter(info["NetworkSettings"]["Networks"].values()))["IPAddress"]

    def network(self) -> str:
        """The project's federation network."""
        return f"{self.project}_federation"

    def metrics(self, service: str) -> dict[str, float]:
        """The service's /metrics, fetched over the project's network."""
        with urllib.request.urlopen(f"http://{self.ip(service)}:{METRICS_PORT}/metrics", timeout=10) as reply:
            return parse_metrics(reply.read().decode())

    def wait_metric(self, service: str, name: str, at_least: float, timeout_s: float) -> float:
        """Poll a service's metric until it reaches `at_least`; its value (fails after timeout_s)."""
        give_up = time.monotonic() + timeout_s
        value = 0.0
        while time.monotonic() < give_up:
            try:
                value = self.metrics(service).get(name, 0.0)
            except OSError:
                value = 0.0  # starting, restarting or unreachable for the moment
            if value >= at_least:
                return value
            time.sleep(0.5)
        pytest.fail(f"{service}: {name} stayed at {value} < {at_least} for {timeout_s} s")

    def wait_exit(self, service: str, timeout_s: float = 300) -> int:
        """Wait for a service's container to exit; its exit code."""
        done = docker("wait", self.container(service), timeout=timeout_s)
        return int(done.stdout.strip())

    def checkpoint_factors(self, service: str, dest: Path) -> tuple[np.ndarray, np.ndarray]:
        """(users, items) of the node's last checkpoint, copied out of its (possibly stopped) container."""
        from cdimf.domain_node.checkpoint import load_checkpoint

        target = dest / service
        docker("cp", f"{self.container(service)}:/srv/cdimf/state", str(target))
        checkpoint = load_checkpoint(target)
        assert checkpoint is not None, f"{service} has no checkpoint"
        return checkpoint.trainer.users, checkpoint.trainer.items

    def down(self) -> None:
        """Remove the project's containers, networks and volumes."""
        self.run("down", "-v", "-t", "2", "--remove-orphans", timeout=180, check=False)


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def round_metrics(launcher_output: str) -> set[tuple[int, str]]:
    """(round, domain) of the launcher's per-round metric lines (`round N  domain  valid HR@10 (99 neg) ...`), colours stripped."""
    text = ANSI.sub("", launcher_output)
    return {(int(number), domain) for number, domain in re.findall(r"\bround\s+(\d+)\s+(\w+)\s+valid HR@", text)}


def node_test_tables(output: str) -> dict[str, list[str]]:
    """The nodes' TEST table lines by domain, from compose or container output."""
    tables: dict[str, list[str]] = {}
    for line in output.splitlines():
        found = re.search(r"TEST (\w+): (.*)$", line)
        if found:
            tables.setdefault(found.group(1), []).append(found.group(2).strip())
    return tables
