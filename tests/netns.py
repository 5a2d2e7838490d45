"""Test helper: a private network of Linux network namespaces, one per simulated host.

Each host gets its own namespace with one interface (`eth0`) and its own IPv4 address from a
private subnet; the interfaces are veth pairs whose other ends sit on a bridge in a separate
"switch" namespace. Nothing is attached to the root namespace and no namespace has a default
route, so traffic can only flow between the namespaces created here. Each host's /etc/hosts
(via /etc/netns/<namespace>/hosts, which `ip netns exec` mounts over /etc/hosts) names every
host, so programs dial hosts by name as on a real network.

Needs root and iproute2 (`apt-get install -y iproute2`). Everything is removed on exit, also
when the body raises; processes started with `popen` are killed by their own ids. What a
killed test run left behind (its pid is in the namespace names) is removed on the next use.
"""

import ipaddress
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_SUBNET = "10.200.0.0/24"
NETNS_ETC = Path("/etc/netns")
NAME_PREFIX = "cdimft"
COMMAND_TIMEOUT_S = 10.0


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (not root, no `ip`, kernel refuses), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing: apt-get install -y iproute2"
    probe = f"{NAME_PREFIX}{os.getpid()}probe"
    created = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if created.returncode != 0:
        return f"`ip netns add` fails here: {created.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True, check=False)
    return None


def _ip(*arguments: str) -> None:
    """Run one `ip` command, raising with its stderr when it fails."""
    finished = subprocess.run(["ip", *arguments], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    if finished.returncode != 0:
        raise RuntimeError(f"ip {' '.join(arguments)} failed: {finished.stderr.strip()}")


@dataclass
class Host:
    """One simulated host: its name (also its DNS name), namespace and address."""

    name: str
    namespace: str
    address: str


@dataclass
class Network:
    """A set of hosts on one private subnet, and the processes started in them."""

    hosts: dict[str, Host]
    switch: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        """The argv that runs `argv` inside `host`'s namespace."""
        return ["ip", "netns", "exec", self.hosts[host].namespace, *argv]

    def run(self, host: str, argv: Sequence[str], timeout: float = COMMAND_TIMEOUT_S, **kwargs: object) -> subprocess.CompletedProcess[str]:
        """Run `argv` in `host` to completion (bounded by `timeout`), capturing text output."""
        return subprocess.run(
            self.command(host, argv), capture_output=True, text=True, timeout=timeout, check=False, **kwargs  # type: ignore[call-overload]
        )

    def popen(self, host: str, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start `argv` in `host` in its own process group; it is killed when the network closes."""
        process = subprocess.Popen(self.command(host, argv), start_new_session=True, **kwargs)  # type: ignore[call-overload]
        self.processes.append(process)
        return process

    def _stop_processes(self) -> None:
        """Kill what `popen` started (by process group, i.e. by the ids we got) and reap it."""
        for process in self.processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                process.wait(timeout=COMMAND_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass


def _hosts_file(hosts: dict[str, Host]) -> str:
    """The /etc/hosts of every namespace: loopback and all hosts of the network."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{host.address}\t{host.name}" for host in hosts.values()]
    return "\n".join(lines) + "\n"


def _remove(namespaces: list[str]) -> None:
    """Delete namespaces (their veths go with them) and their /etc/netns folders; never raises."""
    for namespace in namespaces:
        subprocess.run(["ip", "netns", "delete", namespace], capture_output=True, check=False)
        shutil.rmtree(NETNS_ETC / namespace, ignore_errors=True)


def _stale_namespaces() -> list[str]:
    """Namespaces this helper made in processes that no longer exist (e.g. a killed test run)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    stale = []
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        owner = re.fullmatch(rf"{NAME_PREFIX}(\d+)-(sw|\d+)", name)
        if owner is not None and not Path(f"/proc/{owner.group(1)}").exists():
            stale.append(name)
    return stale


def remove_stale_networks() -> None:
    """Remove namespaces left by dead runs of this helper, killing what still runs inside them
    (processes this helper started there, found by `ip netns pids`)."""
    stale = _stale_namespaces()
    for namespace in stale:
        pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, check=False).stdout
        for pid in pids.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    _remove(stale)


@contextmanager
def private_network(host_names: Sequence[str], subnet: str = DEFAULT_SUBNET) -> Iterator[Network]:
    """Create one namespace per host name on `subnet` (first host gets .1, the next .2, ...)."""
    network_range = ipaddress.ip_network(subnet)
    if not network_range.is_private:
        raise ValueError(f"{subnet} is not a private subnet")
    if len(set(host_names)) != len(host_names) or not host_names:
        raise ValueError(f"host names must be distinct and non-empty: {list(host_names)}")
    addresses = list(network_range.hosts())
    if len(host_names) > len(addresses):
        raise ValueError(f"{subnet} has room for {len(addresses)} hosts, not {len(host_names)}")
    # the pid keeps parallel test processes apart; the index keeps interface-free names short
    tag = f"{NAME_PREFIX}{os.getpid()}"
    switch = f"{tag}-sw"
    hosts = {
        name: Host(name, f"{tag}-{index}", str(addresses[index]))
        for index, name in enumerate(host_names)
    }
    remove_stale_networks()
    created: list[str] = []
    network = Network(hosts, switch)
    try:
        _ip("netns", "add", switch)
        created.append(switch)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        for index, host in enumerate(hosts.values()):
            _ip("netns", "add", host.namespace)
            created.append(host.namespace)
            # both ends are created directly inside their namespaces: nothing touches the root one
            _ip("link", "add", "eth0", "netns", host.namespace, "type", "veth",
                "peer", "name", f"port{index}", "netns", switch)
            _ip("-n", switch, "link", "set", f"port{index}", "master", "br0")
            _ip("-n", switch, "link", "set", f"port{index}", "up")
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/{network_range.prefixlen}", "dev", "eth0")
            _ip("-n", host.namespace, "link", "set", "eth0", "up")
            _ip("-n", host.namespace, "link", "set", "lo", "up")
            etc = NETNS_ETC / host.namespace
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(_hosts_file(hosts))
        yield network
    finally:
        network._stop_processes()
        _remove(created)
