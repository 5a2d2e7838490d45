"""The cold-start policy's parts on their own: the config rule and its errors, the per-pair count, the fraction cap, the wire."""

from pathlib import Path

import numpy as np
import pytest

from cdimf.aggregator.rounds import StateError
from cdimf.aggregator.state import AggregatorState
from cdimf.common.config import ColdStartPolicy, ConfigError, NodeConfig, load_config
from cdimf.common.core.membership import align_memberships, served_matrix
from cdimf.common.security.pseudonyms import pseudonymize
from cdimf.common.wire.chunks import ChunkError, RegistrationAssembler, encode_registration
from cdimf.common.wire.serde import cold_start_from_proto, cold_start_to_proto
from cdimf.protos.v1 import federation_pb2 as pb
from cdimf.simulate import SimulateConfig

SECRET = b"tests-cold-start-policy-secret-0123"
NODE = """domain = "cloth"
train_path = "train.csv"
state_dir = "state"
secret = "s"

[tls]
insecure = true

[cold_start]
max_served = 3
max_served_fraction = 0.1
"""


def test_both_caps_are_refused_naming_the_fields_and_the_file_line(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(NODE)
    with pytest.raises(ConfigError) as error:
        load_config(NodeConfig, config, environ={})
    table_line = NODE.splitlines().index("[cold_start]") + 1
    assert f"{config}:{table_line}" in str(error.value)
    assert "cold_start.max_served and cold_start.max_served_fraction" in str(error.value)


def test_variables_set_the_policy_and_the_defaults_serve_without_a_cap(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(NODE.split("[cold_start]")[0])
    assert load_config(NodeConfig, config, environ={}).cold_start == ColdStartPolicy(serve=True, max_served=None, max_served_fraction=None)
    varied = load_config(NodeConfig, config, environ={"CDIMF_COLD_START__SERVE": "false", "CDIMF_COLD_START__MAX_SERVED_FRACTION": "0.25"})
    assert varied.cold_start == ColdStartPolicy(serve=False, max_served_fraction=0.25)
    with pytest.raises(ConfigError, match="CDIMF_COLD_START__MAX_SERVED_FRACTION: field cold_start.max_served_fraction"):
        load_config(NodeConfig, config, environ={"CDIMF_COLD_START__MAX_SERVED_FRACTION": "1.5"})


def test_caps_in_rows() -> None:
    # a fraction of the users with interactions, rounded down: 0.25 * 10 = 2.5 -> 2
    assert ColdStartPolicy(max_served_fraction=0.25).cap(10) == 2
    assert ColdStartPolicy(max_served=7).cap(10) == 7
    assert ColdStartPolicy(serve=False, max_served=7).cap(10) == 0
    assert ColdStartPolicy().cap(10) is None


def test_simulate_passes_a_domains_policy_to_its_node(tmp_path: Path) -> None:
    simulated = SimulateConfig.model_validate({"domains": [
        {"name": "sport", "train_path": str(tmp_path / "a.csv"), "cold_start": {"max_served": 5}},
        {"name": "cloth", "train_path": str(tmp_path / "b.csv")},
    ]})
    fields = [domain.node_fields() for domain in simulated.domains]
    assert fields[0]["cold_start"] == {"serve": True, "max_served": 5, "max_served_fraction": None}
    assert fields[1]["cold_start"] == {"serve": True, "max_served": None, "max_served_fraction": None}
    node = NodeConfig.model_validate({**fields[0], "state_dir": str(tmp_path), "secret": "s", "tls": {"insecure": True}})
    assert node.cold_start.max_served == 5


def test_served_matrix_equals_a_count_over_the_key_sets() -> None:
    rng = np.random.default_rng(3)
    keys = [rng.choice(60, size=int(rng.integers(20, 40)), replace=False) for _ in range(4)]
    holds = [rng.random(len(k)) < 0.6 for k in keys]
    memberships, _ = align_memberships(keys, holds)
    held = [set(k[h].tolist()) for k, h in zip(keys, holds, strict=True)]
    cold = [set(k[~h].tolist()) for k, h in zip(keys, holds, strict=True)]
    expected = np.array([[0 if h == r else len(cold[r] & held[h]) for r in range(4)] for h in range(4)])
    np.testing.assert_array_equal(served_matrix(memberships), expected)
    assert expected.sum() > 0


def _rows(keys: list[str], holder: bool) -> tuple[np.ndarray, np.ndarray]:
    """Pseudonyms of `keys`, all holders or all receivers."""
    return pseudonymize(keys, SECRET), np.full(len(keys), holder)


def test_a_fraction_cap_counts_the_holders_users_and_a_refusal_leaves_the_files(tmp_path: Path) -> None:
    state = AggregatorState(tmp_path)
    # 10 users with interactions, at most 0.3 of them: 3 rows
    state.register("cloth", *_rows([f"u{i}" for i in range(10)], True), ColdStartPolicy(max_served_fraction=0.3))
    state.register("sport", *_rows(["u0", "u1", "u2", "x"], False))
    files = {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}
    with pytest.raises(StateError) as refused:
        state.register("sport", *_rows(["u0", "u1", "u2", "u3"], False))
    assert refused.value.status == "RESOURCE_EXHAUSTED" and "serves at most 3 receiver rows (max_served_fraction = 0.3)" in refused.value.message
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == files
    assert state.cold_start_counts().served_to("cloth") == {"sport": 3}
    # the same rows with another policy are a new registration, kept over a restart
    state.register("cloth", *_rows([f"u{i}" for i in range(10)], True), ColdStartPolicy(max_served=4))
    restarted = AggregatorState(tmp_path)
    assert restarted.registrations["cloth"].cold_start == ColdStartPolicy(max_served=4)
    restarted.register("sport", *_rows(["u0", "u1", "u2", "u3"], False))
    assert restarted.cold_start_counts().received_from("sport") == {"cloth": 4}


def test_the_policy_travels_on_the_first_chunk_only_and_is_validated() -> None:
    digests, holder = _rows([f"u{i}" for i in range(200)], True)
    policy = cold_start_to_proto(ColdStartPolicy(max_served=9))
    chunks = list(encode_registration(digests, holder, pb.Header(domain="cloth"), chunk_bytes=33 * 50, cold_start=policy))
    assert len(chunks) == 4 and [chunk.HasField("cold_start") for chunk in chunks] == [True, False, False, False]
    assembler = RegistrationAssembler()
    for chunk in chunks:
        assembler.add(chunk)
    assert cold_start_from_proto(assembler.cold_start) == ColdStartPolicy(max_served=9)
    assert cold_start_from_proto(None) == ColdStartPolicy()
    late = RegistrationAssembler()
    late.add(chunks[0])
    chunks[1].cold_start.serve = True
    with pytest.raises(ChunkError, match="chunk 1 carries a cold_start policy"):
        late.add(chunks[1])
    with pytest.raises(ConfigError, match="field cold_start.max_served_fraction"):
        cold_start_from_proto(pb.ColdStartPolicy(serve=True, max_served_fraction=1.5))
    with pytest.raises(ConfigError, match="at most one of cold_start.max_served and cold_start.max_served_fraction"):
        cold_start_from_proto(pb.ColdStartPolicy(serve=True, max_served=1, max_served_fraction=0.5))
