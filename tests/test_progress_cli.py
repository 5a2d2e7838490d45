"""What long steps say, from the real commands: retries toward an unreachable aggregator, a round waiting for a domain."""

import asyncio
import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import IO

import pytest

from cdimf.common.rpc.aggregator_client import AggregatorClient
from tests.federation_harness import REPO_ROOT, Processes, closed_port, wait_for_domains, write_domains

pytestmark = pytest.mark.timeout(180)



def test_retries_say_what_for_how_long_and_when_they_give_up() -> None:
    """`cdimf status` toward a closed port: one line when retrying starts (with its window), one when it gives up, exit 1."""
    with closed_port() as port:
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "cdimf", "status", "--aggregator", f"127.0.0.1:{port}", "--insecure", "--rpc-timeout-s", "2"],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1
        lines = done.stderr.splitlines()
        assert lines[0].startswith(f"cdimf: GetStatus: the aggregator at 127.0.0.1:{port} is unreachable (") and lines[0].endswith(
            "; retrying for up to 2 s")
        assert lines[1].startswith(f"cdimf: GetStatus: giving up after 2 s: the aggregator at 127.0.0.1:{port} stayed unreachable")
        assert time.monotonic() - started >= 2.0


def _lines_until(stream: IO[str], wanted: str, timeout_s: float) -> list[str]:
    """Lines read from `stream` up to the first that contains `wanted`."""
    seen = []
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        if select.select([stream], [], [], 0.5)[0]:
            line = stream.readline()
            if not line:
                break
            seen.append(line.rstrip("\n"))
            if wanted in line:
                return seen
    raise AssertionError(f"no line with {wanted!r} within {timeout_s} s:\n" + "\n".join(seen))


def test_follow_names_the_domain_a_round_waits_for(tmp_path: Path, processes: Processes) -> None:
    """With the cloth node paused, `train --follow` says `waiting for cloth`; resumed, the run finishes and the follower exits 0."""
    files = write_domains(tmp_path / "data")
    _, aggregator = processes.aggregator()
    nodes = processes.nodes(files, aggregator)

    async def registered() -> None:
        async with AggregatorClient(aggregator, rpc_timeout_s=10) as client:
            await wait_for_domains(client, 2)

    asyncio.run(registered())
    cloth = nodes["cloth"][0]
    os.killpg(cloth.pid, signal.SIGSTOP)
    follower = subprocess.Popen([sys.executable, "-m", "cdimf", "train", "--aggregator", aggregator, "--insecure", "--rounds", "2",
                                 "--rank", "6", "--min-domains", "2", "--follow"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        assert follower.stderr is not None
        seen = _lines_until(follower.stderr, "waiting for cloth", 60)
        # sport may still be training at the first look: the line names cloth either way, and only the open round
        assert seen[-1] in ("round    1  waiting for cloth", "round    1  waiting for cloth, sport"), seen
        os.killpg(cloth.pid, signal.SIGCONT)
        _, rest = follower.communicate(timeout=90)
        assert follower.returncode == 0, rest
        assert rest.splitlines()[-1].endswith("finished")
        # each node's log says what it loads, how much, that it registers and that it waits for a run
        log = (tmp_path / "node-sport.log").read_text()
        assert f"domain sport: loading {files['sport']['train']}" in log and "domain sport: loaded " in log
        assert re.search(rf"registering \d+ users with the aggregator at {re.escape(aggregator)}", log)
        assert "; waiting for a run" in log
    finally:
        os.killpg(cloth.pid, signal.SIGCONT)
        if follower.poll() is None:
            follower.kill()
            follower.communicate()


def test_on_a_terminal_the_bar_never_shares_a_line_with_a_metric(tmp_path: Path, processes: Processes) -> None:
    """`train --follow` with stderr on a 100-column pseudo-terminal: a tqdm bar, and every metric line whole on its own line."""
    files = write_domains(tmp_path / "data")
    _, aggregator = processes.aggregator()
    processes.nodes(files, aggregator)
    leader, follower_tty = pty.openpty()
    fcntl.ioctl(follower_tty, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    follower = subprocess.Popen([sys.executable, "-m", "cdimf", "train", "--aggregator", aggregator, "--insecure", "--rounds", "3",
                                 "--rank", "6", "--min-domains", "2", "--wait-for-domains-s", "60", "--follow"], cwd=REPO_ROOT,
                                stdout=subprocess.DEVNULL, stderr=follower_tty)
    os.close(follower_tty)
    written = b""
    try:
        give_up = time.monotonic() + 120
        while time.monotonic() < give_up:
            if select.select([leader], [], [], 0.5)[0]:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the terminal closed: the follower exited
                    break
                if not chunk:
                    break
                written += chunk
            elif follower.poll() is not None:
                break
        assert follower.wait(30) == 0, written.decode(errors="replace")[-2000:]
    finally:
        os.close(leader)
        if follower.poll() is None:
            follower.kill()
    pieces = [piece.strip() for piece in re.split(r"[\r\n]+", written.decode(errors="replace")) if piece.strip()]
    bars = [piece for piece in pieces if "rounds/s" in piece]
    metric = re.compile(r"^round +[123]  (sport|cloth) +valid HR@10 \(\d+ neg\) [\d.]+%  valid NDCG@10 \(\d+ neg\) [\d.]+%$")
    assert bars, pieces  # a terminal gets tqdm's bar
    assert sum(bool(metric.match(piece)) for piece in pieces) == 6, pieces
    assert not [piece for piece in pieces if "HR@10" in piece and not metric.match(piece)], pieces
