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

    min_domains = 1: the run must still wait for both nodes, not start with whichever registered first.
    The [validation] table reaches every node: each validates only in round 2 (every 2, and the
    last round), names its metrics at k = 5 against 7 negatives, and cloth's final row (its valid
    split) ranks 8 candidates, so at k = 10 every target is a hit: HR = 100 % exactly."""
    config = _config(tmp_path, min_domains=1)
    config.write_text(config.read_text() + "\n[validation]\nevery = 2\nnegatives = 7\nk = 5\n")
    done = subprocess.run([sys.executable, "-m", "cdimf", "simulate", "--config", str(config), "--rounds", "2", "--json"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert results["rounds"] == 2 and results["transport"] == "mutual TLS"
    assert sorted(results["admitted"]) == ["cloth", "sport"]
    sport, cloth = results["domains"]["sport"], results["domains"]["cloth"]
    assert sport["split"] == "test" and sport["users"] == 4 and sport["round"] == 2
    assert cloth["split"] == "valid" and cloth["negatives"] == 7 and cloth["round"] == 2
    assert cloth["metrics"]["valid HR@10 (7 neg)"] == 100.0
    # a hit rate is hits / rows: a whole number of the 4 test rows
    hits = sport["metrics"][f"test HR@10 ({sport['negatives']} neg)"] * sport["users"] / 100
    assert hits == pytest.approx(round(hits), abs=1e-3)
    assert results["ok"] is True
    history = results["history"]
    assert history[0]["kind"] == "run_started"
    kinds = [e["kind"] for e in history]
    assert kinds.count("run_finished") == 1 and kinds.count("round_closed") == 2
    assert [e["round"] for e in history if e["kind"] == "round_closed"] == [1, 2]
    assert kinds.index("run_finished") > max(i for i, kind in enumerate(kinds) if kind == "round_closed")
    validated = {(e["round"], e["domain"]): e["metrics"] for e in history if e["kind"] == "metrics"}
    assert len([e for e in history if e["kind"] == "metrics"]) == 2 and set(validated) == {(2, "sport"), (2, "cloth")}
    for metrics in validated.values():
        assert set(metrics) == {"valid HR@5 (7 neg)", "valid NDCG@5 (7 neg)"}
    cloth_hits = validated[(2, "cloth")]["valid HR@5 (7 neg)"] * cloth["users"] / 100
    assert cloth_hits == pytest.approx(round(cloth_hits), abs=1e-3)


def test_simulate_defaults_are_the_warm_sport_cloth_pair_for_ten_synchronous_rounds() -> None:
    """Without --config simulate runs the embedded warm Sport & Cloth pair: 10 synchronous rounds at
    rank 64 (rho 1, identity prox, both domains required), the paper-format files shipped in the package."""
    from cdimf.simulate import SimulateConfig

    config = SimulateConfig()
    assert [d.name for d in config.domains] == ["sport", "cloth"]
    for domain, folder in zip(config.domains, ("sport_cloth", "cloth_sport")):
        assert domain.data_format == "paper"
        assert domain.train_path.parts[-3:] == ("warm-start_sport_cloth", folder, "train.txt") and domain.train_path.is_file()
        assert domain.test_path is not None and domain.test_path.parts[-3:] == ("warm-start_sport_cloth", folder, "test.txt")
        assert domain.test_path.is_file()
    assert config.run.rounds == 10 and config.run.rank == 64 and config.run.min_domains == 2
    assert config.run.admm.rho == 1.0 and config.run.admm.prox == "identity" and config.insecure is False
    assert config.run.round_deadline_s == 0.0  # synchronous: every round waits for every domain


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
