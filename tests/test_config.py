"""Configuration models: TOML + environment loading, path resolution and errors naming file and field."""

from pathlib import Path

import pytest

from cdimf.common.config import AggregatorConfig, ConfigError, NodeConfig, load_config

NODE_TOML = """
domain = "sport"
train_path = "data/train.txt"
state_dir = "/var/lib/cdimf/sport"
secret_file = "federation.secret"
aggregator = "agg.example:7070"

[ials]
rank = 32
lam = 0.5

[tls]
ca_file = "certs/ca.pem"
cert_file = "certs/sport.pem"
key_file = "certs/sport.key"
"""


def _write(tmp_path: Path, text: str, name: str = "node.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_node_config_from_toml_resolves_relative_paths_against_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, NODE_TOML)
    config = load_config(NodeConfig, path, environ={})
    assert config.domain == "sport" and config.ials.rank == 32 and config.ials.lam == 0.5
    assert config.train_path == tmp_path / "data/train.txt"
    assert config.state_dir == Path("/var/lib/cdimf/sport")
    assert config.tls.cert_file == tmp_path / "certs/sport.pem"
    assert config.secret_file == tmp_path / "federation.secret"
    (tmp_path / "federation.secret").write_text("x" * 32 + "\n")
    assert config.federation_secret() == b"x" * 32


def test_environment_overrides_the_file_including_nested_fields(tmp_path: Path) -> None:
    path = _write(tmp_path, NODE_TOML)
    environ = {"CDIMF_IALS__RANK": "16", "CDIMF_AGGREGATION_PERIOD": "3", "CDIMF_CONFIG": "ignored", "OTHER": "1"}
    config = load_config(NodeConfig, path, environ=environ)
    assert config.ials.rank == 16 and config.ials.lam == 0.5 and config.aggregation_period == 3


def test_config_from_environment_only() -> None:
    environ = {
        "CDIMF_LISTEN": "0.0.0.0:7070",
        "CDIMF_STATE_DIR": "/tmp/agg",
        "CDIMF_TLS__INSECURE": "true",
        "CDIMF_RUN": '{"rounds": 3, "rank": 8, "domain_aggregation_period": {"cloth": 2}}',
    }
    config = load_config(AggregatorConfig, None, environ=environ)
    assert config.listen == "0.0.0.0:7070" and config.tls.insecure
    assert config.run is not None and config.run.period_for("cloth") == 2 and config.run.period_for("sport") == 1


def test_bad_value_names_the_file_and_field(tmp_path: Path) -> None:
    path = _write(tmp_path, NODE_TOML.replace("rank = 32", "rank = 0"))
    line = NODE_TOML.splitlines().index("rank = 32") + 1
    with pytest.raises(ConfigError, match=rf"{path}:{line}: field ials\.rank: .*greater than or equal to 1"):
        load_config(NodeConfig, path, environ={})


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    path = _write(tmp_path, NODE_TOML)
    with pytest.raises(ConfigError, match=r"environment variable CDIMF_IALS__RANK: field ials\.rank"):
        load_config(NodeConfig, path, environ={"CDIMF_IALS__RANK": "many"})


def test_unknown_field_bad_address_and_missing_secret_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"field ials\.rnak: Extra inputs are not permitted"):
        load_config(NodeConfig, _write(tmp_path, NODE_TOML.replace("lam = 0.5", "rnak = 3")), environ={})
    with pytest.raises(ConfigError, match=r"field aggregator: .*not host:port"):
        load_config(NodeConfig, _write(tmp_path, NODE_TOML.replace("agg.example:7070", "agg.example")), environ={})
    with pytest.raises(ConfigError, match="exactly one of secret or secret_file"):
        load_config(NodeConfig, _write(tmp_path, NODE_TOML.replace('secret_file = "federation.secret"', "")), environ={})
    with pytest.raises(ConfigError, match=r"field domain: .*a-z 0-9"):
        load_config(NodeConfig, _write(tmp_path, NODE_TOML.replace('"sport"', '"Sport Shop"')), environ={})


def test_tls_needs_files_unless_insecure(tmp_path: Path) -> None:
    text = NODE_TOML.split("[tls]")[0] + "[tls]\nca_file = 'ca.pem'\n"
    with pytest.raises(ConfigError, match=r"field tls: .*cert_file, key_file .*insecure = true"):
        load_config(NodeConfig, _write(tmp_path, text), environ={})


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="absent.toml: cannot read"):
        load_config(NodeConfig, tmp_path / "absent.toml", environ={})
    with pytest.raises(ConfigError, match="broken.toml: not valid TOML"):
        load_config(NodeConfig, _write(tmp_path, "domain = ", "broken.toml"), environ={})
