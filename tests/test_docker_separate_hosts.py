"""Container tier: deploy/README.md's three-hosts guide, followed step by step on real containers.

Each party is a host of its own: a folder standing for its file system and a Docker network of its
own (internal: no route out). The aggregator is the one container on every network, under the
guide's name `agg.example.org`; the nodes and the operator share no network, so they cannot reach
each other. The guide's commands run as written, with only the host's root moved to that party's
folder and the aggregator's `-p 7070:7070` replaced by its networks. The guide's run must finish.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.docker_stack import REPO, docker, require_docker, round_metrics

GUIDE = REPO / "deploy" / "README.md"
DATA = REPO / "data" / "amazon-cdr" / "warm-start_sport_cloth"
IMAGE = "cdimf:local"
UID = 10001  # the image's user: the guide gives the host's `cdimf` user this uid
HOSTS = {"agg.example.org": "agg", "ml.sport.example.com": "sport", "ml.cloth.example.net": "cloth"}
pytestmark = pytest.mark.timeout(900)


def section(title: str) -> str:
    """The text of the guide's `### <title>...` section."""
    text = GUIDE.read_text()
    start = text.index(f"### {title}")
    end = text.find("\n### ", start + 1)
    return text[start:end if end > 0 else len(text)]


def blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of one language, in order."""
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def commands(block: str) -> list[str]:
    """A shell block's commands: continuation lines joined, trailing `# comments` dropped."""
    joined = block.replace("\\\n", " ")
    return [re.sub(r"\s+#\s.*$", "", line).strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def between(text: str, after: str, before: str) -> str:
    """The text between two markers."""
    start = text.index(after) + len(after)
    return text[start:text.index(before, start)]


@dataclass
class Party:
    """One host: its root folder (for /etc, /var/lib, /srv and the home) and its Docker network."""

    name: str
    root: Path
    network: str

    def host_path(self, path: str) -> str:
        """A host path of the guide on this party's host."""
        if path.startswith("~/"):
            return str(self.root / "home" / path[2:])
        return str(self.root / path.lstrip("/")) if path.startswith("/") else path

    def shell(self, command: str) -> None:
        """Run one of the guide's host commands on this host (its absolute paths moved under the root)."""
        moved = re.sub(r"(?<![\w.])(/etc/cdimf|/var/lib/cdimf|/srv/\w+)", lambda m: self.host_path(m.group(1)), command)
        # the host's `cdimf` user has the image's uid (step 1)
        moved = moved.replace("-o cdimf ", f"-o {UID} ").replace("chown cdimf: ", f"chown {UID}:{UID} ")
        assert "useradd" not in moved
        done = subprocess.run(moved, shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (command, done.stderr)


@dataclass
class Federation:
    """The parties of one test run and the Docker objects it made."""

    project: str
    parties: dict[str, Party]
    containers: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)

    def close(self) -> None:
        """Remove every container, volume and network of the run."""
        for container in self.containers:
            docker("rm", "-f", "-v", container, check=False)
        for volume in self.volumes:
            docker("volume", "rm", "-f", volume, check=False)
        for party in self.parties.values():
            docker("network", "rm", party.network, check=False)


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    """Four hosts (aggregator, two nodes, the operator), each with its folder and internal network."""
    require_docker()
    project = f"cdimfh{uuid.uuid4().hex[:8]}"
    parties = {name: Party(name, tmp_path / name, f"{project}-{name}") for name in ("agg", "sport", "cloth", "operator")}
    made = Federation(project, parties)
    try:
        for party in parties.values():
            party.root.mkdir()
            docker("network", "create", "--internal", party.network)
        yield made
    finally:
        made.close()


def build_image() -> None:
    """Step 1's image, built from this checkout (the base CI passes where no registry is reachable)."""
    step = section("Step 1")
    build = re.search(r"docker build -f deploy/Dockerfile -t cdimf:local \.", step)
    assert build, "step 1 names the image build"
    base = os.environ.get("CDIMF_BASE_IMAGE")
    command = build.group(0).replace(" -t ", f" --build-arg BASE={shlex.quote(base)} -t ", 1) if base else build.group(0)
    # BuildKit where the CLI has it, so the build reuses the layers `docker compose` built; else the classic builder
    done = subprocess.run(command, shell=True, cwd=REPO, env={**os.environ, "DOCKER_BUILDKIT": "1"}, capture_output=True, text=True, timeout=900)
    if done.returncode != 0 and "buildx" in done.stderr:
        done = subprocess.run(command, shell=True, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def cdimf_on_path() -> str:
    """PATH with this environment's `cdimf` first (the operator's offline machine runs step 2 with it)."""
    return f"{Path(sys.executable).parent}:{os.environ['PATH']}"


def distribute(pki: Path, parties: dict[str, Party]) -> None:
    """Step 2's table: each file to the host and path the table names; `ca.key` to nobody."""
    table = between(section("Step 2"), "| file(s)", "On each host")
    given: set[str] = set()
    for row in [line for line in table.splitlines()[2:] if line.startswith("|")]:
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        files = re.findall(r"`([^`]+)`", cells[0])
        if cells[1].startswith("nobody"):
            assert files == ["ca.key"], row
            continue
        hosts = re.findall(r"`([\w.]+\.(?:org|com|net))`", cells[1])
        targets = [parties[HOSTS[host]] for host in hosts]
        if "every server host" in cells[1]:
            targets = [parties[name] for name in ("agg", "sport", "cloth")]
        elif "cdimf train" in cells[1]:
            targets = [parties["operator"]]
        assert targets, row
        destination = re.findall(r"`([^`]+)`", cells[2])[0]
        for party in targets:
            folder = Path(party.host_path(destination.rstrip("/")))
            folder.mkdir(parents=True, exist_ok=True)
            for name in files:
                shutil.copy2(pki / name, folder / name)
                given.add(name)
    assert "ca.key" not in given and {"ca.pem", "aggregator.key", "sport.key", "cloth.key", "operator.key"} <= given


def listeners(container: str) -> set[str]:
    """The TCP addresses a container listens on (`ip:port`; Docker's own resolver 127.0.0.11 left out)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        text = docker("exec", container, "cat", table, check=False).stdout
        for line in text.splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state != "0A":
                continue
            address, port = local.split(":")
            ipv4 = ".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)) if len(address) == 8 else None
            ip = ipv4 or ("::" if set(address) == {"0"} else address)
            if ip != "127.0.0.11":
                found.add(f"{ip}:{int(port, 16)}")
    return found


def reachable(container: str, host: str, port: int) -> bool:
    """Whether a TCP connection from inside the container to host:port succeeds within 3 s."""
    probe = f"import socket; socket.create_connection(({host!r}, {port}), timeout=3).close()"
    return docker("exec", container, "python", "-c", probe, check=False, timeout=60).returncode == 0


def wait_healthy(container: str, timeout_s: float = 120) -> None:
    """Wait for the image's health check (step 6) to report the container healthy."""
    give_up = time.monotonic() + timeout_s
    state = ""
    while time.monotonic() < give_up:
        state = docker("inspect", "-f", "{{.State.Health.Status}}", container).stdout.strip()
        if state == "healthy":
            return
        time.sleep(1)
    pytest.fail(f"{container} is {state}: {docker('logs', container, check=False).stderr[-2000:]}")


def test_three_hosts_guide_on_separate_networks(federation: Federation) -> None:
    """deploy/README.md section 2, steps 1-8: certificates handed out by its table, the secret between the
    domains only, its configs and `docker run` commands, health checks, and its run to the end."""
    parties, project = federation.parties, federation.project
    build_image()
    # step 1: the service user's folders on every server host
    for name in ("agg", "sport", "cloth"):
        for command in commands(between(section("Step 1"), "Create a service user and folders:\n\n```sh\n", "```")):
            if not command.startswith("useradd"):
                parties[name].shell(command)
    # step 2: the operator's offline machine makes the certificates; the table hands them out
    offline = parties["operator"].root / "offline"
    offline.mkdir()
    (certs,) = commands(blocks(section("Step 2"), "sh")[0])
    made = subprocess.run(certs, shell=True, cwd=offline, env={**os.environ, "PATH": cdimf_on_path()},
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    distribute(offline / "pki", parties)
    chown = re.search(r"On each host: `([^`]+)`", section("Step 2"))
    assert chown
    for name in ("agg", "sport", "cloth"):
        parties[name].shell(chown.group(1))
    # step 3: one domain makes the secret and passes it to the other; the aggregator never has it
    for command in commands(blocks(section("Step 3"), "sh")[0]):
        parties["sport"].shell(command)
    secret = Path(parties["sport"].host_path("/etc/cdimf/federation.secret"))
    shutil.copy2(secret, parties["cloth"].host_path("/etc/cdimf/federation.secret"))
    os.chown(parties["cloth"].host_path("/etc/cdimf/federation.secret"), UID, UID)
    assert not Path(parties["agg"].host_path("/etc/cdimf/federation.secret")).exists()
    # step 4: the configs as written (the cloth host: "the same with cloth"); each node's own data
    aggregator_toml, node_toml = blocks(section("Step 4"), "toml")
    Path(parties["agg"].host_path("/etc/cdimf/aggregator.toml")).write_text(aggregator_toml)
    for domain, folder in (("sport", "sport_cloth"), ("cloth", "cloth_sport")):
        Path(parties[domain].host_path("/etc/cdimf/node.toml")).write_text(node_toml.replace("sport", domain))
        data = Path(parties[domain].host_path(f"/srv/{domain}"))
        data.mkdir(parents=True)
        shutil.copy(DATA / folder / "train.txt", data / "train.txt")
        shutil.copy(DATA / folder / "test.txt", data / "valid.txt")  # the pair's held-out split as its validation
    # step 6: the guide's `docker run` commands
    aggregator_run, node_run = [command for block in blocks(section("Step 6"), "sh") for command in commands(block) if command.startswith("docker run")]
    aggregator = f"{project}-aggregator"
    run = aggregator_run.replace("--name cdimf-aggregator", f"--name {aggregator}").replace("cdimf-aggregator-state", f"{project}-agg-state")
    assert " -p 7070:7070 " in run, "the aggregator publishes its one port"
    run = run.replace(" -p 7070:7070 ", f" --network {parties['operator'].network} --network-alias agg.example.org ")
    start(federation, parties["agg"], run, aggregator, f"{project}-agg-state")
    for domain in ("sport", "cloth"):
        docker("network", "connect", "--alias", "agg.example.org", parties[domain].network, aggregator)
    nodes = {}
    for domain in ("sport", "cloth"):
        name = f"{project}-{domain}"
        command = node_run.replace("/srv/sport", f"/srv/{domain}").replace("--name cdimf-node", f"--name {name}")
        command = command.replace("cdimf-node-state", f"{name}-state")
        host = next(host for host, party in HOSTS.items() if party == domain)
        command = command.replace("docker run -d ", f"docker run -d --network {parties[domain].network} --hostname {host} ", 1)
        start(federation, parties[domain], command, name, f"{name}-state")
        nodes[domain] = name
    # step 7: every server healthy by the image's check; the operator's probe from its own machine
    for container in (aggregator, *nodes.values()):
        wait_healthy(container)
    operator_probe = next(c for c in commands(blocks(section("Step 7"), "sh")[0]) if "agg.example.org:7070" in c)
    # step 8: the operator's run file as written, and its train command
    run_toml = Path(parties["operator"].host_path("~/.cdimf/run.toml"))
    run_toml.write_text(blocks(section("Step 8"), "toml")[0])
    declared = re.search(r"rounds = (\d+)", run_toml.read_text())
    assert declared, "step 8's run.toml sets the rounds"
    rounds = int(declared.group(1))
    subprocess.run(["chown", "-R", f"{UID}:{UID}", str(parties["operator"].root / "home")], check=True)
    (train,) = [c for c in commands(blocks(section("Step 8"), "sh")[0]) if c.startswith("cdimf train")]
    probed = operator(parties["operator"], operator_probe)
    assert probed.returncode == 0 and "SERVING" in probed.stdout, probed.stdout + probed.stderr
    trained = operator(parties["operator"], train, timeout=600)
    output = trained.stdout + trained.stderr
    assert trained.returncode == 0, output[-4000:]
    assert {(r, d) for r in range(1, rounds + 1) for d in ("sport", "cloth")} <= round_metrics(output), output[-3000:]

    # the ports each party opens: the aggregator its one port, a node only loopback
    assert listeners(aggregator) == {"0.0.0.0:7070"}, listeners(aggregator)
    for domain, container in nodes.items():
        assert listeners(container) == {"127.0.0.1:7071"}, (domain, listeners(container))
    # separate networks: each node reaches the aggregator only; not the other node, nor its own port from outside
    sport_ip = json.loads(docker("inspect", nodes["sport"]).stdout)[0]["NetworkSettings"]["Networks"][parties["sport"].network]["IPAddress"]
    assert reachable(nodes["cloth"], "agg.example.org", 7070)
    assert not reachable(nodes["cloth"], sport_ip, 7071)
    assert not reachable(nodes["cloth"], "ml.sport.example.com", 7071)
    assert not reachable(aggregator, sport_ip, 7071), "the node's own server listens on loopback only"
    # each node runs the compiled solver, as its status and the kernel mapped into its process (PID 1) say
    for domain, container in nodes.items():
        status = docker("exec", container, "cdimf", "node-status", "--node", "127.0.0.1:7071", "--config", "/srv/cdimf/config/node.toml", "--json")
        reply = json.loads(status.stdout)
        assert (reply["domain"], reply["phase"], reply["round"], reply["solver_backend"]) == (domain, "finished", rounds, "native"), reply
        assert "/ials_kernel_" in docker("exec", container, "cat", "/proc/1/maps").stdout


def start(federation: Federation, party: Party, command: str, name: str, volume: str) -> None:
    """Run one of step 6's `docker run` commands on the party's host; track what it made."""
    moved = re.sub(r"-v (/[^:\s]+):", lambda m: f"-v {party.host_path(m.group(1))}:", command)
    federation.containers.append(name)
    federation.volumes.append(volume)
    done = subprocess.run(moved, shell=True, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (moved, done.stderr)


def operator(party: Party, command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """A command of the operator's machine, in a container of the image on the operator's network."""
    home = party.root / "home"
    return subprocess.run(["docker", "run", "--rm", "--no-healthcheck", "--network", party.network, "--read-only", "--tmpfs", "/tmp",
                           "-v", f"{home}:/home/operator:ro", "-e", "HOME=/home/operator", "--entrypoint", "bash", IMAGE, "-c", command],
                          capture_output=True, text=True, timeout=timeout)
