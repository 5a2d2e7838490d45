"""README promises that had no test of their own: the layering of config sources and the node's NOT_SERVING on shutdown."""

import argparse
import asyncio
import os
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from cdimf.aggregator.service import start_aggregator
from cdimf.common.config import AggregatorConfig, NodeConfig, TLSConfig
from cdimf.config_flags import add_model_flags, load_with_flags
from cdimf.domain_node.service import start_node
from tests.federation_harness import SECRET, ials, write_domains

pytestmark = pytest.mark.timeout(60)


def _node_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toml_lam: float | None, env_lam: str | None,
                 flags: list[str]) -> NodeConfig:
    """A NodeConfig from a TOML file (ials.lam = toml_lam), CDIMF_IALS__LAM = env_lam and `flags`."""
    for name in [name for name in os.environ if name.startswith("CDIMF_")]:
        monkeypatch.delenv(name)
    body = 'domain = "sport"\ntrain_path = "train.csv"\nstate_dir = "state"\nsecret_file = "secret"\n[tls]\ninsecure = true\n'
    if toml_lam is not None:
        body += f"[ials]\nlam = {toml_lam}\n"
    config_file = tmp_path / "node.toml"
    config_file.write_text(body)
    if env_lam is not None:
        monkeypatch.setenv("CDIMF_IALS__LAM", env_lam)
    parser = argparse.ArgumentParser()
    fields = add_model_flags(parser, NodeConfig, frozenset({"tls"}))
    return load_with_flags(NodeConfig, config_file, parser.parse_args(flags), fields)


def test_flags_beat_environment_variables_which_beat_the_file_which_beats_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README: defaults < TOML file < CDIMF_* variables < flags, one layer at a time (ials.lam: 0.1 < 0.2 < 0.3 < 0.4)."""
    assert _node_config(tmp_path, monkeypatch, None, None, []).ials.lam == 0.1
    assert _node_config(tmp_path, monkeypatch, 0.2, None, []).ials.lam == 0.2
    assert _node_config(tmp_path, monkeypatch, 0.2, "0.3", []).ials.lam == 0.3
    assert _node_config(tmp_path, monkeypatch, 0.2, "0.3", ["--ials-lam", "0.4"]).ials.lam == 0.4
    assert _node_config(tmp_path, monkeypatch, None, "0.3", ["--ials-lam", "0.4"]).ials.lam == 0.4
    # a flag sets exactly its field: the variable's sibling setting stays
    monkeypatch.setenv("CDIMF_IALS__ALPHA", "0.7")
    monkeypatch.setenv("CDIMF_IALS__LAM", "0.3")
    parser = argparse.ArgumentParser()
    fields = add_model_flags(parser, NodeConfig, frozenset({"tls"}))
    mixed = load_with_flags(NodeConfig, tmp_path / "node.toml", parser.parse_args(["--ials-lam", "0.4"]), fields)
    assert (mixed.ials.lam, mixed.ials.alpha) == (0.4, 0.7)


def test_a_node_reports_not_serving_as_soon_as_it_starts_shutting_down(tmp_path: Path) -> None:
    """deploy/README: the node's health goes NOT_SERVING on shutdown (a Watch sees SERVING, then NOT_SERVING)."""
    files = write_domains(tmp_path / "data")
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

    async def scenario() -> list[int]:
        """Watch the node's health across stop()."""
        aggregator = await start_aggregator(AggregatorConfig(listen="127.0.0.1:0", state_dir=tmp_path / "agg", tls=TLSConfig(insecure=True)))
        config = NodeConfig(domain="sport", train_path=files["sport"]["train"], data_format="csv", aggregator=aggregator.address,
                            state_dir=tmp_path / "sport", secret=SecretStr(SECRET), ials=ials(1), tls=TLSConfig(insecure=True))
        node = await start_node(config)
        seen: list[int] = []
        stopping: asyncio.Future[None] | None = None
        try:
            async with grpc.aio.insecure_channel(node.address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                watch = stub.Watch(health_pb2.HealthCheckRequest(service="cdimf.v1.DomainNode"), timeout=20)
                seen.append((await watch.read()).status)
                stopping = asyncio.ensure_future(node.stop(grace=2.0))
                seen.append((await watch.read()).status)
                watch.cancel()
        finally:
            await (stopping if stopping is not None else node.stop())
            await aggregator.stop(0.2)
        return seen

    assert asyncio.run(scenario()) == [serving, not_serving]
