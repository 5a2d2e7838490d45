"""`cdimf simulate` as a real process: end to end on small data, and Ctrl-C leaves no process behind."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.federation_harness import REPO_ROOT, read_line, write_domains

pytestmark = pytest.mark.timeout(120)


def _config(tmp_path: Path, min_domains: int = 2) -> Path:
    """A simulate config over the two small CSV domains."""
    files = write_domains(tmp_path / "data")
    config = tmp_path / "simulate.toml"
    config.write_text(f"""
[[domains]]
name = "sport"
train_path = "{files['sport']['train']}"
test_path = "{files['sport']['test']}"
data_format = "csv"

[[domains]]
name = "cloth"
train_path = "{files['cloth']['train']}"
data_format = "csv"

[ials]
rank = 6
alpha = 0.1
lam = 0.5
threads = 1

[run]
rounds = 50
rank = 6
min_domains = {min_domains}
""")
    return config


ROLES = ("serve-aggregator", "serve-node")


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent id, state letter, start time in clock ticks) of a process from /proc, None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name in parentheses may hold spaces: the other fields follow the last ')'
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[1]), fields[0], int(fields[19])


def _server_children(pid: int) -> dict[int, int]:
    """The aggregator and node processes whose parent is `pid` (pid: start time), read from /proc.

    Only `cdimf serve-*` children count: whatever else simulate or the interpreter may start
    for a moment (a compiler, a resource tracker) is not what the test is about.
    """
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if stat is not None and stat[0] == pid and any(role.encode() in command for role in ROLES):
            found[int(entry.name)] = stat[2]
    return found


def _alive(pid: int, started: int) -> bool:
    """Whether that process (same pid and start time: not a later one that reused the pid) still runs; a zombie has ended."""
    stat = _stat(pid)
    return stat is not None and stat[2] == started and stat[1] != "Z"


def test_simulate_runs_the_federation_with_mutual_tls_and_prints_the_table(tmp_path: Path) -> None:
    """Two rounds (--rounds overrides the file): both domains evaluated over mutual TLS, all processes gone.

    min_domains = 1: the run must still wait for both nodes, not start with whichever registered first."""
    config = _config(tmp_path, min_domains=1)
    done = subprocess.run([sys.executable, "-m", "cdimf", "simulate", "--config", str(config), "--rounds", "2", "--json"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert results["rounds"] == 2 and results["transport"] == "mutual TLS"
    assert sorted(results["admitted"]) == ["cloth", "sport"]
    assert results["domains"]["sport"]["split"] == "test" and results["domains"]["sport"]["users"] == 4
    assert results["domains"]["cloth"]["split"] == "valid"
    for row in results["domains"].values():
        split, neg = row["split"], row["negatives"]
        assert isinstance(row["round"], int) and row["round"] == 2 and neg >= 1
        metrics = row["metrics"]
        assert 0.0 <= metrics[f"{split} NDCG@10 ({neg} neg)"] <= metrics[f"{split} HR@10 ({neg} neg)"] <= 100.0
    assert results["ok"] is True
    # the per-round history: every round closed, the end last
    assert [e["round"] for e in results["history"] if e["kind"] == "round_closed"] == [1, 2]
    assert results["history"][-1]["kind"] in ("run_finished", "metrics")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_simulate_leaves_no_orphan_process(tmp_path: Path, signum: int) -> None:
    """Ctrl-C (SIGINT) or SIGTERM while the run trains: simulate stops the aggregator and both nodes before it exits."""
    simulate = subprocess.Popen([sys.executable, "-m", "cdimf", "simulate", "--config", str(_config(tmp_path)), "--rounds", "100000",
                                 "--insecure"], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert simulate.stderr is not None
        give_up = time.monotonic() + 60
        seen = ""
        while "started over" not in seen:
            assert time.monotonic() < give_up and simulate.poll() is None, seen
            seen += read_line(simulate.stderr, max(0.0, give_up - time.monotonic()), lambda: simulate.poll() is None) + "\n"
        # the run started, so the aggregator and both nodes run; polled (bounded) rather than
        # counted at one instant of /proc
        children: dict[int, int] = {}
        while len(children) < 3:
            assert time.monotonic() < give_up, children
            children = _server_children(simulate.pid)
        assert len(children) == 3, children
        simulate.send_signal(signum)
        simulate.wait(30)
        assert simulate.returncode != 0
        assert [pid for pid, started in children.items() if _alive(pid, started)] == []
    finally:
        if simulate.poll() is None:
            simulate.kill()
        simulate.communicate()
