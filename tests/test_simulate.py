"""`cdimf simulate` as a real process: end to end on small data, and Ctrl-C leaves no process behind."""

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.federation_harness import REPO_ROOT, write_domains

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


def _children(pid: int) -> set[int]:
    """Process ids whose parent is `pid` (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name in parentheses may hold spaces: the parent id follows the last ')'
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """Whether a process with this pid still exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


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
            if select.select([simulate.stderr], [], [], 0.5)[0]:
                seen += simulate.stderr.readline()
        children = _children(simulate.pid)
        assert len(children) == 3, children
        simulate.send_signal(signum)
        simulate.wait(30)
        assert simulate.returncode != 0
        assert [pid for pid in children if _alive(pid)] == []
    finally:
        if simulate.poll() is None:
            simulate.kill()
        simulate.communicate()
