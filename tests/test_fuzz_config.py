"""Property-based fuzzing of the config loader: any file is a config or a ConfigError naming the file, never another exception.

Three kinds of input: arbitrary bytes, arbitrary text, and TOML documents built from the models'
own field names (nested tables too) with values of any TOML type, so that validation, path
resolution and the table lookup see wrong types and values, not only parse errors.
"""

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from cdimf.common.config import AggregatorConfig, ConfigError, NodeConfig, TLSConfig, load_config
from tests.fuzz_tally import count

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))
# CI draws the same examples every run (derandomize); a budget set by FUZZ_EXAMPLES draws fresh ones
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize="FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
MODELS: list[type[BaseModel]] = [AggregatorConfig, NodeConfig]


def _field_names(model: type[BaseModel]) -> list[str]:
    """Dotted names of every field of `model` and of its nested models (tls.ca_file, run.admm.rho, ...)."""
    names = []
    for name, info in model.model_fields.items():
        names.append(name)
        for candidate in getattr(info.annotation, "__args__", (info.annotation,)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                names.extend(f"{name}.{inner}" for inner in _field_names(candidate))
    return names


def _toml_value(value: Any) -> str:
    """One TOML value (strings through JSON's escapes, which TOML's basic strings share)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value == math.inf else "-inf" if value == -math.inf else repr(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return json.dumps(value)


def _document(assignments: list[tuple[str, Any]]) -> str:
    """A TOML document setting each dotted key (dotted keys are TOML syntax; a clash is a parse error, fine too)."""
    return "".join(f"{'.'.join(json.dumps(part) for part in key.split('.'))} = {_toml_value(value)}\n" for key, value in assignments)


scalars = st.one_of(
    st.booleans(), st.integers(-(1 << 70), 1 << 70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30), st.sampled_from(["127.0.0.1:0", "127.0.0.1:7070", "", "..", "/", "sport", "identity", "l2", "csv"]),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3))


def _keys(model: type[BaseModel]) -> st.SearchStrategy[str]:
    """Field names of the model (and nested ones), and now and then a name it does not have."""
    return st.one_of(st.sampled_from(_field_names(model)), st.text("abcdefgh_.", min_size=1, max_size=12))


def _refused_naming(path: Path, model: type[BaseModel], kind: str, table: str | None = None) -> None:
    """Load `path`; a refusal must be a ConfigError that names it (every other exception fails)."""
    try:
        load_config(model, path, environ={}, table=table)
    except ConfigError as error:
        assert str(path) in str(error), f"the error does not name {path}: {error}"
        count(f"config: {kind}", "refused")
        return
    count(f"config: {kind}", "accepted")


@pytest.mark.parametrize("model", MODELS, ids=lambda model: model.__name__)
@FUZZ
@given(raw=st.binary(max_size=300))
def test_arbitrary_bytes_are_a_config_or_a_config_error_naming_the_file(tmp_path: Path, model: type[BaseModel], raw: bytes) -> None:
    """Binary garbage, invalid UTF-8 included."""
    path = tmp_path / "fuzzed.toml"
    path.write_bytes(raw)
    _refused_naming(path, model, "arbitrary bytes")


@pytest.mark.parametrize("model", MODELS, ids=lambda model: model.__name__)
@FUZZ
@given(text=st.text(max_size=300))
def test_arbitrary_text_is_a_config_or_a_config_error_naming_the_file(tmp_path: Path, model: type[BaseModel], text: str) -> None:
    """Any Unicode text (control characters, lone newlines, NULs)."""
    path = tmp_path / "fuzzed.toml"
    path.write_text(text, encoding="utf-8")
    _refused_naming(path, model, "arbitrary text")


@pytest.mark.parametrize("model", MODELS, ids=lambda model: model.__name__)
@FUZZ
@given(data=st.data())
def test_wrong_types_and_values_in_real_fields_are_config_errors_naming_the_file(
    tmp_path: Path, model: type[BaseModel], data: st.DataObject
) -> None:
    """TOML that parses, with the models' own keys set to values of any type: validation, not a traceback."""
    assignments = data.draw(st.lists(st.tuples(_keys(model), values), max_size=8))
    path = tmp_path / "fuzzed.toml"
    path.write_text(_document(assignments), encoding="utf-8")
    _refused_naming(path, model, "real fields, any values")
    _refused_naming(path, TLSConfig, "real fields, any values", table="tls")  # the [tls] table alone, as the CLI reads it


def test_a_file_that_is_not_utf8_is_named_with_the_byte(tmp_path: Path) -> None:
    """Invalid UTF-8 (tomllib decodes before parsing): ConfigError with the path and where the bad byte is."""
    path = tmp_path / "binary.toml"
    raw = b'listen = "127.0.0.1:0"\nstate_dir = "\xff\xfe"\n'
    path.write_bytes(raw)
    with pytest.raises(ConfigError, match="not UTF-8") as refused:
        load_config(AggregatorConfig, path, environ={})
    message = str(refused.value)
    assert message.startswith(f"{path}:2:"), message  # the bad byte sits on the second line
    assert f"offset {raw.index(0xFF)}" in message, message
