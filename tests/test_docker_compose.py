"""Container tier: README's `docker compose up --build`, run verbatim by a real Docker engine.

It must build the image, train the 40-round simulation to its end, print both nodes' test tables
(999 negatives), and return by itself with every service exited; the nodes run the native solver.
"""

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.docker_stack import REPO, Stack, docker, node_test_tables, require_docker, round_metrics

README_UP = "docker compose up --build"
# a whole stack run per test (the baseline fixture adds one more): above the suite's 300 s default
pytestmark = pytest.mark.timeout(900)


def test_readme_gives_the_command() -> None:
    """README.md and deploy/README.md give exactly the command this tier runs."""
    for readme in (REPO / "README.md", REPO / "deploy" / "README.md"):
        assert f"\n{README_UP}\n" in readme.read_text(), readme


def test_readme_compose_up_runs_to_the_end(tmp_path: Path) -> None:
    """`docker compose up --build` exits 0 by itself with both labelled test tables and the native solver."""
    require_docker()
    stack = Stack(tmp_path)
    started = time.monotonic()
    try:
        # verbatim, through a shell as a reader would type it
        done = subprocess.run(README_UP, shell=True, cwd=REPO, env=stack.env, capture_output=True, text=True, timeout=900)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-4000:]
        print(f"compose up: {time.monotonic() - started:.0f} s")
        tables = node_test_tables(output)
        assert set(tables) == {"sport", "cloth"}, output[-4000:]
        for domain, lines in tables.items():
            assert re.search(r"round 40, \d+ users, each test item ranked against 999 sampled negatives", lines[0]), lines
            rows = [re.fullmatch(r"test (\S+) \(999 neg\)\s+([0-9.]+)%", line) for line in lines[1:]]
            assert all(rows), lines
            values = {row.group(1): float(row.group(2)) for row in rows if row}
            assert set(values) == {"HR@10", "NDCG@10"}, lines
            # a trained model ranks far above chance (10 of 1000 candidates: HR@10 1 %)
            assert values["HR@10"] > 10 and 0 < values["NDCG@10"] < values["HR@10"], (domain, values)
        # every round was followed for both domains
        seen = round_metrics(output)
        assert {(r, d) for r in range(1, 41) for d in ("sport", "cloth")} <= seen, sorted(seen)[-4:]
        for service in ("node-sport", "node-cloth"):
            logs = stack.logs(service)
            assert f"domain {service.split('-')[1]}: solver backend native" in logs, logs[-2000:]
        # `up` returned by itself: nothing of the project is still running
        running = docker("ps", "-q", "--filter", f"label=com.docker.compose.project={stack.project}").stdout.split()
        assert running == []
        for service in ("aggregator", "node-sport", "node-cloth", "launcher", "certs"):
            state = docker("inspect", "-f", "{{.State.ExitCode}}", stack.container(service)).stdout.strip()
            assert state == "0", (service, state)
    finally:
        stack.down()


def test_the_tier_runs_real_compose_v2_and_the_file_is_valid_for_1_29() -> None:
    """`docker compose` is the real Compose v2 (what users run); docker-compose 1.29 accepts the file too."""
    require_docker()
    version = subprocess.run(["docker", "compose", "version", "--short"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and re.match(r"v?2\.\d+", version.stdout.strip()), version.stdout + version.stderr
    legacy = subprocess.run(["docker-compose", "-f", str(REPO / "docker-compose.yml"), "config", "-q"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert legacy.returncode == 0, legacy.stderr
    assert subprocess.run(["docker-compose", "version", "--short"], capture_output=True, text=True, timeout=60).stdout.startswith("1.29")


@pytest.mark.parametrize("path", ["README.md", "deploy/README.md"])
def test_readme_names_no_abort_flag_for_the_plain_run(path: str) -> None:
    """The plain run needs no --exit-code-from (which aborts the stack when `certs` exits 0)."""
    text = (REPO / path).read_text()
    assert "docker compose up --build --exit-code-from launcher\n" not in text
