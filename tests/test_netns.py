"""The network-namespace helper: two hosts with their own addresses talk TCP by name, and only to each other."""

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import netns  # tests/netns.py: pytest's default "prepend" import mode puts tests/ (no __init__.py) on sys.path
import pytest

from tests.federation_harness import read_line as read_line_within

ECHO_PORT = 7000
DEADLINE_S = 10.0

# Accepts one connection, reports who called, echoes one message and exits; bounded by timeouts.
ECHO_SERVER = f"""
import socket, sys
server = socket.create_server((sys.argv[1], {ECHO_PORT}))
server.settimeout({DEADLINE_S})
print("listening", flush=True)
connection, (peer, _) = server.accept()
connection.settimeout({DEADLINE_S})
message = connection.recv(1024)
connection.sendall(message)
connection.close()
print("peer", peer, flush=True)
"""

ECHO_CLIENT = f"""
import socket, sys
with socket.create_connection((sys.argv[1], {ECHO_PORT}), timeout={DEADLINE_S}) as connection:
    connection.sendall(sys.argv[2].encode())
    print(connection.recv(1024).decode(), flush=True)
"""


@pytest.fixture(scope="module")
def namespaces_possible() -> None:
    """Skip with the reason where namespaces cannot be made; in CI (CI set) that is a failure."""
    reason = netns.unavailable_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"network namespaces must work in CI: {reason}")
        pytest.skip(reason)


def read_line(process: subprocess.Popen[bytes]) -> str:
    """One line of a process's stdout, waiting at most DEADLINE_S."""
    assert process.stdout is not None
    return read_line_within(process.stdout, DEADLINE_S, lambda: process.poll() is None).strip()


def test_tcp_echo_between_two_namespaces(namespaces_possible: None) -> None:
    """A client in one namespace reaches a server in another by host name; the server sees the
    client's own address; neither namespace has a route off the private subnet."""
    with netns.private_network(["alpha", "beta"]) as network:
        beta = network.hosts["beta"]
        server = network.popen("beta", [sys.executable, "-c", ECHO_SERVER, beta.address], stdout=subprocess.PIPE)
        assert read_line(server) == "listening"
        message = secrets.token_hex(8)
        client = network.run("alpha", [sys.executable, "-c", ECHO_CLIENT, "beta", message], timeout=DEADLINE_S)
        assert client.returncode == 0, client.stderr
        assert client.stdout.strip() == message
        assert read_line(server) == f"peer {network.hosts['alpha'].address}"
        assert server.wait(timeout=DEADLINE_S) == 0
        for host in network.hosts:
            routes = network.run(host, ["ip", "route", "show"]).stdout
            assert "default" not in routes and routes.startswith("10.200.0.0/24"), routes
    # everything was removed
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert network.switch not in listed and all(host.namespace not in listed for host in network.hosts.values())
    assert not any((netns.NETNS_ETC / host.namespace).exists() for host in network.hosts.values())


def test_cleanup_when_the_body_raises(namespaces_possible: None) -> None:
    """An exception inside the block still kills started processes and removes the namespaces."""
    with pytest.raises(RuntimeError, match="boom"), netns.private_network(["gamma"]) as network:
        sleeper = network.popen("gamma", ["sleep", "60"])
        raise RuntimeError("boom")
    assert sleeper.poll() is not None
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert network.hosts["gamma"].namespace not in listed


def test_leftovers_of_a_killed_run_are_removed(namespaces_possible: None) -> None:
    """Namespaces of a run that died (SIGKILL, no cleanup) and their processes go on the next use."""
    script = (
        "import os, signal, subprocess, sys; sys.path.insert(0, sys.argv[1]); import netns\n"
        "with netns.private_network(['delta']) as network:\n"
        "    network.popen('delta', ['sleep', '60'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "    print(network.hosts['delta'].namespace, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script, os.path.dirname(netns.__file__)],
                            capture_output=True, text=True, timeout=DEADLINE_S, check=False)
    assert killed.returncode == -9, killed.stderr
    namespace = killed.stdout.strip()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert namespace in listed
    orphans = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, check=True).stdout.split()
    assert orphans, "the sleeper should still run inside the leftover namespace"
    netns.remove_stale_networks()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert namespace not in listed
    # SIGKILL is delivered asynchronously: under load a killed process shows "running" for a moment
    give_up = time.monotonic() + DEADLINE_S
    while any(_alive(pid) for pid in orphans) and time.monotonic() < give_up:
        time.sleep(0.05)
    assert not [pid for pid in orphans if _alive(pid)], "the leftover namespace's processes are killed"


def _alive(pid: str) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except FileNotFoundError:
        return False
