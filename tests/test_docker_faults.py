"""Container tier: real `docker` faults on the running compose stack, and its Prometheus metrics.

A shorter run than README's (16 rounds at rank 32) so that each fault fits in CI. Every fault run
must end with the run finished and the same final factors and last-round validation metrics as
the uninterrupted synchronous run of the same stack (the baseline, which also checks /metrics).
"""

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from tests.docker_stack import Stack, docker, require_docker

ROUNDS = 16
RANK = 32
NODES = ("node-sport", "node-cloth")
# a whole stack run per test (the baseline fixture adds one more): above the suite's 300 s default
pytestmark = pytest.mark.timeout(900)


def override(exit_after_run: bool = True, extra_run_flags: tuple[str, ...] = ()) -> str:
    """A compose override: the launcher's shorter run; the servers' exit_after_run."""
    flags = ", ".join(f'"{flag}"' for flag in ("--rounds", str(ROUNDS), "--rank", str(RANK), *extra_run_flags))
    env = f'    environment: {{CDIMF_EXIT_AFTER_RUN: "{str(exit_after_run).lower()}"}}\n'
    services = "".join(f"  {name}:\n{env}" for name in ("aggregator", *NODES))
    return (
        "services:\n"
        f"{services}"
        "  launcher:\n"
        f'    command: ["train", "--aggregator", "aggregator:7070", "--config", "/srv/cdimf/config/run.toml", "--follow", {flags}]\n'
    )


def last_round_metrics(node_logs: str) -> str:
    """The node's logged validation metrics of the last round."""
    found = re.findall(rf"round {ROUNDS}: (valid HR@\S+ \(\d+ neg\) \S+\s+valid NDCG@\S+ \(\d+ neg\) \S+)", node_logs)
    assert found, node_logs[-2000:]
    return found[-1]


def finish(stack: Stack, tmp: Path) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """Wait for both nodes to finish (exit 0 after their test table); their factors and last metrics."""
    result = {}
    for node in NODES:
        assert stack.wait_exit(node, timeout_s=300) == 0, stack.logs(node)[-3000:]
        logs = stack.logs(node)
        assert f"TEST {node.split('-')[1]}: run" in logs, logs[-2000:]
        users, items = stack.checkpoint_factors(node, tmp)
        result[node] = (users, items, last_round_metrics(logs))
    assert stack.wait_exit("aggregator", timeout_s=60) == 0, stack.logs("aggregator")[-3000:]
    return result


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """The uninterrupted synchronous run; checks every server's /metrics on the way."""
    require_docker()
    tmp = tmp_path_factory.mktemp("baseline")
    stack = Stack(tmp, override(exit_after_run=False))
    try:
        stack.run("build", timeout=900)
        stack.run("up", "-d", "--no-build", timeout=300)
        assert stack.wait_exit("launcher", timeout_s=300) == 0, stack.logs("launcher")[-3000:]
        aggregator = stack.metrics("aggregator")
        assert aggregator["cdimf_rounds_closed_total"] == ROUNDS
        assert aggregator["cdimf_round_duration_seconds_count"] == ROUNDS
        for node in NODES:
            domain = node.split("-")[1]
            metrics = {"applied": stack.wait_metric(node, f'cdimf_rounds_applied_total{{domain="{domain}"}}', ROUNDS, 60)}
            samples = stack.metrics(node)
            assert metrics["applied"] == ROUNDS
            assert samples[f'cdimf_solver_backend{{backend="native",domain="{domain}"}}'] == 1.0
            port = {"sport": 7071, "cloth": 7072}[domain]
            status = docker("exec", stack.container(node), "cdimf", "node-status", "--node", f"127.0.0.1:{port}",
                            "--config", f"/srv/cdimf/config/{node}.toml", "--json")
            assert json.loads(status.stdout)["solver_backend"] == "native", status.stdout
            assert aggregator[f'cdimf_registrations_total{{domain="{domain}"}}'] >= 1
            # what the aggregator received is what the node sent: the same payload bytes
            assert aggregator[f'cdimf_bytes_pushed_total{{domain="{domain}"}}'] == samples[f'cdimf_bytes_pushed_total{{domain="{domain}"}}'] > 0
            assert aggregator[f'cdimf_validation_metric{{domain="{domain}",metric="HR@10"}}'] == pytest.approx(
                samples[f'cdimf_validation_metric{{domain="{domain}",metric="HR@10"}}'])
        assert any(name.startswith("cdimf_build_info{") for name in aggregator)
        result = {}
        stack.run("stop", "-t", "10", timeout=120)
        for node in NODES:
            users, items = stack.checkpoint_factors(node, tmp)
            result[node] = (users, items, last_round_metrics(stack.logs(node)))
        return result
    finally:
        stack.down()


def assert_same(run: dict[str, tuple[np.ndarray, np.ndarray, str]], baseline: dict[str, tuple[np.ndarray, np.ndarray, str]]) -> None:
    """Bit-identical final factors and the same last-round validation metrics as the baseline."""
    for node in NODES:
        users, items, metrics = run[node]
        base_users, base_items, base_metrics = baseline[node]
        assert np.array_equal(users, base_users), node
        assert np.array_equal(items, base_items), node
        assert metrics == base_metrics, node


def start_stack(tmp: Path, text: str) -> Stack:
    """A started stack (detached), waiting until its run closed its third round."""
    stack = Stack(tmp, text)
    stack.run("up", "-d", "--no-build", timeout=300)
    stack.wait_metric("aggregator", "cdimf_rounds_closed_total", 3, 180)
    return stack


@pytest.mark.parametrize("service", ["node-sport", "aggregator"])
def test_killed_and_restarted(service: str, baseline: dict, tmp_path: Path) -> None:
    """`docker kill` a node or the aggregator mid-run, `docker start` it: it resumes from its
    checkpoint or state and the run finishes as if nothing happened."""
    stack = start_stack(tmp_path, override())
    try:
        container = stack.container(service)
        docker("kill", container)
        time.sleep(2)
        docker("start", container)
        assert_same(finish(stack, tmp_path), baseline)
    finally:
        stack.down()


def test_node_disconnected_for_20_s(baseline: dict, tmp_path: Path) -> None:
    """`docker network disconnect` a node for ~20 s, then reconnect: the run waits for it and finishes the same."""
    stack = start_stack(tmp_path, override())
    try:
        node, network = stack.container("node-cloth"), stack.network()
        docker("network", "disconnect", network, node)
        time.sleep(20)
        docker("network", "connect", "--alias", "node-cloth", network, node)
        assert_same(finish(stack, tmp_path), baseline)
    finally:
        stack.down()


def test_paused_node_does_not_stall_the_other_domain(tmp_path: Path) -> None:
    """With a round deadline, a `docker pause`d node lets sport's rounds go on; after unpause it rejoins."""
    require_docker()
    # 48 rounds (the last --rounds wins): the run must still be going when the pause lands, on a loaded machine too
    stack = start_stack(tmp_path, override(extra_run_flags=("--round-deadline-s", "2", "--min-domains", "1", "--rounds", "48")))
    try:
        node = stack.container("node-cloth")
        docker("pause", node)
        paused_at = stack.metrics("aggregator")["cdimf_rounds_closed_total"]
        # sport alone closes rounds at each deadline while cloth is frozen
        stack.wait_metric("aggregator", "cdimf_rounds_closed_total", paused_at + 3, 60)
        docker("unpause", node)
        launcher = stack.wait_exit("launcher", timeout_s=300)
        output = stack.logs("launcher")
        assert launcher == 0, output[-3000:]
        assert re.search(r"closed without cloth", output), output[-3000:]
        # cloth rejoined: it reported validation metrics for a round after the pause
        cloth_rounds = [int(r) for r in re.findall(r"round\s+(\d+)\s+cloth\s+valid HR@", output)]
        assert cloth_rounds and max(cloth_rounds) > paused_at + 3, output[-3000:]
        for name in NODES:
            assert stack.wait_exit(name, timeout_s=120) == 0, stack.logs(name)[-3000:]
    finally:
        stack.down()
