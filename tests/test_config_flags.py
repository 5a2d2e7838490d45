"""Flags reach the models as the last layer of the one loader: each sets exactly its field, errors name the flag."""

import argparse
import copy
import os
from pathlib import Path

import pytest

from cdimf.common.config import ConfigError, NodeConfig, RunParams, load_config
from cdimf.config_flags import add_model_flags, load_with_flags
from cdimf.runtime_cli import TLS_FLATTEN, TrainConfig
from cdimf.simulate import SimulateConfig


def _load(model: type, argv: list[str], config_file: Path | None = None, flatten: frozenset[str] = frozenset({"run"}),
          table: str | None = None) -> object:
    """The model loaded like the CLI does: flags generated from it, parsed from argv."""
    parser = argparse.ArgumentParser()
    fields = add_model_flags(parser, model, flatten)
    return load_with_flags(model, config_file, parser.parse_args(argv), fields, table=table)


def test_a_flag_keeps_the_defaults_of_its_siblings(monkeypatch: pytest.MonkeyPatch) -> None:
    """simulate's `--ials-seed 0` keeps the default alpha/lam, `--rounds 3` keeps run.min_domains = 2."""
    monkeypatch.delenv("CDIMF_IALS__SEED", raising=False)
    default = SimulateConfig()
    seeded = _load(SimulateConfig, ["--ials-seed", "0"])
    assert isinstance(seeded, SimulateConfig)
    assert seeded.ials.seed == 0 and (seeded.ials.alpha, seeded.ials.lam) == (default.ials.alpha, default.ials.lam) == (0.01, 1.0)
    short = _load(SimulateConfig, ["--rounds", "3"])
    assert isinstance(short, SimulateConfig)
    assert short.run.rounds == 3 and short.run.min_domains == default.run.min_domains == 2
    assert short.run.model_dump(exclude={"rounds"}) == default.run.model_dump(exclude={"rounds"})


def test_precedence_defaults_toml_environment_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "run.toml"
    config.write_text("aggregator = 'agg.example:7070'\n[tls]\ninsecure = true\n[run]\nrounds = 5\nrank = 8\nmax_staleness = 1\n")
    monkeypatch.setenv("CDIMF_RUN__RANK", "16")
    monkeypatch.setenv("CDIMF_RUN__MAX_STALENESS", "2")
    train = _load(TrainConfig, ["--max-staleness", "3"], config, TLS_FLATTEN)
    assert isinstance(train, TrainConfig)
    # TOML over the defaults, the environment over TOML, the flag over the environment; the rest stays
    assert (train.run.rounds, train.run.rank, train.run.max_staleness, train.run.min_domains) == (5, 16, 3, 1)
    assert train.aggregator == "agg.example:7070"


def test_a_bad_flag_is_named_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"option --rounds: field run\.rounds: .*greater than or equal to 1"):
        _load(SimulateConfig, ["--rounds", "0"])
    with pytest.raises(ConfigError, match=r"option --validation-every: field validation\.every"):
        _load(SimulateConfig, ["--validation-every", "-1"])


def test_the_tls_table_of_any_file_with_its_flags(tmp_path: Path) -> None:
    """recommend/health read only [tls] of a file; relative paths are the file's, flags win."""
    config = tmp_path / "node.toml"
    config.write_text("domain = 'sport'\n[tls]\nca_file = 'certs/ca.pem'\ncert_file = 'certs/me.pem'\nkey_file = 'certs/me.key'\n")
    from cdimf.common.config import TLSConfig

    tls = _load(TLSConfig, ["--key-file", "/keys/other.key"], config, table="tls")
    assert isinstance(tls, TLSConfig)
    assert tls.ca_file == tmp_path / "certs/ca.pem" and tls.key_file == Path("/keys/other.key")
    config.write_text("[tls]\nca_file = 'ca.pem'\n")
    with pytest.raises(ConfigError, match=rf"{config}:1: field tls: .*cert_file, key_file"):
        _load(TLSConfig, [], config, table="tls")


def _node(**fields: object) -> NodeConfig:
    return NodeConfig.model_validate({"domain": "sport", "train_path": "t.txt", "state_dir": "s", "secret": "x" * 32,
                                      "tls": {"insecure": True}, **fields})


def test_the_run_rank_is_the_only_rank_of_a_node() -> None:
    """A node's local model takes the run's rank; a node config naming another rank is an error."""
    run = RunParams(run_id="r", rounds=2, rank=12)
    unset = _node(ials={"lam": 0.5})
    assert unset.ials.rank is None
    params = unset.model_params(run)
    assert params.rank == 12 and params.lam == 0.5
    assert _node(ials={"rank": 12}).model_params(run).rank == 12
    with pytest.raises(ConfigError, match=r"domain sport, run r: ials\.rank = 32 differs from the run's rank 12"):
        _node(ials={"rank": 32}).model_params(run)


def test_simulate_refuses_a_second_rank() -> None:
    with pytest.raises(ValueError, match=r"ials\.rank = 8 differs from the run's rank 64"):
        SimulateConfig.model_validate({"ials": {"rank": 8}})
    assert SimulateConfig.model_validate({"ials": {"rank": 6}, "run": {"rank": 6}}).ials.at_rank(6).rank == 6


def test_one_rule_decides_a_domains_period() -> None:
    run = RunParams(rounds=2, aggregation_period=3, domain_aggregation_period={"cloth": 2})
    assert run.period_for("sport") == 3 and run.period_for("cloth") == 2 and run.period_for("cloth", 5) == 5
    assert _node().period(run) == 3 and _node(aggregation_period=4).period(run) == 4
    assert _node(domain="cloth").period(run) == 2


def test_environment_sets_one_field_of_a_defaulted_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """A variable, like a flag, sets exactly its field: simulate's other run defaults stay."""
    config = load_config(SimulateConfig, None, environ={"CDIMF_RUN__ROUNDS": "4"})
    assert config.run.rounds == 4 and config.run.min_domains == 2


# (flag, field path, valid values): every SimulateConfig field a flag sets, with values its model accepts
_FLAGS = {
    "--rounds": (("run", "rounds"), "int", (1, 1000)),
    "--min-domains": (("run", "min_domains"), "int", (1, 2)),
    "--aggregation-period": (("run", "aggregation_period"), "int", (1, 50)),
    "--max-staleness": (("run", "max_staleness"), "int", (0, 5)),
    "--round-deadline-s": (("run", "round_deadline_s"), "float", (0.0, 100.0)),
    "--admm-rho": (("run", "admm", "rho"), "float", (0.0, 10.0)),
    "--ials-alpha": (("ials", "alpha"), "float", (1e-4, 10.0)),
    "--ials-lam": (("ials", "lam"), "float", (0.0, 10.0)),
    "--ials-nu": (("ials", "nu"), "float", (0.0, 2.0)),
    "--ials-seed": (("ials", "seed"), "int", (0, 2**31)),
    "--ials-sigma": (("ials", "sigma"), "float", (1e-3, 1.0)),
    "--k": (("k",), "int", (1, 1000)),
    "--validation-every": (("validation", "every"), "int", (0, 100)),
    "--validation-negatives": (("validation", "negatives"), "int", (1, 1000)),
    "--startup-timeout-s": (("startup_timeout_s",), "float", (0.5, 1000.0)),
    "--insecure": (("insecure",), "bool", None),
}


def _values():
    """A hypothesis strategy: {flag: value} for any subset of _FLAGS."""
    from hypothesis import strategies as st

    def value(kind: str, bounds: tuple | None):
        if kind == "int":
            return st.integers(*bounds)
        if kind == "float":
            return st.floats(*bounds, allow_nan=False)
        return st.booleans()

    return st.fixed_dictionaries({}, optional={flag: value(kind, bounds) for flag, (_, kind, bounds) in _FLAGS.items()})


def test_any_subset_of_flags_replaces_exactly_those_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    """For any subset of flags: the loaded config is the defaults with exactly those fields replaced (a dict edit in the test)."""
    from hypothesis import given, settings

    for name in [name for name in os.environ if name.startswith("CDIMF_")]:
        monkeypatch.delenv(name)
    defaults = SimulateConfig().model_dump()

    @settings(max_examples=150, deadline=None)
    @given(_values())
    def check(chosen: dict) -> None:
        argv: list[str] = []
        expected = copy.deepcopy(defaults)
        for flag, value in chosen.items():
            path, kind, _ = _FLAGS[flag]
            argv += [flag if value else "--no-insecure"] if kind == "bool" else [flag, repr(value)]
            target = expected
            for part in path[:-1]:
                target = target[part]
            target[path[-1]] = value
        loaded = _load(SimulateConfig, argv)
        assert isinstance(loaded, SimulateConfig)
        assert loaded.model_dump() == expected

    check()


def test_help_shows_the_defaults_a_command_really_uses() -> None:
    """`cdimf simulate --help`: each flag's "(default: X)" is the value SimulateConfig() holds at its field (0.01, 1.0, 2 ...)."""
    from cdimf.cli import build_parser

    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    simulate = commands.choices["simulate"]
    default = SimulateConfig().model_dump()
    checked = 0
    for action in simulate._actions:
        if not action.dest.startswith("field__") or action.help is None or "(default: " not in action.help:
            continue
        value = default
        for part in action.dest.removeprefix("field__").split("__"):
            value = value[part]
        if value is None:
            continue  # the description says what an unset field means
        shown = str(value).lower() if isinstance(value, bool) else str(value)
        assert f"(default: {shown})" in action.help, (action.dest, action.help)
        checked += 1
    assert checked >= 20
    helped = " ".join(simulate.format_help().split())
    assert "--ials-alpha ALPHA weight of the all-pairs term pulling scores to 0 (default: 0.01)" in helped
    assert "(default: 2)" in helped.split("--min-domains MIN_DOMAINS")[2]
