"""Differential privacy of what leaves a node: clipping and noise known answers, the accountant against the analytic
RDP of the Gaussian mechanism, bad settings refused by name, and a real federation of processes whose status, logs,
/metrics, aggregator report and `cdimf node-status` carry the epsilon computed here, and whose factors equal the engine's."""

import asyncio
import math
import re
import subprocess
import sys
import urllib.request
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from cdimf.common.config import ConfigError, NodeConfig, RunParams, load_config
from cdimf.common.core.params import ADMMParams, PrivacyParams
from cdimf.common.core.privacy import clip_rows, noise_rng, privatize, release
from cdimf.common.privacy_accounting import gaussian_epsilon
from cdimf.common.rpc.aggregator_client import AggregatorClient
from cdimf.engine import CDIMFEngine, DomainInput
from cdimf.protos.v1 import federation_pb2 as pb
from cdimf.protos.v1 import federation_pb2_grpc as pb_grpc
from tests.federation_harness import (
    DOMAINS,
    REPO_ROOT,
    SECRET,
    Processes,
    assert_matches_engine,
    ials,
    node_data,
    seeds,
    wait_for_checkpoints,
    wait_for_domains,
    write_domains,
)

pytestmark = pytest.mark.timeout(120)


def analytic_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """r-fold Gaussian RDP r * alpha / (2 z^2), converted at delta by Balle et al. 2020's bound, minimised over a fine alpha grid."""
    alphas = np.arange(1.02, 400.0, 0.005)
    rdp = rounds * alphas / (2.0 * noise_multiplier**2)
    eps = rdp + np.log1p(-1.0 / alphas) - np.log(delta * alphas) / (alphas - 1.0)
    return max(0.0, float(eps.min()))


# ----- clipping and noise -----


def test_clip_rows_scales_long_rows_to_the_bound_and_keeps_the_rest() -> None:
    values = np.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0], [-6.0, 8.0]], dtype=np.float32)
    before = values.copy()
    clipped = clip_rows(values, 1.0)
    assert clipped.dtype == np.float32
    np.testing.assert_allclose(clipped, [[0.6, 0.8], [0.3, 0.4], [0.0, 0.0], [-0.6, 0.8]], rtol=1e-6)
    np.testing.assert_array_equal(values, before)  # the input is left as it was
    with pytest.raises(ValueError, match="max_norm"):
        clip_rows(values, 0.0)


def test_privatize_adds_noise_of_std_multiplier_times_twice_the_clip() -> None:
    rows, rank, clip, multiplier = 40_000, 8, 0.5, 1.3
    values = np.full((rows, rank), 10.0, dtype=np.float32)  # every row clipped to norm 0.5 along (1, ..., 1)
    released = privatize(values, clip, multiplier, np.random.default_rng(7))
    noise = released.astype(np.float64) - clip / math.sqrt(rank)
    expected_std = multiplier * 2 * clip  # replace-one sensitivity 2C
    n = noise.size
    # the sample std's standard error is sigma / sqrt(2n); the mean's sigma / sqrt(n)
    assert abs(noise.std() - expected_std) < 4 * expected_std / math.sqrt(2 * n)
    assert abs(noise.mean()) < 4 * expected_std / math.sqrt(n)
    assert released.dtype == np.float32


def test_seeded_noise_depends_on_seed_domain_and_round_only() -> None:
    draw = [noise_rng(5, domain, r).standard_normal(4) for domain, r in (("sport", 1), ("sport", 1), ("cloth", 1), ("sport", 2))]
    np.testing.assert_array_equal(draw[0], draw[1])
    assert not np.allclose(draw[0], draw[2]) and not np.allclose(draw[0], draw[3])
    values = np.ones((3, 2), dtype=np.float32)
    assert release(values, PrivacyParams(), "sport", 1) is values  # off: sent as it is


# ----- accounting -----


@pytest.mark.parametrize(("noise_multiplier", "rounds"), [(0.8, 1), (1.0, 10), (2.0, 5), (5.0, 20), (10.0, 100)])
def test_the_accountant_matches_the_analytic_gaussian_rdp(noise_multiplier: float, rounds: int) -> None:
    delta = 1e-5
    library = gaussian_epsilon(noise_multiplier, rounds, delta)
    analytic = analytic_epsilon(noise_multiplier, rounds, delta)
    # the library minimises over a coarser grid of orders: never below the fine-grid optimum, and close to it
    assert analytic - 1e-9 <= library <= analytic * 1.03 + 1e-3
    # and below the classic conversion eps = c + 2 sqrt(c log(1/delta)) of RDP c * alpha (its optimum over alpha)
    c = rounds / (2 * noise_multiplier**2)
    assert library <= c + 2 * math.sqrt(c * math.log(1 / delta))


def test_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    by_rounds = [gaussian_epsilon(2.0, r, 1e-5) for r in (0, 1, 2, 5, 10, 50)]
    assert by_rounds[0] == 0.0 and all(a < b for a, b in pairwise(by_rounds))
    by_noise = [gaussian_epsilon(z, 10, 1e-5) for z in (0.5, 1.0, 2.0, 5.0, 10.0)]
    assert all(a > b for a, b in pairwise(by_noise))
    with pytest.raises(ValueError, match="delta"):
        gaussian_epsilon(1.0, 1, 1.0)


# ----- configuration -----

NODE_TOML = """domain = "sport"
train_path = "train.csv"
state_dir = "state"
secret = "s"

[tls]
insecure = true

[privacy]
noise_multiplier = 1.0
delta = {delta}
"""


def test_noise_without_clip_and_a_bad_delta_are_refused_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(NODE_TOML.format(delta="1e-5"))
    with pytest.raises(ConfigError, match=rf"{re.escape(str(config))}:9: field privacy: Value error, noise_multiplier > 0 needs clip_norm"):
        load_config(NodeConfig, config, environ={})
    config.write_text(NODE_TOML.format(delta="1.5").replace("noise_multiplier = 1.0", "clip_norm = 1.0"))
    with pytest.raises(ConfigError, match=rf"{re.escape(str(config))}:11: field privacy.delta: Input should be less than 1"):
        load_config(NodeConfig, config, environ={})
    done = subprocess.run([sys.executable, "-m", "cdimf", "serve-node", "--config", str(config), "--privacy-delta", "0"],
                          capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert done.returncode != 0 and "option --privacy-delta: field privacy.delta: Input should be greater than 0" in done.stderr


# ----- a real federation with DP -----

CLIP, MULTIPLIER, DELTA, NOISE_SEED, ROUNDS = 0.05, 0.7, 1e-4, 11, 3


def _privacy() -> PrivacyParams:
    return PrivacyParams(clip_norm=CLIP, noise_multiplier=MULTIPLIER, delta=DELTA, noise_seed=NOISE_SEED)


def _start_nodes(processes: Processes, files: dict[str, dict[str, Path]], aggregator: str) -> dict[str, str]:
    """Both nodes with DP flags and a /metrics port; returns their gRPC addresses."""
    launched = {}
    for domain in DOMAINS:
        arguments = [*processes._node_arguments(domain, files, aggregator),
                     "--privacy-clip-norm", str(CLIP), "--privacy-noise-multiplier", str(MULTIPLIER), "--privacy-delta", str(DELTA),
                     "--privacy-noise-seed", str(NOISE_SEED), "--metrics-listen", "127.0.0.1:0"]
        launched[domain] = processes.launch(f"node-{domain}", arguments, {"CDIMF_SECRET": SECRET})
    return {domain: processes.listening(f"node-{domain}", process) for domain, process in launched.items()}


async def _run(address: str, nodes: dict[str, str], folder: Path) -> tuple[dict[str, pb.NodeStatus], pb.AggregatorStatus]:
    """One DP run to its end; then every node's GetStatus and the aggregator's status."""
    import grpc

    async with AggregatorClient(address, rpc_timeout_s=10, retry_for_s=30) as control:
        await wait_for_domains(control, 2)
        run = await control.start_run(RunParams(rounds=ROUNDS, rank=6, admm=ADMMParams(rho=1.0), min_domains=2))
        _ = [event async for event in control.watch_run(run.run_id)]
        await wait_for_checkpoints(folder, ROUNDS)
        aggregator_status = await control.get_status()
    statuses = {}
    for domain, node in nodes.items():
        async with grpc.aio.insecure_channel(node) as channel:
            statuses[domain] = await pb_grpc.DomainNodeStub(channel).GetStatus(pb.StatusRequest(), timeout=10)
    return statuses, aggregator_status


def test_a_dp_federation_reports_the_accounted_epsilon_everywhere_and_equals_the_seeded_engine(tmp_path: Path, processes: Processes) -> None:
    files = write_domains(tmp_path / "data")
    _, address = processes.aggregator()
    nodes = _start_nodes(processes, files, address)
    statuses, aggregator_status = asyncio.run(_run(address, nodes, tmp_path))
    expected = analytic_epsilon(MULTIPLIER, ROUNDS, DELTA)
    for domain in DOMAINS:
        status = statuses[domain]
        assert status.round == ROUNDS and status.dp_delta == DELTA
        assert status.dp_epsilon == pytest.approx(expected, rel=0.03)
        log = (tmp_path / f"node-{domain}.log").read_text()
        logged = [float(value) for value in re.findall(r"DP epsilon ([0-9.]+) at delta 0.0001", log)]
        assert len(logged) == ROUNDS and logged[-1] == pytest.approx(status.dp_epsilon, abs=1e-4)
        assert all(a < b for a, b in pairwise(logged))
        port = re.search(r"metrics on http://127.0.0.1:(\d+)/metrics", log)
        assert port is not None, log[-2000:]
        with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        exported = re.search(rf'^cdimf_dp_epsilon\{{domain="{domain}"\}} (\S+)$', text, re.MULTILINE)
        assert exported is not None and float(exported.group(1)) == pytest.approx(status.dp_epsilon, rel=1e-9)
        reported = next(entry for entry in aggregator_status.domains if entry.domain == domain).latest_metrics
        assert reported["dp_epsilon"] == pytest.approx(status.dp_epsilon, rel=1e-9) and reported["dp_delta"] == DELTA
    shown = subprocess.run([sys.executable, "-m", "cdimf", "node-status", "--node", nodes["sport"], "--insecure"],
                           capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert f"DP epsilon {statuses['sport'].dp_epsilon:.4f} at delta 0.0001" in shown.stdout, shown
    watched = subprocess.run([sys.executable, "-m", "cdimf", "status", "--aggregator", address, "--insecure"],
                             capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert f"DP epsilon {statuses['cloth'].dp_epsilon:.4f} at delta 0.0001" in watched.stdout, watched

    # the same seeds in process: the nodes' factors and duals equal the engine's
    inputs = []
    for domain in DOMAINS:
        data = node_data(files, domain)
        inputs.append(DomainInput(domain, data.users.keys, data.train, ials(seeds()[domain]), privacy=_privacy()))
    engine = CDIMFEngine(inputs, ADMMParams(rho=1.0))
    engine.run(ROUNDS)
    found = asyncio.run(wait_for_checkpoints(tmp_path, ROUNDS))
    assert_matches_engine(found, engine)
    # and the noise mattered: the engine without DP ends elsewhere
    plain = CDIMFEngine([DomainInput(d.name, d.user_keys, d.train, d.params) for d in inputs], ADMMParams(rho=1.0))
    plain.run(ROUNDS)
    assert not np.allclose(plain.trainers[0].state.users, engine.trainers[0].state.users, atol=1e-3)

