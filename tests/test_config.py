"""Configuration models: TOML + environment loading, path resolution and errors naming file and field."""

from pathlib import Path

import pytest
from pydantic import BaseModel

from cdimf.common.config import AggregatorConfig, ConfigError, NodeConfig, Override, TLSConfig, load_config

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


def test_a_value_set_as_a_table_names_its_full_dotted_path(tmp_path: Path) -> None:
    """Setting a field below a plain value names the value's whole dotted path, one or two tables deep."""
    path = _write(tmp_path, "[ials]\nrank = 32\n[run.domain_aggregation_period]\ncloth = 2\n", "agg.toml")
    two_deep = Override(("ials", "rank", "x"), 1, "option --x")
    with pytest.raises(ConfigError) as caught:
        load_config(AggregatorConfig, path, environ={}, overrides=[two_deep])
    assert str(caught.value) == "option --x: ials.rank is set as a value and as a table"
    three_deep = Override(("run", "domain_aggregation_period", "cloth", "x"), 1, "option --y")
    with pytest.raises(ConfigError) as caught:
        load_config(AggregatorConfig, path, environ={}, overrides=[three_deep])
    assert str(caught.value) == "option --y: run.domain_aggregation_period.cloth is set as a value and as a table"


def test_a_table_read_alone_names_its_own_keys_line(tmp_path: Path) -> None:
    """With table=, a bad key's line is that table's key's line, not a same-named key of another table."""
    text = "[tls]\ninsecure = true\nca_file = 5\n[aa]\nca_file = 'a'\n[zz]\nca_file = 'z'\n"
    path = _write(tmp_path, text, "tls.toml")
    with pytest.raises(ConfigError, match=rf"^{path}:3: field tls\.ca_file: "):
        load_config(TLSConfig, path, environ={}, table="tls")


class _Leaf(BaseModel):
    """A table with a path, as an item of a list of tables."""

    file: Path
    label: str = ""


class _Tree(BaseModel):
    """Paths in a list of tables, beside lists, tables and text that are not paths."""

    leaves: list[_Leaf] = []
    names: list[str] = []
    tags: dict[str, str] = {}
    one: _Leaf | None = None
    where: Path | None = None


def test_relative_paths_in_a_list_of_tables_are_the_files(tmp_path: Path) -> None:
    """Each table of a [[list]] gets its relative paths resolved; lists of text and plain tables stay as written."""
    text = (
        "names = ['rel/a']\nwhere = 'w.txt'\n[tags]\nt = 'rel/t'\n[one]\nfile = 'one.txt'\n"
        "[[leaves]]\nfile = 'a.txt'\nlabel = 'rel/label'\n[[leaves]]\nfile = '/abs/b.txt'\n"
    )
    tree = load_config(_Tree, _write(tmp_path, text, "tree.toml"), environ={})
    assert [leaf.file for leaf in tree.leaves] == [tmp_path / "a.txt", Path("/abs/b.txt")]
    assert [leaf.label for leaf in tree.leaves] == ["rel/label", ""]
    assert tree.names == ["rel/a"] and tree.tags == {"t": "rel/t"}
    assert tree.one is not None and tree.one.file == tmp_path / "one.txt" and tree.where == tmp_path / "w.txt"
